"""Streaming under load: every token is still its own SSE event carrying the text the non-streamed answer
has, and the incremental detokenizer (a window of recent tokens) gives exactly the full decode."""

from __future__ import annotations

import asyncio
import json
import random
from types import SimpleNamespace

import httpx
import pytest

from runtime import contract as c
from runtime.engine.sequence import Sequence, TokenEvent
from runtime.loader import load_tokenizer
from runtime.sampling import SamplingParams
from runtime.server.openai_api import Choice, stream

PROMPTS = [
    "The order was placed at night",
    "Hello world",
    "Is this transaction a fraud risk? Answer yes or no.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 20 50 100 250 500 1000",
    "naïve café — 日本語 🙂",
]
STREAMS = 32
MULTI_BYTE = "héllo wörld — naïve café, 日本語のテキスト 🙂🚀 Ω≈ç√∫ done"


def events(raw: str) -> list[str]:
    """The ``data`` of every SSE event of a response body; each event must be one ``data:`` line."""
    out = []
    for block in raw.split("\n\n"):
        if not block:
            continue
        assert block.startswith("data: ") and "\n" not in block, f"not one data line: {block[:200]!r}"
        out.append(block[6:])
    return out


def test_concurrent_streams_send_each_token_as_its_own_event_with_the_non_streamed_text(shared_server):
    url = shared_server.url + c.COMPLETIONS_PATH
    lengths = [24, 9, 31, 16, 40]
    stops = [None, None, [" the"], None, ["\n"]]

    def body(i: int, **extra) -> dict:
        b = {"prompt": PROMPTS[i % 5], "max_tokens": lengths[i % 5], "temperature": 0, "ignore_eos": True}
        return b | ({"stop": stops[i % 5]} if stops[i % 5] else {}) | extra

    alone = [httpx.post(url, json=body(i), timeout=60).json()["choices"][0] for i in range(5)]

    async def one(cl: httpx.AsyncClient, i: int) -> str:
        opts = {"stream": True, "logprobs": 0, "stream_options": {"include_usage": True}}
        async with cl.stream("POST", url, json=body(i, **opts)) as r:
            assert r.status_code == 200
            return (await r.aread()).decode()

    async def flood() -> list[str]:
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=STREAMS + 8)) as cl:
            return await asyncio.gather(*(one(cl, i) for i in range(STREAMS)))

    for i, raw in enumerate(asyncio.run(flood())):
        data = events(raw)
        assert data[-1] == "[DONE]"
        chunks = [json.loads(d) for d in data[:-1]]
        usage = chunks[-1]["usage"]
        token_chunks = [ch["choices"][0] for ch in chunks[:-1]]
        # log-probabilities name the tokens of each event: exactly one per event, in order
        assert all(len(ch["logprobs"]["tokens"]) == 1 for ch in token_chunks), f"stream {i}: tokens merged"
        assert len(token_chunks) == usage["completion_tokens"]
        assert "".join(ch["text"] for ch in token_chunks) == alone[i % 5]["text"], f"stream {i} text differs"
        assert token_chunks[-1]["finish_reason"] == alone[i % 5]["finish_reason"]
        assert all(ch["finish_reason"] is None for ch in token_chunks[:-1])


def test_concurrent_chat_streams_match_the_non_streamed_message(shared_server):
    url = shared_server.url + c.CHAT_COMPLETIONS_PATH
    body = {"messages": [{"role": "user", "content": MULTI_BYTE}], "max_tokens": 20, "temperature": 0}
    alone = httpx.post(url, json=body, timeout=60).json()["choices"][0]["message"]["content"]

    async def one(cl: httpx.AsyncClient) -> str:
        async with cl.stream("POST", url, json=body | {"stream": True}) as r:
            return (await r.aread()).decode()

    async def flood() -> list[str]:
        async with httpx.AsyncClient(timeout=120) as cl:
            return await asyncio.gather(*(one(cl) for _ in range(8)))

    for raw in asyncio.run(flood()):
        chunks = [json.loads(d) for d in events(raw)[:-1]]
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks) == alone


# ---- the incremental detokenizer ------------------------------------------------------------------
class CountingTokenizer:
    """The real tokenizer, remembering how many tokens each decode was given."""

    def __init__(self, tok) -> None:
        self.tok, self.sizes = tok, []

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        self.sizes.append(len(ids))
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.fixture(scope="module")
def tokenizer(v2_path):
    return load_tokenizer(v2_path)


