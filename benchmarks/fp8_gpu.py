"""GPU benchmark: block-scaled FP8 weights (DeepSeek-V3's format) against bf16, in one run on one card.

0. The linears alone: the weight-only kernel at decode sizes and the FP8 GEMM at 4096 tokens (and torch's
   blockwise ``F.scaled_mm`` where this torch has it) against bf16 on the dequantized weight, with rooflines.
1. DeepSeek-V2-Lite shape, random weights, quantized to FP8 (128×128 blocks); the bf16 model holds the same
   weights dequantized, so both compute the same function up to the FP8 kernels' activation handling:
   * logits relative error (prefill 2×128) and greedy agreement over 64 decode steps (8 prompts);
   * decode tok/s at batch 1 / 8 / 64 through CUDA graphs as the engine runs them (prompt 128, 64 new
     tokens, the host reading every step's tokens), each against its HBM roofline: the bytes one step must
     read (FP8 weights count 1 byte, their scales 4 bytes per 16K weights; the distinct experts the batch
     picks; the KV cache) over the measured copy bandwidth;
   * prefill 8×512 against its roofline, the larger of bytes / bandwidth and FLOPs / datasheet peak (bf16
     989 TFLOP/s, FP8 1979 TFLOP/s on H100 SXM).
2. A DeepSeek-V3 slice: 4 MoE decoder layers at V3's dims in FP8 (random FP8 weights written directly, 45 GB),
   per-layer decode time at batch 1 / 32 / 128 (two graph-captured models, 4 and 2 layers: the difference
   over 2 is one layer) against the per-layer roofline, and a projection of V3 decode throughput on 16 H100s
   (61 layers, experts spread over 16 GPUs), with its assumptions printed.

``--profile`` adds the kernels of one V2-Lite decode step per batch and of the 8×512 prefill, per model (torch
profiler): where a step's time goes.

Every section runs in its own try/except (the error is printed, the rest goes on); the tables are printed
last, and ``--json`` keeps the raw numbers. ``--smoke``: tiny shapes, a few steps, on the CPU too
(tests/runtime/test_fp8.py runs it there).

    python benchmarks/fp8_gpu.py --json fp8.json
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import model_gpu as mg

from runtime import execution
from runtime.config import ModelConfig, QuantConfig
from runtime.execution import ExecutionOptions
from runtime.kernels import fp8 as k8
from runtime.moe import MoE
from runtime.quant.fp8 import Fp8Linear, dequantize, quantize
from runtime.registry import build_model

PEAK_BF16 = 989e12  # H100 SXM dense, FLOP/s
PEAK_FP8 = 1979e12
# the H100 80GB HBM3's copy bandwidth as this script measures it (3.00 TB/s on 2026-12-06): the projection
# prices the large size's GPUs with it whatever card ran the slice (an H200 reads ~1.6x faster)
H100_COPY_BW = 3.0e12
BLOCK = (128, 128)
V3_SLICE = {
    "model_type": "deepseek_v3",
    "architectures": ["DeepseekV3ForCausalLM"],
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 4,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_shared_experts": 1,
    "n_routed_experts": 256,
    "num_experts_per_tok": 8,
    "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "topk_method": "noaux_tc",
    "n_group": 8,
    "topk_group": 4,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "first_k_dense_replace": 0,  # the slice: 4 MoE layers (V3's 58 of 61)
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
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
    "bos_token_id": 0,
    "eos_token_id": 1,
    "tie_word_embeddings": False,
}
# the smoke shapes: every quantized dim a multiple of 128 where the FP8 experts need it
SMOKE = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "moe_intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "kv_lora_rank": 64,
    "qk_rope_head_dim": 32,
    "v_head_dim": 32,
    "qk_nope_head_dim": 32,
    "vocab_size": 512,
}


def log(*a) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s]", *a, flush=True)


T0 = time.perf_counter()
RESULTS: dict = {}


def section(name: str, fn, *args):
    """Run one section; an exception is printed and recorded, never fatal."""
    log(f"== {name}")
    try:
        out = fn(*args)
        RESULTS[name] = out
        return out
    except Exception as exc:  # the one-shot run must go on
        traceback.print_exc()
        RESULTS[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        return None
    finally:  # the compiled regions hold the modules they traced: drop them, or the next section's model won't fit
        from runtime.execution import REGIONS

        REGIONS.clear()
        torch._dynamo.reset()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            log(f"GPU memory after {name}: {torch.cuda.memory_allocated() / 1e9:.1f} GB allocated")


# ---- models ----------------------------------------------------------------------------------------------


def configs(raw: dict) -> tuple[ModelConfig, ModelConfig]:
    plain = ModelConfig.from_dict(raw)
    fp8 = ModelConfig.from_dict({**raw, "quantization_config": QuantConfig().to_json()})
    return plain, fp8


def init_random(model, seed: int) -> None:
    """Weights at scale 1/sqrt(fan_in), norms near 1 (model_gpu's transformers init is not needed here)."""
    g = torch.Generator(device=model.device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.state_dict(keep_vars=True).items():
            if ".experts." in name:
                continue  # the stacks below
            if "norm" in name:
                p.fill_(1.0)
            elif p.dim() >= 2 and p.is_floating_point() and p.dtype != torch.float8_e4m3fn:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]), generator=g)
            elif p.is_floating_point() and p.dtype != torch.float8_e4m3fn:
                p.normal_(0.0, 0.1, generator=g)
        for _, m in model.moe_layers():
            if m.w13.dtype == torch.float8_e4m3fn:
                continue  # written by fill_fp8_random
            m.w13.normal_(0.0, 1.0 / math.sqrt(m.w13.shape[-1]), generator=g)
            m.w2.normal_(0.0, 1.0 / math.sqrt(m.w2.shape[-1]), generator=g)


