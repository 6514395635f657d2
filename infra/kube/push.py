"""Push the runtime image to an environment's ECR repository (`make push ENV=<env>`, `infra.cli.push`).

The repository comes from the stack output `ecr_repository_url`; the login from boto3's
`ecr.get_authorization_token` (a base64 `AWS:<password>` valid for 12 hours), handed to
`docker login --password-stdin` so it never appears in a process list.
"""

from __future__ import annotations

import base64
import shutil
import subprocess

from infra.catalog.exit_codes import ExitCode


class PushError(RuntimeError):
    """A push step failed; `code` is the exit status (a missing docker is bad input, the rest failures)."""

    def __init__(self, message: str, code: int = ExitCode.FAILED) -> None:
        super().__init__(message)
        self.code = code


def registry_host(repository_url: str) -> str:
    return repository_url.split("/", 1)[0]


def ecr_credentials(region: str, endpoint_url: str | None = None) -> tuple[str, str, str]:
    """(username, password, proxy endpoint) for the account's registry in `region`."""
    from infra.ops.aws import make_client

    client = make_client("ecr", region, endpoint_url)
    data = client.get_authorization_token()["authorizationData"][0]
    user, _, password = base64.b64decode(data["authorizationToken"]).decode().partition(":")
    if not password:
        raise PushError("ECR returned an authorization token without a password")
    return user, password, data["proxyEndpoint"]


def docker_ready() -> None:
    if shutil.which("docker") is None:
        raise PushError(
            "no docker CLI on the PATH: install Docker (engine + buildx) to build and push images", ExitCode.BAD_INPUT
        )
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        raise PushError(
            "the docker CLI is here but no Docker engine answers (`docker info` failed): start dockerd or set "
            "DOCKER_HOST to a reachable engine",
            ExitCode.BAD_INPUT,
        )


def push(local_image: str, repository_url: str, tag: str, region: str, endpoint_url: str | None = None) -> str:
    docker_ready()
    user, password, _ = ecr_credentials(region, endpoint_url)
    host = registry_host(repository_url)
    login = subprocess.run(["docker", "login", "--username", user, "--password-stdin", host], input=password, text=True)
    if login.returncode != 0:
        raise PushError(f"docker login {host} failed")
    remote = f"{repository_url}:{tag}"
    for cmd in (["docker", "tag", local_image, remote], ["docker", "push", remote]):
        if subprocess.run(cmd).returncode != 0:
            raise PushError(f"{' '.join(cmd)} failed")
    return remote
