"""Recording rules for the series the quarterly review reads (`moefleet review`, infra/review/).

A 90-day review over raw series would scan every histogram bucket of every pod at scrape resolution;
these rules pre-aggregate the few fleet-wide series it needs, once per evaluation, so its queries touch
one small series each. They are shipped exactly as the alert rules are (infra/observability/alerts.py):
the AMP rule-group namespace (:func:`recording_rules_yaml`, handed to :mod:`infra.constructs.monitoring`),
a plain rules file for a local Prometheus (the same YAML, see
:func:`infra.observability.prometheus_config.write_local`) and a Prometheus Operator ``PrometheusRule``
(:func:`prometheus_recording_rule_object`).

Names follow Prometheus's ``level:metric:operations`` convention under the ``moe:`` level (fleet-wide
sums). Metric names come from the runtime's contract and the DCGM fields from
:mod:`infra.observability.alerts`; a GPU series prefers the DCGM exporter and falls back to the runtime's
NVML gauges (``A or on () B`` keeps B only when A is empty), so it works with and without the exporter.
"""

from __future__ import annotations

from dataclasses import dataclass

import yaml

from infra.observability.alerts import DCGM_FB_USED, DCGM_GPU_UTIL, RUNTIME_JOB
from runtime import contract as c

RECORDING_GROUP = "moe-fleet-review"
#: The window every rate and average is taken over; also the review's default step.
WINDOW = "5m"
MIB = 1 << 20


@dataclass(frozen=True)
class RecordingRule:
    record: str
    expr: str
    help: str  # what the series means, for docs/review.md and the review's "no data" notes

    def to_prometheus(self) -> dict:
        return {"record": self.record, "expr": self.expr}


def _rate(name: str) -> str:
    return f"sum(rate({name}[{WINDOW}]))"


# Recorded series names, one constant each: the review reads them by these names.
PROMPT_TOKENS_RATE = "moe:prompt_tokens:rate5m"
GENERATION_TOKENS_RATE = "moe:generation_tokens:rate5m"
REQUEST_SUCCESS_RATE = "moe:request_success:rate5m"
RISK_PREDICTIONS_RATE = "moe:risk_predictions:rate5m"
REQUEST_ERRORS_RATE = "moe:request_errors:rate5m"
REQUESTS_REJECTED_RATE = "moe:requests_rejected:rate5m"
FEEDBACK_RATE = "moe:feedback:rate5m"
E2E_BUCKET_RATE = "moe:e2e_request_latency_seconds_bucket:rate5m"
TTFT_BUCKET_RATE = "moe:time_to_first_token_seconds_bucket:rate5m"
GPUS_UP = "moe:gpus:count"
GPU_UTILIZATION = "moe:gpu_utilization_perc:avg5m"  # per GPU
GPU_MEMORY_USED = "moe:gpu_memory_used_bytes:avg"  # mean over GPUs
KV_CACHE_USAGE = "moe:kv_cache_usage_perc:avg"
EXPERT_IMBALANCE = "moe:expert_load_imbalance:avg"
ACCURACY_ROLLING = "moe:accuracy_rolling:avg"
ACCURACY_BASELINE = "moe:accuracy_baseline:avg"
RUNTIME_UP = "moe:runtime_up:avg"
PREFIX_CACHE_QUERIES_RATE = "moe:prefix_cache_queries:rate5m"
PREFIX_CACHE_HITS_RATE = "moe:prefix_cache_hits:rate5m"

#: Counter rates: recorded series → (the runtime's counter, what it counts). The review also reads a short
#: period's totals straight from these counters (a 5-minute moving rate under-counts a run shorter than it).
COUNTER_RATES: dict[str, tuple[str, str]] = {
    PROMPT_TOKENS_RATE: (c.PROMPT_TOKENS.name, "prompt tokens prefilled per second"),
    GENERATION_TOKENS_RATE: (c.GENERATION_TOKENS.name, "tokens generated per second"),
    REQUEST_SUCCESS_RATE: (c.REQUEST_SUCCESS.name, "generation requests finished per second"),
    RISK_PREDICTIONS_RATE: (c.RISK_PREDICTIONS.name, "risk predictions per second"),
    REQUEST_ERRORS_RATE: (c.REQUEST_ERRORS.name, "server-side failures per second"),
    REQUESTS_REJECTED_RATE: (c.REQUESTS_REJECTED.name, "requests refused per second"),
    FEEDBACK_RATE: (c.FEEDBACK.name, "ground-truth labels received per second"),
    PREFIX_CACHE_QUERIES_RATE: (c.PREFIX_CACHE_QUERIES.name, "prompt tokens looked up in the prefix cache per second"),
    PREFIX_CACHE_HITS_RATE: (c.PREFIX_CACHE_HITS.name, "prompt tokens found in the prefix cache per second"),
}


