"""How many prompt tokens a step may take beside running decodes without stalling them.

A step that prefills ``p`` prompt tokens beside ``b`` decoding sequences takes about ``t_decode(b) + p ×
t_token``. With only the token budget as a limit, a burst of new prompts fills every step's budget and
each running stream waits for it: its inter-token latency jumps to several times its usual value exactly
when the server is busiest. Stall-free batching (Sarathi-Serve's term) sizes the prompt share of a step
from a latency bound instead.

:class:`PrefillPacer` learns both terms from the engine's own step times, online, so nothing is
profiled per card or model: a decode-only step's time per decode-batch bucket, and the extra time per
prompt token. While sequences decode, a step's prompt tokens are capped so that the step should take at
most ``max_stall`` × a decode-only step. With nothing decoding, prompts take the whole budget, and
likewise while fewer than ``RAMP_RATIO`` sequences decode per sequence about to start (a burst ramping
up): a stall costs each decoding stream a late token, holding prompts back costs each starting one a late
first token, and the bound protects the decoders only where they clearly outnumber the starting.

The per-token cost is a ratio of decayed sums (extra seconds over prompt tokens), which folds a forward's
fixed cost into the tokens of the step that paid it. That is what makes the cap right: at a fixed cap
``p``, the measured cost is ``(o + c·p) / p`` and the next cap ``A·p / (o + c·p)``, whose fixed point is
``o + c·p = A`` (the allowed extra time ``A`` spent exactly), reached geometrically since ``o < A``. When a
forward's fixed cost alone exceeds ``A``, the cap settles at ``min_tokens``: prompts still progress.

Under heavy load nearly every step carries prompt tokens, so a batch size's decode-only time would never
be seen. When its bucket has no measurement, or one older than ``PROBE_EVERY`` steps, the next step takes
no prompt tokens (a probe): one decode-only step in dozens, which delays waiting prompts by one decode step
and keeps the bound tied to the batch that runs now (decode time grows with batch and context).
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: prompts always get at least this many tokens a step (never starved by a tight latency bound)
MIN_PROMPT_TOKENS = 64
#: weight of the past in the decayed prompt-cost sums (about the last 10 steps with prompts count)
DECAY = 0.9
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
    _extra_s: float = 0.0  # decayed sum of seconds beyond the decode part of steps with prompt tokens
    _prompt_tokens: float = 0.0  # decayed sum of their prompt tokens

    def __post_init__(self) -> None:
        if not self.max_stall > 1:
            raise ValueError(f"max_stall must be > 1, got {self.max_stall}")
        if self.min_tokens < 1:
            raise ValueError(f"min_tokens must be >= 1, got {self.min_tokens}")

    @property
    def token_s(self) -> float | None:
        """Learned extra seconds per prompt token (None until a step with prompt tokens was seen)."""
        return self._extra_s / self._prompt_tokens if self._prompt_tokens else None

    def decode_step_s(self, batch: int) -> float | None:
        """A decode-only step's learned seconds at this batch (its bucket's); None when not measured."""
        return self.decode_s.get(batch_bucket(batch))

    def prompt_budget(self, decoding: int, starting: int = 0) -> int | None:
        """The most prompt tokens a step with ``decoding`` decode rows should take, while ``starting``
        sequences are about to start (partly prefilled, or queued with room in the batch): None for no cap
        (nothing decodes, a ramp-up, or no step with prompt tokens was timed yet), 0 for a probe."""
        if decoding == 0 or starting * RAMP_RATIO > decoding:
            return None
        bucket = batch_bucket(decoding)
        if self.steps - self.measured_at.get(bucket, -PROBE_EVERY - 1) > PROBE_EVERY:
            return 0
        token_s = self.token_s
        if not token_s:
            return None
        return max(self.min_tokens, int((self.max_stall - 1.0) * self.decode_s[bucket] / token_s))

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
        self._extra_s = DECAY * self._extra_s + max(0.0, seconds - base)
        self._prompt_tokens = DECAY * self._prompt_tokens + prompt_tokens
