"""Alert thresholds: every number the alert rules compare against, with the defaults and per-environment overrides.

They are configuration, not rule logic: `environments.toml` overrides them per environment
(`alert_thresholds = { p99_latency_seconds = 0.8 }`) and is validated against this class before anything
is synthesized, while `infra.observability.alerts` turns them into rules and the dashboard draws them
as threshold lines. The source document's four (GPU utilisation, P99 latency, accuracy drift, memory
growth) keep its values as defaults.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields, replace

_DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")


@dataclass(frozen=True)
class Thresholds:
    """Every number the alert rules use, the source document's four among them; environments override any.

    ``*_for`` fields are Prometheus ``for:`` durations (how long the condition must hold before the
    alert fires); ``*_window`` fields are the range-vector windows the expressions smooth over.
    """

    gpu_utilization_perc: float = 90.0
    gpu_utilization_for: str = "15m"  # the source document says "sustained"
    gpu_window: str = "5m"
    p99_latency_seconds: float = 0.5
    latency_for: str = "10m"  # longer than rate_window: a burst shorter than for - window does not page
    rate_window: str = "5m"  # latency histogram, error and rejection rates
    accuracy_drift: float = 0.03  # ±3 percentage points of accuracy (fleet accuracy over the window - baseline)
    accuracy_min_labels: float = 100  # fewer labelled predictions in the window, fleet-wide: too noisy to page on
    accuracy_window: str = "1h"  # the fleet's accuracy = correct / labelled predictions over this window
    accuracy_for: str = "15m"
    memory_growth_bytes_per_hour: float = 1e9  # 1 GB per hour
    memory_window: str = "1h"
    memory_for: str = "30m"
    metrics_missing_for: str = "5m"
    kv_cache_usage: float = 0.95  # fraction of the KV block pool in use
    kv_cache_for: str = "10m"
    queue_fill: float = 0.8  # waiting / admission-queue capacity
    queue_rejected_ratio: float = 0.01  # share of requests refused with 429 (queue_full)
    queue_for: str = "5m"
    error_rate: float = 0.05  # server-side failures / all finished requests
    error_for: str = "10m"  # longer than rate_window, as for latency

    def __post_init__(self) -> None:
        problems = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith(("_for", "_window")):
                if not isinstance(value, str) or not _DURATION.match(value):
                    problems.append(f"{f.name} = {value!r}: expected a Prometheus duration like '30s', '5m', '1h'")
            elif isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                problems.append(f"{f.name} = {value!r}: expected a positive number")
        if problems:
            raise ValueError("invalid alert threshold(s): " + "; ".join(problems))

    def with_overrides(self, overrides: dict[str, float | str] | None) -> Thresholds:
        """A copy with per-environment overrides applied; unknown names and bad values raise with the
        field, the value and what is allowed."""
        unknown = set(overrides or {}) - set(asdict(self))
        if unknown:
            raise ValueError(f"unknown alert threshold(s) {sorted(unknown)}; allowed: {sorted(asdict(self))}")
        return replace(self, **(overrides or {}))
