"""The soak benchmark's short form: steady load for ~20 s through every stateful route, resident memory
sampled, growth fitted and compared with the memory-growth alert's threshold. The full 30-minute run
(`python -m benchmarks.soak`) is in docs/benchmarks.md."""

from __future__ import annotations

import argparse

import pytest

from benchmarks import soak
from infra.catalog.thresholds import Thresholds


def test_slope_fit_and_verdict_follow_the_alert_threshold():
    gb = 1e9
    assert abs(soak.slope_per_hour([(0, 0), (1800, int(0.5 * gb)), (3600, int(gb))]) - gb) < 1
    flat = soak.SoakResult(1, 1, samples=[(t, 400_000_000) for t in range(0, 600, 60)])
    assert flat.slope == 0 and not flat.leaking
    leak = soak.SoakResult(1, 1, samples=[(t, 400_000_000 + int(t / 3600 * 1.2 * gb)) for t in range(0, 600, 60)])
    assert leak.leaking and leak.threshold_bytes_per_hour == Thresholds().memory_growth_bytes_per_hour


@pytest.mark.slow  # its own server start plus ~20 s of load
def test_short_soak_serves_every_request_and_stays_under_the_threshold(v2_path):
    args = argparse.Namespace(
        model=str(v2_path), minutes=0.25, sample=5.0, warmup=3.0, clients=2, pause=0.05, threads=1
    )
    res = soak.run(args)
    assert res.requests > 20 and res.errors == 0, res.summary()
    assert len(res.samples) >= 3
    assert not res.leaking, soak.table(res)
