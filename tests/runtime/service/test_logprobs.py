"""Token log-probabilities over real HTTP, read by the official ``openai`` client, checked against the
log-softmax of the tiny fp32 model's logits computed here by running the model directly (one forward over
prompt + output, no KV cache, no engine)."""

from __future__ import annotations

import contextlib
import math

import httpx
import openai
import pytest
import torch

from runtime import contract as c
from runtime.kv_cache import prefill_metadata
from runtime.loader import load_model, load_tokenizer

TOL = 1e-4


@pytest.fixture(scope="module")
def client(shared_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=shared_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(v2_path):
    """``(prompt ids, output ids) → [len(output), vocab]`` log-probabilities of the model's raw distribution."""
    model, tok = load_model(v2_path), load_tokenizer(v2_path)

    @torch.inference_mode()
    def logprobs(prompt: list[int], output: list[int]) -> torch.Tensor:
        ids = [*prompt, *output]
        meta = prefill_metadata([len(ids)], [len(ids)], None, None)
        rows = torch.arange(len(prompt) - 1, len(ids) - 1)
        logits = model(torch.tensor(ids), torch.arange(len(ids)), meta, None, logits_indices=rows)
        return torch.log_softmax(logits.double(), dim=-1)

    by_bytes = {}
    for i in range(tok.vocab_size):
        by_bytes.setdefault(tok.token_bytes(i), i)
    return logprobs, tok, by_bytes


def check_top(row: torch.Tensor, got: list[tuple[bytes, float]], by_bytes: dict, k: int) -> None:
    """``got``: (bytes, logprob) of the k alternatives; they are the k most likely tokens, most likely first."""
    assert len(got) == k
    want = row.topk(k)
    for (b, lp), v in zip(got, want.values.tolist(), strict=True):
        assert math.isclose(lp, v, abs_tol=TOL)
        assert math.isclose(row[by_bytes[b]].item(), lp, abs_tol=TOL)  # ties may swap ids, not values


def raw_bytes(token: str) -> bytes:
    """A completion token's bytes: its text, or ``bytes:\\xNN...`` for part of a character (as OpenAI writes)."""
    if token.startswith("bytes:"):
        return bytes(int(h, 16) for h in token.removeprefix("bytes:").split("\\x")[1:])
    return token.encode()


def test_completion_logprobs_match_the_model(client, reference):
    ref, tok, by_bytes = reference
    prompt = tok.encode("The order was placed")
    r = client.completions.create(
        model="v2_greedy", prompt=prompt, max_tokens=8, temperature=0, logprobs=3, extra_body={"ignore_eos": True}
    )
    ch = r.choices[0]
    lp = ch.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    out = [by_bytes[raw_bytes(t)] for t in lp.tokens]
    assert tok.decode(out) == ch.text
    want = ref(prompt, out)
    for j in range(len(out)):
        assert math.isclose(lp.token_logprobs[j], want[j, out[j]].item(), abs_tol=TOL)
        assert math.isclose(lp.token_logprobs[j], want[j].max().item(), abs_tol=TOL)  # greedy: the argmax
        top = [(raw_bytes(k), v) for k, v in lp.top_logprobs[j].items()]
        check_top(want[j], top, by_bytes, 3)
        before = b"".join(raw_bytes(t) for t in lp.tokens[:j])
        with contextlib.suppress(UnicodeDecodeError):  # a token after a whole character: its text offset
            assert lp.text_offset[j] == len(before.decode())
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_chat_logprobs_are_the_raw_distribution_when_sampling(client, reference):
    """Sampled at temperature 1.7 with top_k: the values are still the model's own log-softmax."""
    ref, tok, by_bytes = reference
    msgs = [{"role": "user", "content": "Is the order risky?"}]
    r = client.chat.completions.create(
        model="v2_greedy",
        messages=msgs,
        max_tokens=10,
        temperature=1.7,
        seed=5,
        logprobs=True,
        top_logprobs=4,
        extra_body={"ignore_eos": True, "top_k": 50},
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 10
    out = [by_bytes[bytes(e.bytes)] for e in content]
    assert b"".join(bytes(e.bytes) for e in content).decode(errors="replace") == r.choices[0].message.content
    want = ref(tok.encode_chat(msgs), out)
    for j, e in enumerate(content):
        assert math.isclose(e.logprob, want[j, out[j]].item(), abs_tol=TOL)
        assert raw_bytes(e.token) == bytes(e.bytes)
        check_top(want[j], [(bytes(t.bytes), t.logprob) for t in e.top_logprobs], by_bytes, 4)


def test_streamed_logprobs_equal_the_whole_response(client):
    kw = dict(model="v2_greedy", max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    msgs = [{"role": "user", "content": "Hello"}]
    whole = client.chat.completions.create(messages=msgs, logprobs=True, top_logprobs=2, **kw)
    chunks = list(client.chat.completions.create(messages=msgs, logprobs=True, top_logprobs=2, stream=True, **kw))
    streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in whole.choices[0].logprobs.content]

    whole = client.completions.create(prompt="Risk score:", logprobs=2, **kw).choices[0]
    chunks = list(client.completions.create(prompt="Risk score:", logprobs=2, stream=True, **kw))
    parts = [ch.choices[0].logprobs for ch in chunks if ch.choices and ch.choices[0].logprobs]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [x for p in parts for x in getattr(p, key)] == getattr(whole.logprobs, key), key


def test_no_logprobs_unless_asked(client):
    kw = dict(model="v2_greedy", max_tokens=2, temperature=0)
    assert client.completions.create(prompt="Hi", **kw).choices[0].logprobs is None
    r = client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], **kw)
    assert r.choices[0].logprobs is None
    chunks = list(client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], stream=True, **kw))
    assert all(ch.choices[0].logprobs is None for ch in chunks if ch.choices)


def test_logprobs_bounds_are_client_errors(shared_server):
    url = shared_server.url
    msgs = [{"role": "user", "content": "Hi"}]
    r = httpx.post(url + c.CHAT_COMPLETIONS_PATH, json={"messages": msgs, "top_logprobs": 2}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
    r = httpx.post(url + c.CHAT_COMPLETIONS_PATH, json={"messages": msgs, "logprobs": True, "top_logprobs": 21})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
    r = httpx.post(url + c.COMPLETIONS_PATH, json={"prompt": "x", "logprobs": 6}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"
