"""Real Prometheus in the loop: the Debian ``prometheus`` binary scrapes a running ``moe-runtime serve``
with a config and rules rendered by infra.observability.prometheus_config / infra.observability.alerts.

- Prometheus's P99 (``histogram_quantile`` over the runtime's latency histogram) agrees with the P99 the
  clients measured, within the histogram's bucket resolution.
- Every rule loads and evaluates without error; every dashboard expression is valid PromQL there.
- Stopping the runtime turns ``MoeRuntimeMetricsMissing`` pending/firing (``for:`` shortened to 2 s
  through a Thresholds override, so the test takes seconds, not minutes).
- Every metric the dashboard and the rules reference is in the live ``/metrics`` (or is a DCGM field).
"""

from __future__ import annotations

import bisect
import contextlib
import math
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from infra.catalog.thresholds import Thresholds
from infra.observability import alerts, dashboard, prometheus_config, recording
from infra.observability.alerts import alert_rules
from runtime import contract as c
from tests.e2e.load_client import N_REQUESTS, measured_in_own_process
from tests.runtime.service.conftest import Server, free_port, run_server

#: The module's server takes ~20-30 s to start on the shared 2-core box; every test here shares it.
pytestmark = pytest.mark.slow

MISSING = "MoeRuntimeMetricsMissing"


@pytest.fixture(scope="module")
def runtime_server(tmp_path_factory: pytest.TempPathFactory, tiny_v2: Path) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("prom-loop")
    with run_server(tiny_v2, "--max-queue", "256", "--accuracy-baseline", "0.9", log_dir=root) as srv:
        yield srv


def exposed_names(text: str) -> set[str]:
    """Sample names in an exposition, plus the sample names of families that have no samples yet."""
    names: set[str] = set()
    for fam in text_string_to_metric_families(text):
        names |= {s.name for s in fam.samples}
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}.get(fam.type, ("",))
        names |= {fam.name + s for s in suffixes}
    return names


def test_dashboard_and_rules_reference_only_exposed_metrics(runtime_server: Server) -> None:
    live = exposed_names(httpx.get(runtime_server.url + c.METRICS_PATH, timeout=10).text)
    known = live | set(alerts.DCGM_METRICS) | {"up"}
    exprs = dashboard.expressions(dashboard.dashboard()) + [r.expr for r in alert_rules(Thresholds())]
    exprs += [r.expr for r in recording.recording_rules()]  # the review's series, too
    for expr in exprs:
        names = dashboard.metric_names(expr)
        assert names, f"no metric found in {expr!r}"
        assert names <= known, f"{sorted(names - known)} in {expr!r} is neither exposed by the runtime nor a DCGM field"
    assert c.QUEUE_CAPACITY.name in live and c.E2E_LATENCY.name + "_bucket" in live


