"""The alert rules against the real tools: ``promtool check rules`` and ``promtool test rules``.

The promtool unit tests are generated here from :class:`infra.catalog.thresholds.Thresholds`, so they follow any
threshold change: for every alert, input series that cross the threshold for longer than ``for:`` (it
fires, with the expected labels and the measured value in its description), series just below the
threshold (silent) and a spike shorter than ``for:`` (silent, though it would fire without ``for:``).
They run for the source document's thresholds and for a tightened set, and a mismatched pair must fail.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from infra.catalog.thresholds import Thresholds
from infra.observability import alerts
from infra.observability.alerts import GPU_EXPORTER_JOB, RUNTIME_JOB, AlertRule, alert_rules
from runtime import contract as c

REPO = Path(__file__).resolve().parents[2]
RT = {"job": RUNTIME_JOB, "instance": "10.0.1.7:8000"}
RTM = {**RT, c.LABEL_MODEL_NAME: "deepseek-v3"}  # the labels of the runtime's own series
GPU = {"job": GPU_EXPORTER_JOB, "instance": "10.0.1.7:9400", "gpu": "0", "Hostname": "gpu-node-a"}

THRESHOLD_SETS = {
    "source-document": Thresholds(),
    "tightened": Thresholds().with_overrides(
        {
            "gpu_utilization_perc": 80,
            "gpu_utilization_for": "10m",
            "p99_latency_seconds": 0.3,
            "latency_for": "8m",
            "rate_window": "3m",
            "accuracy_drift": 0.02,
            "accuracy_min_labels": 20,
            "accuracy_window": "30m",
            "memory_growth_bytes_per_hour": 5e8,
            "memory_window": "30m",
            "memory_for": "20m",
            "metrics_missing_for": "2m",
            "kv_cache_usage": 0.9,
            "queue_fill": 0.5,
            "queue_rejected_ratio": 0.05,
            "error_rate": 0.01,
        }
    ),
}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not on the PATH: run scripts/setup.sh (installs Debian's prometheus package)")
    return path


# ---- helpers that turn thresholds into input series --------------------------------------------


def minutes(duration: str) -> int:
    """A Prometheus duration in whole minutes, rounded up (the tests sample once a minute)."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    seconds = sum(int(n) * units[u] for n, u in re.findall(r"(\d+)(ms|s|m|h|d|w|y)", duration))
    return max(1, math.ceil(seconds / 60))


def series(name: str, labels: dict[str, str], values: list[float]) -> dict:
    sel = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{sel}}}", "values": " ".join(f"{v:.10g}" for v in values)}


def counter(per_minute: list[float]) -> list[float]:
    """Cumulative counter values from per-minute increments (first sample 0)."""
    out, total = [0.0], 0.0
    for inc in per_minute[:-1]:
        total += inc
        out.append(total)
    return out


def render(template: str, labels: dict[str, str], value: float) -> str:
    """The few Go-template forms our annotations use, as Prometheus renders them."""

    def sub(m: re.Match) -> str:
        expr = m.group(1).strip()
        if expr.startswith("$labels."):
            return labels.get(expr.removeprefix("$labels."), "")
        if expr == "$value":
            return f"{value:g}"
        fmt = re.fullmatch(r'\$value \| printf "(%[^"]+)"', expr)
        if fmt:
            return fmt.group(1) % value
        raise AssertionError(f"the test renderer does not know the template {expr!r}")

    return re.sub(r"\{\{(.*?)\}\}", sub, template)


@dataclass
class Case:
    alert: str
    kind: str  # fires | below | spike | other silent cases
    inputs: list[dict]
    #: minute → expected alerts as (series labels, value); an empty list means "silent"
    evals: dict[int, list[tuple[dict[str, str], float]]] = field(default_factory=dict)


