"""Overload and cancellation: 429s beyond the queue with nothing accepted lost; disconnects free KV."""

from __future__ import annotations

import asyncio
import socket
import time

import httpx
import pytest

from runtime import contract as c

KV = "moe_kv_cache_usage_perc"
ABORTED = 'moe_request_success_total{finish_reason="abort"}'


@pytest.fixture(scope="module", params=["off", "on"], ids=["engine-thread", "engine-process"])
def small_server(server_factory, request):
    """Both engine placements: with the engine in its own process, the server holds the queue itself."""
    with server_factory("--max-queue", "4", "--max-num-seqs", "4", "--engine-process", request.param) as srv:
        yield srv


def test_flood_beyond_the_queue_gets_429_and_loses_nothing(small_server):
    url = small_server.url + c.COMPLETIONS_PATH
    req = {"prompt": "The order was placed", "max_tokens": 24, "temperature": 0, "ignore_eos": True}

    async def flood() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=200)) as cl:
            return await asyncio.gather(*[cl.post(url, json=req) for _ in range(60)])

    rs = asyncio.run(flood())
    codes = [r.status_code for r in rs]
    assert set(codes) <= {200, 429}, codes
    ok, busy = [r for r in rs if r.status_code == 200], [r for r in rs if r.status_code == 429]
    # The queue (4) starts empty, so at least 4 are accepted; how many more join the running batch before
    # the flood ends depends on scheduling (CI saw 5 of 60). Far fewer than 60 fit: the rest get 429.
    assert len(ok) + len(busy) == 60
    assert len(busy) >= 10 and len(ok) >= 4
    assert all(r.headers["Retry-After"] == "1" for r in busy)
    assert all(r.json()["error"]["code"] == "queue_full" for r in busy)
    texts = {r.json()["choices"][0]["text"] for r in ok}
    assert len(texts) == 1 and all(r.json()["usage"]["completion_tokens"] == 24 for r in ok)
    m = small_server.metrics()
    assert m['moe_requests_rejected_total{reason="queue_full"}'] == len(busy)
    # still healthy and serving
    assert httpx.get(small_server.url + c.HEALTH_PATH).status_code == 200
    assert httpx.post(url, json=req, timeout=60).status_code == 200
    small_server.wait_metric(KV, lambda v: v == 0.0)


def test_stream_disconnect_frees_kv_blocks(small_server):
    idle = small_server.wait_metric(KV, lambda v: v == 0.0)
    aborted = small_server.metrics()[ABORTED]
    req = {"prompt": "Hello", "max_tokens": 480, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", small_server.url + c.COMPLETIONS_PATH, json=req, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(x.startswith("data: {") for x in got)
        assert small_server.metrics()[KV] > idle  # the sequence holds blocks while it streams
    # closed mid-stream: the sequence is aborted (not run to its 480 tokens) and its blocks return
    small_server.wait_metric(ABORTED, lambda v: v == aborted + 1, timeout=5)
    small_server.wait_metric(KV, lambda v: v == idle, timeout=5)


def test_non_stream_disconnect_frees_kv_blocks(small_server):
    aborted = small_server.metrics()[ABORTED]
    body = b'{"prompt": "Hello", "max_tokens": 480, "temperature": 0, "ignore_eos": true}'
    head = (
        f"POST {c.COMPLETIONS_PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", small_server.port)) as s:
        s.sendall(head + body)
        small_server.wait_metric("moe_num_requests_running", lambda v: v == 1, timeout=5)
    t0 = time.monotonic()
    small_server.wait_metric(ABORTED, lambda v: v == aborted + 1, timeout=5)
    small_server.wait_metric(KV, lambda v: v == 0.0, timeout=5)
    assert time.monotonic() - t0 < 3
