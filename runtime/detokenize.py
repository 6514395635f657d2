"""Incremental detokenization: a sequence's text, kept up to date as tokens arrive, at a cost per token that
does not grow with the sequence's length.

Decoding every token so far on each new one makes a stream's cost grow with the square of its length; both
the server (streamed text) and the engine (stop strings) need the whole text after each token. A window of
recent tokens is decoded instead, with offsets as vLLM's incremental detokenizer keeps them: ``stable`` is
the text of the first ``read`` tokens, settled because it ends on a whole character, and ``pre`` the window
``tokens[prefix:read]`` decoded alone. Decoding ``tokens[prefix:]`` then gives ``pre`` followed by what the
tokens after ``read`` add to the full text. The window starts on a token that decodes to text, so a
decoder's first-token rules (a stripped leading space, words joined by spaces) apply as they do to the
whole sequence; a tokenizer for which the window's text does not start with ``pre`` is decoded in full from
then on (``windowed`` turns False), so the text is always exactly ``tokenizer.decode(tokens)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol


class Decoder(Protocol):
    def decode(self, ids: list[int]) -> str: ...


class IncrementalText:
    def __init__(self, tokenizer: Decoder) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.stable = ""
        self.prefix = 0
        self.read = 0
        self.pre = ""
        self.windowed = True

    def extend(self, ids: Iterable[int]) -> str:
        """Append tokens; the full text so far (``tokenizer.decode(self.tokens)``)."""
        self.tokens.extend(ids)
        return self.text()

    def text(self) -> str:
        toks, decode = self.tokens, self.tokenizer.decode
        if not self.windowed:
            return decode(toks)
        window = decode(toks[self.prefix :])
        if not window.startswith(self.pre):
            self.windowed = False
            return decode(toks)
        full = self.stable + window[len(self.pre) :]
        if len(toks) > self.read and not full.endswith("\ufffd"):  # settled up to here: move the window on
            after = decode(toks[self.read :])
            if after:
                self.prefix, self.pre = self.read, after
            else:  # tokens without text (skipped special tokens) cannot start a window
                self.pre = window
            self.stable, self.read = full, len(toks)
        return full
