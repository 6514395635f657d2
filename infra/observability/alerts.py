"""Alert rules, defined once: the source document's four thresholds plus the failure modes that page before
users do.

One list of :class:`AlertRule` is rendered three ways — the AMP rule-group namespace (:func:`rules_yaml`,
handed to :mod:`infra.constructs.monitoring`), a plain Prometheus rules file for a local Prometheus
(:func:`write_rules_file`, same format) and a Prometheus Operator ``PrometheusRule`` object
(:func:`prometheus_rule_object`). Metric names come from the runtime's contract, so renaming a metric
breaks a test, not a pager; every threshold lives in :class:`infra.catalog.thresholds.Thresholds` so
environments can override it and the promtool tests follow it (tests/infra/test_alert_rules.py generates
its inputs from here).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from infra.catalog.thresholds import Thresholds
from runtime import contract

#: Scrape job names the rules (and the scrape configs / monitors) use.
RUNTIME_JOB = contract.APP_NAME
GPU_EXPORTER_JOB = "dcgm-exporter"
RUNBOOK_URL = "docs/runbook.md"  # repository-relative: one runbook section per alert
RULE_GROUP = "moe-fleet"

#: DCGM exporter fields we use (dashboard and alerts), with type and help as dcgm-exporter's counters
#: CSV spells them. The exporter is configured with exactly this list (infra.observability.monitoring_objects),
#: so "a documented exporter metric" and "what the exporter emits" are the same list.
DCGM_GPU_UTIL = "DCGM_FI_DEV_GPU_UTIL"
DCGM_FB_USED = "DCGM_FI_DEV_FB_USED"
DCGM_FB_FREE = "DCGM_FI_DEV_FB_FREE"
DCGM_METRICS: dict[str, tuple[str, str]] = {
    DCGM_GPU_UTIL: ("gauge", "GPU utilization (in %)."),
    "DCGM_FI_DEV_MEM_COPY_UTIL": ("gauge", "Memory utilization (in %)."),
    DCGM_FB_USED: ("gauge", "Framebuffer memory used (in MiB)."),
    DCGM_FB_FREE: ("gauge", "Framebuffer memory free (in MiB)."),
    "DCGM_FI_DEV_GPU_TEMP": ("gauge", "GPU temperature (in C)."),
    "DCGM_FI_DEV_POWER_USAGE": ("gauge", "Power draw (in W)."),
    "DCGM_FI_DEV_XID_ERRORS": ("gauge", "Value of the last XID error encountered."),
}


@dataclass(frozen=True)
class AlertRule:
    name: str
    expr: str
    for_: str
    severity: str
    summary: str
    description: str
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def runbook_fragment(self) -> str:
        """The URL fragment GitHub gives the alert's heading in docs/runbook.md (the heading is the alert name)."""
        return self.name.lower()

    def to_prometheus(self) -> dict:
        return {
            "alert": self.name,
            "expr": self.expr,
            "for": self.for_,
            "labels": {"severity": self.severity, **self.labels},
            "annotations": {
                "summary": self.summary,
                "description": self.description,
                "runbook_url": f"{RUNBOOK_URL}#{self.runbook_fragment}",
            },
        }


def _num(x: float) -> str:
    """A threshold as PromQL and people write it (0.5, 90, 1e+09 → 1000000000)."""
    return f"{x:.10g}" if abs(x) < 1e6 else f"{x:.0f}"


def _missing(job: str) -> str:
    return f'up{{job="{job}"}} == 0 or absent(up{{job="{job}"}})'


def fleet_accuracy(window: str, selector: str = "", by: str = "job") -> str:
    """The share of correct risk predictions over ``window`` across every replica: each pod counts its own
    labelled and correct predictions, so the sums are the fleet's whatever replica took the feedback (a
    per-pod rolling gauge would only show the pods that happened to receive labels)."""
    correct = f"sum by ({by}) (increase({contract.RISK_CORRECT.name}{selector}[{window}]))"
    labelled = f"sum by ({by}) (increase({contract.RISK_LABELLED.name}{selector}[{window}]))"
    return f"({correct} / {labelled})"


