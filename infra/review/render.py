"""The review written three ways: ``review.md`` (tables), a self-contained ``review.html`` (the same
tables plus matplotlib plots embedded as base64 PNGs, no external file or script) and ``review.json``
(every figure as a number, ``null`` for no data, for scripts and the next quarter's comparison)."""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from infra.review.analysis import Review

NO_DATA = "no data"


@dataclass
class Section:
    title: str
    rows: list[tuple[str, str]] = field(default_factory=list)
    tables: list[tuple[str, list[str], list[list[str]]]] = field(default_factory=list)
    plots: list[tuple[str, bytes]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ---- number formats ------------------------------------------------------------------------------------


def _fmt(value: Any, kind: str = "num") -> str:
    if value is None:
        return NO_DATA
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, str):
        return value
    return {
        "int": lambda v: f"{v:,.0f}",
        "num": lambda v: f"{v:,.2f}",
        "pct": lambda v: f"{v * 100:.1f}%",
        "perc": lambda v: f"{v:.1f}%",
        "ms": lambda v: f"{v * 1000:.0f} ms",
        "usd": lambda v: f"${v:,.2f}",
        "params": _params,
        "gib": lambda v: f"{v / 2**30:.1f} GiB",
    }[kind](value)


def _params(n: float) -> str:
    """A parameter count the way model cards write it: 671.03 B, 2.45 B, 13.8 M, 344,256."""
    if n >= 1e9:
        return f"{n / 1e9:.2f} B"
    return f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n:,.0f}"


def _span(hours: float) -> str:
    return f"{hours:,.1f} hours" if hours >= 1 else f"{hours * 60:.1f} minutes"


def date(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M UTC")


# ---- plots ---------------------------------------------------------------------------------------------


def _png(draw: Any) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3))
    draw(ax)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _weekly_plot(values: dict[int, float], line: float | None, ylabel: str, line_label: str, *, other=None) -> bytes:
    def draw(ax: Any) -> None:
        weeks = sorted(values)
        ax.bar([w + 1 for w in weeks], [values[w] for w in weeks], color="#4c72b0", label=ylabel)
        if other:
            ax.plot([w + 1 for w in sorted(other)], [other[w] for w in sorted(other)], "k--", label=line_label)
        elif line is not None:
            ax.axhline(line, color="#c44e52", linestyle="--", label=line_label)
        ax.set_xlabel("week of the period")
        ax.set_ylabel(ylabel)
        ax.legend(loc="best")

    return _png(draw)


# ---- sections ------------------------------------------------------------------------------------------


