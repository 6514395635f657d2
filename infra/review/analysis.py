"""The quarterly review's figures: what it asks Prometheus, and the formulas that turn answers into numbers.

Everything is read from the recording rules of :mod:`infra.observability.recording` (fleet-wide series,
cheap over 90 days) at ``step`` resolution; a sample at time t stands for the ``step`` seconds before it.
Where a recorded series starts after the period does, the time before is read through the rule's own
expression. Latency percentiles are computed by Prometheus from the recorded bucket rates over each hour,
week and the whole period. A series that is absent makes its figures ``None`` ("no data" in the report) and adds a note
to its section; nothing here raises for missing data. docs/review.md states each formula.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from infra.catalog.review_thresholds import ReviewThresholds
from infra.catalog.thresholds import Thresholds
from infra.observability import recording as r
from infra.ops.cost import HOURS_PER_MONTH
from infra.review.prom import PrometheusClient
from infra.review.sparsity import Sparsity
from runtime import contract as c

#: Each recorded series' expression, for periods the recording rules did not cover.
RAW = {rule.record: rule.expr for rule in r.recording_rules()}
#: The raw histogram behind each recorded bucket-rate series.
HISTOGRAMS = {r.E2E_BUCKET_RATE: c.E2E_LATENCY.name, r.TTFT_BUCKET_RATE: c.TIME_TO_FIRST_TOKEN.name}
HOUR = 3600.0
#: Periods shorter than this take their totals from the raw counters (see Reader.total).
SHORT_PERIOD = HOUR
WEEK = 7 * 24 * HOUR
ALERTS_FIRING = 'count by (alertname) (ALERTS{alertstate="firing"})'


@dataclass(frozen=True)
class Period:
    start: float  # unix seconds
    end: float
    step: float = 300.0

    @property
    def seconds(self) -> float:
        return self.end - self.start

    @property
    def hours(self) -> float:
        return self.seconds / HOUR


@dataclass(frozen=True)
class Prices:
    """What the period costs: per GPU-hour (GPU nodes and their volumes, which scale with the GPU pool)
    and per hour for everything that runs regardless (cluster, system nodes, storage, NAT, AMP)."""

    usd_per_gpu_hour: float
    usd_per_hour_fixed: float
    capex_usd: float
    source_hardware: str
    instance: str


@dataclass
class Inputs:
    environment: str
    size: str
    model: str
    period: Period
    thresholds: Thresholds
    rules: ReviewThresholds
    prices: Prices
    sparsity: Sparsity | None
    sparsity_error: str | None = None


@dataclass
class Review:
    """Every figure, by section; ``None`` is "no data". ``notes`` say which series were missing."""

    inputs: Inputs
    efficiency: dict[str, Any] = field(default_factory=dict)
    hardware: dict[str, Any] = field(default_factory=dict)
    service: dict[str, Any] = field(default_factory=dict)
    quality: dict[str, Any] = field(default_factory=dict)
    roi: dict[str, Any] = field(default_factory=dict)
    recommendations: list[dict[str, Any]] = field(default_factory=list)
    notes: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    hourly: dict[str, dict[int, float]] = field(default_factory=dict)  # for the plots
    weekly: dict[str, dict[int, float]] = field(default_factory=dict)
    sparsity: dict[str, Any] | None = None  # the parameter breakdown behind compute_saved

    def headline(self) -> dict[str, Any]:
        return {
            "tokens": self.efficiency.get("tokens_total"),
            "tokens_per_s_per_gpu": self.efficiency.get("tokens_per_s_per_gpu_mean"),
            "p99_latency_s": self.service.get("p99_latency_s"),
            "usd_per_million_tokens": self.roi.get("usd_per_million_tokens"),
            "compute_saved": self.efficiency.get("compute_saved"),
        }


class Reader:
    """Asks Prometheus for the review's series over the period, reporting progress on each."""

    def __init__(self, client: PrometheusClient, period: Period, progress: Callable[[str], None]):
        self.client = client
        self.period = period
        self.progress = progress
        self._first: dict[str, float | None] = {}
        self._series: dict[str, list] = {}

    def samples(self, expr: str) -> dict[float, float] | None:
        """One series at step resolution (the sum if several answer); None when absent."""
        series = self.series(expr)
        if not series:
            return None
        out: dict[float, float] = defaultdict(float)
        for s in series:
            for t, v in s.points.items():
                if not math.isnan(v):
                    out[t] += v
        return dict(out) or None

    def series(self, expr: str) -> list:
        """``expr``'s series at step resolution. Where a recorded series starts after the period does (the
        rules were deployed later, or never), the time before is read through its rule's expression: the
        same PromQL over the raw series, only slower."""
        if expr in self._series:
            return self._series[expr]
        p = self.period
        self.progress(f"review: querying {expr}")
        got = self.client.query_range(expr, p.start + p.step, p.end, p.step)
        first = min((t for s in got for t in s.points), default=None)
        if expr in RAW and (first is None or first > p.start + 2 * p.step):
            until = p.end if first is None else first - p.step
            gap = "in the period" if first is None else f"before {_when(first)}"
            self.progress(f"review: {expr} not recorded {gap}; reading its rule's expression")
            merged = {_key(s.labels): s for s in got}
            for raw in self.client.query_range(RAW[expr], p.start + p.step, until, p.step):
                target = merged.setdefault(_key(raw.labels), raw)
                if target is not raw:
                    target.points.update(raw.points)
            got = list(merged.values())
        self._series[expr] = got
        return got

    def total(self, series: str, samples: dict[float, float] | None = None) -> float | None:
        """What a recorded per-second rate adds up to over the period: Σ samples × step. A period shorter
        than SHORT_PERIOD (a demo's run) reads the counter's increase instead: a 5-minute moving rate only
        integrates to the counter's increase once the window has slid past the traffic."""
        p = self.period
        if p.seconds < SHORT_PERIOD and series in r.COUNTER_RATES:
            counter = r.COUNTER_RATES[series][0]
            expr = f"sum(increase({counter}[{_duration(p.seconds)}]))"
            self.progress(f"review: querying {expr}")
            got = self.client.query(expr, p.end)
            value = next(iter(got[0].points.values())) if got else math.nan
            return value if _finite(value) else None
        return _total(self.samples(series) if samples is None else samples, p.step)

    def quantiles(self, q: float, series: str, width: float) -> dict[int, float]:
        """The q-quantile of a recorded histogram per window of ``width`` (see :meth:`windows`); windows
        before the series was first recorded come from the raw histogram."""
        first = self.first_recorded(series)
        if first is None:
            return self.windows(_raw_quantile(q, series), width)
        got = self.windows(_quantile(q, series), width)
        if first > self.period.start + 2 * self.period.step:
            raw = self.windows(_raw_quantile(q, series), width)
            if width >= self.period.seconds:  # one window over the whole period: raw alone covers it all
                return raw
            got = raw | got  # windows that start after `first` keep the recorded value
        return got

    def first_recorded(self, series: str) -> float | None:
        """When the recording rules first wrote ``series`` in the period (hourly resolution; cached)."""
        if series not in self._first:
            p = self.period
            step = min(HOUR, max(p.step, p.seconds / 2))
            got = self.client.query_range(f"count({series})", p.start + step, p.end, step)
            first = min((t for s in got for t in s.points), default=None)
            self._first[series] = None if first is None else first - step
            if first is None:
                self.progress(f"review: {series} not recorded in the period; reading the raw histogram")
        return self._first[series]

    def windows(self, template: str, width: float) -> dict[int, float]:
        """``template`` (with ``{w}`` for the window) over consecutive windows of ``width`` seconds from the
        period's start: {window index: value}; one window over the whole period when it is shorter."""
        p = self.period
        if p.seconds < width:
            expr = template.format(w=_duration(p.seconds))
            self.progress(f"review: querying {expr}")
            got = self.client.query(expr, p.end)
            value = next(iter(got[0].points.values())) if got else math.nan
            return {0: value} if _finite(value) else {}
        expr = template.format(w=_duration(width))
        self.progress(f"review: querying {expr} per {_duration(width)}")
        out: dict[int, float] = {}
        for s in self.client.query_range(expr, p.start + width, p.end, width):
            for t, v in s.points.items():
                if _finite(v):
                    out[round((t - p.start) / width) - 1] = v
        return out

    def whole(self, q: float, series: str) -> float | None:
        return self.quantiles(q, series, self.period.seconds + 1.0).get(0)


