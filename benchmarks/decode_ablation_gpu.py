"""What each decode-path change buys at small batch, measured in one GPU run (DeepSeek-V2-Lite shape,
random bf16 weights, no transformers).

Each row adds one change to the row above; all rows are CUDA-graph decode with the compiled layers and
both decode kernels, as ``benchmarks/model_gpu.py`` measures them:

1. ``tensor staging``: the step's inputs copied into the graph's buffers field by field from device
   tensors built per step;
2. ``host staging``: :meth:`CUDAGraphDecoder.run_host`, one pinned copy of host lists (the engine's path);
3. ``+ router kernel``: a greedy router's softmax, top-k, weights and load counts in one launch
   (:mod:`runtime.kernels.router`, ``ExecutionOptions.kernel_routing``);
4. ``+ one region per layer``: the whole decode layer as one compiled graph (``ExecutionOptions.decode_region``);
5. ``+ graph in pieces``: the step captured as ``GRAPH_PIECES`` graphs, so the GPU starts on the first
   while the host launches the rest (rows 1-4 capture one graph);
6. ``+ q/kv_a in one GEMM``: the two input projections stacked (``fuse_input_projections``);
7. ``+ small-linear kernel``: the decode projections (q/kv_a, W_UK, W_UV, o_proj, router) through
   :mod:`runtime.kernels.linear` instead of cuBLAS;
8. ``+ overlapped loop``: step k+1 launched with step k's tokens fed on the device before the host reads
   them (the engine's ``overlap``; rows 1-7 read each step's tokens before launching the next). The default
   now.

By default the run starts at row 6 (``--first-step 5``); docs/benchmarks.md has the earlier rows.

Per row: tokens/s of the full loop (host reads every step's tokens), GPU time of one graph replay, the
fraction of the HBM roofline, kernels per step (profiler) and the host time of one ``graph.replay()`` call
(the launch, before the GPU has run anything). Checks: the last row's logits against the
eager model's general paths (grouped GEMM, gathered attention; relative error), and per sequence the
number of greedy steps the first and last rows agree on (random weights have near-ties; rounding differs).

    python -m benchmarks.decode_ablation_gpu [--batches 1 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.model_gpu import (
    BLOCK,
    NEW,
    PROMPT,
    V2_LITE,
    OursBench,
    copy_bandwidth,
    kernel_profile,
    log,
    moe_sweep,
    rel,
    roofline_step_bytes,
    sync_time,
)
from runtime import moe as moe_mod
from runtime.config import ModelConfig
from runtime.cuda_graph import GRAPH_PIECES
from runtime.execution import AttentionDecode, ExecutionOptions, MoEImpl
from runtime.kernels import linear as ln
from runtime.kv_cache import AttentionMetadata
from runtime.model import DeepseekForCausalLM
from runtime.registry import build_model

STEPS = (
    "tensor staging",
    "host staging",
    "+ router kernel",
    "+ one region per layer",
    "+ graph in pieces",
    "+ q/kv_a in one GEMM",
    "+ small-linear kernel",
    "+ overlapped loop",
)
# the small-linear kernel's token limits (projections, router) as the runtime sets them; rows before 7 use 0
KERNEL_TOKEN_LIMITS = ln.SMALL_LINEAR_MAX_TOKENS, moe_mod.ROUTER_MAX_TOKENS


def random_model(config: ModelConfig) -> DeepseekForCausalLM:
    torch.manual_seed(0)
    model = build_model(config, torch.bfloat16, "cuda")
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02)
    return model


def apply_step(model: DeepseekForCausalLM, step: int) -> None:
    """The model as row ``step`` runs it (compiled regions on)."""
    ln.SMALL_LINEAR_MAX_TOKENS, moe_mod.ROUTER_MAX_TOKENS = KERNEL_TOKEN_LIMITS if step >= 6 else (0, 0)
    for layer in model.model.layers:
        attn = layer.self_attn
        if step >= 5 and attn.in_proj_weight is None:
            attn.fuse_input_projections()
        elif step < 5:
            attn.in_proj_weight = None  # the parameters stay views of the old stack: the two-GEMM path
    # configuring compile marks the (re)stacked projection weights static
    options = dataclasses.replace(model.options, kernel_routing=step >= 2, decode_region=step >= 3, compile=True)
    model.configure(options)


def use_tuned_linear_configs(path: str) -> None:
    """The small-linear kernel launched with a sweep's best config for each shape it has one for (1 token:
    the 1-token sweep; more: the 8-token one), the default for the others."""
    table = {}
    for entry in json.loads(Path(path).read_text()):
        table[(*entry["dims"], entry["tokens"] > 1)] = tuple(entry["config"])
    default = ln.launch_config

    def tuned(n_rows: int, k: int, groups: int, tokens: int, elem_bytes: int = 2) -> tuple[int, int, int, int]:
        return table.get((n_rows, k, groups, tokens > 1)) or default(n_rows, k, groups, tokens, elem_bytes)

    ln.launch_config = tuned
    log("small-linear configs:", json.dumps([(list(key), c) for key, c in table.items()]))


def tensor_staged_decode(bench: OursBench, tokens, tables, start: int, steps: int) -> list:
    """Row 1's loop: metadata built on the device each step, copied into the graph field by field."""
    return bench.decode_device_inputs(bench.graphs, tokens, tables, start, steps)


