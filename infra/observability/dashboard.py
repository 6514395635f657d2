"""A Grafana dashboard generated from the same definitions as the alert rules.

Metric names come from :mod:`runtime.contract` (and the DCGM list in :mod:`infra.observability.alerts`),
threshold lines from :class:`infra.catalog.thresholds.Thresholds`, so the panel an on-call engineer opens
from an alert shows the very series and line the alert fired on.
``python -m infra.observability.dashboard`` (or :func:`write_dashboard`) writes
``docs/moe-fleet-dashboard.json`` for import into Grafana; tests check that file is current and that every
expression references a metric the runtime or the exporter really emits.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from infra.catalog.thresholds import Thresholds
from infra.observability import alerts
from infra.observability.alerts import fleet_accuracy
from runtime import contract as c

DEFAULT_PATH = Path(__file__).resolve().parents[2] / "docs" / "moe-fleet-dashboard.json"
UID = "moe-fleet-runtime"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
W = "$__rate_interval"  # Grafana's safe rate window for the dashboard's scrape interval
SEL = '{namespace=~"$namespace"}'  # every runtime / exporter series carries namespace on the cluster


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str
    targets: tuple[tuple[str, str], ...]  # (PromQL, legend)
    threshold: float | None = None
    description: str = ""


def _q(quantile: float, metric: str, by: str = "le") -> str:
    return f"histogram_quantile({quantile}, sum by ({by}) (rate({metric}_bucket{SEL}[{W}])))"


def _mean(metric: str) -> str:
    return f"sum(rate({metric}_sum{SEL}[{W}])) / sum(rate({metric}_count{SEL}[{W}]))"


def panels(t: Thresholds) -> list[Panel]:
    lat, ttft, tpot = c.E2E_LATENCY.name, c.TIME_TO_FIRST_TOKEN.name, c.TIME_PER_OUTPUT_TOKEN.name
    return [
        Panel(
            "Latency percentiles",
            "s",
            (
                (_q(0.5, lat), "P50 end-to-end"),
                (_q(0.9, lat), "P90 end-to-end"),
                (_q(0.99, lat), "P99 end-to-end"),
                (_q(0.99, ttft), "P99 time to first token"),
                (_q(0.99, tpot), "P99 time per output token"),
            ),
            threshold=t.p99_latency_seconds,
            description="The line is the P99 alert threshold (MoeP99LatencyHigh).",
        ),
        Panel(
            "Time to first token: queue and prefill",
            "s",
            (
                (_mean(c.REQUEST_QUEUE_TIME.name), "mean queue time"),
                (_mean(c.REQUEST_PREFILL_TIME.name), "mean prefill time"),
                (_q(0.99, c.REQUEST_QUEUE_TIME.name), "P99 queue time"),
                (_q(0.99, c.REQUEST_PREFILL_TIME.name), "P99 prefill time"),
            ),
            description="Time to first token = the wait for a first engine step (room in the batch, the step's "
            "token budget) + the prompt's prefill from there. Queue time growing while prefill stays flat: the "
            "replica is full (scale out). Prefill time growing: its steps are slow or crowded by long prompts.",
        ),
        Panel(
            "Engine steps",
            "short",
            (
                (f"sum by (pod) (rate({c.ITERATION_TOKENS.name}_count{SEL}[{W}]))", "steps/s {{pod}}"),
                (
                    f"sum by (pod) (rate({c.ITERATION_TOKENS.name}_sum{SEL}[{W}])) / "
                    f"sum by (pod) (rate({c.ITERATION_TOKENS.name}_count{SEL}[{W}]))",
                    "tokens per step {{pod}}",
                ),
            ),
            description="Tokens per step: one per decoding sequence plus the step's prompt tokens (at most "
            "--max-num-batched-tokens).",
        ),
        Panel(
            "Throughput",
            "short",
            (
                (f"sum(rate({c.GENERATION_TOKENS.name}{SEL}[{W}]))", "generated tokens/s"),
                (f"sum(rate({c.PROMPT_TOKENS.name}{SEL}[{W}]))", "prompt tokens/s"),
                (f"sum(rate({c.REQUEST_SUCCESS.name}{SEL}[{W}]))", "finished sequences/s"),
                (f"sum(rate({c.RISK_PREDICTIONS.name}{SEL}[{W}]))", "risk predictions/s"),
            ),
        ),
        Panel(
            "Queue and batch",
            "short",
            (
                (f"sum by (pod) ({c.REQUESTS_WAITING.name}{SEL})", "waiting {{pod}}"),
                (f"sum by (pod) ({c.REQUESTS_RUNNING.name}{SEL})", "running {{pod}}"),
                (f"avg by (pod) ({c.BATCH_SIZE.name}{SEL})", "batch size {{pod}}"),
                (
                    f"max by (pod) ({c.REQUESTS_WAITING.name}{SEL} / ({c.QUEUE_CAPACITY.name}{SEL} > 0))",
                    "queue fill {{pod}}",
                ),
                (f"max by (pod) ({c.PADDING_RATIO.name}{SEL})", "padding ratio {{pod}}"),
                (f"sum by (pod) (rate({c.PACED_STEPS.name}{SEL}[{W}]))", "paced steps/s {{pod}}"),
            ),
            description="Paced steps held prompt tokens back so as not to stall running decodes (--max-decode-stall).",
        ),
        Panel(
            "Rejections and errors",
            "reqps",
            (
                (f"sum by ({c.LABEL_REASON}) (rate({c.REQUESTS_REJECTED.name}{SEL}[{W}]))", "rejected: {{reason}}"),
                (f"sum by ({c.LABEL_REASON}) (rate({c.REQUEST_ERRORS.name}{SEL}[{W}]))", "error: {{reason}}"),
            ),
        ),
        Panel(
            "KV pool",
            "percentunit",
            ((f"max by (pod) ({c.KV_CACHE_USAGE.name}{SEL})", "used {{pod}}"),),
            threshold=t.kv_cache_usage,
            description=f"Fraction of the preallocated block pool in use ({c.KV_CACHE_BLOCKS.name} blocks).",
        ),
        Panel(
            "GPU utilisation",
            "percent",
            (
                (f"avg by (Hostname, gpu, pod) ({alerts.DCGM_GPU_UTIL}{SEL})", "DCGM {{Hostname}} GPU {{gpu}} {{pod}}"),
                (f"avg by (pod, gpu) ({c.GPU_UTILIZATION.name}{SEL})", "NVML {{pod}} GPU {{gpu}}"),
            ),
            threshold=t.gpu_utilization_perc,
        ),
        Panel(
            "GPU memory",
            "bytes",
            (
                (
                    f"sum by (Hostname, gpu) ({alerts.DCGM_FB_USED}{SEL}) * 1048576",
                    "DCGM used {{Hostname}} GPU {{gpu}}",
                ),
                (
                    f"sum by (Hostname, gpu) ({alerts.DCGM_FB_FREE}{SEL}) * 1048576",
                    "DCGM free {{Hostname}} GPU {{gpu}}",
                ),
                (f"sum by (pod, gpu) ({c.GPU_MEMORY_USED.name}{SEL})", "NVML used {{pod}} GPU {{gpu}}"),
            ),
        ),
        Panel(
            "Expert-load imbalance",
            "short",
            ((f"max by ({c.LABEL_LAYER}) ({c.EXPERT_LOAD_IMBALANCE.name}{SEL})", "layer {{layer}}"),),
            description="max/mean tokens per routed expert (1 = balanced).",
        ),
        Panel(
            "Accuracy vs baseline",
            "percentunit",
            (
                (fleet_accuracy(t.accuracy_window, SEL, by="namespace"), f"fleet ({t.accuracy_window})"),
                (f"max({c.ACCURACY_BASELINE.name}{SEL})", "baseline"),
                (fleet_accuracy(t.accuracy_window, SEL, by="pod"), "{{pod}}"),
            ),
            description=(
                f"Correct / labelled risk predictions over {t.accuracy_window}, all replicas together (what the "
                f"drift alert compares with the baseline; it fires beyond ±{t.accuracy_drift:g}), and per pod."
            ),
        ),
        Panel(
            "Memory growth",
            "bytes",
            (
                (f"max by (pod) ({c.PROCESS_RESIDENT_MEMORY.name}{SEL})", "resident {{pod}}"),
                (
                    f"max by (pod) (deriv({c.PROCESS_RESIDENT_MEMORY.name}{SEL}[{t.memory_window}]) * 3600)",
                    "growth per hour {{pod}}",
                ),
            ),
            threshold=t.memory_growth_bytes_per_hour,
        ),
    ]


def _panel_json(i: int, p: Panel) -> dict:
    steps: list[dict] = [{"color": "green", "value": None}]
    if p.threshold is not None:
        steps.append({"color": "red", "value": p.threshold})
    return {
        "id": i + 1,
        "type": "timeseries",
        "title": p.title,
        "description": p.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
        "fieldConfig": {
            "defaults": {
                "unit": p.unit,
                "thresholds": {"mode": "absolute", "steps": steps},
                "custom": {"thresholdsStyle": {"mode": "line" if p.threshold is not None else "off"}},
            },
            "overrides": [],
        },
        "targets": [
            {"refId": chr(ord("A") + j), "expr": expr, "legendFormat": legend, "datasource": DATASOURCE}
            for j, (expr, legend) in enumerate(p.targets)
        ],
    }


def dashboard(t: Thresholds | None = None) -> dict:
    """The dashboard as Grafana's JSON model (import via the UI or a provisioning folder)."""
    t = t or Thresholds()
    return {
        "uid": UID,
        "title": "MoE Fleet runtime",
        "tags": ["moe-fleet"],
        "timezone": "utc",
        "schemaVersion": 39,
        "refresh": "30s",
        "time": {"from": "now-3h", "to": "now"},
        "templating": {
            "list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"},
                {
                    "name": "namespace",
                    "type": "query",
                    "datasource": DATASOURCE,
                    "query": f"label_values({c.MODEL_READY.name}, namespace)",
                    "includeAll": True,
                    "allValue": ".*",
                    "multi": True,
                    "current": {"text": "All", "value": "$__all"},
                },
            ]
        },
        "panels": [_panel_json(i, p) for i, p in enumerate(panels(t))],
    }


def expressions(board: dict) -> list[str]:
    """Every PromQL expression of a dashboard's panels."""
    return [target["expr"] for panel in board["panels"] for target in panel["targets"]]


def resolve(expr: str, *, rate_interval: str = "1m", namespace: str = ".*") -> str:
    """An expression with Grafana's variables filled in, as Grafana sends it to Prometheus."""
    return expr.replace("$__rate_interval", rate_interval).replace("$namespace", namespace)


_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers that are not functions, keywords, label names
    (inside ``{}``, ``by``/``without``/``on``/``ignoring``/``group_*`` lists) or parts of numbers."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = re.findall(r"(?<![\w.$])([A-Za-z_:][A-Za-z0-9_:]*)\b(?!\s*\()", s)
    return {n for n in names if n.lower() not in _KEYWORDS}


def write_dashboard(path: Path = DEFAULT_PATH, t: Thresholds | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dashboard(t), indent=2) + "\n")
    return path


if __name__ == "__main__":
    print(write_dashboard(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_PATH))