def p99_nearest_rank(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[math.ceil(0.99 * len(ordered)) - 1]


class Prometheus:
    def __init__(self, workdir: Path, config: Path) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("prometheus is not on the PATH: run scripts/setup.sh (installs Debian's prometheus package)")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "prometheus.log"
        cmd = [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        with self.log.open("w") as fh:
            self.proc = subprocess.Popen(cmd, cwd=workdir, stdout=fh, stderr=subprocess.STDOUT)
        self.wait(lambda: httpx.get(self.url + "/-/ready", timeout=2).status_code == 200, 30, "ready")

    def wait(self, pred, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n{self.log.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                got = pred()
                if got:
                    return got
            if time.monotonic() > deadline:
                raise AssertionError(f"prometheus: not {what} within {timeout} s\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)

    def query(self, expr: str) -> list[dict]:
        r = httpx.get(self.url + "/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        assert body["status"] == "success", f"{expr!r}: {body}"
        return body["data"]["result"]

    def scalar(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def alert_state(self, name: str) -> str | None:
        body = httpx.get(self.url + "/api/v1/alerts", timeout=10).json()
        states = [a["state"] for a in body["data"]["alerts"] if a["labels"]["alertname"] == name]
        return states[0] if states else None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def bucket_of(value: float) -> tuple[float, float]:
    """The latency bucket (lower, upper] holding ``value``."""
    bounds = [0.0, *c.E2E_LATENCY.buckets, math.inf]
    i = bisect.bisect_left(bounds, value)
    return bounds[max(i - 1, 0)], bounds[min(i, len(bounds) - 1)]


def test_prometheus_scrapes_runtime_agrees_on_p99_and_alerts_when_it_stops(
    runtime_server: Server, tmp_path: Path
) -> None:
    t = Thresholds().with_overrides({"metrics_missing_for": "2s"})
    rules = alert_rules(t, gpu_exporter=False)  # no DCGM exporter on this machine
    config = prometheus_config.write_local(
        tmp_path,
        [f"127.0.0.1:{runtime_server.port}"],
        alerts.rules_yaml(rules),
        scrape_interval="1s",
        evaluation_interval="1s",
    )
    check = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr

    prom = Prometheus(tmp_path, config)
    try:
        up = f'up{{job="{alerts.RUNTIME_JOB}"}}'
        prom.wait(lambda: prom.scalar(up) == 1.0, 20, "scraping the runtime")
        model = httpx.get(runtime_server.url + c.MODELS_PATH, timeout=10).json()["data"][0]["id"]

        started = time.monotonic()
        client = measured_in_own_process(runtime_server.url, model)
        took = time.monotonic() - started
        served = runtime_server.metrics()[f"{c.E2E_LATENCY.name}_count"]
        count = f"sum({c.E2E_LATENCY.name}_count)"
        prom.wait(lambda: prom.scalar(count) == served, 10, f"seeing all {served:.0f} observations")

        # All observations since the server started (the load plus one warm-up request).
        total = prom.scalar(f"histogram_quantile(0.99, sum by (le) ({c.E2E_LATENCY.name}_bucket))")
        # As the alert computes it: a rate over a window that covers the load.
        window = f"{math.ceil(took) + 5}s"
        rated = prom.scalar(f"histogram_quantile(0.99, sum by (le) (rate({c.E2E_LATENCY.name}_bucket[{window}])))")
        client_p99 = p99_nearest_rank(client)
        assert total is not None and rated is not None
        lo, hi = bucket_of(total)
        # Tolerance: histogram_quantile only knows which bucket the 99th percentile falls in and interpolates
        # linearly inside it, so the true server-side P99 lies somewhere in (lo, hi]. Clients additionally pay
        # the HTTP round trip and JSON (a few ms on loopback), so their P99 may sit up to 25 ms above hi.
        overhead = 0.025
        print(
            f"\nP99: client {client_p99 * 1000:.1f} ms, Prometheus {total * 1000:.1f} ms (cumulative), "
            f"{rated * 1000:.1f} ms (rate over {window}); bucket ({lo * 1000:.0f}, {hi * 1000:.0f}] ms; "
            f"{N_REQUESTS} requests in {took:.1f} s"
        )
        assert lo - overhead <= client_p99 <= hi + overhead, (client_p99, total, (lo, hi))
        # Bucket by bucket: each request's server-side latency is contained in what its client measured, so
        # at every bound at least as many requests are within it server-side as client-side.
        buckets = prom.query(f"sum by (le) ({c.E2E_LATENCY.name}_bucket)")
        server_le = {float(b["metric"]["le"]): float(b["value"][1]) for b in buckets}
        assert len(server_le) == len(c.E2E_LATENCY.buckets) + 1
        for bound, server_count in server_le.items():
            assert sum(x <= bound for x in client) <= server_count, (bound, server_count)
        assert bucket_of(rated) == (lo, hi) or abs(rated - total) <= hi - lo, (rated, total)

        # Every rule evaluates cleanly against real series; every dashboard panel is valid PromQL here.
        groups = httpx.get(prom.url + "/api/v1/rules", timeout=10).json()["data"]["groups"]
        health = {r["name"]: (r["health"], r.get("lastError", "")) for g in groups for r in g["rules"]}
        assert set(health) == {r.name for r in rules}
        assert all(h == "ok" for h, _ in health.values()), health
        for expr in dashboard.expressions(dashboard.dashboard(t)):
            prom.query(dashboard.resolve(expr))
        assert prom.alert_state(MISSING) is None, "metrics-missing must be silent while the runtime is scraped"

        runtime_server.proc.terminate()
        runtime_server.proc.wait(30)
        state = prom.wait(lambda: prom.alert_state(MISSING), 15, f"{MISSING} pending")
        assert state in ("pending", "firing")
        prom.wait(lambda: prom.alert_state(MISSING) == "firing", 15, f"{MISSING} firing after for: 2s")
    finally:
        prom.stop()
