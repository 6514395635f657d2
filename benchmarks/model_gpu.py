"""GPU benchmark: our runtime vs transformers on the DeepSeek-V2-Lite shape, random bf16 weights.

One run, one card: builds transformers' model directly on the GPU (random init), copies its weights into
ours (so both compute the same function - checked), then measures
  * decode tok/s at batch 1, 8, 32, 64 (prompt 128, 64 new tokens; greedy; host reads every token as a
    real engine does) - ours without and with CUDA graphs (both through the torch.compile'd layer regions
    unless ``--no-compile``), transformers default and static cache;
  * prefill 1×512 and 8×512;
  * copy bandwidth, and each decode figure as a fraction of the HBM roofline (the bytes one step must read:
    every non-expert weight, the distinct experts the batch picks, the KV cache; roofline_step_bytes).
The table is printed last. ``--smoke`` runs a 4-layer model with correctness checks only.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import re
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.config import ModelConfig
from runtime.cuda_graph import GRAPH_PIECES, CUDAGraphDecoder
from runtime.execution import AttentionDecode, ExecutionOptions, MoEImpl, compile_failures
from runtime.kv_cache import (
    AttentionMetadata,
    BlockAllocator,
    PagedKVCache,
    SequenceBlocks,
    prefill_metadata,
)
from runtime.model import DeepseekForCausalLM
from runtime.moe import MoE
from runtime.registry import build_model

V2_LITE = {
    "model_type": "deepseek_v2",
    "vocab_size": 102400,
    "hidden_size": 2048,
    "intermediate_size": 10944,
    "moe_intermediate_size": 1408,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "n_shared_experts": 2,
    "n_routed_experts": 64,
    "num_experts_per_tok": 6,
    "routed_scaling_factor": 1.0,
    "kv_lora_rank": 512,
    "q_lora_rank": None,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "topk_method": "greedy",
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": False,
    "scoring_func": "softmax",
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "max_position_embeddings": 163840,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000,
    "rope_scaling": {
        "type": "yarn",
        "factor": 40,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
    },
    "bos_token_id": 100000,
    "eos_token_id": 100001,
    "tie_word_embeddings": False,
}
BLOCK = 16
PROMPT, NEW = 128, 64
DATASHEET_PEAK = 989e12  # H100/H200 SXM dense bf16, FLOP/s


T0 = time.perf_counter()


def log(*a) -> None:
    print(*a, flush=True)


DEV = "cuda"


def _sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def sync_time(fn) -> float:
    _sync()
    t = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t


def build_hf(raw: dict):
    import transformers

    cfg = transformers.DeepseekV2Config(**{k: v for k, v in raw.items() if k != "model_type"})
    with torch.device(DEV):
        try:
            hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        except TypeError:
            hf = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16)
    return hf.eval()


def copy_from_hf(ours: DeepseekForCausalLM, hf) -> None:
    """transformers 5 packs experts as ``experts.gate_up_proj`` [E, 2I, H] / ``experts.down_proj``;
    those go straight into our stacked buffers; every other name is identical."""
    own = ours.state_dict(keep_vars=True)
    seen = set()
    with torch.no_grad():
        for name, t in hf.state_dict().items():
            m = re.match(r"(.*\.mlp)\.experts\.(gate_up_proj|down_proj)$", name)
            if m:
                moe = ours.get_submodule(m.group(1))
                dst = moe.w13 if m.group(2) == "gate_up_proj" else moe.w2
                src = t if t.shape == dst.shape else t.transpose(-2, -1)
                dst.copy_(src)
                prefix = m.group(1) + ".experts."
                seen.update(k for k in own if k.startswith(prefix) and ("down" in k) == ("down" in name))
            elif name in own:
                own[name].copy_(t)
                seen.add(name)
            elif "rotary" not in name:
                raise KeyError(f"transformers tensor {name} has no counterpart")
    left = set(own) - seen
    if left:
        raise KeyError(f"not filled from transformers: {sorted(left)[:5]}")


def copy_bandwidth() -> float:
    n = 2 * 1024**3 if DEV == "cuda" else 64 * 1024**2
    x = torch.empty(n // 2, dtype=torch.bfloat16, device=DEV)
    y = torch.empty_like(x)
    y.copy_(x)
    best = min(sync_time(lambda: y.copy_(x)) for _ in range(10))
    return 2 * n / best  # read + write


def roofline_step_bytes(ours: DeepseekForCausalLM, B: int, ctx: int) -> float:
    c = ours.config
    elem = 2
    expert_params = 3 * c.hidden_size * c.moe_intermediate_size
    total = sum(p.numel() for p in ours.state_dict().values())
    routed = sum(m.w13.numel() + m.w2.numel() for _, m in ours.moe_layers())
    embed = ours.model.embed_tokens.weight.numel()
    non_expert = total - routed - embed + B * c.hidden_size  # only B embedding rows are read
    E, k = c.n_routed_experts, c.num_experts_per_tok
    distinct = E * (1 - (1 - k / E) ** B)
    kv = B * ctx * c.kv_cache_dim * c.num_hidden_layers
    return elem * (non_expert + len(ours.moe_layers()) * distinct * expert_params + kv)


# ---- ours ------------------------------------------------------------------------------------------


class OursBench:
    def __init__(
        self, model: DeepseekForCausalLM, max_batch: int, max_len: int, decode_len: int, dev: str | None = None
    ) -> None:
        self.model, self.dev = model, dev or DEV
        self.max_blocks = -(-max_len // BLOCK)
        self.decode_blocks = -(-decode_len // BLOCK)  # static block-table width of the decode step
        self.cache = PagedKVCache(model.config, 1 + max_batch * self.max_blocks, BLOCK, model.dtype, self.dev)
        self.graphs: CUDAGraphDecoder | None = None

    def capture(self, batch_sizes, pieces: int = GRAPH_PIECES) -> None:
        self.graphs = CUDAGraphDecoder(self.model, self.cache, self.decode_blocks, batch_sizes, pieces)

    def prefill(self, prompts: torch.Tensor):
        """prompts [B, P] → (last-token logits [B, V], block tables [B, decode_blocks])."""
        B, P = prompts.shape
        alloc = BlockAllocator(self.cache.num_blocks)
        seqs = [SequenceBlocks(alloc, BLOCK) for _ in range(B)]
        slots = [s for seq in seqs for s in seq.append(P)]
        meta = prefill_metadata([P] * B, [P] * B, [s.blocks for s in seqs], slots, device=self.dev)
        pos = torch.arange(P, device=self.dev).repeat(B)
        last = torch.arange(1, B + 1, device=self.dev) * P - 1
        logits = self.model(prompts.reshape(-1), pos, meta, self.cache, logits_indices=last)
        for s in seqs:  # reserve the decode room up front; slots are computed on device below
            s.append(max(0, self.decode_blocks * BLOCK - s.num_tokens))
        tables = torch.tensor([s.blocks[: self.decode_blocks] for s in seqs], device=self.dev)
        return logits, tables

    def decode(
        self, tokens: torch.Tensor, tables: torch.Tensor, start: int, steps: int, graphs: bool, overlap: bool = True
    ):
        """``steps`` greedy decode steps; the host reads each step's tokens (as an engine must). With graphs
        the step's inputs are host lists staged by ``run_host``, as the serving engine does, and with
        ``overlap`` (the engine's default) step k+1 is launched with step k's tokens fed on the device before
        the host reads them."""
        B = tokens.shape[0]
        out = []
        if not graphs:
            step = lambda i, p, m: self.model(i, p, m, self.cache)  # noqa: E731
            return self.decode_device_inputs(step, tokens, tables, start, steps)
        toks, rows, ctx = tokens.tolist(), tables.tolist(), [start] * B
        if not overlap:
            for _ in range(steps):
                slots = [rows[i][c // BLOCK] * BLOCK + c % BLOCK for i, c in enumerate(ctx)]
                ctx = [c + 1 for c in ctx]
                toks = self.graphs.run_host(toks, ctx, rows, slots).argmax(-1).tolist()
                out.append(toks)
            return out
        host = [torch.zeros(B, dtype=torch.int64, pin_memory=True) for _ in range(2)]
        fed, pending = list(range(B)), None
        feed = None
        for k in range(steps):
            slots = [rows[i][c // BLOCK] * BLOCK + c % BLOCK for i, c in enumerate(ctx)]
            ctx = [c + 1 for c in ctx]
            logits = self.graphs.run_host(toks, ctx, rows, slots, feed, None if feed is None else fed)
            feed = logits.argmax(-1)
            host[k % 2].copy_(feed, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            if pending is not None:
                pending[1].synchronize()
                out.append(pending[0].tolist())
            pending = (host[k % 2], ready)
        pending[1].synchronize()
        out.append(pending[0].tolist())
        return out

    def decode_device_inputs(self, step, tokens: torch.Tensor, tables: torch.Tensor, start: int, steps: int):
        """Greedy steps whose inputs are built on the device each step: ``step(ids, positions, meta)`` is the
        eager model, or (benchmarks/decode_ablation_gpu.py) a graph decoder's tensor entry."""
        out = []
        ctx = torch.full((tokens.shape[0],), start, dtype=torch.int64, device=self.dev)
        for _ in range(steps):
            pos = ctx.clone()
            blk = tables.gather(1, (pos // BLOCK)[:, None]).squeeze(1)
            ctx = ctx + 1
            meta = AttentionMetadata(context_lens=ctx, block_tables=tables, slot_mapping=blk * BLOCK + pos % BLOCK)
            tokens = step(tokens, pos, meta).argmax(-1)
            out.append(tokens.tolist())
        return out

    def decode_tok_s(self, B: int, graphs: bool, overlap: bool = True) -> float:
        prompts = torch.randint(0, self.model.config.vocab_size, (B, PROMPT), device=self.dev)
        logits, tables = self.prefill(prompts)
        tokens = logits.argmax(-1)
        self.decode(tokens, tables, PROMPT, 3, graphs, overlap)  # warm-up
        dt = sync_time(lambda: self.decode(tokens, tables, PROMPT, NEW, graphs, overlap))
        return B * NEW / dt

    def prefill_s(self, B: int, P: int) -> float:
        prompts = torch.randint(0, self.model.config.vocab_size, (B, P), device=self.dev)
        self.prefill(prompts)
        return min(sync_time(lambda: self.prefill(prompts)) for _ in range(5))


# ---- transformers ----------------------------------------------------------------------------------


class _StepClock:
    """A logits processor that timestamps every generation step (after a device sync)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        _sync()
        self.stamps.append(time.perf_counter())
        return scores


def hf_decode_tok_s(hf, B: int, static: bool) -> float:
    """Decode tokens/s of ``generate`` between the first and the last step (prefill excluded)."""
    from transformers import LogitsProcessorList

    prompts = torch.randint(0, hf.config.vocab_size, (B, PROMPT), device=DEV)
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0, attention_mask=torch.ones_like(prompts))
    if static:
        kw["cache_implementation"] = "static"
    n = NEW + 1
    with torch.inference_mode():
        t = time.perf_counter()
        hf.generate(prompts, max_new_tokens=n, min_new_tokens=n, **kw)  # warm-up (and compile, if any)
        log(f"  transformers warm-up B={B} static={static}: {time.perf_counter() - t:.1f} s")
        clock = _StepClock()
        hf.generate(prompts, max_new_tokens=n, min_new_tokens=n, logits_processor=LogitsProcessorList([clock]), **kw)
    steps = len(clock.stamps) - 1
    return B * steps / (clock.stamps[-1] - clock.stamps[0])


def hf_prefill_s(hf, B: int, P: int) -> float:
    prompts = torch.randint(0, hf.config.vocab_size, (B, P), device=DEV)
    with torch.inference_mode():
        hf(prompts, logits_to_keep=1)
        return min(sync_time(lambda: hf(prompts, logits_to_keep=1)) for _ in range(5))


# ---- checks ----------------------------------------------------------------------------------------


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check(ours: DeepseekForCausalLM, hf, bench: OursBench) -> dict:
    """Same weights ⇒ same logits (bf16 tolerance), eager decode == graph decode, grouped == loop,
    compiled == uncompiled."""
    res = {}
    g = torch.Generator(device=DEV).manual_seed(0)
    L = PROMPT
    ids = torch.randint(0, ours.config.vocab_size, (2, L), device=DEV, generator=g)
    with torch.inference_mode():
        ref = hf(ids).logits  # [2, 48, V]
        logits, tables = bench.prefill(ids)
        res["prefill_last_rel_err_vs_hf"] = rel(logits, ref[:, -1])
        tok = ref[:, -1].argmax(-1)
        full = torch.cat([ids, tok[:, None]], 1)
        ref2 = hf(full).logits[:, -1]
        eager = ours(tok, torch.full((2,), L, device=DEV), _meta(tables, L), bench.cache)
        res["decode_rel_err_vs_hf"] = rel(eager, ref2)
        options = ours.options
        ours.configure(dataclasses.replace(options, absorb=False))
        expanded = ours(tok, torch.full((2,), L, device=DEV), _meta(tables, L), bench.cache)
        ours.configure(options)
        res["absorbed_vs_expanded_rel_err"] = rel(eager, expanded)
        if bench.graphs is not None:
            graphed = bench.graphs(tok, torch.full((2,), L, device=DEV), _meta(tables, L))
            res["graph_vs_eager_rel_err"] = rel(graphed, eager)
        compiled = ours.compile_enabled
        uncompiled = dataclasses.replace(options, compile=False)
        ours.configure(uncompiled)
        plain = ours(tok, torch.full((2,), L, device=DEV), _meta(tables, L), bench.cache)
        if compiled:
            res["compiled_vs_uncompiled_rel_err"] = rel(eager, plain)
        ours.configure(dataclasses.replace(uncompiled, moe_impl=MoEImpl.LOOP))
        looped = ours(tok, torch.full((2,), L, device=DEV), _meta(tables, L), bench.cache)
        ours.configure(dataclasses.replace(uncompiled, moe_impl=MoEImpl.GROUPED))
        grouped = ours(tok, torch.full((2,), L, device=DEV), _meta(tables, L), bench.cache)
        ours.configure(dataclasses.replace(uncompiled, attention_decode=AttentionDecode.GATHER))
        gathered = ours(tok, torch.full((2,), L, device=DEV), _meta(tables, L), bench.cache)
        ours.configure(dataclasses.replace(options, compile=compiled))
        res["grouped_vs_loop_rel_err"] = rel(grouped, looped)
        res["fused_moe_vs_grouped_rel_err"] = rel(plain, grouped)
        res["paged_attention_vs_gather_rel_err"] = rel(plain, gathered)
        res["greedy_next_token_equal"] = bool((eager.argmax(-1) == ref2.argmax(-1)).all())
    return res


def _meta(tables: torch.Tensor, pos: int) -> AttentionMetadata:
    B = tables.shape[0]
    p = torch.full((B,), pos, device=DEV)
    slot = tables.gather(1, (p // BLOCK)[:, None]).squeeze(1) * BLOCK + p % BLOCK
    return AttentionMetadata(context_lens=p + 1, block_tables=tables, slot_mapping=slot)


def fp32_fits(ours: DeepseekForCausalLM) -> bool:
    """The in-place fp32 conversion needs as many free bytes again as the bf16 weights (plus slack): on an
    80 GB card holding transformers' copy too, it does not fit, and the check is skipped with a log line."""
    if DEV != "cuda":
        return True
    weights = sum(t.numel() * t.element_size() for t in ours.state_dict().values())
    free, _ = torch.cuda.mem_get_info()
    if free < weights + 4 * 2**30:
        log(f"bf16-vs-fp32 check skipped: it needs {weights / 2**30:.0f} GiB more, {free / 2**30:.0f} GiB free")
        return False
    return True


def fp32_check(ours: DeepseekForCausalLM) -> dict:
    """Ours in bf16 against ours in fp32 (the same weights, converted in place and back, lossless) on the
    same inputs: prefill last-token logits and one decode step."""
    g = torch.Generator(device=DEV).manual_seed(2)
    ids = torch.randint(0, ours.config.vocab_size, (2, PROMPT), device=DEV, generator=g)

    def run(tok=None):
        b = OursBench(ours, 2, PROMPT + 16, PROMPT + 16)
        with torch.inference_mode():
            logits, tables = b.prefill(ids)
            tok = logits.argmax(-1) if tok is None else tok  # the decode step gets the same token in both
            dec = ours(tok, torch.full((2,), PROMPT, device=DEV), _meta(tables, PROMPT), b.cache)
        return logits.float(), dec.float(), tok

    p16, d16, tok = run()
    ours.float()
    try:
        p32, d32, _ = run(tok)
    finally:
        ours.to(torch.bfloat16)
    same = int((p16.argmax(-1) == p32.argmax(-1)).sum() + (d16.argmax(-1) == d32.argmax(-1)).sum())
    return {
        "bf16_vs_fp32_prefill_rel_err": rel(p16, p32),
        "bf16_vs_fp32_decode_rel_err": rel(d16, d32),
        "bf16_vs_fp32_top1_equal": f"{same}/4",
    }


def rank_kernels(events: list[tuple[str, float]], runs: int, top: int) -> tuple[float, float, list]:
    """(name, µs) of every kernel over ``runs`` calls → kernels per call, µs per call, and the ``top`` names
    by time as (name, count per call, µs per call); names cut to 60 characters."""
    agg: dict[str, list[float]] = {}
    for name, us in events:
        a = agg.setdefault(name[:60], [0, 0.0])
        a[0] += 1
        a[1] += us
    ranked = sorted(agg.items(), key=lambda kv: -kv[1][1])[:top]
    total = sum(us for _, us in events)
    return len(events) / runs, total / runs, [(n, c // runs, t / runs) for n, (c, t) in ranked]


def kernel_profile(fn, runs: int, top: int) -> tuple[float, float, list]:
    """The CUDA kernels of ``runs`` calls of ``fn`` (torch profiler), ranked by :func:`rank_kernels`."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            fn()
        torch.cuda.synchronize()
    cuda = torch.autograd.DeviceType.CUDA
    return rank_kernels([(e.name, e.device_time) for e in prof.events() if e.device_type == cuda], runs, top)


def profile_graph(bench: OursBench, B: int) -> dict:
    """GPU time of one captured decode step (graph replay alone, CUDA events) and its kernels (profiler)."""
    graph, _ = bench.graphs.graphs[B]
    for _ in range(5):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(30):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    res = {"replay_ms_median": sorted(times)[len(times) // 2]}
    try:
        n, us, top = kernel_profile(graph.replay, runs=3, top=25)
        res["kernels_per_step"], res["kernel_us_per_step"] = n, us
        res["top"] = [(name, count, round(t, 1)) for name, count, t in top]
    except Exception as exc:  # the profiler is a nice-to-have
        res["profiler_error"] = f"{type(exc).__name__}: {exc}"[:200]
    return res


# ---- kernels, FLOPs, CPU agreement ------------------------------------------------------------------


def moe_bytes(m: MoE, ids: torch.Tensor) -> int:
    """Bytes a perfect kernel reads for one MoE call: each distinct expert once, the shared experts once."""
    per_expert = (m.w13[0].numel() + m.w2[0].numel()) * m.w13.element_size()
    shared = 0 if m.shared_experts is None else sum(p.numel() * p.element_size() for p in m.shared_experts.parameters())
    return ids.unique().numel() * per_expert + shared


def moe_sweep(ours: DeepseekForCausalLM, bw: float) -> dict:
    """The decode MoE kernel alone (one layer, CUDA-graph timed): its launch configs at 1 and 8 tokens,
    then the chosen config against the grouped-GEMM path for 1..64 tokens. Sets the best configs."""
    import triton.testing

    from runtime.kernels import moe_decode as md

    _, m = ours.moe_layers()[0]
    H = ours.config.hidden_size
    g = torch.Generator(device=DEV).manual_seed(1)
    inputs = {}
    for T in (1, 2, 4, 8, 16, 32, 64):
        x = torch.randn(T, H, device=DEV, dtype=torch.bfloat16, generator=g)
        ids, w = m.gate(x)
        inputs[T] = (x, ids, w)
    s = m.shared_experts
    sw = (s.gate_proj.weight, s.up_proj.weight, s.down_proj.weight)

    def fused(T):
        x, ids, w = inputs[T]
        return lambda: md.moe_decode_triton(x, ids, w, m.w13, m.w2, sw, 0, m.n_local)

    def grouped(T):
        x, ids, w = inputs[T]
        return lambda: m.routed(x, ids, w, MoEImpl.GROUPED) + s(x)

    def us(fn) -> float:
        return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=30)

    res = {"configs": {}, "best": {}}
    for kind, attr in (("up", "UP_CONFIG"), ("down", "DOWN_CONFIG")):  # up first, then down with the best up
        # few warps with long K blocks (many loads in flight per thread) won for the small GEMVs
        # (benchmarks/linear_gpu.py), so the sweep spans 1-8 warps and K blocks up to 1,024
        cands = [(bn, bk, nw, 3) for bn in (4, 8, 16) for bk in (128, 256, 512, 1024) for nw in (1, 2, 4, 8)]
        scores = []
        for c in cands:
            if c[0] * c[1] > 8192:  # tiles beyond this spill registers
                continue
            setattr(md, attr, c)
            try:
                scores.append((us(fused(1)) + us(fused(8)), c))
            except Exception as exc:  # a config that does not compile is skipped, not fatal
                log(f"  {kind} {c}: {type(exc).__name__}")
        scores.sort()
        setattr(md, attr, scores[0][1])
        res["best"][kind] = scores[0][1]
        res["configs"][kind] = [(c, round(t, 1)) for t, c in scores[:5]]
    rows = []
    for T, (_, ids, _) in inputs.items():
        f, gr = us(fused(T)), us(grouped(T))
        nbytes = moe_bytes(m, ids)
        rows.append(
            {
                "tokens": T,
                "fused_us": f,
                "grouped_us": gr,
                "bytes_MB": nbytes / 1e6,
                "roofline_us": 1e6 * nbytes / bw,
                "fused_GBps": nbytes / f / 1e3,
            }
        )
        log("moe", rows[-1])
    res["rows"] = rows
    return res


def prefill_flops(c: ModelConfig, B: int, P: int) -> float:
    """Multiply-adds × 2 of one prefill over the activated parameters: every layer's projections and
    MLP / shared + k routed experts per token, causal attention, the LM head on the B last tokens."""
    H, nh = c.hidden_size, c.num_attention_heads
    qk, dv = c.qk_nope_head_dim + c.qk_rope_head_dim, c.v_head_dim
    q = H * (nh * qk) if c.q_lora_rank is None else H * c.q_lora_rank + c.q_lora_rank * nh * qk
    attn = q + H * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank * nh * (c.qk_nope_head_dim + dv) + nh * dv * H
    expert = 3 * H * c.moe_intermediate_size
    moe = (c.num_experts_per_tok + c.n_shared_experts) * expert + H * c.n_routed_experts
    dense = 3 * H * c.intermediate_size
    n_moe = sum(c.is_moe_layer(i) for i in range(c.num_hidden_layers))
    per_token = c.num_hidden_layers * attn + n_moe * moe + (c.num_hidden_layers - n_moe) * dense
    core = c.num_hidden_layers * nh * (P * (P + 1) / 2) * (qk + dv)  # QK^T and PV, causal half
    return 2 * (B * P * per_token + B * core + B * H * c.vocab_size)


def matmul_peak() -> float:
    a = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    t = min(sync_time(lambda: a @ b) for _ in range(10))
    return 2 * 8192**3 / t


def profile_prefill(bench: OursBench, B: int, P: int) -> dict:
    prompts = torch.randint(0, bench.model.config.vocab_size, (B, P), device=DEV)
    bench.prefill(prompts)
    n, us, top = kernel_profile(lambda: bench.prefill(prompts), runs=1, top=20)
    return {"kernels": int(n), "kernel_ms": us / 1e3, "top": [(name, c, round(t / 1e3, 2)) for name, c, t in top]}


def tiny_cpu_agreement(steps: int = 24) -> dict:
    """Greedy tokens of a tiny real checkpoint: the CPU path (fp32, eager, general MoE / attention) vs the
    GPU path (CUDA graphs + compiled regions + the Triton kernels) in fp32 and in bf16."""
    import tempfile

    from runtime.loader import load_model
    from runtime.tiny import make_tiny

    out = {}
    with tempfile.TemporaryDirectory() as d:
        path = make_tiny(Path(d) / "tiny", arch="v2", seed=5)
        runs = {}
        for name, dev, dtype in (
            ("cpu_fp32", "cpu", torch.float32),
            ("gpu_fp32", DEV, torch.float32),
            ("gpu_bf16", DEV, torch.bfloat16),
        ):
            torch._dynamo.reset()  # three models through the same compiled functions: start each afresh
            m = load_model(path, dtype=dtype, device=dev)
            if dev != "cpu":
                m.configure(
                    ExecutionOptions(moe_impl=MoEImpl.FUSED, attention_decode=AttentionDecode.PAGED, compile=True)
                )
            b = OursBench(m, 4, 64, 20 + steps + 4, dev)
            if dev != "cpu":
                b.capture((4,))
            prompts = torch.arange(4 * 20, device=dev).reshape(4, 20) % m.config.vocab_size
            with torch.inference_mode():
                logits, tables = b.prefill(prompts)
                runs[name] = b.decode(logits.argmax(-1), tables, 20, steps, graphs=dev != "cpu")
            m.configure(ExecutionOptions())
            del b, m
        ref = runs["cpu_fp32"]
        for name in ("gpu_fp32", "gpu_bf16"):
            same = sum(a == b for r1, r2 in zip(ref, runs[name], strict=True) for a, b in zip(r1, r2, strict=True))
            out[name + "_tokens_equal"] = f"{same}/{4 * steps}"
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="4 layers, correctness only")
    ap.add_argument("--skip-hf-decode", action="store_true")
    ap.add_argument("--json", type=Path, help="write raw results here")
    ap.add_argument("--budget-s", type=float, default=480, help="skip remaining transformers runs after this")
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny shapes on CPU: exercises the script")
    ap.add_argument("--no-compile", action="store_true", help="eager layers (no torch.compile'd regions)")
    ap.add_argument("--batches", type=int, nargs="+", help="decode batch sizes (default 1 8 32 64; --smoke 1 8)")
    ap.add_argument(
        "--skip-fp32-check",
        action="store_true",
        help="skip the bf16-vs-fp32 check (also skipped when the GPU lacks room for it)",
    )
    ap.add_argument("--skip-moe-sweep", action="store_true", help="keep the MoE kernels' default launch configs")
    args = ap.parse_args()
    global DEV, PROMPT, NEW
    if args.cpu_dry_run:
        DEV, PROMPT, NEW = "cpu", 16, 4
    import transformers

    raw = dict(V2_LITE)
    if args.smoke or args.cpu_dry_run:
        raw["num_hidden_layers"] = 4
    if args.cpu_dry_run:
        raw.update(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            moe_intermediate_size=32,
            num_attention_heads=4,
            num_key_value_heads=4,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            n_routed_experts=8,
            num_experts_per_tok=2,
        )
    batches = args.batches or ([1, 8] if args.smoke else [1, 8, 32, 64])
    card = torch.cuda.get_device_name() if DEV == "cuda" else "cpu (dry run)"
    log(f"card: {card}; torch {torch.__version__}; transformers {transformers.__version__}")
    config = ModelConfig.from_dict(raw)

    t = time.perf_counter()
    hf = build_hf(raw)
    log(f"transformers model built on GPU in {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    ours = build_model(config, torch.bfloat16, DEV)
    copy_from_hf(ours, hf)
    log(f"ours filled from it in {time.perf_counter() - t:.1f} s; moe layers {len(ours.moe_layers())}")
    assert all(isinstance(layer.mlp, MoE) == config.is_moe_layer(i) for i, layer in enumerate(ours.model.layers))
    n_params = sum(p.numel() for p in ours.state_dict().values())
    mem = torch.cuda.memory_allocated() / 2**30 if DEV == "cuda" else 0.0
    log(f"params {n_params / 1e9:.2f} B, GPU mem {mem:.1f} GiB")

    checks = {} if args.skip_fp32_check or not fp32_fits(ours) else fp32_check(ours)
    log("bf16 vs fp32:", json.dumps(checks))
    bw = copy_bandwidth()
    log(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    peak = matmul_peak() if DEV == "cuda" else float("nan")
    log(f"bf16 8192^3 matmul {peak / 1e12:.0f} TFLOP/s")
    sweep = moe_sweep(ours, bw) if DEV == "cuda" and not args.skip_moe_sweep else {}
    log("moe kernel sweep:", json.dumps(sweep.get("best")))
    if not args.no_compile:
        ours.configure(ExecutionOptions(compile=True))
    bench = OursBench(ours, max(batches), max_len=max(512, PROMPT + NEW + 8), decode_len=PROMPT + NEW + 8)
    try:
        if DEV != "cuda":
            raise RuntimeError("no CUDA: graphs skipped")
        t = time.perf_counter()
        with torch.inference_mode():
            bench.capture(batches)
        log(f"CUDA graphs captured for {batches} in {time.perf_counter() - t:.1f} s (compile included)")
    except Exception:
        traceback.print_exc()
        log("CUDA graph capture FAILED; graph rows will be missing")
        bench.graphs = None
    checks.update(check(ours, hf, bench))
    checks["compiled"] = ours.compile_enabled
    if compile_failures():
        checks["compile_failed"] = compile_failures()[0][:300]
    log("checks:", json.dumps(checks))

    rows = []
    with torch.inference_mode():
        for B in batches:
            roof = B / (roofline_step_bytes(ours, B, PROMPT + NEW // 2) / bw)
            r = {"batch": B, "roofline_tok_s": roof}
            r["ours_eager"] = bench.decode_tok_s(B, graphs=False)
            if bench.graphs is not None:
                r["ours_graph"] = bench.decode_tok_s(B, graphs=True)
                r["ours_graph_stepwise"] = bench.decode_tok_s(B, graphs=True, overlap=False)
            log("decode", r)
            rows.append(r)
        prof = {}
        if bench.graphs is not None:
            prof = profile_graph(bench, 1)
            log("batch-1 graph profile:", json.dumps(prof))
        prefills = []
        for B, P in ((1, 512), (8, 512)):
            prefills.append(
                {
                    "shape": f"{B}x{P}",
                    "tokens": B * P,
                    "flops": prefill_flops(config, B, P),
                    "ours_s": bench.prefill_s(B, P),
                }
            )
        prefill_prof = profile_prefill(bench, 8, 512) if DEV == "cuda" else {}
        log("prefill 8x512 profile:", json.dumps(prefill_prof))
        if ours.compile_enabled:  # the same without the compiled regions (what compiling buys)
            ours.configure(dataclasses.replace(ours.options, compile=False))
            for p in prefills:
                B, P = map(int, p["shape"].split("x"))
                p["ours_uncompiled_s"] = bench.prefill_s(B, P)
            if bench.graphs is not None:
                compiled_graphs = bench.graphs
                try:
                    bench.capture([1])
                    rows[0]["ours_graph_uncompiled"] = bench.decode_tok_s(1, graphs=True)
                    log("decode batch 1, CUDA graph without compile:", rows[0]["ours_graph_uncompiled"])
                finally:
                    bench.graphs = compiled_graphs
            ours.configure(dataclasses.replace(ours.options, compile=True))
    ours_mem = torch.cuda.max_memory_allocated() / 2**30 if DEV == "cuda" else 0.0
    del bench, ours
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()
    for p in prefills:
        B, P = map(int, p["shape"].split("x"))
        p["hf_s"] = hf_prefill_s(hf, B, P)
        log("prefill", p)
    if not args.skip_hf_decode:
        for static in (False, True):  # all default runs first: static may compile (slow) per shape
            key = "hf_static" if static else "hf_default"
            for r in rows:
                if time.perf_counter() - T0 > args.budget_s:
                    log(f"time budget {args.budget_s} s spent: skipping {key} at batch {r['batch']}")
                    continue
                try:
                    r[key] = hf_decode_tok_s(hf, r["batch"], static)
                except Exception as exc:  # report, keep going
                    traceback.print_exc()
                    r[key] = float("nan")
                    r[key + "_error"] = f"{type(exc).__name__}: {exc}"[:200]
                log("decode", r["batch"], key, r[key])

    agreement = tiny_cpu_agreement() if DEV == "cuda" else {}
    log("tiny checkpoint, greedy tokens vs the CPU path:", json.dumps(agreement))

    # ---- table (last) ---------------------------------------------------------------------------
    log("")
    log(f"## {card} - DeepSeek-V2-Lite shape, random bf16 weights, {config.num_hidden_layers} layers")
    log(
        f"torch {torch.__version__}, transformers {transformers.__version__}, copy bandwidth "
        f"{bw / 1e12:.2f} TB/s, peak GPU memory with ours {ours_mem:.1f} GiB"
    )
    log(f"checks: {json.dumps(checks)}")
    log(f"tiny checkpoint, greedy tokens equal to the CPU path: {json.dumps(agreement)}")
    if prof:
        log(f"batch-1 graph: {json.dumps(prof)}")
    log("")
    log(f"Decode (prompt {PROMPT}, {NEW} new tokens, greedy), tokens/s and fraction of HBM roofline:")
    log(
        "| batch | roofline tok/s | ours (CUDA graph, overlapped) | ours (CUDA graph, step by step) | "
        "ours (no graph) | transformers default | "
        "transformers static cache | ours best / best transformers |"
    )
    log("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:

        def cell(key, r=r):
            v = r.get(key)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                return "n/a"
            return f"{v:,.1f} ({100 * v / r['roofline_tok_s']:.1f}%)"

        best_ours = max(r.get("ours_graph", 0), r["ours_eager"])
        hf_vals = [v for v in (r.get("hf_default"), r.get("hf_static")) if v and not math.isnan(v)]
        ratio = f"{best_ours / max(hf_vals):.2f}×" if hf_vals else "n/a"
        log(
            f"| {r['batch']} | {r['roofline_tok_s']:,.0f} | {cell('ours_graph')} | {cell('ours_graph_stepwise')} | "
            f"{cell('ours_eager')} | "
            f"{cell('hf_default')} | {cell('hf_static')} | {ratio} |"
        )
    log("")
    log(
        f"Prefill (one forward, logits of the last token); TFLOP/s over the activated parameters, as % of "
        f"the datasheet's dense bf16 peak ({DATASHEET_PEAK / 1e12:.0f}) and of the measured matmul ({peak / 1e12:.0f}):"
    )
    log("| prompt | ours ms | ours tok/s | ours TFLOP/s | % datasheet | % matmul | transformers ms | ratio |")
    log("|---|---:|---:|---:|---:|---:|---:|---:|")
    for p in prefills:
        tf = p["flops"] / p["ours_s"]
        log(
            f"| {p['shape']} | {1e3 * p['ours_s']:.1f} | {p['tokens'] / p['ours_s']:,.0f} | {tf / 1e12:.0f} | "
            f"{100 * tf / DATASHEET_PEAK:.0f}% | {100 * tf / peak:.0f}% | {1e3 * p['hf_s']:.1f} | "
            f"{p['hf_s'] / p['ours_s']:.2f}× |"
        )
    if prefill_prof:
        log(f"8x512 prefill kernels: {json.dumps(prefill_prof)}")
    if sweep:
        log("")
        log(f"Decode MoE layer alone (CUDA-graph timed), kernel configs {json.dumps(sweep['best'])}:")
        log("| tokens | bytes (MB) | roofline µs | fused kernel µs | fused GB/s | grouped GEMM path µs |")
        log("|---:|---:|---:|---:|---:|---:|")
        for r in sweep["rows"]:
            log(
                f"| {r['tokens']} | {r['bytes_MB']:.1f} | {r['roofline_us']:.1f} | {r['fused_us']:.1f} | "
                f"{r['fused_GBps']:,.0f} | {r['grouped_us']:.1f} |"
            )
    for p in prefills:
        if "ours_uncompiled_s" in p:
            log(f"{p['shape']} prefill without the compiled regions: {1e3 * p['ours_uncompiled_s']:.1f} ms")
    if "ours_graph_uncompiled" in rows[0]:
        log(f"batch-1 decode, CUDA graph without the compiled regions: {rows[0]['ours_graph_uncompiled']:.1f} tok/s")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "card": card,
                    "checks": checks,
                    "decode": rows,
                    "prefill": prefills,
                    "profile": prof,
                    "prefill_profile": prefill_prof,
                    "moe_sweep": sweep,
                    "agreement": agreement,
                    "copy_bw": bw,
                    "matmul_peak": peak,
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