def recording_rules() -> list[RecordingRule]:
    """Every series the review reads, fleet-wide (one series each, per GPU for utilisation, per ``le``
    for the latency histograms)."""
    gpu_util = f"avg_over_time({DCGM_GPU_UTIL}[{WINDOW}]) or on () avg_over_time({c.GPU_UTILIZATION.name}[{WINDOW}])"
    rules = [RecordingRule(record, _rate(counter), help_) for record, (counter, help_) in COUNTER_RATES.items()]
    rules += [
        RecordingRule(
            E2E_BUCKET_RATE,
            f"sum by (le) (rate({c.E2E_LATENCY.name}_bucket[{WINDOW}]))",
            "end-to-end latency histogram, fleet-wide bucket rates",
        ),
        RecordingRule(
            TTFT_BUCKET_RATE,
            f"sum by (le) (rate({c.TIME_TO_FIRST_TOKEN.name}_bucket[{WINDOW}]))",
            "time-to-first-token histogram, fleet-wide bucket rates",
        ),
        RecordingRule(
            GPUS_UP,
            f"count({DCGM_GPU_UTIL}) or on () count({c.GPU_UTILIZATION.name})",
            "GPUs reporting metrics (DCGM exporter, else the runtime's NVML gauge)",
        ),
        RecordingRule(GPU_UTILIZATION, gpu_util, "utilisation of each GPU, percent, averaged over 5 minutes"),
        RecordingRule(
            GPU_MEMORY_USED,
            f"avg({DCGM_FB_USED}) * {MIB} or on () avg({c.GPU_MEMORY_USED.name})",
            "GPU memory in use, bytes, mean over GPUs",
        ),
        RecordingRule(KV_CACHE_USAGE, f"avg({c.KV_CACHE_USAGE.name})", "KV-cache pool in use, fraction, mean"),
        RecordingRule(
            EXPERT_IMBALANCE, f"avg({c.EXPERT_LOAD_IMBALANCE.name})", "expert load max/mean, mean over layers"
        ),
        RecordingRule(
            ACCURACY_ROLLING,
            # Only once labels arrive: before the first one the gauge reads 0, which is no accuracy at all.
            f"avg({c.ACCURACY_ROLLING.name} and {c.FEEDBACK.name} > 0)",
            "rolling risk-model accuracy, where labels have arrived",
        ),
        RecordingRule(
            ACCURACY_BASELINE, f"avg({c.ACCURACY_BASELINE.name} > 0)", "configured accuracy baseline (0: none)"
        ),
        RecordingRule(RUNTIME_UP, f'avg(up{{job="{RUNTIME_JOB}"}})', "share of runtime targets scraped healthy"),
    ]
    return rules


def rule_groups(rules: list[RecordingRule], interval: str | None = None) -> dict:
    """One group; ``interval`` unset evaluates at the Prometheus's global evaluation interval (AMP: 1m)."""
    group: dict = {"name": RECORDING_GROUP}
    if interval:
        group["interval"] = interval
    group["rules"] = [rule.to_prometheus() for rule in rules]
    return {"groups": [group]}


def recording_rules_yaml(rules: list[RecordingRule] | None = None, interval: str | None = None) -> str:
    """The rules in Prometheus's rule-file format: the AMP namespace's ``data`` and a local rules file."""
    return yaml.safe_dump(rule_groups(recording_rules() if rules is None else rules, interval), sort_keys=False)


def prometheus_recording_rule_object(
    rules: list[RecordingRule], *, name: str, namespace: str, labels: dict[str, str] | None = None
) -> dict:
    """The rules as a Prometheus Operator ``PrometheusRule``; ``labels`` must match the ``ruleSelector``."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels or {})},
        "spec": rule_groups(rules),
    }
