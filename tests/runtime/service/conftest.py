"""Real servers for the service tests: ``moe-runtime serve`` in a subprocess on a free loopback port,
over the session's tiny checkpoint. Modules share one server where their settings agree."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from infra.embedded.emulator.process import free_port
from runtime import contract as c

REPO = Path(__file__).resolve().parents[3]
#: The default risk task shipped in the repository (the source document's fraud prompt).
FRAUD_TASK = REPO / "tasks" / "fraud.toml"


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log: Path
    api_keys: tuple[str, ...] = ()  # keys the server accepts (empty: an open server)

    @property
    def auth(self) -> dict[str, str]:
        """Headers carrying the first accepted key."""
        return {"Authorization": f"Bearer {self.api_keys[0]}"} if self.api_keys else {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def metrics(self) -> dict[str, float]:
        """Flat ``{'name{l="v"}': value}`` map of the exposition, without the ``model_name`` label every
        series carries (one server serves one model)."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        out: dict[str, float] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()) if k != c.LABEL_MODEL_NAME)
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    def wait_metric(self, name: str, pred: Callable[[float], bool], timeout: float = 10.0) -> float:
        deadline = time.monotonic() + timeout
        while True:
            v = self.metrics().get(name)
            if v is not None and pred(v):
                return v
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} = {v} did not reach the expected value in {timeout} s")
            time.sleep(0.1)

    def logs(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def run_server(model: Path, *args: str, log_dir: Path, env: dict | None = None) -> Iterator[Server]:
    port = free_port()
    log = log_dir / f"server-{port}.log"
    cmd = [sys.executable, "-m", "runtime.cli", "serve", "--model", str(model), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--log-level", "warning", "--threads", "1", *args]
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    srv = Server(proc, port, log)
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{srv.logs()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(srv.url + "/readyz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready in 90 s:\n{srv.logs()}")
            time.sleep(0.1)
        yield srv
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="session")
def server_factory(v2_path: Path, tmp_path_factory: pytest.TempPathFactory):
    """``with server_factory("--max-queue", "4") as srv:`` - a fresh server with extra flags."""
    log_dir = tmp_path_factory.mktemp("server-logs")

    def start(*args: str, env: dict | None = None):
        return run_server(v2_path, *args, log_dir=log_dir, env=env)

    return start


@pytest.fixture(scope="session")
def shared_server(server_factory) -> Iterator[Server]:
    """The default server most modules use (baseline accuracy configured for the risk tests). Its engine runs
    in a process of its own, as on a GPU; the servers the other fixtures start keep it in-process, so both
    paths serve the same tests."""
    args = ("--accuracy-baseline", "0.9", "--max-queue", "256", "--risk-task", str(FRAUD_TASK))
    with server_factory(*args, "--engine-process", "on") as srv:
        yield srv


@pytest.fixture(scope="session")
def keyed_server(server_factory, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server that requires an API key: two valid keys, one from $MOE_API_KEYS and one from a key file,
    as during a rotation."""
    from runtime import contract as c

    env_key, file_key = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    key_file = tmp_path_factory.mktemp("keys") / "api-keys"
    key_file.write_text(f"# rotated in\n{file_key}\n")
    with server_factory(
        "--api-key-file", str(key_file), "--risk-task", str(FRAUD_TASK), env={c.ENV_API_KEYS: env_key}
    ) as srv:
        srv.api_keys = (env_key, file_key)
        yield srv
