"""How the model runs a step: which kernels serve it, and which parts run as torch.compile'd regions.

:mod:`runtime.model` says what a forward computes; this module decides how, from one
:class:`ExecutionOptions` applied with ``model.configure(options)``:

* kernel selection, resolved once per step into a :class:`StepPlan` (:func:`plan_step`): decode attention
  through the paged kernel, over a gathered copy of the cache, or in the expanded form; the MoE dispatch
  (the fused decode kernel, grouped GEMM, a per-expert loop, gathered expert weights);
* compiled regions (:func:`run_layer_compiled`): a layer as a few ``torch.compile``'d functions, so norms,
  rope, routing and the MoE epilogue fuse into a few kernels. A decode layer is one region; a prefill layer
  is two regions around the cache write and the attention core, which need the metadata's host-side lists.

The CUDA-graph capture of the decode step is :mod:`runtime.cuda_graph`. This module imports nothing from the
model: the compiled regions call the layers' own methods on whatever modules they are given.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn

from runtime.kernels import triton_usable
from runtime.kv_cache import AttentionMetadata, write_cache

# Up to this many tokens a step's MoE runs as the two-launch kernel of runtime.kernels.moe_decode: below
# it, reading each chosen expert once per pair beats sorting the pairs for a grouped GEMM
# (benchmarks/model_gpu.py measures the crossover).
FUSED_MAX_TOKENS = 16


class _Choice(Enum):
    """An option with named values; parsing a string names the allowed ones on error (CLI flags)."""

    @classmethod
    def parse(cls, value: str | _Choice) -> _Choice:
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            allowed = ", ".join(m.value for m in cls)
            raise ValueError(f"{cls._what()} {value!r}; allowed: {allowed}") from None

    @classmethod
    def _what(cls) -> str:
        return cls.__name__


class MoEImpl(_Choice):
    """How routed experts run. ``AUTO`` picks per step (:func:`moe_dispatch`); the others force one path
    (tests, benchmarks). A step's resolved dispatch is never ``AUTO``."""

    AUTO = "auto"
    FUSED = "fused"  # runtime.kernels.moe_decode: Triton on CUDA, its reference elsewhere
    GROUPED = "grouped"  # sorted dispatch + torch._grouped_mm
    LOOP = "loop"  # sorted dispatch + one GEMM per active expert (host sync: eager only)
    GATHER = "gather"  # each (token, expert) pair against its gathered weights (static shapes)

    @classmethod
    def _what(cls) -> str:
        return "moe impl"


class AttentionDecode(_Choice):
    """Absorbed decode attention: the paged kernel (reads the cache through the block table), a gathered copy
    of the cache and a mask, or ``AUTO`` (paged where its Triton kernel runs: CUDA, 16-bit)."""

    AUTO = "auto"
    PAGED = "paged"
    GATHER = "gather"

    @classmethod
    def _what(cls) -> str:
        return "attention decode"


@dataclass(frozen=True)
class ExecutionOptions:
    """Everything about how the model runs that is not what it computes. Applied once with
    ``model.configure(options)``; every field's default is what serving uses."""

    moe_impl: MoEImpl = MoEImpl.AUTO
    attention_decode: AttentionDecode = AttentionDecode.AUTO
    # decode attention in the absorbed form (False: through kv_b_proj, to check one form against the other)
    absorb: bool = True
    # torch.compile'd layer regions (inductor, default mode). Meant for CUDA, before CUDA-graph capture (the
    # warm-up calls compile), and for prefill; the first call per shape class (1 token / more) compiles. On CPU
    # it needs a C++ compiler (the tests use it). A compiler failure falls back to eager for good.
    compile: bool = False
    # with the fused MoE kernel, a greedy router's choice is one kernel too (False: the Gate module)
    kernel_routing: bool = True
    # a compiled decode layer is one region (False: the prefill's regions; benchmarks' ablation)
    decode_region: bool = True

    def __post_init__(self) -> None:
        for name, kind in (("moe_impl", MoEImpl), ("attention_decode", AttentionDecode)):
            if not isinstance(getattr(self, name), kind):
                raise TypeError(f"{name} must be a {kind.__name__} (parse strings with {kind.__name__}.parse)")


