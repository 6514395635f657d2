"""Token log-probabilities in OpenAI's two shapes.

Chat completions: ``choices[].logprobs = {"content": [{token, logprob, bytes, top_logprobs: [{token,
logprob, bytes}]}]}``. Completions: ``choices[].logprobs = {tokens, token_logprobs, top_logprobs (one
dict token → logprob per token), text_offset}``. The values come from the engine
(:class:`~runtime.engine.sequence.TokenLogprob`): the model's raw distribution, before temperature, top-k
and top-p.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable

from runtime.engine.sequence import TokenLogprob

MIN_LOGPROB = -9999.0  # as vLLM: JSON has no -inf


class TokenText:
    """Text and bytes of single tokens, cached (the vocabulary is fixed)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        got = self._cache.get(token_id)
        if got is None:
            raw = self.tokenizer.token_bytes(token_id)
            try:
                text = raw.decode()
            except UnicodeDecodeError:  # part of a character: OpenAI writes its bytes out
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            got = self._cache[token_id] = (text, list(raw))
        return got


def _lp(x: float) -> float:
    return max(x, MIN_LOGPROB)


def chat_content(text_of: TokenText, entries: Iterable[TokenLogprob]) -> list[dict]:
    """The ``content`` list of a chat choice's ``logprobs``."""
    out = []
    for e in entries:
        token, raw = text_of(e.token)
        top = []
        for tid, lp in e.top:
            t, b = text_of(tid)
            top.append({"token": t, "logprob": _lp(lp), "bytes": b})
        out.append({"token": token, "logprob": _lp(e.logprob), "bytes": raw, "top_logprobs": top})
    return out


class TextOffsets:
    """Where each token starts in the completion text, in characters: a token holding the end of a
    character split over several tokens starts where that character does."""

    def __init__(self) -> None:
        self.chars = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def advance(self, raw: list[int]) -> int:
        """The offset of a token with bytes ``raw``; moves past it."""
        start = self.chars
        self.chars += len(self._decoder.decode(bytes(raw)))
        return start


def completion_logprobs(text_of: TokenText, entries: Iterable[TokenLogprob], offsets: TextOffsets) -> dict:
    """A completion choice's ``logprobs`` for ``entries``; ``offsets`` carries on from the previous ones."""
    tokens, values, tops, starts = [], [], [], []
    for e in entries:
        token, raw = text_of(e.token)
        tokens.append(token)
        values.append(_lp(e.logprob))
        top: dict[str, float] = {}
        for tid, lp in e.top:  # most likely first; a text two tokens share keeps the larger value
            top.setdefault(text_of(tid)[0], _lp(lp))
        tops.append(top)
        starts.append(offsets.advance(raw))
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": starts}
