"""How many prompt tokens a step may take beside running decodes without stalling them.

A step that prefills ``p`` prompt tokens beside ``b`` decoding sequences takes about ``t_decode(b) + p ×
t_token``. With only the token budget as a limit, a burst of new prompts fills every step's budget and
each running stream waits for it: its inter-token latency jumps to several times its usual value exactly
when the server is busiest. Stall-free batching (Sarathi-Serve's term) sizes the prompt share of a step
from a latency bound instead.

:class:`PrefillPacer` learns both terms from the engine's own step times, online, so nothing is
profiled per card or model: a decode-only step's time per decode-batch bucket, and what a step's prompt
tokens add to it. While sequences decode, a step's prompt tokens are capped so that the step should take at
most ``max_stall`` × a decode-only step. With nothing decoding, prompts take the whole budget, and
likewise while fewer than ``RAMP_RATIO`` sequences decode per sequence about to start (a burst ramping
up): a stall costs each decoding stream a late token, holding prompts back costs each starting one a late
first token, and the bound protects the decoders only where they clearly outnumber the starting.

The prompt part's cost is a line, a forward's fixed cost plus a cost per prompt token, fitted through the
mean extra time of steps in each power-of-two class of prompt tokens (each class keeps its last means, so
what small steps cost is remembered while only large ones run). With one class seen, the fixed cost is
folded into the tokens (their ratio), whose fixed point under a repeated cap ``p`` is where the allowed
extra time ``A`` is spent exactly; a second class gives the line, and the cap ``(A - fixed) / per_token``.
When the fixed cost alone exceeds ``A`` no cap can keep the bound: every step with prompt tokens stalls
the decodes whatever its size, so the pacer leaves prompts the whole budget (the fewest such steps, at the
lowest cost per token) instead of cutting them into many small forwards that each pay the fixed cost. On
a GPU where a prefill forward is launch-bound this is the common case, and pacing turns itself off.

Under heavy load nearly every step carries prompt tokens, so a batch size's decode-only time would never
be seen. When its bucket has no measurement, or one older than ``PROBE_EVERY`` steps, the next step takes
no prompt tokens (a probe): one decode-only step in dozens, which delays waiting prompts by one decode step
and keeps the bound tied to the batch that runs now (decode time grows with batch and context).
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: prompts always get at least this many tokens a step (never starved by a tight latency bound)
MIN_PROMPT_TOKENS = 64
#: weight of the past in a prompt-token class's mean extra time and tokens
COST_DECAY = 0.5
#: weight of the past in a bucket's decode-only time (probes are rare under load: each counts for half)
DECODE_DECAY = 0.5
#: a bucket's decode-only time is measured again after this many steps
PROBE_EVERY = 64
#: prompts are paced only while at least this many sequences decode per sequence about to start
RAMP_RATIO = 2


def batch_bucket(batch: int) -> int:
    """Decode batches within a power of two cost about the same (and share a CUDA graph bucket)."""
    return 1 << max(0, batch - 1).bit_length()


@dataclass
class PrefillPacer:
    """``max_stall``: a step with prompt tokens beside decodes should take at most this many times a
    decode-only step of the same batch (> 1). ``min_tokens``: the floor of the cap."""

    max_stall: float
    min_tokens: int = MIN_PROMPT_TOKENS
    decode_s: dict[int, float] = field(default_factory=dict)  # decode-only step seconds per batch bucket
    measured_at: dict[int, int] = field(default_factory=dict)  # the step that last measured each bucket
    steps: int = 0
    # per power-of-two class of prompt tokens: decayed mean (prompt tokens, seconds beyond the decode part)
    prompt_cost: dict[int, tuple[float, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.max_stall > 1:
            raise ValueError(f"max_stall must be > 1, got {self.max_stall}")
        if self.min_tokens < 1:
            raise ValueError(f"min_tokens must be >= 1, got {self.min_tokens}")

    def cost_model(self) -> tuple[float, float] | None:
        """(fixed seconds per prefill forward, seconds per prompt token) of a step's prompt part: the
        least-squares line through the classes' means; with one class (or a line that does not rise with
        tokens) the fixed cost is folded into the tokens. None before any step with prompt tokens."""
        points = list(self.prompt_cost.values())
        if not points:
            return None
        ratio = (0.0, sum(y for _, y in points) / sum(n for n, _ in points))
        if len(points) < 2:
            return ratio
        n_mean = sum(n for n, _ in points) / len(points)
        y_mean = sum(y for _, y in points) / len(points)
        var = sum((n - n_mean) ** 2 for n, _ in points)
        slope = sum((n - n_mean) * (y - y_mean) for n, y in points) / var
        if slope <= 0:
            return ratio
        return max(0.0, y_mean - slope * n_mean), slope

    @property
    def token_s(self) -> float | None:
        """Learned extra seconds per prompt token (None until a step with prompt tokens was seen)."""
        model = self.cost_model()
        return model[1] if model else None

    def decode_step_s(self, batch: int) -> float | None:
        """A decode-only step's learned seconds at this batch (its bucket's); None when not measured."""
        return self.decode_s.get(batch_bucket(batch))

    def prompt_budget(self, decoding: int, starting: int = 0) -> int | None:
        """The most prompt tokens a step with ``decoding`` decode rows should take, while ``starting``
        sequences are about to start (partly prefilled, or queued with room in the batch): None for no cap
        (nothing decodes, a ramp-up, no step with prompt tokens timed yet, or a fixed cost above the bound),
        0 for a probe."""
        if decoding == 0 or starting * RAMP_RATIO > decoding:
            return None
        bucket = batch_bucket(decoding)
        decode_s = self.decode_s.get(bucket)
        if decode_s is None:
            return 0
        model = self.cost_model()
        if model is None:
            return None
        fixed, token_s = model
        allowed = (self.max_stall - 1.0) * decode_s
        if fixed + token_s * self.min_tokens > allowed:  # no cap keeps the bound: the fewest stalls instead
            return None
        if self.steps - self.measured_at[bucket] > PROBE_EVERY:
            return 0
        return max(self.min_tokens, int((allowed - fixed) / token_s))

    def observe(self, seconds: float, decoding: int, prompt_tokens: int) -> None:
        """One finished step: ``seconds`` of wall time, ``decoding`` decode rows, ``prompt_tokens``
        prefilled."""
        self.steps += 1
        if prompt_tokens == 0:
            if decoding:
                bucket = batch_bucket(decoding)
                old = self.decode_s.get(bucket)
                self.decode_s[bucket] = seconds if old is None else DECODE_DECAY * old + (1 - DECODE_DECAY) * seconds
                self.measured_at[bucket] = self.steps
            return
        base = (self.decode_step_s(decoding) or 0.0) if decoding else 0.0
        extra = max(0.0, seconds - base)
        cls = batch_bucket(prompt_tokens)
        old = self.prompt_cost.get(cls)
        if old is not None:
            prompt_tokens = COST_DECAY * old[0] + (1 - COST_DECAY) * prompt_tokens
            extra = COST_DECAY * old[1] + (1 - COST_DECAY) * extra
        self.prompt_cost[cls] = (prompt_tokens, extra)
