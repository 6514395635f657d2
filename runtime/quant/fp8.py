"""Block-scaled FP8 weights: DeepSeek-V3/R1's published checkpoint format.

A quantized linear ``X`` is stored as ``X.weight`` (``float8_e4m3fn`` ``[out, in]``) and
``X.weight_scale_inv`` (fp32 ``[ceil(out/128), ceil(in/128)]``): ``W ≈ W_fp8 × scale``, one scale per
128×128 block, the last block row / column partial when a dimension is not a multiple of 128. Which
tensors are quantized is a naming rule (:func:`is_quantized`): every projection of attention and of the
MLPs / experts; the embeddings, the norms, the router gate (and its correction bias) and ``lm_head`` stay
bf16, as in DeepSeek's release.

This module holds the format (names, shapes, quantize / dequantize, the checks the loader runs) and
:class:`Fp8Linear`, the module a GPU model uses to keep the weights in FP8 (its ``state_dict`` names are
exactly the checkpoint's, so loading stays one-to-one).
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from runtime.collectives import all_reduce
from runtime.execution import Fp8Path, fp8_linear_path
from runtime.kernels import fp8 as kernels

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
GROUP = 128  # the block the kernels handle (and the published checkpoints use)
SCALE_SUFFIX = "_scale_inv"  # "X.weight" → "X.weight_scale_inv"
SAFETENSORS_FP8 = "F8_E4M3"  # safetensors' dtype string for float8_e4m3fn
SAFETENSORS_SCALE = "F32"
# the modules whose ``.weight`` is FP8 in the published checkpoints
QUANTIZED_MODULES = (
    "q_proj",
    "q_a_proj",
    "q_b_proj",
    "kv_a_proj_with_mqa",
    "kv_b_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
_QUANTIZED = re.compile(r"^model\.layers\.\d+\..*\.(" + "|".join(QUANTIZED_MODULES) + r")\.weight$")


def is_quantized(name: str) -> bool:
    """Whether checkpoint tensor ``name`` is an FP8 weight in the published format."""
    return _QUANTIZED.match(name) is not None


def scale_name(weight_name: str) -> str:
    return weight_name + SCALE_SUFFIX


def is_scale(name: str) -> bool:
    return name.endswith(".weight" + SCALE_SUFFIX)


def weight_of_scale(name: str) -> str:
    return name[: -len(SCALE_SUFFIX)]


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """The block-scale grid of a ``[out, in]`` weight (partial last blocks count as a block)."""
    return math.ceil(shape[-2] / block[0]), math.ceil(shape[-1] / block[1])


def quantize(w: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """``[out, in]`` (or ``[E, out, in]``) float weight → (e4m3 weight, fp32 ``scale_inv`` per block): each
    block's absmax maps to 448. An all-zero block gets scale 1 (its values are zero whatever the scale)."""
    w32 = w.float()
    *lead, n, k = w32.shape
    bn, bk = block
    gn, gk = math.ceil(n / bn), math.ceil(k / bk)
    padded = F.pad(w32, (0, gk * bk - k, 0, gn * bn - n))
    blocks = padded.reshape(*lead, gn, bn, gk, bk)
    amax = blocks.abs().amax(dim=(-3, -1))  # [*lead, gn, gk]
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (blocks / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    q = q.reshape(*lead, gn * bn, gk * bk)[..., :n, :k].contiguous()
    return q, scale.contiguous()


def expand_scale(scale: torch.Tensor, shape: tuple[int, ...], block: tuple[int, int]) -> torch.Tensor:
    """``[..., gn, gk]`` block scales → one scale per element of a ``[..., n, k]`` weight."""
    n, k = shape[-2], shape[-1]
    s = scale.repeat_interleave(block[0], dim=-2)[..., :n, :]
    return s.repeat_interleave(block[1], dim=-1)[..., :k]


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = (128, 128), dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``W_fp8 × scale`` in fp32 (the fp8 value is exact in fp32, so the one rounding is the product's), then
    cast to ``dtype``. Whole blocks broadcast their scale over a blocked view: no weight-sized copy of the
    scales (an FP8 prefill dequantizes every expert stack each step)."""
    *lead, n, k = q.shape
    (bn, bk), (gn, gk) = block, scale.shape[-2:]
    if n == gn * bn and k == gk * bk:
        blocks = q.float().view(*lead, gn, bn, gk, bk) * scale.float()[..., :, None, :, None]
        return blocks.view(*lead, n, k).to(dtype)
    return (q.float() * expand_scale(scale.float(), tuple(q.shape), block)).to(dtype)


def quantize_state_dict(
    tensors: dict[str, torch.Tensor], block: tuple[int, int] = (128, 128), keep_dtype: torch.dtype = torch.bfloat16
) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors in the published FP8 layout: each :func:`is_quantized` weight becomes e4m3
    plus its ``weight_scale_inv`` (right after it); other floating tensors are cast to ``keep_dtype``
    (bf16), except fp32 router correction biases, kept as they are (DeepSeek ships them fp32)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if is_quantized(name) and t.dim() == 2:
            out[name], out[scale_name(name)] = quantize(t, block)
        elif t.is_floating_point() and not name.endswith("e_score_correction_bias"):
            out[name] = t.to(keep_dtype).contiguous()
        else:
            out[name] = t.contiguous()
    return out


def block_slice(idx: tuple[slice, ...], full: tuple[int, ...], block: tuple[int, int], name: str) -> tuple[slice, ...]:
    """The block-scale rows / columns of a tensor-parallel slice ``idx`` of an FP8 weight of shape ``full``.
    The slice must start on a block boundary and end on one (or at the end of the tensor): a shard that
    cuts a block in two would need the neighbour's scale. ValueError naming the tensor otherwise."""
    out = []
    for dim, (s, b) in enumerate(zip(idx, block, strict=True)):
        start, stop = s.start or 0, full[dim] if s.stop is None else s.stop
        if start % b or (stop % b and stop != full[dim]):
            raise ValueError(
                f"{name}: the tensor-parallel shard [{start}:{stop}] of dim {dim} (size {full[dim]}) does not "
                f"fall on {b}-wide FP8 scale blocks; choose --tp so that each shard of this dim is a multiple of {b}"
            )
        out.append(slice(start // b, math.ceil(stop / b)))
    return tuple(out)


def keep_dtypes(fn):
    """For ``_apply`` overrides: ``fn`` but every tensor keeps its dtype (``model.to(bf16)`` must not turn FP8
    weights or their fp32 scales into bf16)."""

    def keep(t: torch.Tensor) -> torch.Tensor:
        out = fn(t)
        return out if out.dtype == t.dtype else out.to(t.dtype)

    return keep


class Fp8Linear(nn.Module):
    """A bias-free linear holding its FP8 weight and block scales as the checkpoint does (``weight``,
    ``weight_scale_inv``). ``forward`` runs the kernel :func:`runtime.execution.fp8_linear_path` picks (FP8
    GEMM, weight-only, or the dequantizing reference). ``group``: a row-parallel shard's partial products
    are all-reduced over it (tensor parallelism), as ``RowParallelLinear`` does."""

    group = None

    def __init__(self, in_features: int, out_features: int, block: tuple[int, int] = (128, 128)) -> None:
        super().__init__()
        if tuple(block) != (GROUP, GROUP):
            raise ValueError(f"FP8 kernels need {GROUP}×{GROUP} weight blocks, got {list(block)}")
        self.in_features, self.out_features, self.block = in_features, out_features, block
        gn, gk = scale_shape((out_features, in_features), block)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE), requires_grad=False)
        self.weight_scale_inv = nn.Parameter(torch.empty(gn, gk, dtype=torch.float32), requires_grad=False)

    def _apply(self, fn, recurse: bool = True) -> Fp8Linear:
        return super()._apply(keep_dtypes(fn), recurse)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(self.weight, self.weight_scale_inv, self.block, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fp8_linear(x, self.weight, self.weight_scale_inv)
        return y if self.group is None else all_reduce(y, self.group)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 block={list(self.block)}"


def fp8_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x [..., K] @ dequant(w, scale).T`` through the kernel the hardware calls for."""
    x2 = x.reshape(-1, x.shape[-1])
    path = fp8_linear_path(x2)
    if path is Fp8Path.FP8_GEMM:
        y = kernels.fp8_gemm(x2, w, scale)
    elif path is Fp8Path.WEIGHT_ONLY:
        y = kernels.w8_linear(x2, w, scale)
    else:
        y = kernels.w8_linear_reference(x2, w, scale)
    return y.view(*x.shape[:-1], w.shape[0])


# kv_b_proj stays in the model dtype (dequantized at load): absorbed decode multiplies per-head slices of it
# into the query and the output (W_UK, W_UV), as DeepSeek's own inference code does
DEQUANTIZED_IN_FP8_MODELS = ("kv_b_proj",)