def gpu_cases(t: Thresholds) -> list[Case]:
    f, w, thr = minutes(t.gpu_utilization_for), minutes(t.gpu_window), t.gpu_utilization_perc
    n, hot = w + f + 3, min(100.0, thr + 5)
    nvml = {**RTM, c.LABEL_GPU: "0"}
    spike = [30.0] * w + [hot] * f + [30.0] * 5
    return [
        Case(
            "MoeGpuUtilizationHigh", "fires-dcgm", [series(alerts.DCGM_GPU_UTIL, GPU, [hot] * n)], {n - 1: [(GPU, hot)]}
        ),
        Case(
            "MoeGpuUtilizationHigh",
            "fires-nvml",
            [series(c.GPU_UTILIZATION.name, nvml, [hot] * n)],
            {n - 1: [(nvml, hot)]},
        ),
        Case(
            "MoeGpuUtilizationHigh",
            "below",
            [series(alerts.DCGM_GPU_UTIL, GPU, [thr - 0.5] * n), series(c.GPU_UTILIZATION.name, nvml, [thr - 0.5] * n)],
            {n - 1: []},
        ),
        Case(
            "MoeGpuUtilizationHigh",
            "spike",
            [series(alerts.DCGM_GPU_UTIL, GPU, spike), series(c.GPU_UTILIZATION.name, nvml, spike)],
            {m: [] for m in range(w, len(spike))},
        ),
    ]


def latency_cases(t: Thresholds) -> list[Case]:
    f, w, thr = minutes(t.latency_for), minutes(t.rate_window), t.p99_latency_seconds
    assert f - w - 2 >= 1, "latency_for must exceed rate_window by 3m for the spike case"
    bounds = list(c.E2E_LATENCY.buckets)
    slow = next(i for i in range(1, len(bounds)) if bounds[i - 1] >= thr)  # every request above thr
    fast = max(i for i in range(len(bounds)) if bounds[i] <= thr)  # every request at or below thr

    def hist(per_minute_bucket: list[int]) -> list[dict]:
        les = [*(f"{b:g}" for b in bounds), "+Inf"]
        out = []
        for j, le in enumerate(les):
            inc = [100.0 if j >= b else 0.0 for b in per_minute_bucket]
            out.append(series(f"{c.E2E_LATENCY.name}_bucket", {**RTM, "le": le}, counter(inc)))
        return out

    def p99(i: int) -> float:
        lo = bounds[i - 1] if i else 0.0
        return lo + (bounds[i] - lo) * 0.99

    n = w + f + 3
    spike = [0] * (w + 2) + [slow] * (f - w - 2) + [0] * (w + 4)
    return [
        Case(
            "MoeP99LatencyHigh",
            "fires",
            hist([slow] * n),
            {n - 1: [({"job": RUNTIME_JOB, c.LABEL_MODEL_NAME: RTM[c.LABEL_MODEL_NAME]}, p99(slow))]},
        ),
        Case("MoeP99LatencyHigh", "below", hist([fast] * n), {n - 1: []}),
        Case("MoeP99LatencyHigh", "spike", hist(spike), {m: [] for m in range(w + 2, len(spike))}),
    ]


RT_B = {**RTM, "instance": "10.0.1.8:8000"}  # a second replica of the same job