def alert_rules(t: Thresholds | None = None, *, gpu_exporter: bool = True) -> list[AlertRule]:
    """The rules. ``gpu_exporter=False`` leaves out the DCGM-exporter target alert (a local Prometheus
    has no exporter; the GPU utilisation alert still works there on the runtime's NVML gauge)."""
    t = t or Thresholds()
    c = contract
    w = t.rate_window
    finished = (
        f"sum without ({c.LABEL_FINISH_REASON}) (rate({c.REQUEST_SUCCESS.name}[{w}]))"
        f" + rate({c.RISK_PREDICTIONS.name}[{w}])"
    )
    errors = f"sum without ({c.LABEL_REASON}) (rate({c.REQUEST_ERRORS.name}[{w}]))"
    baseline = f"max by (job) ({c.ACCURACY_BASELINE.name})"
    labelled = f"sum by (job) (increase({c.RISK_LABELLED.name}[{t.accuracy_window}]))"
    queue_full = (
        f'sum without ({c.LABEL_REASON}) (rate({c.REQUESTS_REJECTED.name}{{{c.LABEL_REASON}="queue_full"}}[{w}]))'
    )
    rules = [
        AlertRule(
            name="MoeGpuUtilizationHigh",
            expr=(
                f"avg_over_time({DCGM_GPU_UTIL}[{t.gpu_window}]) > {_num(t.gpu_utilization_perc)}"
                f" or avg_over_time({c.GPU_UTILIZATION.name}[{t.gpu_window}]) > {_num(t.gpu_utilization_perc)}"
            ),
            for_=t.gpu_utilization_for,
            severity="warning",
            summary=f"GPU utilisation above {_num(t.gpu_utilization_perc)}% for {t.gpu_utilization_for}",
            description=(
                'GPU {{ $labels.gpu }} on {{ $labels.instance }} averaged {{ $value | printf "%.1f" }}% over '
                f"{t.gpu_window} (threshold {_num(t.gpu_utilization_perc)}%): the replica is saturated."
            ),
        ),
        AlertRule(
            name="MoeP99LatencyHigh",
            expr=(
                f"histogram_quantile(0.99, sum without (instance, pod) (rate({c.E2E_LATENCY.name}_bucket[{w}])))"
                f" > {_num(t.p99_latency_seconds)}"
            ),
            for_=t.latency_for,
            severity="critical",
            summary=f"P99 request latency above {t.p99_latency_seconds * 1000:.0f} ms",
            description=(
                'P99 end-to-end latency of job {{ $labels.job }} is {{ $value | printf "%.3f" }} s over '
                f"{w} (threshold {_num(t.p99_latency_seconds)} s)."
            ),
        ),
        AlertRule(
            name="MoeAccuracyDrift",
            expr=(
                f"abs({fleet_accuracy(t.accuracy_window)} - on (job) {baseline}) > {_num(t.accuracy_drift)}"
                f" and on (job) {baseline} > 0"
                f" and on (job) {labelled} >= {_num(t.accuracy_min_labels)}"
            ),
            for_=t.accuracy_for,
            severity="warning",
            summary=f"Risk-model accuracy drifted beyond ±{t.accuracy_drift * 100:.0f} points of its baseline",
            description=(
                "Accuracy of the fleet (job {{ $labels.job }}, every replica) over the last "
                + t.accuracy_window
                + ' differs from the baseline by {{ $value | printf "%.3f" }} (threshold '
                + _num(t.accuracy_drift)
                + ")."
            ),
        ),
        AlertRule(
            name="MoeMemoryLeak",
            expr=(
                f"deriv({c.PROCESS_RESIDENT_MEMORY.name}[{t.memory_window}]) * 3600 / 1e9"
                f" > {_num(t.memory_growth_bytes_per_hour / 1e9)}"
            ),
            for_=t.memory_for,
            severity="warning",
            summary=f"Runtime memory grows faster than {_num(t.memory_growth_bytes_per_hour / 1e9)} GB per hour",
            description=(
                'Resident memory of {{ $labels.instance }} grows {{ $value | printf "%.2f" }} GB per hour '
                f"(trend over {t.memory_window}; threshold {_num(t.memory_growth_bytes_per_hour / 1e9)} GB/h)."
            ),
        ),
        AlertRule(
            name="MoeRuntimeMetricsMissing",
            expr=_missing(RUNTIME_JOB),
            for_=t.metrics_missing_for,
            severity="critical",
            summary="The runtime's metrics are not being scraped",
            description=(
                f"Prometheus has no healthy scrape of job {RUNTIME_JOB} "
                "(instance {{ $labels.instance }}, up = {{ $value }}; an absent target reports 1 with no instance)."
            ),
        ),
        AlertRule(
            name="MoeKvCacheNearlyFull",
            expr=f"{c.KV_CACHE_USAGE.name} > {_num(t.kv_cache_usage)}",
            for_=t.kv_cache_for,
            severity="warning",
            summary=f"KV-cache block pool above {t.kv_cache_usage * 100:.0f}% for {t.kv_cache_for}",
            description=(
                'The KV-cache pool of {{ $labels.instance }} is {{ $value | printf "%.3f" }} full '
                f"(threshold {_num(t.kv_cache_usage)}): new sequences wait for blocks."
            ),
        ),
        AlertRule(
            name="MoeAdmissionQueueSaturated",
            expr=(
                f"{c.REQUESTS_WAITING.name} / ({c.QUEUE_CAPACITY.name} > 0) > {_num(t.queue_fill)}"
                f" or {queue_full} / ({finished} + {queue_full}) > {_num(t.queue_rejected_ratio)}"
            ),
            for_=t.queue_for,
            severity="warning",
            summary="The admission queue is saturated (requests queue up or are refused with 429)",
            description=(
                'Admission on {{ $labels.instance }} at {{ $value | printf "%.3f" }}: queue fill above '
                f"{_num(t.queue_fill)} or share of requests refused as queue_full above {_num(t.queue_rejected_ratio)}."
            ),
        ),
        AlertRule(
            name="MoeErrorRateHigh",
            expr=f"{errors} / ({errors} + {finished}) > {_num(t.error_rate)}",
            for_=t.error_for,
            severity="critical",
            summary=f"More than {t.error_rate * 100:.0f}% of requests fail on the server",
            description=(
                '{{ $value | printf "%.3f" }} of requests on {{ $labels.instance }} failed with a server error '
                f"over {w} (threshold {_num(t.error_rate)})."
            ),
        ),
    ]
    if gpu_exporter:
        rules.append(
            AlertRule(
                name="MoeGpuMetricsMissing",
                # Only while a runtime is up: a GPU pool scaled to zero has no exporter pods, rightly.
                expr=f'({_missing(GPU_EXPORTER_JOB)}) and on () (count(up{{job="{RUNTIME_JOB}"}} == 1) > 0)',
                for_=t.metrics_missing_for,
                severity="critical",
                summary="GPU metrics (DCGM exporter) are not being scraped while the runtime runs",
                description=(
                    f"Prometheus has no healthy scrape of job {GPU_EXPORTER_JOB} "
                    "(instance {{ $labels.instance }}, value {{ $value }}): "
                    "GPU utilisation alerts and panels are blind."
                ),
            )
        )
    return rules


def rule_groups(rules: list[AlertRule]) -> dict:
    return {"groups": [{"name": RULE_GROUP, "rules": [rule.to_prometheus() for rule in rules]}]}


def rules_yaml(rules: list[AlertRule]) -> str:
    """The rules in Prometheus's rule-file format: the AMP namespace's ``data`` and a local rules file."""
    return yaml.safe_dump(rule_groups(rules), sort_keys=False)


def write_rules_file(path: Path, rules: list[AlertRule]) -> Path:
    """A plain rules file for a local Prometheus (``rule_files:`` in its config)."""
    path.write_text(rules_yaml(rules))
    return path


def prometheus_rule_object(
    rules: list[AlertRule], *, name: str, namespace: str, labels: dict[str, str] | None = None
) -> dict:
    """The rules as a Prometheus Operator ``PrometheusRule`` (monitoring.coreos.com/v1), a plain dict.

    ``labels`` must match the Prometheus object's ``ruleSelector`` (kube-prometheus-stack selects
    ``release: <name>`` by default), or the operator silently ignores the rules.
    """
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels or {})},
        "spec": rule_groups(rules),
    }
