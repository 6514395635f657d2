"""What a sampled token does to its sequence: stop tokens and EOS, stop strings, ``max_new_tokens``.

The rules are the offline :class:`~runtime.generate.Generator`'s: a stop token (or EOS, unless ignored)
finishes the sequence without the token; a stop string cuts the text where it starts (the final event then
carries that text, as OpenAI's API does); reaching ``max_new_tokens`` finishes it with the token. Every
outcome becomes a :class:`~runtime.engine.sequence.TokenEvent`; a finished sequence leaves the batch at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from runtime.detokenize import IncrementalText
from runtime.engine.model_runner import Sampled, SamplingFailed
from runtime.engine.sequence import Sequence, TokenEvent, TokenLogprob
from runtime.engine.stats import EngineStats
from runtime.loader import Tokenizer
from runtime.sampling import unpack_logprobs

Events = list[tuple[Sequence, TokenEvent]]


class PostProcessor:
    def __init__(
        self,
        eos: Iterable[int],
        tokenizer: Tokenizer | None,
        stats: EngineStats,
        release: Callable[[Sequence], None],
    ) -> None:
        """``release``: called once per finished sequence, to return its blocks and forget it."""
        self.eos = set(eos)
        self.tokenizer, self.stats, self.release = tokenizer, stats, release

    def first_tokens(self, sampled: list[tuple[Sequence, Sampled]], events: Events) -> None:
        """Tokens sampled from a prefill: each sequence's first (its time to first token starts here)."""
        now = time.monotonic()
        for s, tok in sampled:
            if not isinstance(tok, SamplingFailed):
                s.first_token_at = now
        self.accept(sampled, events)

    def accept(self, sampled: list[tuple[Sequence, Sampled]], events: Events) -> None:
        """Tokens of sequences still running are appended or finish them; sequences that finished since their
        step was launched drop theirs."""
        for s, tok in sampled:
            if isinstance(tok, SamplingFailed):
                self.finish(s, "error", events, error=tok.message)
            elif s.finish_reason is None:
                self._accept(s, tok, events)

    def _accept(self, s: Sequence, tok: int, events: Events) -> None:
        p = s.params
        lps = _read_logprob(s, tok)
        if tok in p.stop_token_ids or (tok in self.eos and not p.ignore_eos):
            self.finish(s, "stop", events)
            return
        s.output_ids.append(tok)
        self.stats.token()
        if p.stop and self.tokenizer is not None:
            if s.text is None:
                s.text = IncrementalText(self.tokenizer)
            text = s.text.extend([tok])  # == tokenizer.decode(s.output_ids), at a cost that does not grow
            hits = [text.find(x) for x in p.stop if x and x in text]
            if hits:
                self.finish(s, "stop", events, new=[tok], text=text[: min(hits)], logprobs=lps)
                return
        if len(s.output_ids) >= p.max_new_tokens:
            self.finish(s, "length", events, new=[tok], logprobs=lps)
            return
        events.append((s, TokenEvent([tok], logprobs=lps)))

    def finish(
        self,
        s: Sequence,
        reason: str,
        events: Events,
        new: Iterable[int] = (),
        text: str | None = None,
        error: str | None = None,
        logprobs: list[TokenLogprob] | None = None,
    ) -> None:
        """``reason``: "stop", "length", "abort" or "error". A sequence finishes once (e.g. a failed sampling
        followed by its unread token is one finish)."""
        if s.finish_reason is not None:
            return
        s.finish_reason = reason
        self.release(s)
        events.append((s, TokenEvent(list(new), reason, text, error, logprobs)))
        self.stats.finished(s, reason)


def _read_logprob(s: Sequence, tok: int) -> list[TokenLogprob] | None:
    """The log-probabilities queued with this token (sampled in the same order, on the host once the token
    is); None when the request did not ask for them."""
    if s.params.logprobs is None or not s.pending_logprobs:
        return None
    row, k = s.pending_logprobs.popleft()
    chosen, top = unpack_logprobs(row.tolist(), s.params.logprobs, k)
    return [TokenLogprob(tok, chosen, tuple(top))]
