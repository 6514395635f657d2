"""Multi-GPU benchmark: DeepSeek-V2-Lite shape, random bf16 weights, EP=2 / TP=2 / TP=2×EP=2 vs one GPU.

Run under torchrun on one 2-GPU host (one command does everything and prints a table last)::

    torchrun --nproc-per-node 2 benchmarks/parallel_gpu.py            # GPUs (NCCL)
    torchrun --nproc-per-node 2 benchmarks/parallel_gpu.py --cpu-dry-run   # tiny shapes, gloo, CPU

Weights are drawn per checkpoint tensor from a seed derived from its name, full-size, then cut with the
same :func:`runtime.parallel.shard.checkpoint_slice` the loader uses, so every layout computes the same
function as the single-GPU model. Phases:
  1. rank 0 alone: the whole model on GPU 0 (the baseline): reference logits, decode tok/s;
  2. per layout, every rank: its shard; logits vs the reference; decode tok/s (CUDA graphs captured on
     every rank with the NCCL all-reduces inside, torch.compile'd layer regions);
  3. the serving path on the last layout: rank 0's engine drives rank 1 through the lockstep protocol
     (header + NCCL payload broadcast, CUDA graphs captured on both), greedy tokens vs SPMD decode.
Decode: prompt 128, 64 new greedy tokens, host reads every step's tokens (benchmarks/model_gpu.py's loop).

Failure drill (ranks started by hand, not by torchrun, whose agent would end rank 0 itself)::

    for r in 0 1; do RANK=$r WORLD_SIZE=2 LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 \
      python benchmarks/parallel_gpu.py --failure-drill 200 [--drill-hang] & done; wait
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import sys
import time
import traceback
import zlib
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import benchmarks.model_gpu as mg  # OursBench: the decode loop of the one-GPU table
from runtime.config import ModelConfig
from runtime.execution import REGIONS, compile_failures
from runtime.kv_cache import prefill_metadata
from runtime.parallel.dist import ParallelState, make_groups
from runtime.parallel.layout import ParallelLayout
from runtime.parallel.shard import checkpoint_slice
from runtime.registry import build_model

TINY = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_attention_heads=4,
    num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    n_routed_experts=8, num_experts_per_tok=2, num_hidden_layers=4,
)  # fmt: skip
RANK = int(os.environ.get("RANK", 0))


def log(*a) -> None:
    if RANK == 0:
        print(*a, flush=True)


def fill(model, full_shapes: dict[str, tuple[int, ...]], ps: ParallelState | None) -> None:
    """Deterministic weights: tensor ``name`` is the same on every layout (full draw, then this rank's cut)."""
    dev = model.device
    with torch.no_grad():
        for name, dst in model.state_dict(keep_vars=True).items():
            full = full_shapes[name]
            g = torch.Generator(device=dev).manual_seed(zlib.crc32(name.encode()))
            if "norm" in name:
                t = 1.0 + 0.1 * torch.randn(full, generator=g, device=dev)
            else:
                t = torch.randn(full, generator=g, device=dev) / full[-1] ** 0.5
            idx = checkpoint_slice(full, tuple(dst.shape), ps) if ps is not None else None
            dst.copy_(t if idx is None else t[idx])
    model.reset_buffers()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def reference_inputs(vocab: int):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (4, mg.PROMPT), generator=g).to(mg.DEV)


def probe(bench: mg.OursBench, prompts: torch.Tensor) -> dict:
    """Packed-prefill logits of every position (no cache), then 8 greedy decode steps through the cache."""
    B, P = prompts.shape
    with torch.inference_mode():
        meta = prefill_metadata([P] * B, [P] * B, None, None, device=mg.DEV)
        pos = torch.arange(P, device=mg.DEV).repeat(B)
        logits = bench.model(prompts.reshape(-1), pos, meta)
        last, tables = bench.prefill(prompts)
        first = last.argmax(-1)
        tokens = [first.tolist(), *bench.decode(first, tables, P, 7, graphs=False)]  # [step][sequence]
    return {"logits": logits.float().cpu(), "tokens": tokens}


