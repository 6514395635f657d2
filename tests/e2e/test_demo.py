"""The README's main command, end to end: `python -m infra.demo --once` (what `make demo ARGS=--once` runs)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from infra.emulator.process import free_port, port_in_use
from infra.terraform import PROJECT_ROOT


def demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "infra.demo", *args],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.slow
@pytest.mark.terraform
def test_demo_once_deploys_and_tears_down(tmp_path: Path) -> None:
    port = free_port()
    proc = demo("--once", "--port", str(port), "--workdir", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "cluster_name" in proc.stdout and "moefleet-local" in proc.stdout
    assert "stack destroyed" in proc.stdout and "nothing left running" in proc.stdout
    assert not port_in_use(port), "the emulator must be stopped"


def test_demo_names_the_failed_step_when_the_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = demo("--once", "--port", str(port), "--workdir", str(tmp_path))
    assert proc.returncode == 1
    assert f"step 'start emulated AWS' failed: port {port} on 127.0.0.1 is already in use" in proc.stderr


@pytest.mark.slow
@pytest.mark.terraform
def test_demo_stays_up_until_interrupted_then_tears_down(tmp_path: Path) -> None:
    """Without --once the demo waits; Ctrl-C (SIGINT) destroys the stack and stops the emulator."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "infra.demo", "--port", str(port), "--workdir", str(tmp_path)],
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = []
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if "Press Ctrl-C" in line:
                break
        assert port_in_use(port), "".join(lines)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, rest
    assert "stack destroyed" in rest and "nothing left running" in rest
    assert not port_in_use(port)
