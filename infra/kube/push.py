"""`make push ENV=<env>`: log in to the environment's ECR repository and push the runtime image.

The repository comes from the stack output `ecr_repository_url` (or `--outputs FILE`); the login from
boto3's `ecr.get_authorization_token` (a base64 `AWS:<password>` valid for 12 hours), handed to
`docker login --password-stdin` so it never appears in a process list.
"""

from __future__ import annotations

import argparse
import base64
import shutil
import subprocess
import sys
from pathlib import Path


class PushError(RuntimeError):
    def __init__(self, message: str, code: int = 1) -> None:
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
        raise PushError("no docker CLI on the PATH: install Docker (engine + buildx) to build and push images", 2)
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        raise PushError(
            "the docker CLI is here but no Docker engine answers (`docker info` failed): start dockerd or set "
            "DOCKER_HOST to a reachable engine",
            2,
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.kube.push", description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", required=True, help="environment whose ECR repository receives the image")
    parser.add_argument("--tag", required=True, help="image tag (make: git describe --tags --always --dirty)")
    parser.add_argument("--image", default="moe-runtime", help="local image name (default: moe-runtime)")
    parser.add_argument("--outputs", type=Path, help="stack outputs JSON instead of terraform output")
    args = parser.parse_args(argv)
    from infra.kube.outputs import OutputsError, StackOutputs
    from infra.ops.outputs import OutputsUnavailable, default_stack_dir, stack_outputs

    try:
        if args.outputs:
            outputs = StackOutputs.from_file(args.outputs)
        else:
            outputs = StackOutputs.from_mapping(stack_outputs(default_stack_dir(args.env)), f"outputs of {args.env}")
        remote = push(f"{args.image}:{args.tag}", outputs.ecr_repository_url, args.tag, outputs.region)
    except (OutputsError, OutputsUnavailable) as err:
        print(f"push: {err}", file=sys.stderr)
        return 2
    except PushError as err:
        print(f"push: {err}", file=sys.stderr)
        return err.code
    print(f"push: {remote}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