def sections(review: Review, plots: bool = True) -> list[Section]:
    e, h, s, q, roi = review.efficiency, review.hardware, review.service, review.quality, review.roi
    t = review.inputs.rules
    eff = Section("Model efficiency", notes=list(review.notes.get("efficiency", [])))
    eff.rows = [
        ("tokens served (prompt + generated)", _fmt(e.get("tokens_total"), "int")),
        ("prompt tokens", _fmt(e.get("prompt_tokens"), "int")),
        ("generated tokens", _fmt(e.get("generated_tokens"), "int")),
        ("tokens/s per GPU, mean of busy hours", _fmt(e.get("tokens_per_s_per_gpu_mean"))),
        (f"tokens/s per GPU, P{t.busy_hour_percentile:g} of busy hours", _fmt(e.get("tokens_per_s_per_gpu_p95"))),
        ("busy hours (tokens served, GPUs up)", _fmt(e.get("busy_hours"), "int")),
        ("parameters, total", _fmt(e.get("total_params"), "params")),
        ("parameters activated per token (input embedding excluded)", _fmt(e.get("activated_params"), "params")),
        ("experts per token", _fmt(e.get("experts_per_token"))),
        ("compute saved against a dense model of the same size", _fmt(e.get("compute_saved"), "pct")),
        ("source document's claim (> 40% saved) holds", _fmt(e.get("source_claim_holds"))),
        (
            "expert load imbalance (max/mean), mean / max",
            _pair(e, "expert_load_imbalance_mean", "expert_load_imbalance_max"),
        ),
        ("prefix-cache hit rate", _fmt(e.get("prefix_cache_hit_rate"), "pct")),
    ]
    if review.sparsity:
        sp = review.sparsity
        eff.tables.append(
            (
                "Where the parameters are (all layers)",
                ["part", "parameters"],
                [
                    ["input embedding (lookup, not compute)", _fmt(sp["embedding_params"], "params")],
                    ["attention (MLA)", _fmt(sp["attention_params"], "params")],
                    [f"dense MLP ({sp['dense_layers']} layers)", _fmt(sp["dense_mlp_params"], "params")],
                    ["router", _fmt(sp["router_params"], "params")],
                    [f"shared experts ({sp['moe_layers']} MoE layers)", _fmt(sp["shared_expert_params"], "params")],
                    ["routed experts, all", _fmt(sp["routed_expert_params"], "params")],
                    ["routed experts, top-k per token", _fmt(sp["activated_routed_params"], "params")],
                    ["dense model of the same size, per token", _fmt(sp["dense_equivalent_params"], "params")],
                ],
            )
        )
    tokens = review.hourly.get("tokens_per_s") or {}
    if plots and tokens:
        eff.plots.append(("Tokens per second, hourly mean", _png(lambda ax: _hourly(ax, tokens, "tokens/s"))))

    hw = Section("Hardware utilisation", notes=list(review.notes.get("hardware", [])))
    hw.rows = [
        ("GPU utilisation, mean", _fmt(h.get("gpu_utilization_mean"), "perc")),
        (f"GPU time at < {t.gpu_low_perc:g}%", _fmt(h.get("gpu_time_below_low"), "pct")),
        (f"GPU time at {t.gpu_low_perc:g}–{t.gpu_high_perc:g}%", _fmt(h.get("gpu_time_between"), "pct")),
        (f"GPU time at > {t.gpu_high_perc:g}%", _fmt(h.get("gpu_time_above_high"), "pct")),
        ("GPU-hours up", _fmt(h.get("gpu_hours"), "num")),
        (
            "GPU memory used per GPU, mean / max",
            _pair(h, "gpu_memory_used_mean_bytes", "gpu_memory_used_max_bytes", "gib"),
        ),
        ("KV-cache usage, mean / P95", _pair(h, "kv_cache_usage_mean", "kv_cache_usage_p95", "pct")),
        ("hours with GPUs up", _fmt(h.get("gpu_up_hours"), "int")),
        ("hours with zero traffic while GPUs were up", _fmt(h.get("idle_hours_with_gpus_up"), "int")),
    ]
    if plots and h.get("gpu_utilization_mean") is not None:
        bands = [h["gpu_time_below_low"], h["gpu_time_between"], h["gpu_time_above_high"]]
        labels = [f"< {t.gpu_low_perc:g}%", f"{t.gpu_low_perc:g}–{t.gpu_high_perc:g}%", f"> {t.gpu_high_perc:g}%"]
        hw.plots.append(
            (
                "Share of GPU time by utilisation band",
                _png(lambda ax: _bars(ax, labels, [b * 100 for b in bands], "% of GPU time")),
            )
        )

    sq = Section("Service quality", notes=list(review.notes.get("service", [])))
    sq.rows = [
        ("P99 latency, period (SLO)", f"{_fmt(s.get('p99_latency_s'), 'ms')} (SLO {_fmt(s.get('slo_p99_s'), 'ms')})"),
        ("P50 latency, period", _fmt(s.get("p50_latency_s"), "ms")),
        (
            "hours with P99 over the SLO",
            f"{_fmt(s.get('hours_p99_over_slo'), 'int')} of {_fmt(s.get('hours_with_latency'), 'int')} "
            f"({_fmt(s.get('share_hours_p99_over_slo'), 'pct')})",
        ),
        ("time to first token, P50 / P99", _pair(s, "ttft_p50_s", "ttft_p99_s", "ms")),
        ("requests finished", _fmt(s.get("requests"), "int")),
        ("error rate (server side)", _fmt(s.get("error_rate"), "pct")),
        ("rejection rate", _fmt(s.get("rejection_rate"), "pct")),
        ("availability (runtime scraped healthy)", _fmt(s.get("availability"), "pct")),
    ]
    weekly_p99 = review.weekly.get("p99") or {}
    ttft = review.weekly.get("ttft_p99") or {}
    if weekly_p99:
        sq.tables.append(
            (
                "P99 latency by week",
                ["week", "P99", "over SLO", "TTFT P99"],
                [
                    [str(w + 1), _fmt(v, "ms"), _fmt(v > s["slo_p99_s"]), _fmt(ttft.get(w), "ms")]
                    for w, v in sorted(weekly_p99.items())
                ],
            )
        )
        if plots:
            sq.plots.append(
                ("P99 latency by week against the SLO", _weekly_plot(weekly_p99, s["slo_p99_s"], "P99 (s)", "SLO"))
            )
    alerts = s.get("alert_minutes_firing") or {}
    sq.tables.append(
        (
            "Minutes each alert was firing",
            ["alert", "minutes"],
            [[a, _fmt(m, "int")] for a, m in alerts.items()] or [["none fired", "0"]],
        )
    )

    ql = Section("Quality", notes=list(review.notes.get("quality", [])))
    ql.rows = [
        ("rolling accuracy, mean", _fmt(q.get("accuracy_mean"), "num")),
        ("baseline, mean", _fmt(q.get("baseline_mean"), "num")),
        (
            "hours drifting beyond tolerance",
            f"{_fmt(q.get('hours_drifting'), 'int')} of {_fmt(q.get('hours_with_accuracy'), 'int')} "
            f"(±{q.get('accuracy_tolerance'):g})",
        ),
        ("feedback coverage (labels / predictions)", _fmt(q.get("feedback_coverage"), "pct")),
    ]
    acc, base = review.weekly.get("accuracy") or {}, review.weekly.get("baseline") or {}
    if acc:
        ql.tables.append(
            (
                "Accuracy by week",
                ["week", "rolling accuracy", "baseline"],
                [[str(w + 1), _fmt(v, "num"), _fmt(base.get(w), "num")] for w, v in acc.items()],
            )
        )
        if plots:
            ql.plots.append(
                (
                    "Rolling accuracy by week against its baseline",
                    _weekly_plot(acc, None, "accuracy", "baseline", other=base),
                )
            )

    rs = Section("ROI")
    rs.rows = [
        ("period", _span(roi["period_hours"])),
        (
            f"GPU cost ({_fmt(roi['gpu_hours'], 'num')} GPU-hours × {_fmt(roi['usd_per_gpu_hour'], 'usd')}, "
            f"{roi['instance']})",
            _fmt(roi["cost_gpu_usd"], "usd"),
        ),
        (f"always-on cost ({_fmt(roi['usd_per_hour_fixed'], 'usd')}/h)", _fmt(roi["cost_fixed_usd"], "usd")),
        ("cost of the period at list prices", _fmt(roi["cost_usd"], "usd")),
        ("cost per million tokens", _fmt(roi.get("usd_per_million_tokens"), "usd")),
        (
            f"source document's capex ({roi['source_hardware']}, {_fmt(roi['capex_usd'], 'usd')}) "
            f"over {t.capex_amortisation_months:g} months, this period",
            _fmt(roi["capex_amortised_usd"], "usd"),
        ),
        ("the same per million tokens", _fmt(roi.get("capex_usd_per_million_tokens"), "usd")),
    ]
    if plots:
        rs.plots.append(
            (
                "Cost of the period: cloud at list prices against amortised capex",
                _png(
                    lambda ax: _bars(
                        ax,
                        ["cloud (list prices)", "capex amortised"],
                        [roi["cost_usd"], roi["capex_amortised_usd"]],
                        "USD",
                    )
                ),
            )
        )

    rec = Section("Recommendations")
    rec.tables.append(
        (
            "Rules",
            ["rule", "condition", "fired", "numbers", "action"],
            [
                [
                    x["rule"],
                    x["condition"],
                    "no data" if x["fired"] is None else ("YES" if x["fired"] else "no"),
                    _numbers(x["numbers"]),
                    x["action"] if x["fired"] else "—",
                ]
                for x in review.recommendations
            ],
        )
    )
    return [eff, hw, sq, ql, rs, rec]


