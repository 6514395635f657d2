"""The README's main command, end to end: `python -m infra.embedded.demo --once` (what `make demo ARGS=--once` runs)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from infra.embedded.emulator.process import free_port, port_in_use
from infra.terraform.runner import PROJECT_ROOT
from tests.e2e.demo_runs import DemoRun


def demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "infra.embedded.demo", *args],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )


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
        [sys.executable, "-m", "infra.embedded.demo", "--once", "--workdir", str(tmp_path / "w")],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PATH": str(bin_dir)},
    )
    assert proc.returncode == 1
    assert "step 'check tools' failed: not on PATH: prometheus (Debian's prometheus package" in proc.stderr


@pytest.mark.slow
@pytest.mark.terraform
def test_demo_stays_up_until_interrupted_then_tears_down(stay_up_demo: Future[dict[str, Any]]) -> None:
    """Without --once the demo waits; the API and Prometheus answer meanwhile; Ctrl-C (SIGINT) destroys
    the stack and stops every process."""
    seen = stay_up_demo.result()
    assert all(seen["listening"]), seen["shown"][-3000:]
    assert seen["models"] == ["tiny-deepseek"]
    assert seen["targets"] == ["up"], "Prometheus scrapes the runtime"
    assert seen["returncode"] == 0, seen["rest"][-3000:]
    assert "stack destroyed" in seen["rest"] and "nothing left running" in seen["rest"]
    assert not seen["still_listening"]


@pytest.mark.slow
@pytest.mark.terraform
def test_demo_once_deploys_serves_monitors_and_tears_down(once_demo: DemoRun) -> None:
    once_demo.proc.wait(timeout=900)
    out, tmp_path, ports = once_demo.output(), once_demo.workdir, once_demo.ports
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
    # The risk records went through the DynamoDB code into the stack's table on the emulated AWS.
    assert re.search(r"labelled records in DynamoDB\s+20 \(moefleet-local-risk-predictions\)", out), out[-3000:]
    assert re.search(r"MoeP99LatencyHigh\s+(inactive|pending)", out)
    # A review of its own run: tokens, P99 and cost per million tokens from Prometheus, sparsity from the
    # tiny checkpoint's config; no GPUs on a CPU run, so tokens/s per GPU is "no data".
    headline = next(line for line in out.splitlines() if "compute saved by sparsity" in line)
    assert re.search(r"tokens [1-9][\d,]* ·", headline) and "tokens/s/GPU no data" in headline, headline
    assert re.search(r"P99 \d+ ms", headline) and re.search(r"per million tokens \$[\d,.]+", headline), headline
    review = tmp_path / "review"
    assert "data:image/png;base64," in (review / "review.html").read_text()
    assert json.loads((review / "review.json").read_text())["headline"]["tokens"] > 0
    # Torn down in reverse order, nothing left listening.
    for message in ("Prometheus stopped", "runtime stopped", "stack destroyed", "emulated AWS stopped"):
        assert message in out
    assert out.index("Prometheus stopped") < out.index("stack destroyed") < out.index("emulated AWS stopped")
    assert "nothing left running" in out
    assert not [p for p in ports if port_in_use(p)], "every port must be free again"
