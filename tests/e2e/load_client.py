"""Client load for the Prometheus loop, timed in a process of its own.

Kept apart from the test module so that the spawned process imports only this and httpx (not torch and the
rest of the test module's imports), and starts in a fraction of a second.
"""

from __future__ import annotations

import asyncio
import time

import httpx

from runtime import contract as c

N_REQUESTS = 120
CONCURRENCY = 8


def _load_in_process(url: str, model: str) -> list[float]:
    return asyncio.run(load(url, model))


def measured_in_own_process(url: str, model: str) -> list[float]:
    """The clients' latencies, timed in a process of their own: in the test process the suite's background
    jobs (terraform lifecycles, demos) share the interpreter lock and would add their waits to the clocks."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_load_in_process, url, model).result(timeout=300)


async def load(url: str, model: str) -> list[float]:
    """``N_REQUESTS`` completions from ``CONCURRENCY`` clients with mixed output lengths; latencies (s)."""
    sem = asyncio.Semaphore(CONCURRENCY)
    latencies: list[float] = []

    async def one(cl: httpx.AsyncClient, i: int) -> None:
        body = {
            "model": model,
            "prompt": f"order {i} placed at night",
            "max_tokens": 2 + (i * 7) % 13,
            "temperature": 0,
            "ignore_eos": True,
        }
        async with sem:
            t0 = time.perf_counter()
            r = await cl.post(url + c.COMPLETIONS_PATH, json=body)
            latencies.append(time.perf_counter() - t0)
        assert r.status_code == 200, r.text

    async with httpx.AsyncClient(timeout=60) as cl:
        await asyncio.gather(*(one(cl, i) for i in range(N_REQUESTS)))
    return latencies
