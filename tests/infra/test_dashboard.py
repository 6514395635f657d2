"""The Grafana dashboard: generated from the contract and the thresholds, committed file current, every
expression pointing at a metric the runtime declares or a DCGM field the exporter is configured with.

(The same check against a live server's /metrics runs in tests/e2e/test_prometheus_loop.py, which also
has a real Prometheus evaluate every panel's expression.)
"""

from __future__ import annotations

import json

import pytest

from infra.catalog.thresholds import Thresholds
from infra.observability import alerts, dashboard
from runtime import contract as c

SUFFIXES = {"counter": ("",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


def declared_names() -> set[str]:
    return {m.name + s for m in c.METRICS for s in SUFFIXES[m.type]}


def test_committed_dashboard_is_current() -> None:
    committed = json.loads(dashboard.DEFAULT_PATH.read_text())
    assert committed == dashboard.dashboard(), (
        "run `python -m infra.observability.dashboard` to regenerate docs/moe-fleet-dashboard.json"
    )


def test_every_expression_references_declared_or_dcgm_metrics() -> None:
    known = declared_names() | set(alerts.DCGM_METRICS)
    for expr in dashboard.expressions(dashboard.dashboard()):
        names = dashboard.metric_names(expr)
        assert names, expr
        assert names <= known, f"{sorted(names - known)} in {expr!r}"


def test_dashboard_covers_the_signals_on_call_needs() -> None:
    titles = [p["title"] for p in dashboard.dashboard()["panels"]]
    for wanted in (
        "Latency",
        "Throughput",
        "Queue",
        "KV pool",
        "GPU utilisation",
        "GPU memory",
        "Expert-load",
        "Accuracy",
        "Memory growth",
    ):
        assert any(wanted in title for title in titles), f"no panel about {wanted!r}: {titles}"
    board = dashboard.dashboard()
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)) and all(t["expr"] and t["legendFormat"] for t in panel["targets"])


@pytest.mark.parametrize("t", [Thresholds(), Thresholds(p99_latency_seconds=0.3, gpu_utilization_perc=75)])
def test_threshold_lines_follow_the_alert_thresholds(t: Thresholds) -> None:
    panels = {p["title"]: p for p in dashboard.dashboard(t)["panels"]}

    def line(title: str) -> float:
        return panels[title]["fieldConfig"]["defaults"]["thresholds"]["steps"][-1]["value"]

    assert line("Latency percentiles") == t.p99_latency_seconds
    assert line("GPU utilisation") == t.gpu_utilization_perc
    assert line("KV pool") == t.kv_cache_usage
    assert line("Memory growth") == t.memory_growth_bytes_per_hour


def test_metric_name_extraction() -> None:
    expr = (
        'sum by (le, pod) (rate(a_bucket{job="x", le=~"0.5|1"}[5m])) * 1e9 > bool b '
        'or on (instance) absent(up{job="y"}) unless max without (gpu) (c:recorded) offset 5m'
    )
    assert dashboard.metric_names(expr) == {"a_bucket", "b", "up", "c:recorded"}
    assert dashboard.resolve('rate(x[$__rate_interval]){n=~"$namespace"}') == 'rate(x[1m]){n=~".*"}'


def test_write_dashboard(tmp_path) -> None:
    path = dashboard.write_dashboard(tmp_path / "d.json", Thresholds(p99_latency_seconds=0.25))
    assert json.loads(path.read_text())["uid"] == dashboard.UID