def _key(labels: dict[str, str]) -> tuple:
    """A series' identity across a recorded name and its expression: the labels without the name."""
    return tuple(sorted((k, v) for k, v in labels.items() if k != "__name__"))


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _finite(v: float) -> bool:
    return not (math.isnan(v) or math.isinf(v))


def _duration(seconds: float) -> str:
    return f"{max(1, round(seconds))}s"


def _total(samples: dict[float, float] | None, step: float) -> float | None:
    return None if samples is None else sum(samples.values()) * step


def _by_hour(samples: dict[float, float] | None, period: Period, *, scale: float = 1.0) -> dict[int, float]:
    """Sum of samples × scale per hour of the period (hour k holds samples in (start + k h, start + (k+1) h])."""
    out: dict[int, float] = defaultdict(float)
    for t, v in (samples or {}).items():
        out[int((t - period.step - period.start) // HOUR)] += v * scale
    return dict(out)


def _hour_means(samples: dict[float, float] | None, period: Period) -> dict[int, float]:
    sums, counts = _by_hour(samples, period), _by_hour(dict.fromkeys(samples or {}, 1.0), period)
    return {k: sums[k] / counts[k] for k in sums if counts.get(k)}


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), ``q`` in 0..100."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or not den else num / den


def _sum(*values: float | None) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) if present else None


