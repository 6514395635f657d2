"""The two `make demo` runs the suite checks (`--once`, and staying up until Ctrl-C), started in the
background at the beginning of the session (tests/conftest.py) so their waits overlap the other tests."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.embedded.emulator.process import free_port, port_in_use
from infra.terraform.runner import PROJECT_ROOT


def port_args() -> tuple[list[str], list[int]]:
    ports = [free_port(), free_port(), free_port()]
    return ["--port", str(ports[0]), "--runtime-port", str(ports[1]), "--prometheus-port", str(ports[2])], ports


@dataclass
class DemoRun:
    """One `python -m infra.embedded.demo` process writing to a log file (never a pipe nobody reads yet)."""

    proc: subprocess.Popen[bytes]
    log: Path
    workdir: Path
    ports: list[int]

    @classmethod
    def start(cls, workdir: Path, *extra: str) -> DemoRun:
        args, ports = port_args()
        log = workdir.parent / f"{workdir.name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "infra.embedded.demo", *extra, *args, "--workdir", str(workdir)],
                cwd=PROJECT_ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return cls(proc, log, workdir, ports)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_line(self, text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.output()
            if text in out:
                return out
            if self.proc.poll() is not None:
                raise AssertionError(f"demo exited with {self.proc.returncode} before {text!r}:\n{out[-4000:]}")
            time.sleep(1)
        raise AssertionError(f"no {text!r} within {timeout:.0f} s:\n{self.output()[-4000:]}")

    def explore_then_interrupt(self) -> dict[str, Any]:
        """What a user does once the demo is up: look at the API and Prometheus, then press Ctrl-C.
        Runs in a background thread from the start of the session; the test asserts on what it saw."""
        seen: dict[str, Any] = {"shown": self.wait_for_line("Press Ctrl-C", timeout=1200)}
        seen["listening"] = [port_in_use(p) for p in self.ports]
        # the summary prints the run's generated API key, as a user would copy it
        key = re.search(r"runtime API key\s*:?\s+(\S+)", seen["shown"]).group(1)
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.ports[1]}/v1/models", headers={"Authorization": f"Bearer {key}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            seen["models"] = [m["id"] for m in json.load(response)["data"]]
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ports[2]}/api/v1/targets", timeout=10) as response:
            seen["targets"] = [t["health"] for t in json.load(response)["data"]["activeTargets"]]
        self.proc.send_signal(signal.SIGINT)
        seen["returncode"] = self.proc.wait(timeout=600)
        seen["rest"] = self.output()[len(seen["shown"]) :]
        seen["still_listening"] = [p for p in self.ports if port_in_use(p)]
        return seen

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # the demo tears down on SIGTERM like on Ctrl-C
            self.proc.wait(timeout=600)
