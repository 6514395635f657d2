"""The risk-score application of the service: a risk score from the language model, plus accuracy tracking
(the use case of the source document, a deployment guide: e-commerce transactions scored for fraud).

The task (``runtime.risk_task``: prompt, labels, threshold, few-shot examples) renders the features into a
prompt that ends where the model should answer the positive or the negative label; the risk score is
P(pos) / (P(pos) + P(neg)) from the next-token log-probabilities of those two label tokens. Factors are
ranked by leave-one-out impact: the same prompt without feature i, all N+1 prompts scored in ONE batched
forward (the engine's scoring job), impact_i = score - score_without_i.

Feedback joins a later ground-truth label to the stored prediction record (``prediction_store``) by
``request_id``; each replica counts labelled and correct predictions, and the fleet's accuracy over a time
window is computed from those counters in PromQL (the source document's ±3% accuracy-drift alert). The
per-replica rolling accuracy over the last ``window`` labels stays as a gauge for the feedback response.
"""

from __future__ import annotations

import collections
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass

from runtime.risk_task import RiskTask


class RiskConfigError(RuntimeError):
    """The tokenizer cannot express the task's label tokens (the checkpoint does not fit this task)."""


def label_token_ids(task: RiskTask, tokenizer) -> tuple[int, int]:
    """The token ids of the two labels: each must be exactly one token, and they must differ, or the
    score would be meaningless."""
    ids = []
    for field in ("positive_label", "negative_label"):
        label = getattr(task, field)
        got = tokenizer.encode(label, add_bos=False)
        if len(got) != 1:
            raise RiskConfigError(
                f"risk task {task.name!r}: {field} {label!r} is {len(got)} tokens {got} for this tokenizer; "
                "it must be exactly one token (try a leading space, or another word)"
            )
        ids.append(got[0])
    if ids[0] == ids[1]:
        raise RiskConfigError(f"risk task {task.name!r}: both labels are token {ids[0]}; they must differ")
    return ids[0], ids[1]


def score_from_logprobs(lp_pos: float, lp_neg: float) -> float:
    """P(pos) normalized over the two labels, computed stably; always in [0, 1]."""
    m = max(lp_pos, lp_neg)
    a, b = math.exp(lp_pos - m), math.exp(lp_neg - m)
    return a / (a + b)


def leave_one_out_prompts(task: RiskTask, features: Mapping[str, object]) -> list[str]:
    """[full prompt, prompt without feature 0, without feature 1, ...]."""
    names = list(features)
    out = [task.render(features)]
    for n in names:
        out.append(task.render({k: v for k, v in features.items() if k != n}))
    return out


@dataclass
class Factor:
    name: str
    value: object
    impact: float  # score with the feature minus score without it (> 0: raises the risk)


def rank_factors(features: Mapping[str, object], scores: list[float]) -> list[Factor]:
    """``scores`` = [full, without_0, without_1, ...] → factors sorted by |impact|, largest first."""
    full = scores[0]
    factors = [Factor(name, value, full - s) for (name, value), s in zip(features.items(), scores[1:], strict=True)]
    return sorted(factors, key=lambda f: -abs(f.impact))


class RollingAccuracy:
    """This replica's share of correct predictions over its last ``window`` labels."""

    def __init__(self, window: int = 500) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        self._hits: collections.deque[bool] = collections.deque(maxlen=window)
        self._lock = threading.Lock()

    def add(self, correct: bool) -> float:
        with self._lock:
            self._hits.append(correct)
            return self.accuracy()

    def accuracy(self) -> float:
        return sum(self._hits) / len(self._hits) if self._hits else math.nan

    @property
    def labelled(self) -> int:
        return len(self._hits)