def _quantile(q: float, series: str) -> str:
    """The q-quantile of a recorded bucket-rate series over a window ``{w}``: the mean rate of each bucket
    over the window is proportional to its increase, which is what the quantile needs."""
    return f"histogram_quantile({q}, sum by (le) (avg_over_time({series}[{{w}}])))"


def _raw_quantile(q: float, series: str) -> str:
    """The same from the raw histogram, for periods the recording rules did not cover."""
    return f"histogram_quantile({q}, sum by (le) (rate({HISTOGRAMS[series]}_bucket[{{w}}])))"


def analyse(client: PrometheusClient, inputs: Inputs, progress: Callable[[str], None]) -> Review:
    review = Review(inputs)
    p = inputs.period
    read = Reader(client, p, progress)
    _efficiency(review, read)
    _hardware(review, read)
    _service(review, read)
    _quality(review, read)
    _roi(review)
    review.recommendations = recommendations(review)
    return review


def _note_missing(review: Review, section: str, samples: Any, series: str) -> None:
    if not samples:
        review.notes[section].append(f"no data: {series}")


def _efficiency(review: Review, read: Reader) -> None:
    p, e = read.period, review.efficiency
    prompt = read.samples(r.PROMPT_TOKENS_RATE)
    generated = read.samples(r.GENERATION_TOKENS_RATE)
    gpus = read.samples(r.GPUS_UP)
    risk = read.samples(r.RISK_PREDICTIONS_RATE)
    for name, s in ((r.PROMPT_TOKENS_RATE, prompt), (r.GENERATION_TOKENS_RATE, generated), (r.GPUS_UP, gpus)):
        _note_missing(review, "efficiency", s, name)
    e["prompt_tokens"] = read.total(r.PROMPT_TOKENS_RATE, prompt)
    e["generated_tokens"] = read.total(r.GENERATION_TOKENS_RATE, generated)
    e["tokens_total"] = _sum(e["prompt_tokens"], e["generated_tokens"])
    tokens_h = _by_hour(prompt, p, scale=p.step)
    for k, v in _by_hour(generated, p, scale=p.step).items():
        tokens_h[k] = tokens_h.get(k, 0.0) + v
    gpu_s_h = _by_hour(gpus, p, scale=p.step)
    review.hourly["tokens_per_s"] = {k: v / HOUR for k, v in tokens_h.items()}
    review.hourly["gpu_seconds"] = gpu_s_h
    review.hourly["risk"] = _by_hour(risk, p, scale=p.step)
    busy = [tokens_h[k] / gpu_s_h[k] for k in sorted(tokens_h) if tokens_h[k] > 0 and gpu_s_h.get(k, 0) > 0]
    e["busy_hours"] = len(busy) if tokens_h and gpu_s_h else None
    e["tokens_per_s_per_gpu_mean"] = statistics.fmean(busy) if busy else None
    e["tokens_per_s_per_gpu_p95"] = percentile(busy, review.inputs.rules.busy_hour_percentile)
    imbalance = read.samples(r.EXPERT_IMBALANCE)
    _note_missing(review, "efficiency", imbalance, r.EXPERT_IMBALANCE)
    e["expert_load_imbalance_mean"] = statistics.fmean(imbalance.values()) if imbalance else None
    e["expert_load_imbalance_max"] = max(imbalance.values()) if imbalance else None
    queries = read.samples(r.PREFIX_CACHE_QUERIES_RATE)
    hits = read.samples(r.PREFIX_CACHE_HITS_RATE)
    _note_missing(review, "efficiency", queries, r.PREFIX_CACHE_QUERIES_RATE)
    e["prefix_cache_hit_rate"] = (
        _ratio(read.total(r.PREFIX_CACHE_HITS_RATE, hits) or 0.0, read.total(r.PREFIX_CACHE_QUERIES_RATE, queries))
        if queries
        else None
    )
    s = review.inputs.sparsity
    if s is None:
        review.notes["efficiency"].append(f"no data: model config ({review.inputs.sparsity_error})")
    e["total_params"] = s.total_params if s else None
    e["activated_params"] = s.activated_params if s else None
    e["dense_equivalent_params"] = s.dense_equivalent_params if s else None
    e["experts_per_token"] = s.experts_per_token if s else None
    e["compute_saved"] = s.compute_saved if s else None
    e["source_claim_holds"] = (s.compute_saved > 0.40) if s else None
    review.sparsity = s.to_dict() if s else None