class AttentionPath(Enum):
    """The attention core a step runs."""

    PREFILL = "prefill"  # packed prompts: SDPA over keys / values expanded from the latent
    PAGED = "paged"  # absorbed decode, the kernel reading the paged cache
    GATHERED = "gathered"  # absorbed decode over a gathered copy of the cache and an additive mask
    EXPANDED = "expanded"  # decode through kv_b_proj (``absorb=False``)
    MIXED = "mixed"  # a mixed step: decode rows through the paged kernel, prompt chunks as PREFILL
    MIXED_GATHERED = "mixed_gathered"  # the same, decode rows over a gathered cache (no Triton)

    @property
    def needs_bias(self) -> bool:
        """The gathered decode paths mask padded cache slots with an additive bias."""
        return self in (AttentionPath.GATHERED, AttentionPath.EXPANDED)


@dataclass(frozen=True)
class StepPlan:
    """The options resolved for one step's shape, device and dtype; the same for every layer."""

    attention: AttentionPath
    moe: MoEImpl  # never AUTO
    compiled: bool
    kernel_routing: bool
    decode_region: bool


def plan_step(
    options: ExecutionOptions, x: torch.Tensor, meta: AttentionMetadata, fp8_experts: bool = False
) -> StepPlan:
    """The kernels for a step whose hidden states are ``x`` [T, H] (decided outside compiled code);
    ``fp8_experts``: the model's expert stacks are FP8 (:func:`moe_dispatch_fp8`)."""
    if meta.num_decode:
        paged = paged_attention(options.attention_decode, x)
        attention = AttentionPath.MIXED if paged else AttentionPath.MIXED_GATHERED
    elif not meta.is_decode:
        attention = AttentionPath.PREFILL
    elif not options.absorb:
        attention = AttentionPath.EXPANDED
    elif paged_attention(options.attention_decode, x):
        attention = AttentionPath.PAGED
    else:
        attention = AttentionPath.GATHERED
    moe = moe_dispatch(options.moe_impl, x, compiled=options.compile)
    if fp8_experts:
        moe = moe_dispatch_fp8(moe, x, decode=meta.is_decode)
    return StepPlan(
        attention=attention,
        moe=moe,
        compiled=options.compile,
        kernel_routing=options.kernel_routing,
        decode_region=options.decode_region,
    )


def paged_attention(choice: AttentionDecode, x: torch.Tensor) -> bool:
    if choice is AttentionDecode.AUTO:
        return triton_usable(x) and x.dtype in (torch.bfloat16, torch.float16)
    return choice is AttentionDecode.PAGED


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """``torch._grouped_mm``'s fast CUDA kernel needs bf16 on Hopper (sm90) or newer."""
    return (
        hasattr(torch, "_grouped_mm")
        and device.type == "cuda"
        and dtype == torch.bfloat16
        and torch.cuda.get_device_capability(device) >= (9, 0)
    )


def moe_dispatch(impl: MoEImpl, x: torch.Tensor, compiled: bool = False) -> MoEImpl:
    """The routed experts' path for ``x`` [T, H]. ``AUTO``: the fused decode kernel for few tokens where Triton
    runs, the grouped GEMM where supported, else the loop (eager: it syncs with the host) or the gather path
    (compiled code, where the grouped GEMM is unsupported; it reads k·T expert copies, so only for small T).
    A forced ``LOOP`` becomes one of the others under compile."""
    if impl is MoEImpl.FUSED:
        return MoEImpl.FUSED
    if impl is MoEImpl.AUTO and x.shape[0] <= FUSED_MAX_TOKENS and triton_usable(x):
        return MoEImpl.FUSED
    if impl is MoEImpl.GROUPED:
        return MoEImpl.GROUPED
    if impl is MoEImpl.LOOP and not compiled:
        return MoEImpl.LOOP
    if impl is MoEImpl.GATHER:
        return MoEImpl.GATHER
    if grouped_mm_supported(x.device, x.dtype):
        return MoEImpl.GROUPED
    return MoEImpl.GATHER if compiled else MoEImpl.LOOP


class Fp8Path(Enum):
    """How an FP8 linear (runtime.quant.fp8.Fp8Linear) runs for a step."""

    FP8_GEMM = "fp8_gemm"  # FP8 tensor cores, activations quantized per 1×128 group (sm89 / sm90 prefill)
    WEIGHT_ONLY = "weight_only"  # FP8 weight dequantized in the kernel, bf16 math (decode; Ampere)
    DEQUANT = "dequant"  # the reference: dequantize, then F.linear (no Triton)


