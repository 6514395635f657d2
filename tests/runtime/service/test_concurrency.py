"""Many concurrent clients: every request completes, and batching never changes greedy outputs."""

from __future__ import annotations

import asyncio
import threading

import httpx

from runtime import contract as c

PROMPTS = [
    "The order was placed at night",
    "Hello world",
    "Is this transaction a fraud risk? Answer yes or no.",
    "velocity ip_country card_country device_age account_age amount merchant category hour attempts",
    "A",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 20 50 100 250 500 1000",
]


def body(prompt: str, max_tokens: int) -> dict:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}


def test_concurrent_greedy_outputs_equal_single_request_outputs(shared_server):
    url = shared_server.url + c.COMPLETIONS_PATH
    before = shared_server.metrics()
    lengths = [24, 7, 31, 16, 40, 12]  # mixed output lengths: sequences leave the batch at different steps
    alone = [
        httpx.post(url, json=body(p, n), timeout=60).json()["choices"][0]["text"]
        for p, n in zip(PROMPTS, lengths, strict=True)
    ]

    running_seen: list[float] = []
    stop = threading.Event()

    def watch() -> None:  # proves the requests really shared decode steps
        while not stop.is_set():
            running_seen.append(shared_server.metrics()["moe_num_requests_running"])

    async def flood() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(timeout=120, limits=limits) as cl:
            jobs = [cl.post(url, json=body(PROMPTS[i % 6], lengths[i % 6])) for i in range(48)]
            return await asyncio.gather(*jobs)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        responses = asyncio.run(flood())
    finally:
        stop.set()
        watcher.join()
    assert [r.status_code for r in responses] == [200] * 48
    for i, r in enumerate(responses):
        ch = r.json()["choices"][0]
        assert ch["text"] == alone[i % 6], f"request {i} differs from its single-request output"
        assert r.json()["usage"]["completion_tokens"] == lengths[i % 6]
    assert max(running_seen) > 1
    after = shared_server.metrics()
    assert after["moe_kv_cache_usage_perc"] == 0.0

    def delta(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    assert delta("moe_e2e_request_latency_seconds_count") == 48 + 6
    assert delta("moe_time_to_first_token_seconds_count") == 48 + 6
    # time to first token splits into the wait for a first step and the prefill from it
    assert delta("moe_request_queue_time_seconds_count") == delta("moe_request_prefill_time_seconds_count") == 54
    split = delta("moe_request_queue_time_seconds_sum") + delta("moe_request_prefill_time_seconds_sum")
    assert abs(split - delta("moe_time_to_first_token_seconds_sum")) < 1e-6, split
    # every prompt token is in one step, and each generated token after a sequence's first is a decode row
    steps, tokens = delta("moe_iteration_tokens_count"), delta("moe_iteration_tokens_sum")
    assert tokens >= delta("moe_prompt_tokens_total") + delta("moe_generation_tokens_total") - 54
    assert 0 < steps < tokens
    assert delta("moe_generation_tokens_total") == 8 * sum(lengths) + sum(lengths)
    assert delta('moe_request_success_total{finish_reason="length"}') == 48 + 6
