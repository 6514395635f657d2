"""Child processes the demo owns (the runtime, Prometheus): start, wait until they answer, stop for sure.

A process that dies during start-up is reported with the tail of its log, so the failed step says why.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from runtime import contract


class ServiceError(RuntimeError):
    pass


class ManagedProcess:
    """One child process with its log file; `stop()` is safe to call any number of times."""

    def __init__(self, name: str, command: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.command = command
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(self.env or {})},
                start_new_session=True,  # Ctrl-C in the terminal reaches the demo, which stops us in order
            )

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait_until_answers(self, url: str, timeout: float) -> float:
        """Poll `url` until it returns 200; returns the seconds it took."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise ServiceError(
                    f"{self.name} exited with {code} during start-up; log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return time.monotonic() - started
            except OSError:
                pass
            time.sleep(0.3)
        raise ServiceError(
            f"{self.name} did not answer {url} within {timeout:.0f} s; log {self.log_path}:\n{self.log_tail()}"
        )

    def stop(self, grace: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def runtime_process(
    model_dir: Path, port: int, log_path: Path, model_name: str, env: dict[str, str] | None = None, api_key: str = ""
) -> ManagedProcess:
    """`moe-runtime serve` on loopback, CPU. `env` carries the environment's runtime settings (accuracy
    baseline, risk task) and the prediction table, by the variable names the pods get them under; the API
    key comes from the environment too, as the pod gets it from its Secret."""
    return ManagedProcess(
        "the runtime",
        [
            sys.executable,
            "-m",
            "runtime.cli",
            "serve",
            "--model",
            str(model_dir),
            "--served-model-name",
            model_name,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--device",
            "cpu",
        ],
        log_path,
        env={**(env or {}), **({contract.ENV_API_KEYS: api_key} if api_key else {})},
    )


def prometheus_process(config: Path, data_dir: Path, port: int, log_path: Path) -> ManagedProcess:
    return ManagedProcess(
        "Prometheus",
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={data_dir}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--web.enable-lifecycle",
            "--log.level=warn",
        ],
        log_path,
    )


def runtime_ready_url(port: int) -> str:
    return f"http://127.0.0.1:{port}{contract.READY_PATH}"
