"""benchmarks/serving_gpu.py gets one shot on a GPU: its ``--cpu-smoke`` mode runs a level over real HTTP here
(a tiny model, the engine in its own process), and what the server saw of it must square with what the
client measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def test_serving_benchmark_level_runs_on_the_cpu_and_the_server_side_squares(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "benchmarks.serving_gpu", "--cpu-smoke", "--levels", "4", "--skip", "small", "engine"]
    res = subprocess.run(
        [*cmd, "--out", str(tmp_path), "--serve-args", "--engine-process on"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "What the server saw of each level" in res.stdout
    level = json.loads((tmp_path / "results.json").read_text())["levels"]["4"]
    assert level["tokens"] == 4 * 8 and level["steps"] >= 8  # 8 new tokens each: at least 8 steps
    # the server's clock starts when the request arrives and stops when the token is sampled: inside the client's
    assert 0 < level["server_ttft_ms"] <= level["ttft_mean_ms"]
    assert abs(level["server_queue_ms"] + level["server_prefill_ms"] - level["server_ttft_ms"]) < 1e-3
