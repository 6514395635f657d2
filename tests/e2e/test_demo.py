"""The README's main command, end to end: `python -m infra.demo --once` (what `make demo ARGS=--once` runs)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
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


def port_args() -> tuple[list[str], list[int]]:
    ports = [free_port(), free_port(), free_port()]
    return ["--port", str(ports[0]), "--runtime-port", str(ports[1]), "--prometheus-port", str(ports[2])], ports


def test_demo_names_the_failed_step_when_the_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = demo("--once", "--port", str(free_port()), "--runtime-port", str(port), "--workdir", str(tmp_path))
    assert proc.returncode == 1
    assert f"step 'check ports' failed: port {port} on 127.0.0.1 (runtime) is already in use" in proc.stderr
    assert not (tmp_path / "emulator.log").exists(), "nothing may start when a port is taken"


def test_demo_names_a_missing_tool(tmp_path: Path) -> None:
    """PATH with terraform but without Prometheus: the demo says which tool and where it comes from."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "terraform").symlink_to(shutil.which("terraform"))  # type: ignore[arg-type]
    proc = subprocess.run(
        [sys.executable, "-m", "infra.demo", "--once", "--workdir", str(tmp_path / "w")],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PATH": str(bin_dir)},
    )
    assert proc.returncode == 1
    assert "step 'check tools' failed: not on PATH: prometheus (Debian's prometheus package" in proc.stderr


@dataclass
class OnceDemo:
    proc: subprocess.Popen[bytes]
    log: Path
    workdir: Path
    ports: list[int]


@pytest.fixture(scope="module")
def once_demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OnceDemo]:
    """`--once` started in the background as soon as a test asks for it, so that its waits (terraform's
    polling, the runtime's start) overlap the stay-up test's instead of doubling the suite's time."""
    workdir = tmp_path_factory.mktemp("demo-once")
    args, ports = port_args()
    log = workdir.parent / f"{workdir.name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "infra.demo", "--once", *args, "--workdir", str(workdir)],
            cwd=PROJECT_ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield OnceDemo(proc, log, workdir, ports)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=600)


@pytest.mark.slow
@pytest.mark.terraform
def test_demo_stays_up_until_interrupted_then_tears_down(tmp_path: Path, once_demo: OnceDemo) -> None:
    """Without --once the demo waits; Ctrl-C (SIGINT) destroys the stack and stops every process.
    (Asks for `once_demo` only to start it: the two run side by side.)"""
    args, ports = port_args()
    proc = subprocess.Popen(
        [sys.executable, "-m", "infra.demo", *args, "--workdir", str(tmp_path)],
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
        # Explore like a user would: the API, the metrics and Prometheus answer while the demo waits.
        assert all(port_in_use(p) for p in ports), "".join(lines)
        with urllib.request.urlopen(f"http://127.0.0.1:{ports[1]}/v1/models", timeout=10) as response:
            assert json.load(response)["data"][0]["id"] == "tiny-deepseek"
        with urllib.request.urlopen(f"http://127.0.0.1:{ports[2]}/api/v1/targets", timeout=10) as response:
            targets = json.load(response)["data"]["activeTargets"]
        assert [t["health"] for t in targets] == ["up"]
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, rest
    assert "stack destroyed" in rest and "nothing left running" in rest
    assert not [p for p in ports if port_in_use(p)]


@pytest.mark.slow
@pytest.mark.terraform
def test_demo_once_deploys_serves_monitors_and_tears_down(once_demo: OnceDemo) -> None:
    once_demo.proc.wait(timeout=900)
    out, tmp_path, ports = once_demo.log.read_text(), once_demo.workdir, once_demo.ports
    assert once_demo.proc.returncode == 0, out[-6000:]
    # Deployed, weights through the cold tier into the hot tier, served, scraped, alerts evaluated.
    assert "cluster_name" in out and "moefleet-local" in out and "models_bucket" in out
    assert "SHA-256 manifest written last" in out and "verified against the manifest" in out
    assert (tmp_path / "hot-tier" / "tiny-deepseek" / "demo" / "model.safetensors.index.json").exists()
    assert "Sample answers" in out and "client P50 / P99" in out
    prom_line = next(line for line in out.splitlines() if "Prometheus P50 / P99" in line)
    assert "n/a" not in prom_line, prom_line
    assert re.search(r"requests Prometheus saw\s+(1[6-9]|[2-9]\d)", out), "all 16 chats (and warm-up) scraped"
    assert re.search(r"MoeRuntimeMetricsMissing\s+inactive", out), "the runtime is scraped, so not missing"
    assert re.search(r"MoeP99LatencyHigh\s+(inactive|pending)", out)
    # Torn down in reverse order, nothing left listening.
    for message in ("Prometheus stopped", "runtime stopped", "stack destroyed", "emulated AWS stopped"):
        assert message in out
    assert out.index("Prometheus stopped") < out.index("stack destroyed") < out.index("emulated AWS stopped")
    assert "nothing left running" in out
    assert not [p for p in ports if port_in_use(p)], "every port must be free again"