def _hardware(review: Review, read: Reader) -> None:
    p, h, t = read.period, review.hardware, review.inputs.rules
    util = read.series(r.GPU_UTILIZATION)
    values = [v for s in util for v in s.points.values() if _finite(v)]
    _note_missing(review, "hardware", values, r.GPU_UTILIZATION)
    h["gpu_utilization_mean"] = statistics.fmean(values) if values else None
    n = len(values)
    h["gpu_time_below_low"] = sum(v < t.gpu_low_perc for v in values) / n if n else None
    h["gpu_time_between"] = sum(t.gpu_low_perc <= v <= t.gpu_high_perc for v in values) / n if n else None
    h["gpu_time_above_high"] = sum(v > t.gpu_high_perc for v in values) / n if n else None
    gpu_s = review.hourly["gpu_seconds"]
    h["gpu_hours"] = sum(gpu_s.values()) / HOUR if gpu_s else None
    memory = read.samples(r.GPU_MEMORY_USED)
    _note_missing(review, "hardware", memory, r.GPU_MEMORY_USED)
    h["gpu_memory_used_mean_bytes"] = statistics.fmean(memory.values()) if memory else None
    h["gpu_memory_used_max_bytes"] = max(memory.values()) if memory else None
    kv = read.samples(r.KV_CACHE_USAGE)
    _note_missing(review, "hardware", kv, r.KV_CACHE_USAGE)
    h["kv_cache_usage_mean"] = statistics.fmean(kv.values()) if kv else None
    h["kv_cache_usage_p95"] = percentile(list(kv.values()), 95) if kv else None
    tokens_h, risk_h = review.hourly["tokens_per_s"], review.hourly["risk"]
    idle = [k for k, g in gpu_s.items() if g > 0 and tokens_h.get(k, 0.0) == 0 and risk_h.get(k, 0.0) == 0]
    h["gpu_up_hours"] = sum(1 for g in gpu_s.values() if g > 0) if gpu_s else None
    h["idle_hours_with_gpus_up"] = len(idle) if gpu_s else None
    review.hourly["gpu_util"] = _hour_means({t_: v for s in util for t_, v in s.points.items()}, p) if util else {}