def _pair(d: dict, a: str, b: str, kind: str = "num") -> str:
    if d.get(a) is None and d.get(b) is None:
        return NO_DATA
    return f"{_fmt(d.get(a), kind)} / {_fmt(d.get(b), kind)}"


def _numbers(numbers: dict[str, Any]) -> str:
    return ", ".join(
        f"{k} = {NO_DATA if v is None else (f'{v:.4g}' if isinstance(v, float) else v)}" for k, v in numbers.items()
    )


def _hourly(ax: Any, values: dict[int, float], ylabel: str) -> None:
    hours = sorted(values)
    ax.plot([h / 24 for h in hours], [values[h] for h in hours], lw=0.8)
    ax.set_xlabel("day of the period")
    ax.set_ylabel(ylabel)


def _bars(ax: Any, labels: list[str], values: list[float], ylabel: str) -> None:
    ax.bar(labels, values, color=["#4c72b0", "#55a868", "#c44e52"][: len(values)])
    ax.set_ylabel(ylabel)


# ---- documents -----------------------------------------------------------------------------------------


def _title(review: Review) -> tuple[str, str]:
    i = review.inputs
    return (
        f"MoE Fleet review: {i.environment}",
        f"{date(i.period.start)} → {date(i.period.end)} · size {i.size} · model {i.model}",
    )


