"""``x @ w.T`` for one token: the decode step's small projections at the pace their bytes allow.

At batch 1 a decode layer multiplies one row by q/kv_a, W_UK and W_UV (per head), o_proj and the router
(fp32). Each GEMV should take no longer than its bytes over the HBM bandwidth; cuBLAS's one-row kernels are
tuned for large matrices, and its fp32 GEMV for the router is two launches. Here one program per row or few
rows streams its rows of ``w`` once in long K blocks with one or two warps, so each thread keeps many loads
in flight, and there are enough programs to keep every SM reading (benchmarks/linear_gpu.py measures it;
results in docs/benchmarks.md). Every token is multiplied by the tile in registers, so the weight is read
once whatever the batch, but those per-token reductions run on the CUDA cores: from 2 tokens cuBLAS's
tensor-core GEMV wins on the bf16 weights (see the limits below).

Batched form for the absorbed attention: ``x [G, T, K]``, ``w [G, N, K]`` → ``[G, T, N]`` (G heads), any
strides, so W_UK (``[nh, dn, r]`` read as ``[nh, r, dn]``, transposed) needs no copy. Accumulation is fp32;
the output has the promoted dtype of ``x`` and ``w`` (the router: bf16 tokens, fp32 weight → fp32, equal to
``F.linear(x.float(), w)`` up to summation order).
"""

from __future__ import annotations

import torch
from torch import nn

from runtime.kernels import HAS_TRITON, triton_usable

# Up to this many tokens the decode projections use this kernel. It reads the weight once at the
# bandwidth's pace, but its per-token reductions run on the CUDA cores: from 2 tokens cuBLAS's tensor-core
# GEMV is as fast on the bf16 weights (benchmarks/linear_gpu.py, docs/benchmarks.md). The router's fp32
# weight is the exception, which cuBLAS serves with two launches: there the kernel wins up to 16 tokens
# (ROUTER_MAX_TOKENS, the fused MoE's crossover, so the two choices never split a compiled graph twice).
SMALL_LINEAR_MAX_TOKENS = 1
ROUTER_MAX_TOKENS = 16

# The launch rule fitted to benchmarks/linear_gpu.py's sweep (the q/kv_a, o_proj, W_UK, W_UV, router and
# dense-MLP shapes; close to each shape's best config): a program reads at least
# ROW_BYTES of weight (one row of K ≥ 2048, several of a short K), in K blocks of up to 1,024, one warp per
# 2,048 tile elements. Long blocks and few warps give each thread many loads in flight, which is what a
# GEMV needs; one program per row or two gives every SM many programs.
ROW_BYTES = 4096
MAX_BLOCK_K = 1024


def launch_config(n_rows: int, k: int, groups: int, tokens: int, elem_bytes: int = 2) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) for a ``[groups, n_rows, k]`` weight and ``tokens`` rows."""
    block_n = min(16, _next_pow2(-(-ROW_BYTES // (k * elem_bytes))))
    block_k = min(MAX_BLOCK_K if tokens == 1 else MAX_BLOCK_K // 2, max(256, _next_pow2(k)))
    return block_n, block_k, max(1, block_n * block_k // 2048), 1


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _linear_kernel(
        x_ptr, w_ptr, y_ptr, T, N, K,
        sxg, sxt, sxk, swg, swn, swk, syg, syt, syn,
        BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        nb = tl.program_id(0)
        g = tl.program_id(1)
        offs_t = tl.arange(0, BLOCK_T)
        offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        x_row = x_ptr + g * sxg
        w_rows = w_ptr + g * swg + offs_n[:, None] * swn
        acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            w = tl.load(w_rows + offs_k[None, :] * swk, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            w = w.to(tl.float32)
            # token by token against the tile in registers: a [T, N, K] product would not fit in them. Padding
            # tokens (t >= T) read the last real one; their rows are not stored.
            for t in tl.static_range(BLOCK_T):
                x_t = x_row + tl.minimum(t, T - 1) * sxt
                xt = tl.load(x_t + offs_k * sxk, mask=k_mask, other=0.0).to(tl.float32)
                part = tl.sum(w * xt[None, :], axis=1)
                acc += tl.where(offs_t[:, None] == t, part[None, :], 0.0)
        y = y_ptr + g * syg + offs_t[:, None] * syt + offs_n[None, :] * syn
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=(offs_t < T)[:, None] & n_mask[None, :])


def _out_dtype(x: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, w.dtype)


def small_linear_triton(x: torch.Tensor, w: torch.Tensor, config: tuple[int, int, int, int] | None = None):
    """See the module docstring. ``config`` = (BLOCK_N, BLOCK_K, num_warps, num_stages) overrides the
    defaults (the benchmark's sweep)."""
    batched = x.dim() == 3
    x3, w3 = (x, w) if batched else (x[None], w[None])
    G, T, K = x3.shape
    N = w3.shape[1]
    y = torch.empty(G, T, N, dtype=_out_dtype(x, w), device=x.device)
    if T and N:
        bn, bk, warps, stages = config or launch_config(N, K, G, T, w.element_size())
        _linear_kernel[(triton.cdiv(N, bn), G)](
            x3, w3, y, T, N, K, *x3.stride(), *w3.stride(), *y.stride(),
            BLOCK_T=triton.next_power_of_2(T), BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
        )  # fmt: skip
    return y if batched else y[0]


def small_linear_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    dtype = _out_dtype(x, w)
    return torch.matmul(x.to(dtype), w.to(dtype).transpose(-2, -1))


@torch.library.custom_op("moefleet::small_linear", mutates_args=())
def small_linear_op(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x [T, K] @ w [N, K].T`` (or per group: ``[G, T, K] @ [G, N, K]``) with fp32 accumulation."""
    fn = small_linear_triton if triton_usable(x) else small_linear_reference
    return fn(x, w)


@small_linear_op.register_fake
def _(x, w):
    return x.new_empty(*x.shape[:-1], w.shape[-2], dtype=_out_dtype(x, w))


def small_linear(x: torch.Tensor, w: torch.Tensor, max_tokens: int | None = None) -> torch.Tensor:
    """The decode projections' entry: the kernel for up to ``max_tokens`` (default SMALL_LINEAR_MAX_TOKENS)
    tokens where Triton runs, the usual matmul elsewhere (the CPU path, prefill, larger batches), with the
    same result dtype."""
    limit = SMALL_LINEAR_MAX_TOKENS if max_tokens is None else max_tokens
    if triton_usable(x) and x.shape[-2] <= limit:
        return small_linear_op(x, w)
    return small_linear_reference(x, w)


def project(proj: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``proj(x)`` for a plain bias-free ``nn.Linear`` through :func:`small_linear`; any other projection (a
    biased or tensor-parallel one, with its own collective) as itself."""
    return small_linear(x, proj.weight) if type(proj) is nn.Linear and proj.bias is None else proj(x)