def agreed_steps(a: Sequence[int], b: Sequence[int]) -> int:
    """Greedy steps two runs of one sequence agree on before their first difference."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))


def replay_ms(bench: OursBench, B: int, n: int = 50) -> float:
    graph, _ = bench.graphs.graphs[B]
    for _ in range(5):
        graph.replay()
    return sync_time(lambda: [graph.replay() for _ in range(n)]) / n * 1e3


def launch_us(bench: OursBench, B: int, n: int = 20) -> float:
    """Median host time of the ``replay()`` call itself (the GPU idle before it)."""
    graph, _ = bench.graphs.graphs[B]
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        graph.replay()
        times.append(time.perf_counter() - t)
    torch.cuda.synchronize()
    return sorted(times)[n // 2] * 1e6


def loop_anatomy(bench: OursBench, B: int, tok, tables) -> dict:
    """ms per step of the decode loop, built up: back-to-back replays (GPU time), a sync after each replay,
    + argmax and reading the tokens, + staging host lists (the engine's loop without overlap), or device
    tensors instead; and the overlapped loop (the engine's default)."""
    graph, out = bench.graphs.graphs[B]

    def per_step(fn) -> float:
        fn()
        return sync_time(fn) / NEW * 1e3

    def synced():
        for _ in range(NEW):
            graph.replay()
            torch.cuda.synchronize()

    def read():
        for _ in range(NEW):
            graph.replay()
            out.argmax(-1).tolist()

    return {
        "replays": per_step(lambda: [graph.replay() for _ in range(NEW)]),
        "replay+sync": per_step(synced),
        "replay+argmax+tolist": per_step(read),
        "host staging loop": per_step(lambda: bench.decode(tok, tables, PROMPT, NEW, graphs=True, overlap=False)),
        "overlapped loop": per_step(lambda: bench.decode(tok, tables, PROMPT, NEW, graphs=True)),
        "tensor staging loop": per_step(lambda: tensor_staged_decode(bench, tok, tables, PROMPT, NEW)),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument(
        "--first-step", type=int, default=5,
        help="row to start from (0: tensor staging; each row compiles the decode layer again, and dynamo "
        "gives up on a function after 8 compiles)",
    )  # fmt: skip
    ap.add_argument("--linear-configs", help="the small-linear kernel's launch configs per shape (linear_gpu --save)")
    ap.add_argument("--moe-sweep", action="store_true", help="sweep the fused MoE kernels' launch configs first")
    args = ap.parse_args()
    if args.linear_configs:
        use_tuned_linear_configs(args.linear_configs)
    config = ModelConfig.from_dict(dict(V2_LITE))
    model = random_model(config)
    bw = copy_bandwidth()
    if args.moe_sweep:
        with torch.inference_mode():
            log("moe sweep:", json.dumps({k: v for k, v in moe_sweep(model, bw).items() if k != "rows"}))
    log(f"card {torch.cuda.get_device_name()}, torch {torch.__version__}, copy bandwidth {bw / 1e12:.2f} TB/s")
    bench = OursBench(model, max(args.batches), max_len=512, decode_len=PROMPT + NEW + 8)
    prompts = {B: torch.randint(0, config.vocab_size, (B, PROMPT), device="cuda") for B in args.batches}

    def prefill(B: int):
        """Uncompiled (identical cache rows in every use; no prefill compile time)."""
        compiled, options = model.compile_enabled, model.options
        model.configure(dataclasses.replace(options, compile=False))
        try:
            return bench.prefill(prompts[B])
        finally:
            model.configure(dataclasses.replace(options, compile=compiled))

    with torch.inference_mode():
        # Each prefill takes a fresh allocator, so every batch reuses the same blocks: a batch is prefilled
        # again right before each use (same prompts, same rows) and never reads another batch's writes.
        ref_logits = {}  # the first decode step through the general paths (grouped GEMM, gathered attention)
        model.configure(ExecutionOptions(moe_impl=MoEImpl.GROUPED, attention_decode=AttentionDecode.GATHER))
        for B in args.batches:
            logits, tables = prefill(B)
            meta_pos = PROMPT
            slot = tables[:, meta_pos // BLOCK] * BLOCK + meta_pos % BLOCK
            meta = AttentionMetadata(
                context_lens=torch.full((B,), PROMPT + 1, device="cuda"), block_tables=tables, slot_mapping=slot
            )
            ref_logits[B] = model(logits.argmax(-1), torch.full((B,), PROMPT, device="cuda"), meta, bench.cache)
        model.configure(ExecutionOptions(compile=True))
        rows, tokens_by_step = [], {}
        first = args.first_step
        for step, what in list(enumerate(STEPS))[first:]:
            apply_step(model, step)
            bench.capture(args.batches, pieces=GRAPH_PIECES if step >= 4 else 1)
            for B in args.batches:
                logits, tables = prefill(B)
                tok = logits.argmax(-1)
                roof = B / (roofline_step_bytes(model, B, PROMPT + NEW // 2) / bw)
                if step == 0:
                    run = lambda t=tok, tb=tables: tensor_staged_decode(bench, t, tb, PROMPT, NEW)  # noqa: E731
                else:
                    run = lambda t=tok, tb=tables, o=step >= 7: bench.decode(t, tb, PROMPT, NEW, True, o)  # noqa: E731
                tokens_by_step[(step, B)] = run()
                tok_s = B * NEW / sync_time(run)
                r = {"step": what, "batch": B, "tok_s": tok_s, "roofline_pct": 100 * tok_s / roof}
                r["replay_ms"] = replay_ms(bench, B)
                r["gpu_roofline_pct"] = 100 * (B / (r["replay_ms"] / 1e3)) / roof
                graph, _ = bench.graphs.graphs[B]
                r["kernels"], r["kernel_us"], top = kernel_profile(graph.replay, runs=3, top=30)
                r["launch_us"] = launch_us(bench, B)
                log(json.dumps(r))
                if step == len(STEPS) - 1:
                    log(f"top kernels, batch {B}:", json.dumps([(n, c, round(t, 1)) for n, c, t in top]))
                rows.append(r)
        checks = {}
        for B in args.batches:  # the last configuration's first decode step against the eager model
            logits, tables = prefill(B)
            slot = tables[:, PROMPT // BLOCK] * BLOCK + PROMPT % BLOCK
            got = bench.graphs.run_host(logits.argmax(-1).tolist(), [PROMPT + 1] * B, tables.tolist(), slot.tolist())
            checks[f"rel_err_b{B}"] = rel(got, ref_logits[B])
            first_row, last_row = tokens_by_step[(first, B)], tokens_by_step[(len(STEPS) - 1, B)]
            seqs_a, seqs_b = list(zip(*first_row, strict=True)), list(zip(*last_row, strict=True))
            same = [agreed_steps(a, b) for a, b in zip(seqs_a, seqs_b, strict=True)]
            checks[f"greedy_steps_equal_per_seq_b{B}"] = same  # first and last rows, until the first difference
            if (6, B) in tokens_by_step:  # the same graphs, tokens fed from the host or on the device: identical
                checks[f"overlapped_tokens_equal_b{B}"] = tokens_by_step[(6, B)] == tokens_by_step[(7, B)]
        log("checks:", json.dumps(checks))
        # the rows above compiled the decode layer for every configuration: start afresh, or the captures
        # below can meet dynamo's recompile limit and run eager
        torch._dynamo.reset()
        for pieces in (GRAPH_PIECES, 1):  # where the loop's time goes beyond the GPU's, at batch 1
            bench.capture([1], pieces=pieces)
            logits, tables = prefill(1)
            log(f"loop anatomy, batch 1, {pieces} piece(s), ms/step:", json.dumps(
                loop_anatomy(bench, 1, logits.argmax(-1), tables)))  # fmt: skip
    log("")
    log(
        "| change | batch | tok/s (loop) | % roofline | graph replay ms | GPU-only % roofline | kernels/step "
        "| launch µs |"
    )
    log("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        log(
            f"| {r['step']} | {r['batch']} | {r['tok_s']:,.1f} | {r['roofline_pct']:.1f}% | {r['replay_ms']:.3f} | "
            f"{r['gpu_roofline_pct']:.1f}% | {r['kernels']:.0f} | {r['launch_us']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
