"""Missing, unknown or expired AWS credentials at every `moefleet` entry point that calls AWS (and the
init container's weights pull): one line naming the profile and the variables to set, exit 1 (an
external failure), never a traceback. Each command runs as a real subprocess with a scrubbed environment;
"expired" is a loopback endpoint answering every call the way AWS does for an expired session token."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from infra.catalog.environments import DEFAULT_ENVIRONMENTS_FILE, load_environments
from infra.catalog.exit_codes import ExitCode
from infra.catalog.outputs import representative_outputs

ROOT = Path(__file__).resolve().parents[2]
MODEL = ["--model", "m", "--revision", "r1", "--bucket", "b"]


def _commands(tmp: Path) -> dict[str, list[str]]:
    outputs = tmp / "outputs.json"
    dev = load_environments(DEFAULT_ENVIRONMENTS_FILE)["dev"]
    outputs.write_text(json.dumps({k: {"value": v} for k, v in representative_outputs(dev).items()}))
    (tmp / "ckpt").mkdir(exist_ok=True)
    (tmp / "ckpt" / "config.json").write_text("{}")
    cli = [sys.executable, "-m", "infra.cli"]
    return {
        "preflight": [*cli, "preflight", "{env}"],
        "status": [*cli, "status", "{env}", "--bucket", "b"],
        "weights verify": [*cli, "weights", "verify", "{env}", *MODEL],
        "weights upload": [*cli, "weights", "upload", "{env}", str(tmp / "ckpt"), *MODEL],
        "weights pull": [*cli, "weights", "pull", "{env}", "--dest", str(tmp / "hot"), *MODEL],
        "install": [*cli, "install", "{env}", "--outputs", str(outputs)],
        "init container": [
            sys.executable,
            "-m",
            "infra.ops.weights",
            "pull",
            "--bucket",
            "b",
            "--prefix",
            "models/m/r1/",
            "--dest",
            str(tmp / "hot2"),
            "--region",
            "us-east-1",
        ],
    }


def _scrubbed(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "MOEFLEET_EMULATOR_ENDPOINT"}
    env |= {
        "PYTHONPATH": str(ROOT),
        "HOME": str(tmp),  # no ~/.aws
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "no-credentials"),
        "AWS_CONFIG_FILE": str(tmp / "no-config"),
        "AWS_EC2_METADATA_DISABLED": "true",  # no instance role to fall back on
    }
    return env | extra


def _run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def _assert_one_line(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    """The error is one line (the last; progress lines may come before it), with no traceback."""
    err = proc.stderr.strip()
    assert proc.returncode == ExitCode.FAILED, f"exit {proc.returncode}: {proc.stdout}{proc.stderr}"
    assert "Traceback" not in err and err, err
    last = err.splitlines()[-1]
    for needle in needles:
        assert needle in last, err


@pytest.mark.parametrize("entry", list(_commands(Path("/"))))
def test_missing_credentials(entry: str, tmp_path: Path) -> None:
    cmd = [a.replace("{env}", "dev") for a in _commands(tmp_path)[entry]]
    proc = _run(cmd, _scrubbed(tmp_path))
    _assert_one_line(proc, "AWS credentials missing", "AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def test_unknown_profile_is_named(tmp_path: Path) -> None:
    cmd = [a.replace("{env}", "dev") for a in _commands(tmp_path)["weights verify"]]
    proc = _run(cmd, _scrubbed(tmp_path, AWS_PROFILE="ghost"))
    _assert_one_line(proc, "profile 'ghost' (AWS_PROFILE)", "aws sso login")


class _Expired(BaseHTTPRequestHandler):
    """Every request: 400 ExpiredToken, as S3 and STS answer a session token past its expiry."""

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        body = (
            b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>ExpiredToken</Code>"
            b"<Message>The provided token has expired.</Message></Error>"
        )
        self.send_response(400)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def expired_endpoint() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Expired)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize("entry", ["weights verify", "weights upload", "weights pull", "init container"])
def test_expired_credentials(entry: str, tmp_path: Path, expired_endpoint: str) -> None:
    cmd = [a.replace("{env}", "local") for a in _commands(tmp_path)[entry]]
    cmd += (
        ["--endpoint-url", expired_endpoint] if entry == "init container" else ["--emulator-endpoint", expired_endpoint]
    )
    proc = _run(cmd, _scrubbed(tmp_path))
    _assert_one_line(proc, "AWS credentials expired or rejected (ExpiredToken)", "AWS_SESSION_TOKEN")
