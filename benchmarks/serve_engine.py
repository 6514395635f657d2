"""The engine alone (no HTTP): continuous-batching throughput and the batching-invariance check, on any
device. On CUDA it exercises the path the CPU tests cannot: compiled layer regions + CUDA-graph decode
with batch buckets inside the scheduler.

    python -m benchmarks.serve_engine [--device cuda] [--dtype bfloat16] [--model PATH] [--batches 1 8 32 64]

For each batch size B: B sequences submitted at once (fixed prompt and output lengths), time until all
finish, generated tokens/s. Before that, greedy outputs of a mixed-length batch are compared with each
prompt run alone through the same engine (must be equal in fp32; bf16 may differ by rounding).
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time

import torch

from runtime.engine import Engine, EngineConfig, Sequence
from runtime.execution import AttentionDecode, ExecutionOptions, MoEImpl
from runtime.loader import load_model, load_tokenizer
from runtime.sampling import SamplingParams


def run(engine: Engine, prompts: list[list[int]], max_new: list[int]) -> tuple[list[list[int]], float]:
    done = threading.Semaphore(0)
    outs: list[list[int]] = [[] for _ in prompts]

    def on(i):
        def f(ev):
            outs[i].extend(ev.token_ids)
            if ev.finish_reason:
                done.release()

        return f

    seqs = [
        Sequence(f"b{i}-{time.monotonic_ns()}", p, SamplingParams(max_new_tokens=n, ignore_eos=True), on(i))
        for i, (p, n) in enumerate(zip(prompts, max_new, strict=True))
    ]
    t0 = time.perf_counter()
    engine.submit(seqs)
    for _ in seqs:
        if not done.acquire(timeout=300):
            raise TimeoutError("engine did not finish")
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    return outs, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint (default: a fresh tiny one)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--moe-impl", default="auto", help=" | ".join(m.value for m in MoEImpl))
    p.add_argument("--attention-decode", default="auto", help=" | ".join(m.value for m in AttentionDecode))
    a = p.parse_args(argv)
    try:
        options = ExecutionOptions(MoEImpl.parse(a.moe_impl), AttentionDecode.parse(a.attention_decode))
    except ValueError as exc:
        p.error(str(exc))
    path = a.model
    if path is None:
        from runtime.tiny import make_tiny

        path = str(make_tiny(tempfile.mkdtemp() + "/tiny", arch="v2", seed=0))
    model = load_model(path, dtype=a.dtype, device=a.device)
    model.configure(options)
    tok = load_tokenizer(path)
    t0 = time.perf_counter()
    cfg = EngineConfig(max_num_seqs=max(a.batches), compile=not a.no_compile, cuda_graphs=not a.no_cuda_graphs)
    engine = Engine(model, tok, cfg)
    engine.start()
    engine.warm_up()
    print(
        f"device {a.device} dtype {a.dtype} graphs {engine.runner.graphs is not None} moe {a.moe_impl} "
        f"attention {a.attention_decode} "
        f"start-up {time.perf_counter() - t0:.1f} s, {engine.allocator.capacity} KV blocks"
    )

    texts = ["The order", "Hello world, this is a tiny language model. " * 4, "A", "Risk score: low. " * 2]
    prompts = [tok.encode(t) for t in texts]
    lens = [24, 9, 40, 17]
    alone = [run(engine, [pr], [n])[0][0] for pr, n in zip(prompts, lens, strict=True)]
    together, _ = run(engine, prompts * 8, lens * 8)
    same = sum(together[i] == alone[i % 4] for i in range(32))
    print(f"batching invariance: {same}/32 greedy outputs equal to the single-request outputs")

    prompt = [(7 + 13 * i) % 500 + 3 for i in range(a.prompt_len)]
    for b in a.batches:
        run(engine, [prompt] * b, [a.output_len] * b)  # warm this bucket
        _, dt = run(engine, [prompt] * b, [a.output_len] * b)
        print(f"batch {b:3d}: {b * a.output_len / dt:9.0f} tok/s  ({dt * 1000:7.1f} ms for {a.output_len} tokens)")
    assert engine.allocator.usage() == 0.0, "KV blocks leaked"
    engine.stop()
    return 0 if same == 32 or a.dtype != "float32" else 1


if __name__ == "__main__":
    raise SystemExit(main())
