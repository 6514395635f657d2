"""What the engine knows about one generation sequence, and the events it streams back.

An HTTP request with ``n`` choices becomes ``n`` sequences. The engine thread owns every field except
``on_event`` (set by the submitter) and reads ``params`` only.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from runtime.detokenize import IncrementalText
from runtime.kv_cache import SequenceBlocks
from runtime.sampling import SamplingParams


class EngineError(RuntimeError):
    """Base for refusals the HTTP layer maps to a status code."""


class QueueFullError(EngineError):
    """The bounded admission queue is full (HTTP 429 with Retry-After)."""


class ShuttingDownError(EngineError):
    """The engine is draining or stopped (HTTP 503)."""


class RequestTooLargeError(EngineError, ValueError):
    """The request can never run: context or KV pool limit (HTTP 400, message names the limit)."""


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability and the ``top`` most likely alternatives ``(token id,
    log-probability)``, most likely first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class TokenEvent:
    """New tokens for one sequence since the previous event; ``finish_reason`` set on the last one.

    ``text`` is set only when a stop string cut the output: it is then the final text (the stop
    string and what follows are not part of it, as in OpenAI's API)."""

    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    text: str | None = None
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token in ``token_ids``, when the request asked


@dataclass(eq=False)
class Sequence:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    on_event: Callable[[TokenEvent], None] = field(default=lambda ev: None, repr=False)
    arrival: float = field(default_factory=time.monotonic)
    warmup: bool = False  # the engine's own start-up sequence: left out of the request metrics

    # engine-owned state
    output_ids: list[int] = field(default_factory=list)
    blocks: SequenceBlocks | None = field(default=None, repr=False)
    generator: object | None = field(default=None, repr=False)
    # tokens in the KV cache, or scheduled into it this step (chunked prefill), counted over ``token_ids``
    num_computed: int = 0
    # tokens to prefill before the next token is sampled: the prompt, or after a preemption the prompt and
    # the tokens generated so far (recomputed, not swapped); set when the sequence (re)joins the batch
    prefill_len: int = 0
    preemptions: int = 0
    scheduled_at: float | None = None  # its first engine step (a preempted sequence keeps the first)
    first_token_at: float | None = None
    finish_reason: str | None = None
    # (runtime.sampling.token_logprobs row, its k) for each sampled token not yet accepted, oldest first;
    # filled only when ``params.logprobs`` is set
    pending_logprobs: deque = field(default_factory=deque, repr=False)
    # the generated text, kept up to date for stop strings (only when the request has some)
    text: IncrementalText | None = field(default=None, repr=False)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def token_ids(self) -> list[int]:
        """Prompt then generated tokens: what the cache holds, position by position."""
        return self.prompt_ids + self.output_ids if self.output_ids else self.prompt_ids

    @property
    def prefilled(self) -> bool:
        return self.prefill_len > 0 and self.num_computed >= self.prefill_len
