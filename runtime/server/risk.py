"""The risk-score application of the service: an e-commerce risk score from the language model, plus
accuracy-drift tracking (the use case of the source document, a deployment guide).

The features are rendered into a fixed prompt that ends where the model should answer " yes" or
" no"; the risk score is P(yes) / (P(yes) + P(no)) from the next-token log-probabilities of those two
label tokens. Factors are ranked by leave-one-out impact: the same prompt without feature i, all N+1
prompts scored in ONE batched forward (the engine's scoring job), impact_i = score - score_without_i.

Feedback joins a later ground-truth label to the stored prediction by ``request_id``; the share of
correct predictions over the last ``window`` labels is the rolling-accuracy gauge, compared against a
configured baseline (the source document's ±3% accuracy-drift alert).
"""

from __future__ import annotations

import collections
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass

PROMPT_HEADER = "Order features:\n"
PROMPT_QUESTION = "Is this transaction a fraud risk? Answer yes or no. The answer is"
POSITIVE_LABEL, NEGATIVE_LABEL = " yes", " no"
THRESHOLD = 0.5


class RiskConfigError(RuntimeError):
    """The tokenizer cannot express the label tokens (the checkpoint does not fit this template)."""


def render(features: Mapping[str, object]) -> str:
    """Stable, readable prompt: one ``name: value`` line per feature, in the caller's order."""
    lines = "".join(f"{k}: {_fmt(v)}\n" for k, v in features.items())
    return PROMPT_HEADER + lines + PROMPT_QUESTION


def _fmt(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def label_token_ids(tokenizer) -> tuple[int, int]:
    """First token of " yes" / " no"; they must differ or the score would be meaningless."""
    pos = tokenizer.encode(POSITIVE_LABEL, add_bos=False)
    neg = tokenizer.encode(NEGATIVE_LABEL, add_bos=False)
    if not pos or not neg or pos[0] == neg[0]:
        raise RiskConfigError(f"labels {POSITIVE_LABEL!r}/{NEGATIVE_LABEL!r} do not map to distinct tokens")
    return pos[0], neg[0]


def score_from_logprobs(lp_pos: float, lp_neg: float) -> float:
    """P(pos) normalized over the two labels, computed stably; always in [0, 1]."""
    m = max(lp_pos, lp_neg)
    a, b = math.exp(lp_pos - m), math.exp(lp_neg - m)
    return a / (a + b)


def leave_one_out_prompts(features: Mapping[str, object]) -> list[str]:
    """[full prompt, prompt without feature 0, without feature 1, ...]."""
    names = list(features)
    out = [render(features)]
    for n in names:
        out.append(render({k: v for k, v in features.items() if k != n}))
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


class FeedbackTracker:
    """Stored predictions (bounded, oldest evicted) and the rolling accuracy over labelled ones."""

    def __init__(self, window: int = 500, capacity: int = 100_000, baseline: float | None = None) -> None:
        if window < 1 or capacity < 1:
            raise ValueError("window and capacity must be >= 1")
        self.window, self.capacity, self.baseline = window, capacity, baseline
        self._pred: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._hits: collections.deque[bool] = collections.deque(maxlen=window)
        self._lock = threading.Lock()

    def record(self, request_id: str, score: float) -> None:
        with self._lock:
            self._pred[request_id] = score
            self._pred.move_to_end(request_id)
            while len(self._pred) > self.capacity:
                self._pred.popitem(last=False)

    def label(self, request_id: str, label: bool) -> tuple[bool, float] | None:
        """Join a ground-truth label; returns (prediction was correct, rolling accuracy) or None when
        the request id is unknown (never seen, evicted or already labelled)."""
        with self._lock:
            score = self._pred.pop(request_id, None)
            if score is None:
                return None
            correct = (score >= THRESHOLD) == bool(label)
            self._hits.append(correct)
            return correct, self.accuracy()

    def accuracy(self) -> float:
        return sum(self._hits) / len(self._hits) if self._hits else float("nan")

    @property
    def labelled(self) -> int:
        return len(self._hits)
