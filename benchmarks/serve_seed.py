"""A faithful re-creation of the source document's serving design, as the benchmark's baseline.

The source document's design: an async FastAPI endpoint that hands each request to a 32-thread ``ThreadPoolExecutor``
which runs the model for that one request. Here each worker thread owns a reference
:class:`~runtime.generate.Generator` (batch 1, its own KV pool) over the SAME loaded model our server
uses, so the only difference measured is the serving design: no batching across requests, no
admission control, the model shared by up to 32 threads at once.

Run: ``python -m benchmarks.serve_seed --model PATH --port 8001``; accepts the subset of
``/v1/completions`` the load generator sends (token-id prompt, max_tokens, temperature, ignore_eos).
"""

from __future__ import annotations

import argparse
import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

from runtime.generate import Generator
from runtime.loader import load_model, load_tokenizer
from runtime.sampling import SamplingParams

WORKERS = 32  # the source document's executor size


class Req(BaseModel):
    prompt: list[int] | str
    max_tokens: int = 16
    temperature: float = 0.0
    ignore_eos: bool = False


def build_app(model_path: str, max_model_len: int = 512) -> FastAPI:
    model = load_model(model_path)
    tok = load_tokenizer(model_path)
    executor = ThreadPoolExecutor(max_workers=WORKERS)
    local = threading.local()
    app = FastAPI()

    def run(req: Req) -> dict:
        gen = getattr(local, "gen", None)
        if gen is None:  # one Generator (KV pool for one sequence) per worker thread
            gen = local.gen = Generator(model, tok, max_batch=1, max_model_len=max_model_len)
        params = SamplingParams(max_new_tokens=req.max_tokens, temperature=req.temperature, ignore_eos=req.ignore_eos)
        r = gen.generate([req.prompt], params)[0]
        return {
            "choices": [{"index": 0, "text": r.text or "", "finish_reason": r.finish_reason}],
            "usage": {"prompt_tokens": len(r.prompt_ids), "completion_tokens": len(r.token_ids)},
        }

    @app.post("/v1/completions")
    async def completions(req: Req) -> dict:
        return await asyncio.get_running_loop().run_in_executor(executor, run, req)

    @app.get("/readyz")
    async def readyz() -> dict:
        return {"status": "ready"}

    return app


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    uvicorn.run(build_app(a.model), host=a.host, port=a.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