def streamed(tok, ids: list[int], holdback: int = 0, final_text: str | None = None) -> tuple[list[str], Choice]:
    ch = Choice(Sequence("s", [1], SamplingParams()), tok, holdback)
    out = []
    for j, t in enumerate(ids):
        last = j == len(ids) - 1
        out.append(ch.update(TokenEvent([t], "stop" if last else None, final_text if last else None)))
    return out, ch


def test_incremental_detokenization_equals_the_full_decode_for_multi_byte_text(tokenizer):
    ids = tokenizer.encode(MULTI_BYTE * 3, add_bos=False)
    assert any(not tokenizer.decode([t]) or "\ufffd" in tokenizer.decode([t]) for t in ids), (
        "the text should hold characters split over several tokens"
    )
    for holdback in (0, 4):
        out, ch = streamed(tokenizer, ids, holdback)
        assert "".join(out) == tokenizer.decode(ids) == MULTI_BYTE * 3
        assert ch.detok.windowed
        assert all("\ufffd" not in d for d in out), "part of a character was released"
        # every prefix released is a prefix of the full text (nothing is taken back)
        full = MULTI_BYTE * 3
        assert all(full.startswith("".join(out[: k + 1])) for k in range(len(out)))


def test_incremental_detokenization_equals_the_full_decode_for_random_and_special_tokens(tokenizer):
    rng = random.Random(0)
    specials = sorted(tokenizer._special_ids)
    for _ in range(150):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 48))]
        for _ in range(rng.randrange(3)):  # skipped special tokens, also at the start
            ids.insert(rng.randrange(len(ids) + 1), rng.choice(specials))
        out, _ = streamed(tokenizer, ids, rng.choice((0, 2)))
        assert "".join(out) == tokenizer.decode(ids), ids


def test_a_stop_string_final_text_replaces_the_decoded_one(tokenizer):
    """As the engine does: the token completing the stop string finishes the sequence with the text before
    it; what was held back (stop string length - 1) is never released past the cut."""
    stop = "日本"
    ids = tokenizer.encode(MULTI_BYTE, add_bos=False)
    k = next(k for k in range(1, len(ids) + 1) if stop in tokenizer.decode(ids[:k]))
    cut = MULTI_BYTE[: MULTI_BYTE.index(stop)]
    out, _ = streamed(tokenizer, ids[:k], holdback=len(stop) - 1, final_text=cut)
    assert "".join(out) == cut


def test_each_event_decodes_a_short_window_not_the_whole_output(tokenizer):
    ids = tokenizer.encode((MULTI_BYTE + " the quick brown fox. ") * 20, add_bos=False)
    counting = CountingTokenizer(tokenizer)
    out, _ = streamed(counting, ids)
    assert "".join(out) == tokenizer.decode(ids)
    assert len(ids) > 300 and max(counting.sizes) <= 12, max(counting.sizes)


def test_queued_events_leave_in_one_write_each_token_its_own_event(tokenizer):
    """When the loop wakes up to several queued events they go out as one string of separate events."""

    async def go() -> list[str]:
        aborted: list[str] = []
        st = SimpleNamespace(engine=SimpleNamespace(abort=aborted.append), metrics=None)
        ids = tokenizer.encode("one two three four five", add_bos=False)
        ch = Choice(Sequence("s", [1], SamplingParams()), tokenizer, 0)
        queue: asyncio.Queue = asyncio.Queue()
        for j, t in enumerate(ids):
            queue.put_nowait((0, TokenEvent([t], "length" if j == len(ids) - 1 else None)))
        body = SimpleNamespace(stream_options=None)

        def chunk(i, delta, reason, first, lps):
            return None if first else f"data: {json.dumps({'text': delta, 'finish_reason': reason})}\n\n"

        writes = [w async for w in stream(st, queue, [ch], [[1]], body, chunk)]
        assert aborted == []  # finished: nothing to abort
        return writes, len(ids)

    writes, n = asyncio.run(go())
    assert len(writes) == 2 and writes[-1] == "data: [DONE]\n\n"
    data = [json.loads(d) for d in events(writes[0])]
    assert len(data) == n and data[-1]["finish_reason"] == "length"
    assert "".join(d["text"] for d in data) == "one two three four five"