def headline_text(review: Review) -> str:
    hl = review.headline()
    return (
        f"tokens {_fmt(hl['tokens'], 'int')} · tokens/s/GPU {_fmt(hl['tokens_per_s_per_gpu'])} · "
        f"P99 {_fmt(hl['p99_latency_s'], 'ms')} · "
        f"cost per million tokens {_fmt(hl['usd_per_million_tokens'], 'usd')} · "
        f"compute saved by sparsity {_fmt(hl['compute_saved'], 'pct')}"
    )


def markdown(review: Review, secs: list[Section]) -> str:
    title, sub = _title(review)
    out = [f"# {title}", "", sub, "", f"**Headline:** {headline_text(review)}", ""]
    for sec in secs:
        out += [f"## {sec.title}", ""]
        if sec.rows:
            out += ["| figure | value |", "| --- | --- |", *[f"| {k} | {v} |" for k, v in sec.rows], ""]
        for caption, headers, rows in sec.tables:
            out += [f"**{caption}**", "", "| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
            out += ["| " + " | ".join(row) + " |" for row in rows]
            out.append("")
        out += [f"- {note}" for note in sec.notes]
        if sec.notes:
            out.append("")
    return "\n".join(out)


def html_document(review: Review, secs: list[Section]) -> str:
    title, sub = _title(review)
    e = html.escape
    out = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{e(title)}</title><style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left}"
        ".note{color:#a33}</style></head><body>",
        f"<h1>{e(title)}</h1><p>{e(sub)}</p><p><b>Headline:</b> {e(headline_text(review))}</p>",
    ]
    for sec in secs:
        out.append(f"<h2>{e(sec.title)}</h2>")
        if sec.rows:
            out.append(
                "<table>" + "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in sec.rows) + "</table>"
            )
        for caption, headers, rows in sec.tables:
            head = "".join(f"<th>{e(h)}</th>" for h in headers)
            body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows)
            out.append(f"<table><caption>{e(caption)}</caption><tr>{head}</tr>{body}</table>")
        for caption, png in sec.plots:
            data = base64.b64encode(png).decode()
            out.append(
                f"<figure><img alt='{e(caption)}' src='data:image/png;base64,{data}'>"
                f"<figcaption>{e(caption)}</figcaption></figure>"
            )
        out += [f"<p class='note'>{e(note)}</p>" for note in sec.notes]
    out.append("</body></html>")
    return "\n".join(out)


def json_document(review: Review) -> dict[str, Any]:
    i = review.inputs
    return {
        "environment": i.environment,
        "size": i.size,
        "model": i.model,
        "period": {"start": i.period.start, "end": i.period.end, "step_s": i.period.step, "hours": i.period.hours},
        "headline": review.headline(),
        "model_efficiency": review.efficiency,
        "sparsity": review.sparsity,
        "hardware": review.hardware,
        "service": review.service,
        "quality": review.quality,
        "roi": review.roi,
        "recommendations": review.recommendations,
        "weekly": {k: {str(w + 1): v for w, v in vals.items()} for k, vals in review.weekly.items()},
        "notes": dict(review.notes),
        "rule_thresholds": asdict(i.rules),
    }


def write(review: Review, out_dir: Path) -> dict[str, Path]:
    """Write review.md, review.html and review.json into ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    secs = sections(review)
    paths = {"md": out_dir / "review.md", "html": out_dir / "review.html", "json": out_dir / "review.json"}
    paths["md"].write_text(markdown(review, secs))
    paths["html"].write_text(html_document(review, secs))
    paths["json"].write_text(json.dumps(json_document(review), indent=2, default=_json_default))
    return paths


def _json_default(value: Any) -> Any:
    if isinstance(value, float):
        return None
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
