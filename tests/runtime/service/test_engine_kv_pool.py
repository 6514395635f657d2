"""A server whose KV pool is far too small for its batch: requests are preempted and resumed, never lost.

Over real HTTP: many concurrent streamed and plain completions against a 15-block pool all finish with 200
and the output a lone request gets; the preemption and prefix-cache counters move on /metrics."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from runtime import contract as c

SYSTEM = "You are a careful fraud analyst. Answer in one short line. " * 2


@pytest.fixture(scope="module")
def tiny_pool_server(server_factory):
    with server_factory("--kv-blocks", "16", "--max-num-seqs", "8", "--max-num-batched-tokens", "64") as srv:
        yield srv


def body(i: int, stream: bool = False) -> dict:
    return {
        "prompt": f"{SYSTEM}Case {i}: amount {17 * i} at hour {i % 24}.",
        "max_tokens": 40,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }


def streamed_text(lines: list[str]) -> str:
    text = ""
    for line in lines:
        if line.startswith("data: ") and line != "data: [DONE]":
            text += json.loads(line[6:])["choices"][0]["text"]
    return text


def test_concurrent_requests_all_complete_when_the_pool_is_tiny(tiny_pool_server):
    srv = tiny_pool_server
    url = srv.url + c.COMPLETIONS_PATH
    alone = {i: httpx.post(url, json=body(i), timeout=60).json()["choices"][0]["text"] for i in range(4)}
    before = srv.metrics()

    async def one(cl: httpx.AsyncClient, i: int) -> tuple[int, str]:
        if i % 2:
            r = await cl.post(url, json=body(i % 4))
            return r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else r.text
        async with cl.stream("POST", url, json=body(i % 4, stream=True)) as r:
            lines = [line async for line in r.aiter_lines()]
            return r.status_code, streamed_text(lines)

    async def flood() -> list[tuple[int, str]]:
        async with httpx.AsyncClient(timeout=180, limits=httpx.Limits(max_connections=64)) as cl:
            return await asyncio.gather(*(one(cl, i) for i in range(24)))

    results = asyncio.run(flood())
    assert [code for code, _ in results] == [200] * 24
    for i, (_, text) in enumerate(results):
        assert text == alone[i % 4], f"request {i}: a preempted and resumed request must give the same text"
    after = srv.metrics()
    assert after["moe_num_preemptions_total"] > before.get("moe_num_preemptions_total", 0)
    assert after["moe_prefix_cache_hits_total"] > before["moe_prefix_cache_hits_total"]
    assert after["moe_prefix_cache_queries_total"] >= after["moe_prefix_cache_hits_total"]
    assert after["moe_kv_cache_usage_perc"] == 0.0
    assert after.get('moe_request_errors_total{reason="engine"}', 0) == before.get(
        'moe_request_errors_total{reason="engine"}', 0
    )