# From this many tokens an FP8-capable GPU runs FP8 linears on its FP8 tensor cores: below it the step is
# bound by reading the weights, which the weight-only kernel does at the same byte count without quantizing
# the activations (benchmarks/fp8_gpu.py measures both).
FP8_GEMM_MIN_TOKENS = 64


def fp8_gemm_supported(device: torch.device) -> bool:
    """FP8 tensor cores: Ada (sm89) and Hopper (sm90) or newer."""
    return device.type == "cuda" and _fp8_tensor_cores(
        torch.cuda.current_device() if device.index is None else device.index
    )


@torch.compiler.assume_constant_result
def _fp8_tensor_cores(index: int) -> bool:
    # a constant to torch.compile: FP8 linears are called inside compiled regions, and the device never changes
    return torch.cuda.get_device_capability(index) >= (8, 9)


def fp8_linear_path(x: torch.Tensor) -> Fp8Path:
    """The FP8 linear kernel for activations ``x`` [T, K]: by hardware (sm90 → FP8 GEMM for prefill-sized
    steps, weight-only below; sm80 → weight-only; no Triton → dequantize)."""
    if not triton_usable(x):
        return Fp8Path.DEQUANT
    if x.shape[0] >= FP8_GEMM_MIN_TOKENS and fp8_gemm_supported(x.device):
        return Fp8Path.FP8_GEMM
    return Fp8Path.WEIGHT_ONLY


# FP8 experts run :func:`runtime.kernels.moe_fp8.moe_fp8` at every step size: it reads the FP8 stacks as they
# are, needs no host sync (a decode batch of any size is captured in a CUDA graph) and, for long prefill steps,
# runs tiles of each expert's pairs on tensor cores. None keeps it so; a number sends longer prefill steps to
# the grouped GEMM over the stacks dequantized to bf16 for the step (where it runs: Hopper; elsewhere one FP8
# GEMM pair per active expert, eagerly): the path before the tile kernels, which benchmarks/fp8_gpu.py times
# beside them.
FP8_FUSED_MAX_TOKENS: int | None = None


def moe_dispatch_fp8(dispatch: MoEImpl, x: torch.Tensor, decode: bool = False) -> MoEImpl:
    """The routed experts' path for FP8 expert stacks where Triton runs (elsewhere ``dispatch`` stands: the
    references dequantize). ``decode``: a decode step, whatever its batch (its graph must not read the
    routing on the host)."""
    if dispatch is MoEImpl.FUSED or not triton_usable(x):
        return dispatch
    if decode or FP8_FUSED_MAX_TOKENS is None or x.shape[0] <= FP8_FUSED_MAX_TOKENS:
        return MoEImpl.FUSED
    return MoEImpl.GROUPED if grouped_mm_supported(x.device, x.dtype) else MoEImpl.LOOP


# ---- compiled regions --------------------------------------------------------------------------------
# Each region takes its module as an argument, so one compiled graph serves every layer (parameters are graph
# inputs); dynamic=True gives one graph for all token counts > 1 (prefill and every decode batch) plus one
# specialised to 1 token. Rope is passed as real cos / sin: compiled code spells the complex multiply out.


def _layer_in(layer: nn.Module, x, rotary, cos, sin):
    """Input norm, q / kv projections and rope: everything of a layer before its cache write."""
    return layer.attention_input(x, rotary, (cos, sin, None))


def _layer_out(layer: nn.Module, x, attn_out, moe: MoEImpl, kernel_routing: bool):
    """o_proj, residual, post-attention norm, MLP or MoE, residual."""
    return layer.attention_output(x, attn_out, moe, kernel_routing)


def _decode_gathered(attn: nn.Module, q_nope, q_pe, kv, bias):
    return attn.decode_gathered(q_nope, q_pe, kv, bias)


def _decode_paged(attn: nn.Module, q_nope, q_pe, cache, block_tables, context_lens):
    return attn.decode_paged(q_nope, q_pe, cache, block_tables, context_lens)


def _decode_layer(
    layer: nn.Module, x, rotary, cos, sin, cache, slots, tables, ctx, bias, moe: MoEImpl, kernel_routing, paged
):
    """A whole decode layer (absorbed attention) as one graph: norms, rope, casts and residual adds fuse across
    what are region boundaries in prefill, and nothing between them returns to Python."""
    attn = layer.self_attn
    q_nope, q_pe, kv_new = layer.attention_input(x, rotary, (cos, sin, None))
    write_cache(cache, slots, kv_new)
    if paged:
        o = attn.decode_paged(q_nope, q_pe, cache, tables, ctx)
    else:
        o = attn.decode_gathered(q_nope, q_pe, attn.gather(cache, tables), bias)
    return layer.attention_output(x, o.reshape(x.shape[0], -1), moe, kernel_routing)


