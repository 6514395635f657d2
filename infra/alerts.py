"""Alert rules, defined once: the seed's four thresholds plus "metrics missing".

Rendered into the AMP rule-group namespace here (and, by the monitoring issue, into a PrometheusRule
object and a plain rules file for the local Prometheus). Metric names come from the runtime's contract,
so renaming a metric breaks a test, not a pager.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import yaml

from runtime import contract

#: Scrape job names the rules (and the scrape configs) use.
RUNTIME_JOB = contract.APP_NAME
GPU_EXPORTER_JOB = "dcgm-exporter"
RUNBOOK_URL = "docs/runbook.md"  # repository-relative: one runbook entry per alert


@dataclass(frozen=True)
class Thresholds:
    """The seed's thresholds (DESIGN.md §1); environments may override any of them."""

    gpu_utilization_perc: float = 90.0
    gpu_utilization_for: str = "15m"  # "sustained"
    p99_latency_seconds: float = 0.5
    latency_for: str = "5m"
    accuracy_drift: float = 0.03  # ±3 percentage points of accuracy
    accuracy_for: str = "15m"
    memory_growth_bytes_per_hour: float = 1e9  # 1 GB per hour
    memory_for: str = "30m"
    metrics_missing_for: str = "5m"

    def with_overrides(self, overrides: dict[str, float | str] | None) -> Thresholds:
        unknown = set(overrides or {}) - set(asdict(self))
        if unknown:
            raise ValueError(f"unknown alert threshold(s) {sorted(unknown)}; allowed: {sorted(asdict(self))}")
        return replace(self, **(overrides or {}))


@dataclass(frozen=True)
class AlertRule:
    name: str
    expr: str
    for_: str
    severity: str
    summary: str
    description: str
    labels: dict[str, str] = field(default_factory=dict)

    def to_prometheus(self) -> dict:
        return {
            "alert": self.name,
            "expr": self.expr,
            "for": self.for_,
            "labels": {"severity": self.severity, **self.labels},
            "annotations": {
                "summary": self.summary,
                "description": self.description,
                "runbook_url": f"{RUNBOOK_URL}#{self.name.lower()}",
            },
        }


def alert_rules(t: Thresholds | None = None) -> list[AlertRule]:
    t = t or Thresholds()
    latency = contract.E2E_LATENCY.name
    return [
        AlertRule(
            name="MoeGpuUtilizationHigh",
            expr=(
                f"max by (instance, gpu) (avg_over_time(DCGM_FI_DEV_GPU_UTIL[5m])) > {t.gpu_utilization_perc}"
                f" or max by (instance, gpu) (avg_over_time({contract.GPU_UTILIZATION.name}[5m]))"
                f" > {t.gpu_utilization_perc}"
            ),
            for_=t.gpu_utilization_for,
            severity="warning",
            summary=f"GPU utilisation above {t.gpu_utilization_perc:.0f}% for {t.gpu_utilization_for}",
            description='GPU {{ $labels.gpu }} on {{ $labels.instance }} is at {{ $value | printf "%.0f" }}%.',
        ),
        AlertRule(
            name="MoeP99LatencyHigh",
            expr=(f"histogram_quantile(0.99, sum by (le) (rate({latency}_bucket[5m]))) > {t.p99_latency_seconds}"),
            for_=t.latency_for,
            severity="critical",
            summary=f"P99 request latency above {t.p99_latency_seconds * 1000:.0f} ms",
            description="P99 end-to-end latency is {{ $value | humanizeDuration }}.",
        ),
        AlertRule(
            name="MoeAccuracyDrift",
            expr=(f"abs({contract.ACCURACY_ROLLING.name} - {contract.ACCURACY_BASELINE.name}) > {t.accuracy_drift}"),
            for_=t.accuracy_for,
            severity="warning",
            summary=f"Risk-model accuracy drifted beyond ±{t.accuracy_drift * 100:.0f}% of its baseline",
            description="Rolling accuracy differs from the baseline by {{ $value | humanizePercentage }}.",
        ),
        AlertRule(
            name="MoeMemoryLeak",
            expr=(f"deriv({contract.PROCESS_RESIDENT_MEMORY.name}[1h]) * 3600 > {t.memory_growth_bytes_per_hour:.0f}"),
            for_=t.memory_for,
            severity="warning",
            summary=f"Runtime memory grows faster than {t.memory_growth_bytes_per_hour / 1e9:.0f} GB per hour",
            description="Resident memory of {{ $labels.instance }} grows {{ $value | humanize1024 }}B per hour.",
        ),
        AlertRule(
            name="MoeMetricsMissing",
            expr=f'up{{job="{RUNTIME_JOB}"}} == 0 or absent(up{{job="{RUNTIME_JOB}"}})',
            for_=t.metrics_missing_for,
            severity="critical",
            summary="The runtime's metrics are not being scraped",
            description=f"Prometheus has no healthy scrape of job {RUNTIME_JOB} (target down or missing).",
        ),
    ]


def rule_groups(rules: list[AlertRule]) -> dict:
    return {"groups": [{"name": "moe-fleet", "rules": [rule.to_prometheus() for rule in rules]}]}


def rules_yaml(rules: list[AlertRule]) -> str:
    return yaml.safe_dump(rule_groups(rules), sort_keys=False)
