"""`make push`: ECR credentials from the embedded AWS (moto), and the docker steps, in order, with the
password on stdin. Docker itself is a recording stand-in script: no engine runs here."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from infra.cli.push import main
from infra.kube.push import PushError, docker_ready, ecr_credentials, registry_host


@pytest.mark.moto
def test_ecr_credentials_from_the_authorization_token(emulator: str):
    user, password, endpoint = ecr_credentials("us-east-1", emulator)
    assert user == "AWS" and password and endpoint.startswith("https://")


def _fake_docker(tmp_path: Path, info_rc: int) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "docker.log"
    script = bin_dir / "docker"
    script.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = info ]; then exit {info_rc}; fi\n'
        f'stdin=""; if [ "$1" = login ]; then stdin=$(cat); fi\n'
        f'echo "$* | $stdin" >> {log}\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def test_clear_errors_without_docker(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(PushError, match="no docker CLI"):
        docker_ready()
    monkeypatch.setenv("PATH", f"{_fake_docker(tmp_path, info_rc=1)}:{os.environ['PATH']}")
    with pytest.raises(PushError, match="no Docker engine answers"):
        docker_ready()


@pytest.mark.moto
def test_push_logs_in_tags_and_pushes(emulator: str, tmp_path: Path, monkeypatch, environments):
    from infra.catalog.outputs import representative_outputs

    monkeypatch.setenv("PATH", f"{_fake_docker(tmp_path, info_rc=0)}:{os.environ['PATH']}")
    monkeypatch.setattr(
        "infra.kube.push.ecr_credentials", lambda region, endpoint=None: ecr_credentials(region, emulator)
    )
    outputs = tmp_path / "outputs.json"
    values = representative_outputs(environments["dev"])
    outputs.write_text(json.dumps(values))
    assert main(["--env", "dev", "--tag", "v3", "--outputs", str(outputs)]) == 0
    lines = (tmp_path / "docker.log").read_text().splitlines()
    url = values["ecr_repository_url"]
    assert lines[0].startswith(f"login --username AWS --password-stdin {registry_host(url)} | ")
    assert lines[0].split(" | ")[1]  # the password came on stdin, not in the arguments
    assert lines[1:] == [f"tag moe-runtime:v3 {url}:v3 | ", f"push {url}:v3 | "]