def _embed(model: nn.Module, input_ids, positions):
    """Token embeddings and the step's rope cos / sin (real form)."""
    x, (cos, sin, _) = model.embed(input_ids, positions, complex_rope=False)
    return x, cos, sin


class CompiledRegions:
    """The regions' ``torch.compile`` wrappers, built on first use. A compiler error never loses a step: the
    call runs eagerly, and so does every region after it (``failures`` keeps the first message)."""

    def __init__(self) -> None:
        self._compiled: dict[Callable, Callable] = {}
        self.failures: list[str] = []

    def __call__(self, fn: Callable, *args):
        if self.failures:
            return fn(*args)
        c = self._compiled.get(fn)
        if c is None:
            c = self._compiled[fn] = torch.compile(fn, dynamic=True)
        try:
            return c(*args)
        except Exception as exc:  # the compiler's, whatever its type
            self.failures.append(f"{type(exc).__name__}: {exc}"[:500])
            warnings.warn(f"torch.compile failed ({self.failures[0]}); running eager", stacklevel=2)
            return fn(*args)

    def clear(self) -> None:
        """Drop the compiled functions (they hold the modules they were traced with)."""
        self._compiled.clear()


REGIONS = CompiledRegions()


def compile_failures() -> list[str]:
    """Why compilation failed, if it did (first message first); empty while compiled regions run."""
    return REGIONS.failures


def mark_static(tensors: Iterable[torch.Tensor]) -> None:
    """Tell dynamo these buffers keep their shapes (parameters already are static), so one graph serves every
    layer instead of one per distinct buffer shape guess."""
    import torch._dynamo

    for t in tensors:
        torch._dynamo.mark_static(t)


def embed_compiled(model: nn.Module, input_ids: torch.Tensor, positions: torch.Tensor):
    """``model.embed`` as a compiled region → (x, (cos, sin, None))."""
    x, cos, sin = REGIONS(_embed, model, input_ids, positions)
    return x, (cos, sin, None)


def run_layer_compiled(
    layer: nn.Module,
    x: torch.Tensor,
    rotary: nn.Module,
    rope: tuple,
    meta: AttentionMetadata,
    cache: torch.Tensor | None,
    bias: torch.Tensor | None,
    plan: StepPlan,
) -> torch.Tensor:
    """One decoder layer through compiled regions (the eager form is the layer's ``forward``)."""
    cos, sin = rope[0], rope[1]
    absorbed = plan.attention in (AttentionPath.PAGED, AttentionPath.GATHERED)
    if plan.decode_region and absorbed and cache is not None:
        paged = plan.attention is AttentionPath.PAGED
        args = (cache, meta.slot_mapping, meta.block_tables, meta.context_lens, bias, plan.moe, plan.kernel_routing)
        return REGIONS(_decode_layer, layer, x, rotary, cos, sin, *args, paged)
    q_nope, q_pe, kv_new = REGIONS(_layer_in, layer, x, rotary, cos, sin)
    o = _attend(layer.self_attn, q_nope, q_pe, kv_new, meta, cache, bias, plan.attention)
    return REGIONS(_layer_out, layer, x, o, plan.moe, plan.kernel_routing)


def _attend(attn: nn.Module, q_nope, q_pe, kv_new, meta: AttentionMetadata, cache, bias, path: AttentionPath):
    """``attn.attend`` with the absorbed decode cores compiled; prefill and the expanded form stay eager."""
    if path not in (AttentionPath.PAGED, AttentionPath.GATHERED):
        return attn.attend(q_nope, q_pe, kv_new, meta, cache, bias, path)
    write_cache(cache, meta.slot_mapping, kv_new)
    if path is AttentionPath.PAGED:
        out = REGIONS(_decode_paged, attn, q_nope, q_pe, cache, meta.block_tables, meta.context_lens)
    else:
        out = REGIONS(_decode_gathered, attn, q_nope, q_pe, attn.gather(cache, meta.block_tables), bias)
    return out.reshape(q_nope.shape[0], -1)