def accuracy_cases(t: Thresholds) -> list[Case]:
    """Two replicas with different accuracies: the alert judges the fleet (sum of correct / sum of labelled
    over the window), not either pod, and each pod's counters only count the feedback that reached it."""
    f, w, d, base = minutes(t.accuracy_for), minutes(t.accuracy_window), t.accuracy_drift, 0.9
    n = w + f + 3
    per_min = (t.accuracy_min_labels + 60) / w  # labels per minute per replica: comfortably enough in a window
    job = {"job": RUNTIME_JOB}

    def inputs(
        acc_a: list[float],
        acc_b: list[float],
        rate: float = per_min,
        baseline: float = base,
        b_extra: tuple[list[float], list[float]] | None = None,
    ) -> list[dict]:
        extra_labelled, extra_correct = b_extra or ([0.0] * n, [0.0] * n)
        return [
            series(c.RISK_LABELLED.name, RTM, counter([rate] * n)),
            series(c.RISK_CORRECT.name, RTM, counter([rate * a for a in acc_a])),
            series(c.RISK_LABELLED.name, RT_B, counter([rate + e for e in extra_labelled])),
            series(
                c.RISK_CORRECT.name, RT_B, counter([rate * b + e for b, e in zip(acc_b, extra_correct, strict=True)])
            ),
            series(c.ACCURACY_BASELINE.name, RTM, [baseline] * n),
            series(c.ACCURACY_BASELINE.name, RT_B, [baseline] * n),
        ]

    down, up = base - d - 0.01, base + d + 0.01

    # replica A is always right; B's accuracy is set so that the fleet's (A + B) / 2 is `fleet`
    def pair(fleet: float) -> tuple[list[float], list[float]]:
        return [1.0] * n, [2 * fleet - 1.0] * n

    # Spike: a burst of wrong answers on B pushes the fleet's accuracy past the threshold; three minutes later
    # a larger burst of right ones brings it back inside, before `for` is over.
    window_labels = 2 * per_min * w
    wrong = window_labels / 4
    target = base - d / 2
    right = math.ceil((target * (window_labels + wrong) - base * window_labels) / (1 - target)) + 1
    burst_labelled, burst_correct = [0.0] * n, [0.0] * n
    burst_labelled[w], burst_labelled[w + 3] = wrong, right
    burst_correct[w + 3] = right
    return [
        Case("MoeAccuracyDrift", "fires-down", inputs(*pair(down)), {n - 1: [(job, d + 0.01)]}),
        Case("MoeAccuracyDrift", "fires-up", inputs([up] * n, [up] * n), {n - 1: [(job, d + 0.01)]}),
        # each pod is 0.1 off the baseline, the fleet is on it: silent
        Case("MoeAccuracyDrift", "below-fleet-on-baseline", inputs(*pair(base)), {n - 1: []}),
        Case("MoeAccuracyDrift", "below", inputs(*pair(base - d + 0.005)), {n - 1: []}),
        Case(
            "MoeAccuracyDrift",
            "few-labels",
            inputs(*pair(down), rate=(t.accuracy_min_labels - 10) / w / 2),
            {n - 1: []},
        ),
        Case("MoeAccuracyDrift", "no-baseline", inputs(*pair(down), baseline=0.0), {n - 1: []}),
        Case(
            "MoeAccuracyDrift",
            "spike",
            inputs(*pair(base), b_extra=(burst_labelled, burst_correct)),
            {m: [] for m in range(w - 1, n)},
        ),
    ]