def _service(review: Review, read: Reader) -> None:
    p, s = read.period, review.service
    slo = review.inputs.thresholds.p99_latency_seconds
    s["slo_p99_s"] = slo
    s["p99_latency_s"] = read.whole(0.99, r.E2E_BUCKET_RATE)
    s["p50_latency_s"] = read.whole(0.5, r.E2E_BUCKET_RATE)
    hourly = read.quantiles(0.99, r.E2E_BUCKET_RATE, HOUR)
    weekly = read.quantiles(0.99, r.E2E_BUCKET_RATE, WEEK)
    if s["p99_latency_s"] is None:
        review.notes["service"].append(f"no data: {r.E2E_BUCKET_RATE}")
    review.hourly["p99"], review.weekly["p99"] = hourly, weekly
    over = [k for k, v in hourly.items() if v > slo]
    s["hours_with_latency"] = len(hourly)
    s["hours_p99_over_slo"] = len(over)
    s["share_hours_p99_over_slo"] = len(over) / len(hourly) if hourly else None
    s["ttft_p50_s"] = read.whole(0.5, r.TTFT_BUCKET_RATE)
    s["ttft_p99_s"] = read.whole(0.99, r.TTFT_BUCKET_RATE)
    review.weekly["ttft_p99"] = read.quantiles(0.99, r.TTFT_BUCKET_RATE, WEEK)
    if s["ttft_p99_s"] is None:
        review.notes["service"].append(f"no data: {r.TTFT_BUCKET_RATE}")
    ok = _sum(read.total(r.REQUEST_SUCCESS_RATE), read.total(r.RISK_PREDICTIONS_RATE))
    errors = read.total(r.REQUEST_ERRORS_RATE)
    rejected = read.total(r.REQUESTS_REJECTED_RATE)
    s["requests"] = ok
    s["error_rate"] = _ratio(errors or 0.0, _sum(ok, errors)) if ok is not None else None
    s["rejection_rate"] = _ratio(rejected or 0.0, _sum(ok, errors, rejected)) if ok is not None else None
    if ok is None:
        review.notes["service"].append(f"no data: {r.REQUEST_SUCCESS_RATE}, {r.RISK_PREDICTIONS_RATE}")
    firing: dict[str, float] = {}
    for series in read.series(ALERTS_FIRING):
        name = series.labels.get("alertname", "?")
        firing[name] = firing.get(name, 0.0) + len(series.points) * p.step / 60
    s["alert_minutes_firing"] = dict(sorted(firing.items()))
    up = read.samples(r.RUNTIME_UP)
    _note_missing(review, "service", up, r.RUNTIME_UP)
    # Samples missing inside the period count as down: nothing scraped the runtime then.
    expected = max(1, round(p.seconds / p.step))
    s["availability"] = sum(up.values()) / expected if up else None
    s["request_success_ratio"] = None if s["error_rate"] is None else 1 - s["error_rate"]