def decode_rows(bench: mg.OursBench, batches: list[int]) -> dict[int, float]:
    out = {}
    with torch.inference_mode():
        for B in batches:
            torch.manual_seed(B)  # same prompts on every rank (and in every layout)
            out[B] = bench.decode_tok_s(B, graphs=bench.graphs is not None)
            log(f"  decode batch {B}: {out[B]:,.1f} tok/s")
    return out


def run_config(config, ps, full_shapes, batches, compile_: bool, max_len: int):
    t = time.perf_counter()
    model = build_model(config, torch.bfloat16, mg.DEV, parallel=ps)
    fill(model, full_shapes, ps)
    mem = torch.cuda.memory_allocated() / 2**30 if mg.DEV == "cuda" else 0.0
    log(f"  built + filled in {time.perf_counter() - t:.1f} s, {mem:.1f} GiB on GPU")
    if compile_:
        model.configure(dataclasses.replace(model.options, compile=True))
    bench = mg.OursBench(model, max(batches), max_len=max_len, decode_len=mg.PROMPT + mg.NEW + 8)
    if mg.DEV == "cuda":
        t = time.perf_counter()
        with torch.inference_mode():
            bench.capture(batches)
        log(f"  CUDA graphs for {batches} in {time.perf_counter() - t:.1f} s (compile included)")
    return model, bench, mem


def free() -> None:
    """Drop what the last configuration left: compiled graphs (they hold its modules), cached memory."""
    gc.collect()
    REGIONS.clear()
    torch._dynamo.reset()
    if mg.DEV == "cuda":
        torch.cuda.empty_cache()


def serving_check(model, ps: ParallelState, prompts: torch.Tensor, want: list[list[int]]) -> dict:
    """Rank 0: engine over a lockstep Leader; others: the worker loop. Greedy tokens must match ``want``."""
    from runtime.engine import Engine, EngineConfig, Sequence
    from runtime.parallel.lockstep import Leader, worker_loop
    from runtime.sampling import SamplingParams

    if not ps.is_leader:
        return {"worker_exit": worker_loop(model, ps)}
    leader = Leader(model, ps)
    cfg = EngineConfig(max_num_seqs=8, kv_blocks=256, max_model_len=512, compile=model.compile_enabled)
    engine = Engine(leader, None, cfg, graph_capture=leader.make_graph_decoder)
    seqs = []
    for i, p in enumerate(prompts.tolist()):
        s = Sequence(f"s{i}", p, SamplingParams(max_new_tokens=len(want[0]), ignore_eos=True))
        seqs.append(s)
    engine.start()
    t = time.perf_counter()
    engine.submit(seqs)
    while any(s.finish_reason is None for s in seqs) and time.perf_counter() - t < 120:
        time.sleep(0.01)
    got = [s.output_ids for s in seqs]
    same = sum(x == y for a, b in zip(got, want, strict=True) for x, y in zip(a, b, strict=True)) / sum(map(len, want))
    engine.stop()
    leader.close()
    return {
        "engine_cuda_graphs": engine.runner.graphs is not None,
        "engine_greedy_agreement_with_spmd": same,
        "first_tokens_equal": [g[:1] for g in got] == [w[:1] for w in want],
        "engine_s": round(time.perf_counter() - t, 2),
        "leader_failed": leader.failed,
    }


