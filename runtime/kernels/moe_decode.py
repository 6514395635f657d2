"""Routed + shared experts for a few tokens in two kernel launches.

At decode a batch of T tokens picks at most T·k experts; the step is bound by reading those experts'
weights once. The general path (sort the pairs, gather rows, grouped GEMM, scatter-add) takes many launches
per layer and a grouped GEMM tuned for many rows per expert. Here, for small T:

1. ``up``: one program per (pair, block of intermediate rows) reads its expert's gate and up rows straight
   from the stacked ``w13`` buffer (the router's ids index it) and writes ``silu(x·Wg) * (x·Wu)``. The
   shared experts are one more "pair" per token, reading their own weights.
2. ``down``: one program per (token, block of hidden rows, slot) multiplies one expert's down rows (or the
   shared experts') and the routing weight; the k (+1) partial rows are summed by the caller, in a fixed
   order (deterministic, no atomics) and fused with the residual add when compiled.

Under expert parallelism the ids are global; pairs routed to another rank's experts read nothing and add
zero. Accumulation is fp32, inputs and outputs in the model dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from runtime.kernels import HAS_TRITON, triton_usable

# (BLOCK_N, BLOCK_K, num_warps, num_stages) per kernel; chosen by benchmarks/model_gpu.py's sweep (results in
# docs/benchmarks.md). Few warps with long K blocks keep many loads in flight per thread, which is what
# reading each expert's weights once at the bandwidth's pace needs.
UP_CONFIG = (4, 256, 1, 3)
DOWN_CONFIG = (4, 512, 1, 3)

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _swiglu_rows(
        x_row, g_rows, u_rows, offs_n, n_mask, k_end, H, stride_w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr
    ):
        acc_g = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < H
            xk = tl.load(x_row + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            off = offs_n[:, None] * stride_w + offs_k[None, :]
            m = n_mask[:, None] & k_mask[None, :]
            g = tl.load(g_rows + off, mask=m, other=0.0).to(tl.float32)
            u = tl.load(u_rows + off, mask=m, other=0.0).to(tl.float32)
            acc_g += tl.sum(g * xk[None, :], axis=1)
            acc_u += tl.sum(u * xk[None, :], axis=1)
        return acc_g / (1.0 + tl.exp(-acc_g)) * acc_u

    @triton.jit
    def _rows_dot(v_row, w_rows, offs_n, n_mask, k_end, K, stride_w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            v = tl.load(v_row + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            w = tl.load(
                w_rows + offs_n[:, None] * stride_w + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0
            ).to(tl.float32)
            acc += tl.sum(w * v[None, :], axis=1)
        return acc

    @triton.jit
    def _moe_up_kernel(
        x_ptr,
        ids_ptr,
        w13_ptr,
        sg_ptr,
        su_ptr,
        h_ptr,
        T,
        H,
        inter,
        shared_inter,
        top_k,
        expert_offset,
        n_local,
        stride_x,
        stride_we,
        stride_wn,
        stride_ws,
        stride_h,
        HAS_SHARED: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        p = tl.program_id(0)
        nb = tl.program_id(1)
        offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        n_routed = T * top_k
        if p < n_routed:
            t = p // top_k
            e = tl.load(ids_ptr + p) - expert_offset
            valid = (e >= 0) & (e < n_local)
            e = tl.where(valid, e, 0).to(tl.int64)  # e × expert stride can pass 2^31
            n_mask = offs_n < inter
            k_end = tl.where(valid & (nb * BLOCK_N < inter), H, 0)
            g_rows = w13_ptr + e * stride_we
            h = _swiglu_rows(
                x_ptr + t * stride_x,
                g_rows,
                g_rows + inter * stride_wn,
                offs_n,
                n_mask,
                k_end,
                H,
                stride_wn,
                BLOCK_N,
                BLOCK_K,
            )
            tl.store(h_ptr + p * stride_h + offs_n, h.to(h_ptr.dtype.element_ty), mask=n_mask)
        elif HAS_SHARED:
            t = p - n_routed
            n_mask = offs_n < shared_inter
            k_end = tl.where(nb * BLOCK_N < shared_inter, H, 0)
            h = _swiglu_rows(
                x_ptr + t * stride_x, sg_ptr, su_ptr, offs_n, n_mask, k_end, H, stride_ws, BLOCK_N, BLOCK_K
            )
            tl.store(h_ptr + p * stride_h + offs_n, h.to(h_ptr.dtype.element_ty), mask=n_mask)

    @triton.jit
    def _moe_down_kernel(
        h_ptr, ids_ptr, wts_ptr, w2_ptr, sd_ptr, out_ptr, T, H, inter, shared_inter, top_k, expert_offset, n_local,
        stride_h, stride_we, stride_wn, stride_sd, stride_ot, stride_os,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        t = tl.program_id(0)
        nb = tl.program_id(1)
        j = tl.program_id(2)  # slot: the token's j-th routed expert, or (j == top_k) its shared experts
        offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < H
        if j < top_k:
            p = t * top_k + j
            e = tl.load(ids_ptr + p) - expert_offset
            valid = (e >= 0) & (e < n_local)
            e = tl.where(valid, e, 0).to(tl.int64)  # e × expert stride can pass 2^31
            w = tl.load(wts_ptr + p).to(tl.float32)
            part = _rows_dot(h_ptr + p * stride_h, w2_ptr + e * stride_we, offs_n, n_mask, tl.where(valid, inter, 0),
                             inter, stride_wn, BLOCK_N, BLOCK_K)  # fmt: skip
            out = w * part
        else:
            p = T * top_k + t
            out = _rows_dot(h_ptr + p * stride_h, sd_ptr, offs_n, n_mask, shared_inter, shared_inter, stride_sd,
                            BLOCK_N, BLOCK_K)  # fmt: skip
        tl.store(out_ptr + t * stride_ot + j * stride_os + offs_n, out, mask=n_mask)


def moe_decode_triton(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    expert_offset: int,
    n_local: int,
) -> torch.Tensor:
    """The two launches; see the module docstring. Shapes: x [T, H], ids/weights [T, k], w13 [E, 2I, H],
    w2 [E, H, I], shared = (gate [Is, H], up [Is, H], down [H, Is]) or None."""
    T, H = x.shape
    k = ids.shape[1]
    inter = w2.shape[-1]
    x, ids, weights = x.contiguous(), ids.contiguous(), weights.contiguous()
    if shared is not None:
        sg, su, sd = (t.contiguous() for t in shared)
        shared_inter = sg.shape[0]
    else:
        sg = su = sd = w13  # never read
        shared_inter = 0
    width = max(inter, shared_inter)
    n_pairs = T * k + (T if shared is not None else 0)
    h = torch.empty(n_pairs, width, dtype=x.dtype, device=x.device)
    bn, bk, warps, stages = UP_CONFIG
    _moe_up_kernel[(n_pairs, triton.cdiv(width, bn))](
        x, ids, w13, sg, su, h, T, H, inter, shared_inter, k, expert_offset, n_local,
        x.stride(0), w13.stride(0), w13.stride(1), sg.stride(0), h.stride(0),
        HAS_SHARED=shared is not None, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    slots = k + (1 if shared is not None else 0)
    out = torch.empty(T, slots, H, dtype=torch.float32, device=x.device)
    bn, bk, warps, stages = DOWN_CONFIG
    _moe_down_kernel[(T, triton.cdiv(H, bn), slots)](
        h, ids, weights, w2, sd, out, T, H, inter, shared_inter, k, expert_offset, n_local,
        h.stride(0), w2.stride(0), w2.stride(1), sd.stride(0), out.stride(0), out.stride(1),
        BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


def moe_decode_reference(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    expert_offset: int,
    n_local: int,
) -> torch.Tensor:
    """The same function in PyTorch: each (token, expert) pair against its gathered expert weights."""
    T, k = ids.shape
    inter = w2.shape[-1]
    local = ids.reshape(-1) - expert_offset
    valid = (local >= 0) & (local < n_local)
    e = local.clamp(0, n_local - 1)
    xs = x.repeat_interleave(k, dim=0)
    g, u = torch.bmm(w13.index_select(0, e), xs[:, :, None]).squeeze(-1).float().split(inter, dim=-1)
    h = (F.silu(g) * u).to(x.dtype)
    out = torch.bmm(w2.index_select(0, e), h[:, :, None]).squeeze(-1).float()
    parts = (out * (weights.reshape(-1).float() * valid)[:, None]).view(T, k, -1)
    if shared is not None:
        sg, su, sd = shared
        hs = (F.silu(F.linear(x, sg).float()) * F.linear(x, su).float()).to(x.dtype)
        parts = torch.cat([parts, F.linear(hs, sd).float()[:, None]], dim=1)
    return parts


@torch.library.custom_op("moefleet::moe_decode", mutates_args=())
def moe_decode(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    shared_gate: torch.Tensor | None,
    shared_up: torch.Tensor | None,
    shared_down: torch.Tensor | None,
    expert_offset: int,
    n_local: int,
) -> torch.Tensor:
    """Per token, each routed expert's output times its weight, and the shared experts' output: fp32
    ``[T, k (+1), H]``, for the caller to sum (inside compiled code that sum fuses with the residual add)."""
    shared = None if shared_gate is None else (shared_gate, shared_up, shared_down)
    fn = moe_decode_triton if triton_usable(x) else moe_decode_reference
    return fn(x, ids, weights, w13, w2, shared, expert_offset, n_local)


@moe_decode.register_fake
def _(x, ids, weights, w13, w2, shared_gate, shared_up, shared_down, expert_offset, n_local):
    slots = ids.shape[1] + (0 if shared_gate is None else 1)
    return x.new_empty(x.shape[0], slots, x.shape[1], dtype=torch.float32)