def memory_cases(t: Thresholds) -> list[Case]:
    f, w, thr_gb = minutes(t.memory_for), minutes(t.memory_window), t.memory_growth_bytes_per_hour / 1e9
    base = 8e9

    def grow(gb_per_hour: float, ramp: int, flat_before: int = 0, flat_after: int = 0) -> list[float]:
        step = gb_per_hour * 1e9 / 60
        vals = [base] * flat_before + [base + step * (i + 1) for i in range(ramp)]
        return vals + [vals[-1]] * flat_after

    n = w + f + 5
    burst = grow(3 * thr_gb, max(1, f // 2), flat_before=w, flat_after=w + f)  # crosses thr for < f
    return [
        Case(
            "MoeMemoryLeak",
            "fires",
            [series(c.PROCESS_RESIDENT_MEMORY.name, RTM, grow(1.5 * thr_gb, n))],
            {n - 1: [(RTM, 1.5 * thr_gb)]},
        ),
        Case(
            "MoeMemoryLeak", "below", [series(c.PROCESS_RESIDENT_MEMORY.name, RTM, grow(0.9 * thr_gb, n))], {n - 1: []}
        ),
        Case(
            "MoeMemoryLeak",
            "spike",
            [series(c.PROCESS_RESIDENT_MEMORY.name, RTM, burst)],
            {m: [] for m in range(w, len(burst), 2)},
        ),
    ]


def runtime_missing_cases(t: Thresholds) -> list[Case]:
    f = minutes(t.metrics_missing_for)
    n = f + 3
    other = series("up", {"job": "node", "instance": "n:9100"}, [1.0] * n)
    return [
        Case("MoeRuntimeMetricsMissing", "fires-down", [series("up", RT, [0.0] * n)], {n - 1: [(RT, 0.0)]}),
        Case("MoeRuntimeMetricsMissing", "fires-absent", [other], {n - 1: [({"job": RUNTIME_JOB}, 1.0)]}),
        Case("MoeRuntimeMetricsMissing", "below", [series("up", RT, [1.0] * n)], {n - 1: []}),
        Case(
            "MoeRuntimeMetricsMissing",
            "spike",
            [series("up", RT, [1.0] * 2 + [0.0] * (f - 1) + [1.0] * 4)],
            {m: [] for m in range(f + 5)},
        ),
    ]


def gpu_missing_cases(t: Thresholds) -> list[Case]:
    f = minutes(t.metrics_missing_for)
    n = f + 3
    rt_up = series("up", RT, [1.0] * n)
    gpu_up = {k: v for k, v in GPU.items() if k in ("job", "instance")}
    return [
        Case("MoeGpuMetricsMissing", "fires-absent", [rt_up], {n - 1: [({"job": GPU_EXPORTER_JOB}, 1.0)]}),
        Case("MoeGpuMetricsMissing", "fires-down", [rt_up, series("up", gpu_up, [0.0] * n)], {n - 1: [(gpu_up, 0.0)]}),
        Case("MoeGpuMetricsMissing", "below", [rt_up, series("up", gpu_up, [1.0] * n)], {n - 1: []}),
        Case("MoeGpuMetricsMissing", "pool-at-zero", [series("up", {"job": "node"}, [1.0] * n)], {n - 1: []}),
        Case(
            "MoeGpuMetricsMissing",
            "spike",
            [rt_up, series("up", gpu_up, [1.0] * 2 + [0.0] * (f - 1) + [1.0] * (n - f - 1))],
            {m: [] for m in range(n)},
        ),
    ]


def kv_cases(t: Thresholds) -> list[Case]:
    f, thr = minutes(t.kv_cache_for), t.kv_cache_usage
    n, full = f + 3, min(1.0, thr + 0.02)
    name = c.KV_CACHE_USAGE.name
    return [
        Case("MoeKvCacheNearlyFull", "fires", [series(name, RTM, [full] * n)], {n - 1: [(RTM, full)]}),
        Case("MoeKvCacheNearlyFull", "below", [series(name, RTM, [thr - 0.01] * n)], {n - 1: []}),
        Case(
            "MoeKvCacheNearlyFull",
            "spike",
            [series(name, RTM, [0.3] * 2 + [full] * (f - 1) + [0.3] * 4)],
            {m: [] for m in range(f + 5)},
        ),
    ]


def _traffic(n: int, ok: float, rejected: float = 0.0, errors: float = 0.0) -> list[dict]:
    """Per-minute request counts as the runtime's counters (all label values it pre-creates)."""
    return [
        series(c.REQUEST_SUCCESS.name, {**RTM, c.LABEL_FINISH_REASON: "stop"}, counter([ok] * n)),
        series(c.REQUEST_SUCCESS.name, {**RTM, c.LABEL_FINISH_REASON: "length"}, [0.0] * n),
        series(c.RISK_PREDICTIONS.name, RTM, [0.0] * n),
        series(c.REQUESTS_REJECTED.name, {**RTM, c.LABEL_REASON: "queue_full"}, counter([rejected] * n)),
        series(c.REQUESTS_REJECTED.name, {**RTM, c.LABEL_REASON: "invalid_request"}, counter([3.0] * n)),
        series(c.REQUEST_ERRORS.name, {**RTM, c.LABEL_REASON: "engine"}, counter([errors] * n)),
        series(c.REQUEST_ERRORS.name, {**RTM, c.LABEL_REASON: "internal"}, [0.0] * n),
    ]


def queue_cases(t: Thresholds) -> list[Case]:
    f, w = minutes(t.queue_for), minutes(t.rate_window)
    n = w + f + 3
    cap = 100.0

    def gauges(waiting: list[float], capacity: float = cap) -> list[dict]:
        return [
            series(c.REQUESTS_WAITING.name, RTM, waiting),
            series(c.QUEUE_CAPACITY.name, RTM, [capacity] * len(waiting)),
        ]

    hi, lo = round(cap * min(1.0, t.queue_fill + 0.1)), round(cap * t.queue_fill) - 5
    rej_hi, rej_lo = 3 * t.queue_rejected_ratio * 1000, 0.5 * t.queue_rejected_ratio * 1000
    return [
        Case(
            "MoeAdmissionQueueSaturated", "fires-fill", gauges([hi] * n) + _traffic(n, 1000), {n - 1: [(RTM, hi / cap)]}
        ),
        Case(
            "MoeAdmissionQueueSaturated",
            "fires-rejections",
            gauges([0.0] * n, capacity=0.0) + _traffic(n, 1000, rejected=rej_hi),
            {n - 1: [(RTM, rej_hi / (1000 + rej_hi))]},
        ),
        Case(
            "MoeAdmissionQueueSaturated",
            "below",
            gauges([lo] * n) + _traffic(n, 1000, rejected=rej_lo),
            {n - 1: []},
        ),
        Case(
            "MoeAdmissionQueueSaturated",
            "unwired-capacity",
            gauges([hi] * n, capacity=0.0) + _traffic(n, 1000),
            {n - 1: []},
        ),
        Case(
            "MoeAdmissionQueueSaturated",
            "spike",
            gauges([0.0] * 2 + [hi] * (f - 1) + [0.0] * 4) + _traffic(f + 5, 1000),
            {m: [] for m in range(f + 5)},
        ),
    ]


def error_cases(t: Thresholds) -> list[Case]:
    f, w, thr = minutes(t.error_for), minutes(t.rate_window), t.error_rate
    n = w + f + 3
    bad, ok = 2 * thr * 1000, 1000.0
    spike = [0.0] * (w + 2) + [10 * thr * 1000] * 1 + [0.0] * (w + f)
    return [
        Case("MoeErrorRateHigh", "fires", _traffic(n, ok, errors=bad), {n - 1: [(RTM, bad / (bad + ok))]}),
        Case("MoeErrorRateHigh", "below", _traffic(n, ok, errors=0.8 * thr * ok), {n - 1: []}),
        Case("MoeErrorRateHigh", "idle", _traffic(n, 0.0), {n - 1: []}),
        Case(
            "MoeErrorRateHigh",
            "spike",
            [
                *_traffic(len(spike), ok)[:-2],
                series(c.REQUEST_ERRORS.name, {**RTM, c.LABEL_REASON: "engine"}, counter(spike)),
            ],
            {m: [] for m in range(len(spike))},
        ),
    ]


CASE_BUILDERS = (
    gpu_cases,
    latency_cases,
    accuracy_cases,
    memory_cases,
    runtime_missing_cases,
    gpu_missing_cases,
    kv_cases,
    queue_cases,
    error_cases,
)


def all_cases(t: Thresholds) -> list[Case]:
    return [case for build in CASE_BUILDERS for case in build(t)]


def promtool_tests(t: Thresholds, rules: list[AlertRule], rules_file: str) -> dict:
    by_name = {r.name: r for r in rules}
    tests = []
    for case in all_cases(t):
        rule = by_name[case.alert]
        checks = []
        for minute, expected in sorted(case.evals.items()):
            exp = []
            for labels, value in expected:
                annotations = rule.to_prometheus()["annotations"]
                exp.append(
                    {
                        "exp_labels": {"severity": rule.severity, **labels},
                        "exp_annotations": {**annotations, "description": render(rule.description, labels, value)},
                    }
                )
            checks.append({"eval_time": f"{minute}m", "alertname": case.alert, "exp_alerts": exp})
        tests.append(
            {
                "name": f"{case.alert}/{case.kind}",
                "interval": "1m",
                "input_series": case.inputs,
                "alert_rule_test": checks,
            }
        )
    return {"rule_files": [rules_file], "evaluation_interval": "1m", "tests": tests}


def run_promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


# ---- tests --------------------------------------------------------------------------------------


@pytest.mark.parametrize("gpu_exporter", [True, False])
def test_promtool_check_rules(tmp_path: Path, gpu_exporter: bool) -> None:
    rules = alert_rules(Thresholds(), gpu_exporter=gpu_exporter)
    path = alerts.write_rules_file(tmp_path / "rules.yml", rules)
    proc = run_promtool("check", "rules", str(path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(rules)} rules found" in proc.stdout


@pytest.mark.parametrize("name", sorted(THRESHOLD_SETS))
def test_promtool_unit_tests_for_every_alert(tmp_path: Path, name: str) -> None:
    t = THRESHOLD_SETS[name]
    rules = alert_rules(t)
    alerts.write_rules_file(tmp_path / "rules.yml", rules)
    spec = promtool_tests(t, rules, "rules.yml")
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(spec, sort_keys=False))
    proc = run_promtool("test", "rules", "tests.yml", cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert "SUCCESS" in proc.stdout + proc.stderr


def test_every_alert_has_firing_below_and_spike_cases() -> None:
    cases = all_cases(Thresholds())
    for rule in alert_rules(Thresholds()):
        kinds = {case.kind.split("-")[0] for case in cases if case.alert == rule.name}
        assert {"fires", "below", "spike"} <= kinds, f"{rule.name} lacks promtool cases: has {sorted(kinds)}"


def test_tests_fail_when_rules_and_thresholds_disagree(tmp_path: Path) -> None:
    """The generated tests are able to fail: default rules checked against tightened expectations."""
    alerts.write_rules_file(tmp_path / "rules.yml", alert_rules(Thresholds()))
    spec = promtool_tests(THRESHOLD_SETS["tightened"], alert_rules(THRESHOLD_SETS["tightened"]), "rules.yml")
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(spec, sort_keys=False))
    proc = run_promtool("test", "rules", "tests.yml", cwd=tmp_path)
    assert proc.returncode != 0
    assert "FAILED" in proc.stdout + proc.stderr


def test_rules_carry_severity_summary_description_and_runbook() -> None:
    runbook = (REPO / alerts.RUNBOOK_URL).read_text()
    headings = {h.strip(): i for i, h in enumerate(re.findall(r"^## (.+)$", runbook, flags=re.M))}
    sections = re.split(r"^## ", runbook, flags=re.M)
    for rule in alert_rules(Thresholds()):
        prom = rule.to_prometheus()
        assert prom["for"] and prom["labels"]["severity"] in ("warning", "critical")
        assert "{{ $value" in rule.description, f"{rule.name}: the description must show the measured value"
        assert rule.name in headings, f"docs/runbook.md has no '## {rule.name}' section"
        body = sections[headings[rule.name] + 1]
        for part in ("Cause", "Confirm", "Act"):
            assert f"**{part}" in body, f"runbook section {rule.name} lacks its **{part}…** part"


def test_thresholds_validate_overrides() -> None:
    with pytest.raises(ValueError, match=r"unknown alert threshold\(s\) \['p99'\]; allowed: .*p99_latency_seconds"):
        Thresholds().with_overrides({"p99": 0.4})
    with pytest.raises(ValueError, match=r"latency_for = '5 minutes': expected a Prometheus duration"):
        Thresholds().with_overrides({"latency_for": "5 minutes"})
    with pytest.raises(ValueError, match=r"error_rate = -1: expected a positive number"):
        Thresholds().with_overrides({"error_rate": -1})
    assert Thresholds().with_overrides({"p99_latency_seconds": 0.25}).p99_latency_seconds == 0.25
    assert "> 0.25" in alert_rules(Thresholds(p99_latency_seconds=0.25))[1].expr


def test_prometheus_rule_object_and_amp_namespace_render_the_same_groups() -> None:
    rules = alert_rules(Thresholds())
    obj = alerts.prometheus_rule_object(rules, name="moe-fleet", namespace="moe", labels={"release": "kps"})
    assert obj["apiVersion"] == "monitoring.coreos.com/v1" and obj["kind"] == "PrometheusRule"
    assert obj["metadata"] == {"name": "moe-fleet", "namespace": "moe", "labels": {"release": "kps"}}
    assert obj["spec"] == yaml.safe_load(alerts.rules_yaml(rules)) == alerts.rule_groups(rules)
    names = [r["alert"] for r in obj["spec"]["groups"][0]["rules"]]
    assert len(names) == len(set(names)) == 9


def test_spikes_cross_the_threshold_so_only_for_keeps_them_silent(tmp_path: Path) -> None:
    """Each spike case fails against rules whose ``for:`` is 0s: the silence comes from ``for:``."""
    t = Thresholds()
    zero = t.with_overrides({f: "0s" for f in t.__dataclass_fields__ if f.endswith("_for")})
    alerts.write_rules_file(tmp_path / "rules.yml", alert_rules(zero))
    spec = promtool_tests(t, alert_rules(t), "rules.yml")
    for test in [x for x in spec["tests"] if x["name"].endswith("/spike")]:
        (tmp_path / "tests.yml").write_text(yaml.safe_dump({**spec, "tests": [test]}, sort_keys=False))
        proc = run_promtool("test", "rules", "tests.yml", cwd=tmp_path)
        assert proc.returncode != 0, f"{test['name']}: the spike never crosses the threshold; the case proves nothing"


# ---- scrape configs and Kubernetes objects rendered from the same names ----------------------------


def test_local_and_amp_scrape_configs_pass_promtool(tmp_path: Path) -> None:
    from infra.observability import prometheus_config as pc

    local = pc.write_local(tmp_path / "local", ["127.0.0.1:8000"], alerts.rules_yaml(alert_rules()))
    proc = run_promtool("check", "config", str(local), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job = yaml.safe_load(local.read_text())["scrape_configs"][0]
    assert job["job_name"] == RUNTIME_JOB and job["metrics_path"] == c.METRICS_PATH

    # Debian builds Prometheus without Kubernetes service discovery, so promtool checks the AMP config
    # with each kubernetes_sd_configs swapped for a static target: everything else (relabelling, jobs,
    # honor_labels) is checked by the real parser; the discovery role is asserted below.
    amp_config = pc.amp_collector_config()
    checkable = yaml.safe_load(pc.to_yaml(amp_config))
    for job in checkable["scrape_configs"]:
        assert job.pop("kubernetes_sd_configs") == [{"role": "pod"}]
        job["static_configs"] = [{"targets": ["127.0.0.1:9"]}]
    amp = tmp_path / "amp.yml"
    amp.write_text(pc.to_yaml(checkable))
    proc = run_promtool("check", "config", str(amp), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jobs = {j["job_name"]: j for j in amp_config["scrape_configs"]}
    assert set(jobs) == {RUNTIME_JOB, GPU_EXPORTER_JOB}
    assert jobs[GPU_EXPORTER_JOB]["honor_labels"] is True  # keep DCGM's workload pod/namespace labels
    keep = jobs[RUNTIME_JOB]["relabel_configs"][0]
    assert keep["action"] == "keep" and keep["regex"] == c.APP_NAME

    with pytest.raises(ValueError, match=r"scrape target '8000': expected 'host:port'"):
        pc.local_config(["8000"])


def test_gpu_monitoring_objects_run_on_the_gpu_pool_and_keep_pod_labels() -> None:
    from infra.catalog.names import GPU_POOL, GPU_TAINT, NODE_POOL_LABEL
    from infra.observability import monitoring_objects as mo

    objs = mo.gpu_monitoring_objects("gpu-monitoring", monitor_labels={"release": "kps"})
    kinds = [(o["kind"], o["metadata"]["name"]) for o in objs]
    assert kinds == [
        ("DaemonSet", "nvidia-device-plugin"),
        ("ConfigMap", "dcgm-exporter-counters"),
        ("DaemonSet", "dcgm-exporter"),
        ("Service", "dcgm-exporter"),
        ("ServiceMonitor", "dcgm-exporter"),
    ]
    assert all(o["metadata"]["namespace"] == "gpu-monitoring" for o in objs)
    for ds in (o for o in objs if o["kind"] == "DaemonSet"):
        spec = ds["spec"]["template"]["spec"]
        assert GPU_TAINT.toleration() in spec["tolerations"]
        assert spec["nodeSelector"] == {NODE_POOL_LABEL: GPU_POOL}
        assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
        image = spec["containers"][0]["image"]
        tag = image.rsplit(":", 1)[1]
        assert tag not in ("latest", "") and any(ch.isdigit() for ch in tag), image

    config, dcgm, service, monitor = objs[1:]
    container = dcgm["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["DCGM_EXPORTER_KUBERNETES"] == "true"
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in dcgm["spec"]["template"]["spec"]["volumes"]}
    assert volumes["pod-resources"]["hostPath"]["path"] == mounts["pod-resources"]["mountPath"] == mo.POD_RESOURCES_PATH
    counters_file = env["DCGM_EXPORTER_COLLECTORS"]
    assert counters_file == f"{mounts['counters']['mountPath']}/{mo.DCGM_COUNTERS_FILE}"
    csv_names = {line.split(",")[0] for line in config["data"][mo.DCGM_COUNTERS_FILE].splitlines() if line[:1] != "#"}
    assert csv_names == set(alerts.DCGM_METRICS)
    assert service["spec"]["selector"] == dcgm["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    endpoint = monitor["spec"]["endpoints"][0]
    assert endpoint["honorLabels"] is True and endpoint["port"] == service["spec"]["ports"][0]["name"]
    assert monitor["metadata"]["labels"]["release"] == "kps"
    # jobLabel turns the Service's name label into job="dcgm-exporter", the job MoeGpuMetricsMissing watches.
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == GPU_EXPORTER_JOB


def test_runtime_monitors_and_prometheus_rule() -> None:
    from infra.observability import monitoring_objects as mo

    selector = {mo.NAME_KEY: c.APP_NAME, mo.COMPONENT_KEY: "server"}
    sm = mo.runtime_service_monitor("moe", selector, labels={"release": "kps"})
    pm = mo.runtime_pod_monitor("moe", selector)
    assert sm["kind"] == "ServiceMonitor" and pm["kind"] == "PodMonitor"
    assert sm["spec"]["endpoints"][0] == {"port": c.PORT_NAME, "path": c.METRICS_PATH, "interval": mo.SCRAPE_INTERVAL}
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == c.PORT_NAME
    for monitor in (sm, pm):
        assert monitor["spec"]["selector"]["matchLabels"] == selector
        assert selector[monitor["spec"]["jobLabel"]] == RUNTIME_JOB
    with pytest.raises(ValueError, match=r"selector_labels must include app.kubernetes.io/name='moe-runtime'"):
        mo.runtime_service_monitor("moe", {"app": "moe"})

    t = Thresholds(p99_latency_seconds=0.3)
    rule = mo.prometheus_rule("moe", t, labels={"release": "kps"})
    assert rule["kind"] == "PrometheusRule" and rule["metadata"]["labels"]["release"] == "kps"
    assert rule["spec"] == alerts.rule_groups(alert_rules(t))