def failure_drill(config, full_shapes, timeout_s: float, die_after: int, hang: bool) -> int:
    """Rank 1 dies (``os._exit``), or hangs with its sockets open (``hang``), in the middle of a long
    generation served by rank 0's engine (CUDA graphs, NCCL collectives inside them). Rank 0 prints how long
    it took to notice. Start the ranks without torchrun (its agent would kill rank 0 itself): RANK /
    WORLD_SIZE / MASTER_* set by hand."""
    from runtime.engine import Engine, EngineConfig, Sequence
    from runtime.parallel.lockstep import Leader, worker_loop
    from runtime.sampling import SamplingParams

    ps = make_groups(ParallelLayout(2, 2, 2), RANK, RANK, timeout_s)
    model = build_model(config, torch.bfloat16, mg.DEV, parallel=ps)
    fill(model, full_shapes, ps)
    if RANK != 0:
        calls, receive = [0], dist.broadcast

        def dying(*a, **k):  # each step's inputs arrive by one broadcast: die on the die_after-th
            calls[0] += 1
            if calls[0] == die_after:
                print(f"rank 1: {'hanging' if hang else 'exiting abruptly'} at step {die_after}", flush=True)
                if hang:
                    time.sleep(6 * timeout_s)
                os._exit(1)
            return receive(*a, **k)

        dist.broadcast = dying
        return worker_loop(model, ps)
    t_dead: list[float] = []
    leader = Leader(model, ps, on_failure=lambda msg: t_dead.append(time.perf_counter()) or log(f"on_failure: {msg}"))
    # compile off: a first compiled call can take longer than this drill's short timeout
    cfg = EngineConfig(max_num_seqs=8, kv_blocks=1024, max_model_len=4096, compile=False)
    engine = Engine(leader, None, cfg, graph_capture=leader.make_graph_decoder)
    log(f"engine ready (graphs: {engine.runner.graphs is not None}); generating")
    seqs = [Sequence(f"s{i}", [1, 2, 3, 4], SamplingParams(max_new_tokens=3000, ignore_eos=True)) for i in range(4)]
    engine.start()
    t0 = time.perf_counter()
    engine.submit(seqs)
    while not t_dead and time.perf_counter() - t0 < 6 * timeout_s:
        time.sleep(0.05)
    steps = max(len(s.output_ids) for s in seqs)
    if not t_dead:
        log(f"FAILURE NOT DETECTED within {6 * timeout_s} s (steps {steps})")
        return 2
    reasons = sorted({str(s.finish_reason) for s in seqs})
    log(
        f"failure detected {t_dead[0] - t0:.2f} s after the start ({steps} steps done; timeout {timeout_s} s); "
        f"sequences finished with {reasons}"
    )
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny shapes on CPU with gloo")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--layouts", default="1x2,2x1,2x2", help="TPxEP list")
    ap.add_argument("--json", type=Path, help="write raw results here (rank 0)")
    ap.add_argument("--failure-drill", type=int, default=0, help="rank 1 dies at this decode step (see failure_drill)")
    ap.add_argument("--drill-hang", action="store_true", help="rank 1 hangs instead of exiting")
    args = ap.parse_args()
    raw = dict(mg.V2_LITE)
    if args.cpu_dry_run:
        mg.DEV, mg.PROMPT, mg.NEW = "cpu", 16, 4
        raw.update(TINY)
    batches = [1, 8] if args.cpu_dry_run else [1, 8, 32, 64]
    world, local = int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if mg.DEV == "cuda":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        torch.cuda.set_device(local)
    dist.init_process_group("gloo" if args.cpu_dry_run else "nccl", timeout=datetime.timedelta(seconds=1800))
    torch._dynamo.config.cache_size_limit = 64
    compile_ = not args.no_compile and mg.DEV == "cuda"
    config = ModelConfig.from_dict(raw)
    full_shapes = {k: tuple(v.shape) for k, v in build_model(config, device="meta").state_dict().items()}
    card = torch.cuda.get_device_name() if mg.DEV == "cuda" else "cpu (dry run)"
    n_params = sum(torch.Size(s).numel() for s in full_shapes.values())
    log(f"card: {card} x{world}; torch {torch.__version__}; {n_params / 1e9:.2f} B params")
    max_len = max(512, mg.PROMPT + mg.NEW + 8)
    if args.failure_drill:
        raw["num_hidden_layers"] = 4  # the shape of a layer is what matters here, not the depth
        config = ModelConfig.from_dict(raw)
        full_shapes = {k: tuple(v.shape) for k, v in build_model(config, device="meta").state_dict().items()}
        code = failure_drill(config, full_shapes, 10.0, args.failure_drill, args.drill_hang)
        sys.stdout.flush()
        os._exit(code)
    prompts = reference_inputs(config.vocab_size)
    results: dict = {"card": card, "world": world, "torch": torch.__version__, "rows": {}}

    # ---- 1. one GPU ---------------------------------------------------------------------------------
    if RANK == 0:
        log("one GPU:")
        model, bench, mem = run_config(config, None, full_shapes, batches, compile_, max_len)
        ref = probe(bench, prompts)
        results["rows"]["1 GPU"] = {
            "mem_gib": mem,
            "tok_s": decode_rows(bench, batches),
            "compiled": model.compile_enabled,
        }
        del model, bench
        free()
    dist.barrier()

    # ---- 2. layouts ---------------------------------------------------------------------------------
    ps = model = None
    for spec in args.layouts.split(","):
        tp, ep = map(int, spec.split("x"))
        name = f"TP={tp} EP={ep}"
        log(f"{name}:")
        layout = ParallelLayout(tp, ep, world).validate(config)
        ps = make_groups(layout, RANK, local, 600.0)
        try:
            model, bench, mem = run_config(config, ps, full_shapes, batches, compile_, max_len)
            got = probe(bench, prompts)
            row = {"mem_gib": mem, "compiled": model.compile_enabled}
            if RANK == 0:
                row["logits_rel_err"] = rel(got["logits"], ref["logits"])
                steps = zip(got["tokens"], ref["tokens"], strict=True)
                pairs = [(x, y) for ra, rb in steps for x, y in zip(ra, rb, strict=True)]
                row["greedy_tokens_equal"] = sum(x == y for x, y in pairs) / len(pairs)
                log(f"  logits rel err vs one GPU {row['logits_rel_err']:.4f}, greedy {row['greedy_tokens_equal']:.0%}")
            row["tok_s"] = decode_rows(bench, batches)
            if compile_failures():
                row["compile_failed"] = compile_failures()[0][:300]
            results["rows"][name] = row
            last = spec == args.layouts.split(",")[-1]
            if last:
                spmd = got["tokens"]
                del bench
                gc.collect()
                try:
                    results["serving"] = serving_check(model, ps, prompts, [list(t) for t in zip(*spmd, strict=True)])
                except Exception as exc:
                    traceback.print_exc()
                    results["serving"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                log(f"  serving path: {json.dumps(results['serving'])}")
            else:
                del bench
            del model
            free()
        except Exception as exc:
            traceback.print_exc()
            results["rows"][name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        dist.barrier()

    # ---- table --------------------------------------------------------------------------------------
    if RANK == 0:
        base = results["rows"]["1 GPU"]["tok_s"]
        log("")
        log(f"## {card}: DeepSeek-V2-Lite shape, random bf16 weights, decode tok/s (prompt {mg.PROMPT}, {mg.NEW} new)")
        log(
            "| layout | GPUs | GiB/GPU | compiled | logits rel err | greedy agree | "
            + " | ".join(f"B={b}" for b in batches)
            + " |"
        )
        log("|---|---:|---:|---|---:|---:|" + "---:|" * len(batches))
        for name, r in results["rows"].items():
            if "error" in r:
                log(f"| {name} | | | | | | error: {r['error'][:120]} |")
                continue
            cells = [f"{r['tok_s'][b]:,.0f} ({r['tok_s'][b] / base[b]:.2f}×)" for b in batches]
            err = f"{r['logits_rel_err']:.4f}" if "logits_rel_err" in r else "-"
            agree = f"{r['greedy_tokens_equal']:.0%}" if "greedy_tokens_equal" in r else "-"
            gpus = 1 if name == "1 GPU" else world
            log(
                f"| {name} | {gpus} | {r['mem_gib']:.1f} | {r['compiled']} | {err} | {agree} | "
                + " | ".join(cells)
                + " |"
            )
        log(f"serving path: {json.dumps(results.get('serving'))}")
        if args.json:
            args.json.write_text(json.dumps(results, indent=2, default=str))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