def _quality(review: Review, read: Reader) -> None:
    p, q = read.period, review.quality
    tolerance = review.inputs.thresholds.accuracy_drift
    rolling = read.samples(r.ACCURACY_ROLLING)
    baseline = read.samples(r.ACCURACY_BASELINE)
    _note_missing(review, "quality", rolling, r.ACCURACY_ROLLING)
    _note_missing(review, "quality", baseline, r.ACCURACY_BASELINE)
    q["accuracy_tolerance"] = tolerance
    q["accuracy_mean"] = statistics.fmean(rolling.values()) if rolling else None
    q["baseline_mean"] = statistics.fmean(baseline.values()) if baseline else None
    r_h, b_h = _hour_means(rolling, p), _hour_means(baseline, p)
    both = [k for k in r_h if k in b_h]
    drifting = [k for k in both if abs(r_h[k] - b_h[k]) > tolerance]
    q["hours_with_accuracy"] = len(both)
    q["hours_drifting"] = len(drifting)
    q["share_hours_drifting"] = len(drifting) / len(both) if both else None
    for name, samples in (("accuracy", rolling), ("baseline", baseline)):
        weeks: dict[int, list[float]] = defaultdict(list)
        for t, v in (samples or {}).items():
            weeks[int((t - p.step - p.start) // WEEK)].append(v)
        review.weekly[name] = {k: statistics.fmean(v) for k, v in sorted(weeks.items())}
    feedback = read.total(r.FEEDBACK_RATE)
    predictions = read.total(r.RISK_PREDICTIONS_RATE)
    q["feedback_labels"] = feedback
    q["risk_predictions"] = predictions
    q["feedback_coverage"] = _ratio(feedback or 0.0, predictions) if predictions else None
    if not predictions:
        review.notes["quality"].append(f"no data: {r.RISK_PREDICTIONS_RATE}")


def _roi(review: Review) -> None:
    i, roi = review.inputs, review.roi
    gpu_hours = review.hardware.get("gpu_hours") or 0.0
    roi["period_hours"] = i.period.hours
    roi["gpu_hours"] = gpu_hours
    roi["usd_per_gpu_hour"] = i.prices.usd_per_gpu_hour
    roi["usd_per_hour_fixed"] = i.prices.usd_per_hour_fixed
    roi["cost_gpu_usd"] = gpu_hours * i.prices.usd_per_gpu_hour
    roi["cost_fixed_usd"] = i.period.hours * i.prices.usd_per_hour_fixed
    roi["cost_usd"] = roi["cost_gpu_usd"] + roi["cost_fixed_usd"]
    tokens = review.efficiency.get("tokens_total")
    roi["usd_per_million_tokens"] = _ratio(roi["cost_usd"], tokens / 1e6 if tokens else None)
    months = i.period.hours / HOURS_PER_MONTH
    roi["capex_usd"] = i.prices.capex_usd
    roi["capex_amortised_usd"] = i.prices.capex_usd / i.rules.capex_amortisation_months * months
    roi["capex_usd_per_million_tokens"] = _ratio(roi["capex_amortised_usd"], tokens / 1e6 if tokens else None)
    roi["source_hardware"] = i.prices.source_hardware
    roi["instance"] = i.prices.instance


def recommendations(review: Review) -> list[dict[str, Any]]:
    """The three rules, each with its threshold, the numbers it read and whether it fired (None: no data)."""
    t, thresholds = review.inputs.rules, review.inputs.thresholds
    util = review.hardware.get("gpu_utilization_mean")
    over = review.service.get("share_hours_p99_over_slo")
    drift = review.quality.get("share_hours_drifting")
    out = [
        {
            "rule": "right-size",
            "condition": f"mean GPU utilisation over the period < {t.gpu_busy_below_perc:g}%",
            "fired": None if util is None else util < t.gpu_busy_below_perc,
            "numbers": {"gpu_utilization_mean": util, "threshold_perc": t.gpu_busy_below_perc},
            "action": "move to a smaller size or run fewer replicas",
        },
        {
            "rule": "scale-out",
            "condition": (
                f"P99 latency above the SLO ({thresholds.p99_latency_seconds:g} s) in more than "
                f"{t.p99_over_slo_hours_share:.0%} of the hours with traffic"
            ),
            "fired": None if over is None else over > t.p99_over_slo_hours_share,
            "numbers": {
                "share_hours_p99_over_slo": over,
                "hours_p99_over_slo": review.service.get("hours_p99_over_slo"),
                "hours_with_latency": review.service.get("hours_with_latency"),
                "threshold_share": t.p99_over_slo_hours_share,
            },
            "action": "scale out (more replicas) or move to a larger size",
        },
        {
            "rule": "re-evaluate-model",
            "condition": (
                f"rolling accuracy off its baseline by more than ±{thresholds.accuracy_drift:g} in more than "
                f"{t.accuracy_drift_hours_share:.0%} of the hours with an accuracy"
            ),
            "fired": None if drift is None else drift > t.accuracy_drift_hours_share,
            "numbers": {
                "share_hours_drifting": drift,
                "hours_drifting": review.quality.get("hours_drifting"),
                "hours_with_accuracy": review.quality.get("hours_with_accuracy"),
                "threshold_share": t.accuracy_drift_hours_share,
            },
            "action": "re-evaluate the model revision against fresh labelled data",
        },
    ]
    return out
