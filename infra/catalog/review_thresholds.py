"""The quarterly review's rule thresholds, defined once: the review's recommendations compare against these.

The source document ends by asking its users to review the stack every quarter on model efficiency,
hardware utilisation and business ROI. `moefleet review` turns that into explicit rules; each number a
rule compares against lives here (and the bands the GPU-utilisation distribution is cut into), so the
report, its tests and docs/review.md cannot disagree. The latency SLO and the accuracy tolerance are the
environment's alert thresholds (`infra.catalog.thresholds.Thresholds`), not repeated here.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class ReviewThresholds:
    """Rule thresholds of the review; every field is a positive number."""

    #: GPU utilisation bands of the distribution (percent): time below `gpu_low_perc` is "idle-ish",
    #: above `gpu_high_perc` saturated (the source document's 90% alert threshold).
    gpu_low_perc: float = 30.0
    gpu_high_perc: float = 90.0
    #: Rule "right-size": mean GPU utilisation over the period below this → a smaller size or fewer replicas.
    gpu_busy_below_perc: float = 30.0
    #: Rule "scale out": share of hours (with traffic) whose P99 exceeds the SLO above this.
    p99_over_slo_hours_share: float = 0.05
    #: Rule "re-evaluate the model revision": share of hours (with an accuracy) whose rolling accuracy is
    #: off its baseline by more than the alert's tolerance, above this.
    accuracy_drift_hours_share: float = 0.05
    #: Months the source document's hardware purchase is spread over in the ROI comparison.
    capex_amortisation_months: float = 36.0
    #: Percentile of busy hours reported for tokens/s per GPU.
    busy_hour_percentile: float = 95.0

    def __post_init__(self) -> None:
        bad = [
            f"{f.name} = {getattr(self, f.name)!r}: expected a positive number"
            for f in fields(self)
            if isinstance(getattr(self, f.name), bool)
            or not isinstance(getattr(self, f.name), int | float)
            or getattr(self, f.name) <= 0
        ]
        if self.gpu_low_perc >= self.gpu_high_perc:
            bad.append(f"gpu_low_perc = {self.gpu_low_perc!r}: must be below gpu_high_perc = {self.gpu_high_perc!r}")
        if bad:
            raise ValueError("invalid review threshold(s): " + "; ".join(bad))
