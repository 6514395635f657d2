"""Start and stop the embedded AWS as a child process (the demo and the test suite share this)."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


class EmulatorError(RuntimeError):
    pass


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port() -> int:
    """A free loopback port *below* the ephemeral range. A port the OS hands out for `bind(0)` comes from
    that range, where any outgoing connection (terraform → emulator, boto3, …) may take it before a server
    that was told to use it starts; picking below the range avoids that race."""
    low = _ephemeral_range()[0]
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 20000), low)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # a crowded machine: let the OS choose
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


class Emulator:
    """`with Emulator(port) as url:` runs moto + our patches on 127.0.0.1 for the block's duration."""

    def __init__(self, port: int | None = None, log_path: Path | None = None, startup_timeout: float = 60) -> None:
        self.port = port or free_port()
        self.log_path = log_path
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> str:
        if port_in_use(self.port):
            raise EmulatorError(f"port {self.port} on 127.0.0.1 is already in use; stop what holds it or pick another")
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115 - owned by proc
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "infra.embedded.emulator.server", "--port", str(self.port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parents[3],  # the project root: `-m infra...` resolves there
            env={**os.environ, "MOTO_IAM_LOAD_MANAGED_POLICIES": "true"},
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EmulatorError(
                    f"emulator exited with {self.proc.returncode} during start-up (log: {self.log_path})"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1):
                    return self.url
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise EmulatorError(f"emulator did not answer on {self.url} within {self.startup_timeout:.0f} s")

    def reset(self) -> None:
        req = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(req, timeout=10):
            pass

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