def quantize_into(bf16, fp8) -> None:
    """``fp8`` gets the block-quantized weights of ``bf16``, and ``bf16`` is overwritten with their
    dequantized values: the two models then hold the same function (FP8 vs 'dequantized bf16')."""
    with torch.no_grad():
        for name, mod in fp8.named_modules():
            if isinstance(mod, Fp8Linear):
                src = bf16.get_submodule(name).weight
                q, s = quantize(src, BLOCK)
                mod.weight.copy_(q)
                mod.weight_scale_inv.copy_(s)
                src.copy_(dequantize(q, s, BLOCK, src.dtype))
        for (_, a), (_, b) in zip(bf16.moe_layers(), fp8.moe_layers(), strict=True):
            for src, dst, sc in ((a.w13, b.w13, b.w13_scale), (a.w2, b.w2, b.w2_scale)):
                for e in range(src.shape[0]):  # per expert: a bounded fp32 transient
                    q, s = quantize(src[e], BLOCK)
                    dst[e].copy_(q)
                    sc[e].copy_(s)
                    src[e].copy_(dequantize(q, s, BLOCK, src.dtype))
        own = fp8.state_dict(keep_vars=True)
        for name, t in bf16.state_dict(keep_vars=True).items():  # everything kept in bf16 / fp32
            if name in own and own[name].dtype != torch.float8_e4m3fn and not name.endswith("_scale_inv"):
                if "kv_b_proj" in name:  # dequantized in FP8 models: the same values in both
                    q, s = quantize(t, BLOCK)
                    t.copy_(dequantize(q, s, BLOCK, t.dtype))
                own[name].copy_(t)


def fill_fp8_random(model, seed: int) -> None:
    """Random FP8 weights written directly (V3 slice: no bf16 copy would fit): N(0, 1) e4m3 values times
    block scales 1/sqrt(fan_in), so the products are the usual 1/sqrt(fan_in)-scaled weights."""
    init_random(model, seed)  # bf16 / fp32 tensors (embeddings, norms, router, kv_b_proj, lm_head)
    g = torch.Generator(device=model.device).manual_seed(seed + 1)
    with torch.no_grad():

        def fill(w: torch.Tensor, s: torch.Tensor) -> None:
            w.copy_(torch.randn(w.shape, generator=g, device=w.device, dtype=torch.bfloat16).to(w.dtype))
            s.fill_(1.0 / math.sqrt(w.shape[-1]))

        for mod in model.modules():
            if isinstance(mod, Fp8Linear):
                fill(mod.weight, mod.weight_scale_inv)
        for _, m in model.moe_layers():
            for e in range(m.w13.shape[0]):
                fill(m.w13[e], m.w13_scale[e])
                fill(m.w2[e], m.w2_scale[e])


# ---- rooflines --------------------------------------------------------------------------------------------


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def expert_bytes(m) -> int:
    """One expert's weights (and scales), as stored."""
    n = nbytes(m.w13[0]) + nbytes(m.w2[0])
    if m.w13_scale is not None:
        n += nbytes(m.w13_scale[0]) + nbytes(m.w2_scale[0])
    return n


def step_bytes(
    model, B: int, ctx: int, layers: list[int] | None = None, head: bool = True, distinct: float | None = None
) -> float:
    """Bytes one decode step must read: the weights of ``layers`` (all by default) as stored, the distinct
    experts a batch of B picks (``distinct`` per MoE layer where measured, else what uniform routing picks on
    average), the KV cache, and (``head``) B embedding rows, final norm and LM head."""
    c = model.config
    idx = range(model.num_layers) if layers is None else layers
    total = 0.0
    for i in idx:
        layer = model.model.layers[i]
        moe = getattr(layer.mlp, "w13", None) is not None
        for name, t in layer.state_dict().items():
            if ".experts." not in name:
                total += nbytes(t)
        if moe:
            E, k = c.n_routed_experts, c.num_experts_per_tok
            n_local = layer.mlp.n_local
            picked = n_local * (1 - (1 - k / E) ** B) if distinct is None else distinct
            total += picked * expert_bytes(layer.mlp)
        total += B * ctx * c.kv_cache_dim * model.dtype.itemsize
    if head:
        total += nbytes(model.lm_head.weight) + nbytes(model.model.norm.weight)
        total += B * c.hidden_size * model.dtype.itemsize
    return total


# ---- measurements -----------------------------------------------------------------------------------------


def make_bench(model, args, batches: list[int], max_len: int):
    bench = mg.OursBench(model, max(batches), max_len, max_len, dev=str(model.device))
    if model.device.type == "cuda" and not args.no_graphs:
        bench.capture(batches)
        log(f"decode graphs captured for batches {batches}")
    return bench


def decode_step_s(bench, B: int, steps: int, graphs: bool) -> float:
    """Seconds per decode step at batch B (prompt PROMPT, ``steps`` greedy steps, host reads every step)."""
    V = bench.model.config.vocab_size
    prompts = torch.randint(0, V, (B, mg.PROMPT), device=bench.dev)
    logits, tables = bench.prefill(prompts)
    tokens = logits.argmax(-1)
    bench.decode(tokens, tables, mg.PROMPT, 2, graphs)  # warm-up
    return mg.sync_time(lambda: bench.decode(tokens, tables, mg.PROMPT, steps, graphs)) / steps


def routed_experts(bench, B: int, graphs: bool) -> float:
    """Distinct experts one decode step of B sequences routes to, averaged over the MoE layers (each layer
    counts its tokens per expert on the device). Random weights route far from uniformly (hidden states
    drift toward a shared direction through the layers), so a roofline priced at uniform routing counts
    experts the step never reads."""
    moes = [m for m in bench.model.modules() if isinstance(m, MoE)]
    prompts = torch.randint(0, bench.model.config.vocab_size, (B, mg.PROMPT), device=bench.dev)
    logits, tables = bench.prefill(prompts)
    for m in moes:
        m.expert_load.zero_()
    bench.decode(logits.argmax(-1), tables, mg.PROMPT, 1, graphs)
    return sum(int((m.expert_load > 0).sum()) for m in moes) / max(1, len(moes))


def agreement(b_fp8, b_bf16, B: int, steps: int, graphs: bool) -> dict:
    """Prefill logits error and greedy agreement, FP8 against the dequantized bf16 model."""
    V = b_fp8.model.config.vocab_size
    g = torch.Generator(device=b_fp8.dev).manual_seed(1)
    prompts = torch.randint(0, V, (B, mg.PROMPT), device=b_fp8.dev, generator=g)
    with torch.inference_mode():
        lf, tf = b_fp8.prefill(prompts)
        lb, tb = b_bf16.prefill(prompts)
        first = lb.argmax(-1)  # both decode from the same first token
        sf = b_fp8.decode(first, tf, mg.PROMPT, steps, graphs)
        sb = b_bf16.decode(first, tb, mg.PROMPT, steps, graphs)
    per_seq = list(zip(*sf, strict=True)), list(zip(*sb, strict=True))
    same = [sum(a == b for a, b in zip(x, y, strict=True)) for x, y in zip(*per_seq, strict=True)]
    diverge = [
        next((i for i, (a, b) in enumerate(zip(x, y, strict=True)) if a != b), steps)
        for x, y in zip(*per_seq, strict=True)
    ]
    return {
        "prefill_logits_rel_err": mg.rel(lf, lb),
        "prefill_argmax_agree": float((lf.argmax(-1) == lb.argmax(-1)).float().mean()),
        "greedy_token_agreement": sum(same) / (B * steps),
        "greedy_first_divergence_step": diverge,
    }


def v2_lite(args, bw: float) -> dict:
    raw = SMOKE_V2 if args.smoke else mg.V2_LITE
    plain, qcfg = configs(raw)
    dev = args.device
    log("building bf16 and FP8 models")
    bf16 = build_model(plain, dtype=torch.bfloat16, device=dev)
    fp8 = build_model(qcfg, dtype=torch.bfloat16, device=dev, fp8=True)
    init_random(bf16, 0)
    quantize_into(bf16, fp8)
    opts = ExecutionOptions(compile=not args.no_compile and dev == "cuda")
    for m in (bf16, fp8):
        m.configure(opts)
    gb = {n: sum(nbytes(t) for t in m.state_dict().values()) / 1e9 for n, m in (("bf16", bf16), ("fp8", fp8))}
    log(f"weights: bf16 {gb['bf16']:.1f} GB, fp8 {gb['fp8']:.1f} GB")
    batches = [2] if args.smoke else [1, 8, 64]
    max_len = mg.PROMPT + args.steps + 16
    graphs = dev == "cuda" and not args.no_graphs
    benches = {n: make_bench(m, args, batches, max_len) for n, m in (("bf16", bf16), ("fp8", fp8))}
    out: dict = {"weights_gb": gb}
    log("prefill and greedy agreement, FP8 against bf16")
    try:
        out["accuracy"] = agreement(benches["fp8"], benches["bf16"], 8 if not args.smoke else 2, args.steps, graphs)
        log("accuracy", out["accuracy"])
    except Exception as exc:
        traceback.print_exc()
        out["accuracy"] = {"error": str(exc)[:300]}
    for B in batches:
        for name, bench in benches.items():
            try:
                s = decode_step_s(bench, B, args.steps, graphs)
                picked = routed_experts(bench, B, graphs)
                ctx = mg.PROMPT + args.steps // 2
                roof = step_bytes(bench.model, B, ctx, distinct=picked) / bw
                out[f"decode_b{B}_{name}"] = {
                    "tok_s": B / s, "step_ms": s * 1e3, "roofline_ms": roof * 1e3, "routed_experts": picked,
                    "roofline_uniform_routing_ms": step_bytes(bench.model, B, ctx) / bw * 1e3,
                }  # fmt: skip
                log(
                    f"decode B={B} {name}: {B / s:.0f} tok/s, {s * 1e3:.2f} ms/step, roofline {roof * 1e3:.2f} ms "
                    f"({picked:.1f} experts routed per layer)"
                )
            except Exception as exc:
                traceback.print_exc()
                out[f"decode_b{B}_{name}"] = {"error": str(exc)[:300]}
    if args.profile and graphs:
        for B in batches:
            for name, bench in benches.items():
                out[f"profile_b{B}_{name}"] = prof = mg.profile_graph(bench, B)
                log(f"decode B={B} {name} kernels:", json.dumps(prof))
    PB, PL = (2, 32) if args.smoke else (8, 512)
    # FP8 three times: as it runs; with the experts' former prefill path (the grouped GEMM over stacks
    # dequantized for the step); with the Triton FP8 GEMM for the linears in place of cuBLAS's
    variants = [
        ("bf16", "bf16", None, True),
        ("fp8", "fp8", None, True),
        ("fp8_dequantized", "fp8", 256, True),
        ("fp8_triton_gemm", "fp8", None, False),
    ]
    for name, model_name, fused_max, scaled_mm in variants:
        bench = benches[model_name]
        saved = execution.FP8_FUSED_MAX_TOKENS, k8.SCALED_MM
        execution.FP8_FUSED_MAX_TOKENS, k8.SCALED_MM = fused_max, scaled_mm
        try:
            s = bench.prefill_s(PB, PL)
            flops = mg.prefill_flops(bench.model.config, PB, PL)
            peak = PEAK_BF16 if name == "bf16" else PEAK_FP8
            weights = sum(nbytes(t) for t in bench.model.state_dict().values())
            roof = max(flops / peak, weights / bw)
            out[f"prefill_{PB}x{PL}_{name}"] = {"ms": s * 1e3, "roofline_ms": roof * 1e3, "tflops": flops / s / 1e12}
            tf = flops / s / 1e12
            log(f"prefill {PB}x{PL} {name}: {s * 1e3:.1f} ms ({tf:.0f} TFLOP/s), roofline {roof * 1e3:.1f} ms")
            if args.profile and dev == "cuda":
                out[f"profile_prefill_{name}"] = prof = mg.profile_prefill(bench, PB, PL)
                log(f"prefill {PB}x{PL} {name} kernels:", json.dumps(prof))
        except Exception as exc:
            traceback.print_exc()
            out[f"prefill_{PB}x{PL}_{name}"] = {"error": str(exc)[:300]}
        finally:
            execution.FP8_FUSED_MAX_TOKENS, k8.SCALED_MM = saved
    del benches, bf16, fp8
    return out


def v3_slice(args, bw: float) -> dict:
    raw = {**V3_SLICE, **SMOKE, "num_hidden_layers": 4, "n_group": 4, "topk_group": 2} if args.smoke else V3_SLICE
    _, qcfg = configs(raw)
    dev = args.device
    log("building the V3 slice (FP8)")
    model = build_model(qcfg, dtype=torch.bfloat16, device=dev, fp8=True)
    fill_fp8_random(model, 3)
    model.configure(ExecutionOptions(compile=not args.no_compile and dev == "cuda"))
    gb = sum(nbytes(t) for t in model.state_dict().values()) / 1e9
    log(f"V3 slice weights: {gb:.1f} GB")
    batches = [2] if args.smoke else [1, 32, 128]
    graphs = dev == "cuda" and not args.no_graphs
    max_len = mg.PROMPT + args.steps + 16
    steps = max(4, args.steps // 4)
    per = {}
    layers = model.model.layers
    times = {}
    for n in (4, 2):
        model.model.layers = layers[:n]
        bench = make_bench(model, args, batches, max_len)
        for B in batches:
            log(f"{n} layers, batch {B}: prefill, then {steps} decode steps")
            try:
                times[(n, B)] = decode_step_s(bench, B, steps, graphs)
                if n == 4:
                    per[f"b{B}_routed_experts"] = routed_experts(bench, B, graphs)
            except Exception as exc:
                traceback.print_exc()
                times[(n, B)] = float("nan")
                per[f"b{B}_error"] = str(exc)[:300]
        del bench
        gc.collect()
        if dev == "cuda":
            torch.cuda.empty_cache()
    model.model.layers = layers
    ctx = mg.PROMPT + steps // 2
    for B in batches:
        layer_s = (times[(4, B)] - times[(2, B)]) / 2
        picked = per.pop(f"b{B}_routed_experts", None)
        roof = step_bytes(model, B, ctx, layers=[0], head=False, distinct=picked) / bw
        per[f"b{B}"] = {
            "routed_experts": picked,
            "step_ms_4_layers": times[(4, B)] * 1e3,
            "layer_ms": layer_s * 1e3,
            "layer_roofline_ms": roof * 1e3,
            "roofline_fraction": roof / layer_s if layer_s > 0 else float("nan"),
        }
        log(f"V3 layer B={B}: {layer_s * 1e3:.3f} ms/layer, roofline {roof * 1e3:.3f} ms ({picked} experts routed)")
    per["projection"] = project_v3(model, per, batches, ctx)
    return per


def project_v3(model, per: dict, batches: list[int], ctx: int) -> dict:
    """V3 decode on 16 H100s, experts spread 16 per GPU (EP 16), attention replicated (every GPU runs
    every token's attention, as runtime.parallel's EP layout does), one all-reduce of the MoE output per
    layer. A layer's time = its bytes on one GPU (replicated weights + the local experts the batch picks +
    the KV cache) at the bandwidth fraction the slice reached at that batch, plus the all-reduce."""
    c = model.config
    layer = model.model.layers[0]
    E, k, gpus, layers = c.n_routed_experts, c.num_experts_per_tok, 16, 61
    replicated = sum(nbytes(t) for n, t in layer.state_dict().items() if ".experts." not in n)
    eb = expert_bytes(layer.mlp)
    link_bw, link_lat = 50e9, 30e-6  # per GPU across 2 nodes (EFA 3.2 Tb/s per 8-GPU node), s per all-reduce
    bw = H100_COPY_BW  # the fraction of the roofline comes from the card that ran; the bandwidth is an H100's
    head = (nbytes(model.lm_head.weight)) / bw
    out = {
        "assumptions": (
            f"{layers} layers all priced as MoE layers (V3 has 3 dense: slightly pessimistic); EP {gpus}: "
            f"{E // gpus} experts per GPU, uniform routing; attention and shared expert replicated; one "
            f"all-reduce of [B, {c.hidden_size}] bf16 per layer at {link_bw / 1e9:.0f} GB/s per GPU + "
            f"{link_lat * 1e6:.0f} us; H100 copy bandwidth {bw / 1e12:.2f} TB/s at the fraction of the roofline the "
            f"slice reached at that batch on this card (its roofline priced at the experts its random weights "
            f"routed to); context {ctx}; "
            "every GPU decodes the whole batch (no data-parallel attention)"
        )
    }
    for B in batches:
        frac = per.get(f"b{B}", {}).get("roofline_fraction", float("nan"))
        if not frac or math.isnan(frac):
            continue
        local = (E // gpus) * (1 - (1 - k / E) ** B)
        by = replicated + local * eb + B * ctx * c.kv_cache_dim * 2
        t_layer = by / (bw * min(frac, 1.0))
        t_ar = link_lat + 2 * B * c.hidden_size * 2 * (gpus - 1) / gpus / link_bw
        step = layers * (t_layer + t_ar) + head
        out[f"b{B}"] = {"layer_ms": t_layer * 1e3, "allreduce_ms": t_ar * 1e3, "step_ms": step * 1e3, "tok_s": B / step}
        log(f"V3 x16 H100 projection B={B}: {step * 1e3:.1f} ms/step, {B / step:.0f} tok/s")
    return out


SMOKE_V2 = {**mg.V2_LITE, **SMOKE}


def scaled_mm_blockwise(q: torch.Tensor, qs: torch.Tensor, w: torch.Tensor, ws: torch.Tensor, out_dtype):
    """torch's own blockwise-scaled FP8 GEMM (``F.scaled_mm``, 1×128 activations × 128×128 weights; cuBLAS on
    sm90, CUDA ≥ 12.9), the alternative to the Triton ``fp8_gemm``: 1×128 scales outer-dim-major."""
    import torch.nn.functional as F

    st = F.ScalingType
    return F.scaled_mm(
        q, w.t(), qs.t().contiguous().t(), st.BlockWise1x128 if hasattr(st, "BlockWise1x128") else st.Blockwise_1x128,
        ws.t(), st.BlockWise128x128 if hasattr(st, "BlockWise128x128") else st.Blockwise_128x128,
        output_dtype=out_dtype,
    )  # fmt: skip


def gemm_micro(args, bw: float) -> dict:
    """The linears alone, FP8 kernels against bf16 on the dequantized weight: prefill-sized products (Triton
    FP8 GEMM with its activation quantization, torch's blockwise scaled_mm if this torch has it) and decode
    sizes (weight-only kernel), each against its roofline."""

    dev = args.device
    shapes = {"v2lite_mlp_up": (10944, 2048), "v3_o_proj": (7168, 16384), "v3_q_b": (24576, 1536)}
    if args.smoke:
        shapes = {"smoke": (384, 256)}
    out: dict = {}
    for name, (n, k) in shapes.items():
        w, ws = quantize(torch.randn(n, k, device=dev) / math.sqrt(k), BLOCK)
        wd = dequantize(w, ws, BLOCK, torch.bfloat16)
        for m in [4] if args.smoke else [1, 8, 64, 4096]:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            r: dict = {}

            def t(fn):
                fn()
                return min(mg.sync_time(fn) for _ in range(10))

            ref = x.float() @ wd.float().T
            r["bf16_ms"] = t(lambda: x @ wd.T) * 1e3  # noqa: B023
            r["roofline_fp8_ms"] = max(2 * m * n * k / PEAK_FP8, (n * k + 2 * m * (n + k)) / bw) * 1e3
            r["roofline_bf16_ms"] = max(2 * m * n * k / PEAK_BF16, (2 * n * k + 2 * m * (n + k)) / bw) * 1e3
            for kname, fn in (("w8_linear", k8.w8_linear), ("fp8_gemm", k8.fp8_gemm)):
                try:
                    r[f"{kname}_ms"] = t(lambda fn=fn: fn(x, w, ws)) * 1e3  # noqa: B023
                    r[f"{kname}_rel_err"] = mg.rel(fn(x, w, ws), ref)
                except Exception as exc:
                    r[f"{kname}_error"] = f"{type(exc).__name__}: {exc}"[:200]
            if m >= 64:
                try:
                    q, qs = k8.act_quant(x)
                    r["scaled_mm_ms"] = t(lambda: scaled_mm_blockwise(q, qs, w, ws, torch.bfloat16)) * 1e3  # noqa: B023
                    r["scaled_mm_rel_err"] = mg.rel(scaled_mm_blockwise(q, qs, w, ws, torch.bfloat16), ref)
                    r["act_quant_ms"] = t(lambda: k8.act_quant(x)) * 1e3  # noqa: B023
                except Exception as exc:
                    r["scaled_mm_error"] = f"{type(exc).__name__}: {exc}"[:200]
            out[f"{name}_m{m}"] = r
            log(name, m, {k_: (round(v, 4) if isinstance(v, float) else v) for k_, v in r.items()})
    return out


def sweep(args, bw: float) -> dict:
    """Launch configurations of the weight-only GEMV at decode sizes against bf16 on the same product, then
    :func:`moe_sweep`: picks the defaults in runtime/kernels/fp8.py and runtime/kernels/moe_fp8.py."""

    dev = args.device
    out: dict = {}
    shapes = {"v2lite_mlp_up": (10944, 2048), "v3_o_proj": (7168, 16384), "v3_q_b": (24576, 1536)}
    configs = [(bn, bk, w, 3) for bn in (4, 8, 16) for bk in (512, 1024) for w in (1, 2, 4)]
    # the tensor-core kernel at 8 tokens: a 16-row tile in place of the GEMV's loop over tokens
    skinny = [(16, bn, bk, w, 3) for bn in (16, 32, 64) for bk in (128, 256) for w in (2, 4)]
    if args.smoke:
        shapes, configs, skinny = {"smoke": (384, 256)}, configs[:2], skinny[:2]
    for name, (n, k) in shapes.items():
        # copies of the weight, cycled through, so that its bytes come from HBM as a model's layers' do
        n_copies = -(-L2_FLUSH // (n * k)) if dev == "cuda" else 1
        copies = [quantize(torch.randn(n, k, device=dev) / math.sqrt(k), BLOCK) for _ in range(n_copies)]
        deq = [dequantize(w, ws, BLOCK, torch.bfloat16) for w, ws in copies]
        for m in (1, 8):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            bf16 = graph_time(lambda i: x @ deq[i].T, len(copies), dev)  # noqa: B023
            r = {"bf16_ms": bf16 * 1e3, "roofline_fp8_ms": (n * k + 2 * m * (n + k)) / bw * 1e3}
            for cfg in configs + (skinny if m > 1 else []):
                try:
                    call = lambda i, cfg=cfg: k8.w8_linear_triton(x, *copies[i], cfg)  # noqa: B023, E731
                    r[str(cfg)] = graph_time(call, len(copies), dev) * 1e3
                except Exception as exc:
                    r[str(cfg)] = f"{type(exc).__name__}: {exc}"[:100]
            timed = {c: v for c, v in r.items() if c.startswith("(") and isinstance(v, float)}
            best = min(timed, key=timed.get) if timed else None
            out[f"gemv_{name}_m{m}"] = {**r, "best": best}
            dflt = timed.get(str(k8.GEMV_CONFIG))
            log(
                f"gemv {name} m={m}: bf16 {r['bf16_ms']:.4f} ms, roofline {r['roofline_fp8_ms']:.4f}, "
                f"best {best} {timed.get(best, float('nan')):.4f} ms, default {dflt}"
            )
    return out | moe_sweep(args, bw)


def moe_sweep(args, bw: float) -> dict:
    """The routed experts of V2-Lite (64 experts of 1408, top-6) at decode batches and one prefill step: the
    FP8 kernels' launch configurations against bf16's kernel for the same step size."""
    from runtime.kernels import moe_fp8 as mf
    from runtime.kernels.moe_decode import moe_decode

    dev = args.device
    out: dict = {}
    H, inter, E, topk = (256, 128, 8, 2) if args.smoke else (2048, 1408, 64, 6)
    w13, s13 = quantize(torch.randn(E, 2 * inter, H, device=dev) / math.sqrt(H), BLOCK)
    w2, s2 = quantize(torch.randn(E, H, inter, device=dev) / math.sqrt(inter), BLOCK)
    d13, d2 = dequantize(w13, s13, BLOCK, torch.bfloat16), dequantize(w2, s2, BLOCK, torch.bfloat16)
    saved = mf.MOE_BLOCK_N, mf.MOE_BLOCK_K, mf.MOE_NUM_WARPS
    moe_configs = [(bn, bk, w) for bn in (4, 8, 16) for bk in (256, 512) for w in (1, 2, 4)]
    tile_configs = [(16, 64, 256, 4, 3), (16, 128, 128, 4, 3), (32, 64, 256, 4, 3), (64, 128, 128, 4, 3)]
    act_configs = [(16, 128, 4, 3), (32, 128, 4, 3), (64, 128, 4, 3), (64, 128, 8, 3), (128, 128, 8, 3)]
    sizes = (1, 8, 64, 256, 4096)  # decode batches, then a prefill step (8 × 512 tokens)
    if args.smoke:
        moe_configs, tile_configs, act_configs, sizes = moe_configs[:2], tile_configs[:1], act_configs[:1], (1, 64)
    for T in sizes:
        x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
        # routings cycled through, so that at one token the chosen experts' rows are not in L2 from the last call
        routes = [torch.stack([torch.randperm(E, device=dev)[:topk] for _ in range(T)]) for _ in range(ROUTINGS)]
        wts = torch.rand(T, topk, device=dev)
        fp8 = (w13, s13, w2, s2, 0, E)
        distinct = sum(ids.unique().numel() for ids in routes) / ROUTINGS
        r = {"roofline_fp8_ms": max(distinct * 3 * H * inter / bw, 6 * T * topk * H * inter / PEAK_FP8) * 1e3}

        def timed(call, reps: int = ROUTINGS if T > mf.MOE_BY_EXPERT_MAX_TOKENS else 2 * ROUTINGS) -> float:
            return graph_time(call, ROUTINGS, dev, reps) * 1e3

        if T <= mf.MOE_BY_EXPERT_MAX_TOKENS:  # bf16's decode kernel, and the FP8 CUDA-core kernels' configs
            r["bf16_ms"] = timed(lambda i: moe_decode(x, routes[i], wts, d13, d2, None, None, None, 0, E))  # noqa: B023
            kernel = "pairs" if T <= mf.MOE_BY_PAIR_MAX_TOKENS else "experts"
            for cfg in moe_configs:
                mf.MOE_BLOCK_N, mf.MOE_BLOCK_K, mf.MOE_NUM_WARPS = cfg
                try:
                    r[str(cfg)] = timed(lambda i: mf.moe_fp8_triton(x, routes[i], wts, *fp8, kernel=kernel))  # noqa: B023
                except Exception as exc:
                    r[str(cfg)] = f"{type(exc).__name__}: {exc}"[:100]
            mf.MOE_BLOCK_N, mf.MOE_BLOCK_K, mf.MOE_NUM_WARPS = saved
        else:  # bf16's prefill path, and FP8's before the tile kernels: the grouped GEMM (Hopper)
            r["bf16_ms"] = timed(lambda i: grouped_experts(x, routes[i], wts, d13, d2))  # noqa: B023
            stacks = lambda: (dequantize(w13, s13, BLOCK, x.dtype), dequantize(w2, s2, BLOCK, x.dtype))  # noqa: B023, E731
            r["dequantized_grouped_ms"] = timed(lambda i: grouped_experts(x, routes[i], wts, *stacks()))  # noqa: B023
        if T > mf.MOE_BY_PAIR_MAX_TOKENS:  # the tensor-core kernels over tiles of one expert's pairs
            kernels = (("tiles", mf._moe_fp8_tiles, tile_configs), ("fp8_tiles", mf._moe_fp8_act_tiles, act_configs))
            for name, fn, cfgs in kernels:
                for cfg in cfgs:
                    try:
                        r[f"{name} {cfg}"] = timed(lambda i, fn=fn, cfg=cfg: fn(x, routes[i], wts, *fp8, config=cfg))  # noqa: B023
                    except Exception as exc:
                        r[f"{name} {cfg}"] = f"{type(exc).__name__}: {exc}"[:100]
        bests = {}
        for kind in ("(", "tiles ", "fp8_tiles "):
            timed = {c: v for c, v in r.items() if c.startswith(kind) and isinstance(v, float)}
            bests[kind.strip(" (") or "cuda_cores"] = min(timed, key=timed.get) if timed else None
        out[f"moe_T{T}"] = {
            **r, "best": bests["cuda_cores"], "best_tiles": bests["tiles"], "best_fp8_tiles": bests["fp8_tiles"]
        }  # fmt: skip
        log(f"moe T={T}: bf16 {r['bf16_ms']:.4f} ms, roofline {r['roofline_fp8_ms']:.4f}, " + ", ".join(
            f"{kind} {c} {r[c]:.4f} ms" for kind, c in bests.items() if c
        ))  # fmt: skip
    return out


L2_FLUSH = 256 * 2**20  # bytes of weight copies a timed product cycles through (an H100's L2: 50 MB)
ROUTINGS = 8  # routings a timed MoE call cycles through


def graph_time(call, variants: int, dev: str, reps: int = 16) -> float:
    """Seconds per ``call(i)`` as a CUDA graph replays ``reps`` calls, ``i`` cycling over ``variants``: the
    kernels' own time, as the engine's decode graphs run them (a synchronized call from the host adds
    launch and dispatch overhead, tens of µs, more than a decode kernel takes). On the CPU: one
    synchronized call, the best of three."""
    if dev != "cuda":
        call(0)
        return min(mg.sync_time(lambda: call(0)) for _ in range(3))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile, autotune and allocate outside the capture
        for i in range(variants):
            call(i)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            call(i % variants)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / reps)
    del graph
    torch.cuda.empty_cache()
    return best


def grouped_experts(x, ids, wts, w13, w2) -> torch.Tensor:
    """The routed experts as runtime.moe.MoE.routed's grouped path runs them (sort, grouped GEMMs, un-sort)."""
    T, k = ids.shape
    sorted_ids, order = ids.reshape(-1).sort(stable=True)
    offs = torch.searchsorted(sorted_ids, torch.arange(w13.shape[0], device=x.device), right=True, out_int32=True)
    g, u = torch._grouped_mm(x.index_select(0, order // k), w13.transpose(-2, -1), offs=offs).chunk(2, dim=-1)
    out = torch._grouped_mm(torch.nn.functional.silu(g) * u, w2.transpose(-2, -1), offs=offs)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=x.device))
    return (out.index_select(0, inverse).view(T, k, -1).float() * wts[..., None]).sum(dim=1)


def apply_tuning(found: dict) -> dict:
    """Set the kernels' launch configurations to a sweep's best (``--tune``, ``--tune-from``): the GEMV config
    with the least total time over the sweep's batch-1 products (each relative to its best); at 8 tokens the
    tensor-core kernel's best config where its total beats that GEMV's; the MoE decode config best over one
    and eight tokens; each tile kernel's
    best launch at 64 tokens and at a prefill step; and above 16 tokens the kernel fastest at 64 (or the
    FP8-activation tiles from 65 where they won at 256). Returns what was set (recorded in the results)."""
    import ast

    from runtime.kernels import moe_fp8 as mf

    def totals(keys: list[str]) -> dict[str, float]:
        """Each config's time over the results ``keys``, each relative to that result's best (so that one large
        product does not outweigh the others), summed over the results where it ran."""
        out: dict[str, float] = {}
        for key in keys:
            r = found.get(key, {})
            times = {c: v for c, v in r.items() if c.startswith("(") and isinstance(v, float)}
            for cfg, v in times.items():
                out[cfg] = out.get(cfg, 0.0) + v / min(times.values())
        return out

    applied = {}
    one = totals([k for k in found if k.startswith("gemv_") and k.endswith("_m1")])
    eight = totals([k for k in found if k.startswith("gemv_") and k.endswith("_m8")])
    if one:
        gemv = min(one, key=one.get)
        k8.GEMV_CONFIG = applied["GEMV_CONFIG"] = ast.literal_eval(gemv)
        dots = {c: v for c, v in eight.items() if len(ast.literal_eval(c)) == 5}
        if dots and gemv in eight and min(dots.values()) < eight[gemv]:
            k8.W8_SKINNY_CONFIG = applied["W8_SKINNY_CONFIG"] = ast.literal_eval(min(dots, key=dots.get))
    per_pair = totals(["moe_T1", "moe_T8"])  # the per-pair kernel's decode sizes
    best_moe = min(per_pair, key=per_pair.get) if per_pair else None
    if best_moe:
        mf.MOE_BLOCK_N, mf.MOE_BLOCK_K, mf.MOE_NUM_WARPS = ast.literal_eval(best_moe)
        applied["MOE_BLOCK_N, MOE_BLOCK_K, MOE_NUM_WARPS"] = (mf.MOE_BLOCK_N, mf.MOE_BLOCK_K, mf.MOE_NUM_WARPS)

    def best(T: int, key: str) -> tuple[float, tuple | None]:
        r = found.get(f"moe_T{T}", {})
        cfg = r.get(key)
        v = r.get(cfg or "", None)
        return (v, ast.literal_eval(cfg.split(" ", 1)[1])) if isinstance(v, float) else (float("inf"), None)

    # the tile kernels' launches: the small tile's from 64 tokens, the large one's from a prefill step
    for name, key, T in (
        ("MOE_TILES_SMALL", "best_tiles", 64),
        ("MOE_TILES_LARGE", "best_tiles", 4096),
        ("MOE_FP8_TILES_SMALL", "best_fp8_tiles", 64),
        ("MOE_FP8_TILES_LARGE", "best_fp8_tiles", 4096),
    ):
        cfg = best(T, key)[1]
        if cfg:
            setattr(mf, name, cfg)
            applied[name] = cfg
    # above the per-pair kernel's range: whichever kernel was fastest at 64 tokens (the FP8-activation tiles
    # from 17 tokens, or from 65 where they only won at 256)
    for T, start in ((64, mf.MOE_BY_PAIR_MAX_TOKENS + 1), (256, 65)):
        experts = found.get(f"moe_T{T}", {}).get(found.get(f"moe_T{T}", {}).get("best") or "")
        experts = experts if isinstance(experts, float) else float("inf")
        tiles, fp8_tiles = best(T, "best_tiles")[0], best(T, "best_fp8_tiles")[0]
        if fp8_tiles < min(tiles, experts):
            mf.MOE_FP8_ACT_MIN_TOKENS = applied["MOE_FP8_ACT_MIN_TOKENS"] = start
            break
        if T == 64 and tiles < experts:
            mf.MOE_TILES_MIN_TOKENS = applied["MOE_TILES_MIN_TOKENS"] = start
    log("tuned launch configurations:", applied)
    return applied


def kernels_check(args) -> dict:
    """The FP8 kernels against their references on this device (tests/runtime/fp8_kernel_checks.py)."""
    from tests.runtime.fp8_kernel_checks import main as checks

    checks(args.device)
    return {"ok": True}


def print_tables(bw: float) -> None:
    print("\n## FP8 vs bf16, DeepSeek-V2-Lite shape" + (f" (copy bandwidth {bw / 1e12:.2f} TB/s)" if bw else ""))
    v2 = RESULTS.get("v2_lite") or {}
    print("| measure | bf16 (dequantized weights) | FP8 | FP8 / bf16 |")
    print("|---|---|---|---|")
    for key in sorted(k for k in v2 if k.startswith("decode_b")):
        if not key.endswith("_bf16"):
            continue
        b, f = v2[key], v2.get(key.replace("_bf16", "_fp8"), {})
        if "tok_s" in b and "tok_s" in f:
            print(
                f"| {key[7:-5]} decode tok/s (roofline ms) | {b['tok_s']:.0f} ({b['roofline_ms']:.2f}: "
                f"{b['roofline_ms'] / b['step_ms']:.0%}) | {f['tok_s']:.0f} ({f['roofline_ms']:.2f}: "
                f"{f['roofline_ms'] / f['step_ms']:.0%}) | {f['tok_s'] / b['tok_s']:.2f}x |"
            )
    for key in (k for k in v2 if k.startswith("prefill_") and k.endswith("_bf16")):
        for variant, label in (
            ("_fp8", ""),
            ("_fp8_dequantized", ", FP8 experts dequantized to bf16"),
            ("_fp8_triton_gemm", ", Triton FP8 GEMM for the linears"),
        ):
            b, f = v2[key], v2.get(key.replace("_bf16", variant), {})
            if "ms" in b and "ms" in f:
                print(
                    f"| {key[8:-5]} prefill ms (roofline){label} | {b['ms']:.1f} ({b['roofline_ms']:.1f}) | "
                    f"{f['ms']:.1f} ({f['roofline_ms']:.1f}) | {b['ms'] / f['ms']:.2f}x |"
                )
    print("accuracy:", json.dumps(v2.get("accuracy"), default=str))
    v3 = RESULTS.get("v3_slice") or {}
    print("\n## DeepSeek-V3 slice, FP8, one MoE layer per decode step")
    print("| batch | ms / layer | roofline ms | fraction |")
    print("|---|---|---|---|")
    for k, r in v3.items():
        if k.startswith("b") and isinstance(r, dict) and "layer_ms" in r:
            print(f"| {k[1:]} | {r['layer_ms']:.3f} | {r['layer_roofline_ms']:.3f} | {r['roofline_fraction']:.0%} |")
    proj = v3.get("projection") or {}
    if proj:
        print("\nprojection, V3 decode on 16 H100s:", proj.get("assumptions"))
        for k, r in proj.items():
            if k.startswith("b"):
                print(f"  batch {k[1:]}: {r['step_ms']:.1f} ms/step, {r['tok_s']:.0f} tok/s")
    gm = RESULTS.get("gemm") or {}
    if gm:
        print("\n## Linears alone (ms; FP8 roofline = FP8 weight bytes or FP8 FLOPs)")
        print("| shape, tokens | bf16 | w8_linear | fp8_gemm | scaled_mm (+ act_quant) | roofline fp8 / bf16 |")
        print("|---|---|---|---|---|---|")
        for k, r in gm.items():
            if not isinstance(r, dict) or "bf16_ms" not in r:
                continue

            def f(key, r=r):
                return f"{r[key]:.3f}" if key in r else "-"

            sm = f("scaled_mm_ms") + (f" (+{r['act_quant_ms']:.3f})" if "act_quant_ms" in r else "")
            print(
                f"| {k} | {f('bf16_ms')} | {f('w8_linear_ms')} | {f('fp8_gemm_ms')} | {sm} | "
                f"{f('roofline_fp8_ms')} / {f('roofline_bf16_ms')} |"
            )
    errors = {k: v["error"] for k, v in RESULTS.items() if isinstance(v, dict) and "error" in v}
    if errors:
        print("\nsections that failed:", json.dumps(errors, indent=1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, few steps (also on the CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=64, help="decode steps per measurement / agreement run")
    ap.add_argument("--no-compile", action="store_true", help="eager layers (no torch.compile'd regions)")
    ap.add_argument("--no-graphs", action="store_true", help="decode without CUDA graphs")
    ap.add_argument(
        "--skip", nargs="*", default=[], choices=["kernels", "sweep", "gemm", "v2", "v3"], help="sections to leave out"
    )
    ap.add_argument("--tune", action="store_true", help="the model sections use the sweep's best launch configs")
    ap.add_argument("--tune-from", type=Path, help="the same, from an earlier run's --json (its sweep section)")
    ap.add_argument("--json", type=Path, help="write raw results here")
    ap.add_argument(
        "--profile", action="store_true", help="V2-Lite: each model's kernels per decode step and prefill (profiler)"
    )
    ap.add_argument(
        "--stacks-every", type=float, default=0, help="print every thread's stack every N seconds (finds a stall)"
    )
    args = ap.parse_args()
    if args.stacks_every > 0:  # a run killed at its time limit may cut its last dump short: earlier ones remain
        faulthandler.dump_traceback_later(args.stacks_every, repeat=True)
    mg.DEV = args.device
    # two models (bf16 and FP8: other module types) through the same compiled regions, three batch sizes
    torch._dynamo.config.recompile_limit = 64
    if args.smoke:
        args.steps = min(args.steps, 3)
        mg.PROMPT = 16
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    log(f"device {args.device}: {name}, torch {torch.__version__}")
    bw = mg.copy_bandwidth() if args.device == "cuda" else 50e9
    RESULTS["copy_bandwidth_tb_s"] = bw / 1e12
    if "kernels" not in args.skip:
        section("kernels", kernels_check, args)
    if "sweep" not in args.skip:
        section("sweep", sweep, args, bw)
    if args.tune_from:
        try:
            RESULTS["tuned"] = apply_tuning(json.loads(args.tune_from.read_text()).get("sweep", {}))
        except (OSError, ValueError) as exc:  # the sweep's run died: the defaults stand, and the log says so
            log(f"no tuning from {args.tune_from}: {exc}")
    elif args.tune and isinstance(RESULTS.get("sweep"), dict):
        RESULTS["tuned"] = apply_tuning(RESULTS["sweep"])
    if "gemm" not in args.skip:
        section("gemm", gemm_micro, args, bw)
    if "v2" not in args.skip:
        section("v2_lite", v2_lite, args, bw)
    if "v3" not in args.skip:
        section("v3_slice", v3_slice, args, bw)
    print_tables(bw)
    if args.json:
        args.json.write_text(json.dumps(RESULTS, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
