"""The routed experts over FP8 expert stacks (:mod:`runtime.quant.fp8`: e4m3, an fp32 scale per 128×128 block),
at every step size, as one op: :func:`moe_fp8` (``moefleet::moe_fp8``). It picks the kernel by the step's
token count T and the GPU (:func:`moe_fp8_kernel`):

* ``pairs`` (T ≤ :data:`MOE_BY_PAIR_MAX_TOKENS`): :mod:`runtime.kernels.moe_decode`'s two launches, a
  program per (token, expert) pair and block of rows, reading FP8 rows and their scales;
* ``experts`` (above that, where neither tile kernel is on): a program per expert looping over its pairs on
  CUDA cores, so a batch reads each chosen expert about once;
* ``fp8_tiles`` (from :data:`MOE_FP8_ACT_MIN_TOKENS`, on GPUs with FP8 tensor cores): tiles of one expert's pairs
  on FP8 tensor cores. Activations are quantized per token and 128 features, as the checkpoint format
  prescribes (``activation_scheme: dynamic``); each 128-wide K step's fp32 product is scaled by the token's
  and the weight block's scales before it joins the accumulator (DeepSeek-V3's promotion of partial sums),
  and the up kernel quantizes its own output in its epilogue for the down kernel;
* ``tiles`` (from :data:`MOE_TILES_MIN_TOKENS`, and any step above :data:`MOE_BY_EXPERT_MAX_TOKENS`, on
  GPUs without FP8 tensor cores: Ampere): the same tiles on bf16 tensor cores, the FP8 weight dequantized
  in registers.

Every path reads the stacks' FP8 bytes (no dequantized copy of them), needs no host sync (a decode step stays
capturable in a CUDA graph) and returns fp32 ``[T, k, H]``: each routed expert's output times its routing
weight, for the caller to sum. Under expert parallelism ids are global; pairs routed to another rank's
experts add exactly zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from runtime.kernels import HAS_TRITON, triton_usable
from runtime.kernels.fp8 import (
    GROUP,
    _act_dequant,
    _dequant,
    act_quant,
    act_quant_reference,
    native_fp8,
    w8_linear_triton,
)
from runtime.kernels.moe_decode import moe_decode_reference

# The launch configurations and crossovers below are a launch sweep's best on an H100 (benchmarks/fp8_gpu.py
# --tune, every kernel timed as a CUDA graph replays it; docs/benchmarks.md). The CUDA-core kernels:
# (BLOCK_N rows, BLOCK_K, num_warps) of the per-pair and per-expert kernels
MOE_BLOCK_N = 8
MOE_BLOCK_K = 512
MOE_NUM_WARPS = 1
# up to this many tokens the FP8 MoE decode kernel runs a program per (token, expert) pair; above, per expert
# (each expert's weights read about once per step however many of the batch's tokens chose it)
MOE_BY_PAIR_MAX_TOKENS = 16
# the per-expert loop is for decode batches; above this many tokens (prefill) a tile kernel always
MOE_BY_EXPERT_MAX_TOKENS = 256
# the weight-only tile kernel: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), the small tile while
# experts average at most 16 pairs (decode batches), the large one above (prefill); from
# MOE_TILES_MIN_TOKENS it replaces the per-expert kernel (None: not below MOE_BY_EXPERT_MAX_TOKENS). At 64
# tokens it took 0.28 ms against the per-expert kernel's 0.73 (V2-Lite's experts)
MOE_TILES_SMALL = (16, 64, 256, 4, 3)
MOE_TILES_LARGE = (64, 128, 128, 4, 3)
MOE_TILES_MIN_TOKENS: int | None = MOE_BY_PAIR_MAX_TOKENS + 1
# from this many tokens, on FP8 tensor cores (sm89+), the FP8-activation tile kernel (None: never). It was
# the fastest kernel from 64 tokens (0.28 ms at 64, 0.31 at 256, 1.15 at a 4,096-token step: bf16's
# grouped GEMM path took 1.65, the stacks dequantized for it 6.3)
MOE_FP8_ACT_MIN_TOKENS: int | None = MOE_BY_PAIR_MAX_TOKENS + 1
# its launches: (BLOCK_M pairs, BLOCK_N rows of the down projection, num_warps, num_stages); the up kernel's
# row block is one scale block (128), which is also the group its output is quantized in. The small tile
# while experts average at most 16 pairs, the large one above
MOE_FP8_TILES_SMALL = (16, 128, 4, 3)
MOE_FP8_TILES_LARGE = (128, 128, 8, 3)


if HAS_TRITON:
    import triton
    import triton.language as tl

    from runtime.kernels.fp8 import _decode_e4m3, _quantize_rows

    @triton.jit
    def _scaled_rows(
        v_row, w_rows, s_rows, offs_n, n_mask, k_end, K, swn, ssn,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NATIVE: tl.constexpr,
    ):  # fmt: skip
        """Σ_k w[n, k]·v[k] over FP8 rows; a K step spans BLOCK_K // 128 scale blocks, each block's partial
        sum times its scale."""
        GROUPS: tl.constexpr = BLOCK_K // 128
        n_groups = tl.cdiv(K, 128)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            v = tl.load(v_row + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            w = tl.load(
                w_rows + offs_n[:, None] * swn + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0
            )
            offs_g = k0 // 128 + tl.arange(0, GROUPS)
            s = tl.load(
                s_rows + (offs_n // 128)[:, None] * ssn + offs_g[None, :],
                mask=n_mask[:, None] & (offs_g < n_groups)[None, :], other=0.0,
            )  # fmt: skip
            part = tl.sum(tl.reshape(_decode_e4m3(w, NATIVE) * v[None, :], [BLOCK_N, GROUPS, 128]), axis=2)
            acc += tl.sum(part * s, axis=1)
        return acc

    @triton.jit
    def _swiglu_scaled_rows(
        x_row, wg_rows, sg_rows, wu_rows, su_rows, offs_n, n_mask, k_end, K, swn, ssn,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NATIVE: tl.constexpr,
    ):  # fmt: skip
        """silu(x·Wg)·(x·Wu) over FP8 rows ``offs_n`` of a gate and an up matrix (their own scale blocks): both
        tiles are loaded in the same K step, so each step has twice the bytes in flight of one
        :func:`_scaled_rows`."""
        GROUPS: tl.constexpr = BLOCK_K // 128
        n_groups = tl.cdiv(K, 128)
        acc_g = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            v = tl.load(x_row + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            m = n_mask[:, None] & k_mask[None, :]
            wg = tl.load(wg_rows + offs_n[:, None] * swn + offs_k[None, :], mask=m, other=0)
            wu = tl.load(wu_rows + offs_n[:, None] * swn + offs_k[None, :], mask=m, other=0)
            offs_g = k0 // 128 + tl.arange(0, GROUPS)
            sm = n_mask[:, None] & (offs_g < n_groups)[None, :]
            s_off = (offs_n // 128)[:, None] * ssn + offs_g[None, :]
            sg = tl.load(sg_rows + s_off, mask=sm, other=0.0)
            su = tl.load(su_rows + s_off, mask=sm, other=0.0)
            pg = tl.sum(tl.reshape(_decode_e4m3(wg, NATIVE) * v[None, :], [BLOCK_N, GROUPS, 128]), axis=2)
            pu = tl.sum(tl.reshape(_decode_e4m3(wu, NATIVE) * v[None, :], [BLOCK_N, GROUPS, 128]), axis=2)
            acc_g += tl.sum(pg * sg, axis=1)
            acc_u += tl.sum(pu * su, axis=1)
        return acc_g / (1.0 + tl.exp(-acc_g)) * acc_u

    @triton.jit
    def _moe_up_fp8_kernel(
        x_ptr, ids_ptr, w_ptr, s_ptr, sg_ptr, ssg_ptr, su_ptr, ssu_ptr, h_ptr, T, H, inter, shared_inter, top_k,
        expert_offset, n_local, sx, swe, swn, sse, ssn, sswn, sssn, sh,
        HAS_SHARED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NATIVE: tl.constexpr,
    ):  # fmt: skip
        """Programs ``p < T·k`` are (token, routed expert) pairs; with HAS_SHARED the next T are each token's
        shared experts, reading their own FP8 gate and up rows (one launch fewer than as their own linears)."""
        p = tl.program_id(0)
        nb = tl.program_id(1)
        offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        if p < T * top_k:
            t = p // top_k
            e = tl.load(ids_ptr + p) - expert_offset
            valid = (e >= 0) & (e < n_local)
            e = tl.where(valid, e, 0).to(tl.int64)  # e × expert stride passes 2^31 (V3: 256 experts)
            n_mask = offs_n < inter
            k_end = tl.where(valid & (nb * BLOCK_N < inter), H, 0)
            w, s = w_ptr + e * swe, s_ptr + e * sse
            # the up half starts at row ``inter``, a whole scale block (MoE.use_fp8 checks it)
            h = _swiglu_scaled_rows(x_ptr + t * sx, w, s, w + inter * swn, s + (inter // 128) * ssn, offs_n, n_mask,
                                    k_end, H, swn, ssn, BLOCK_N, BLOCK_K, NATIVE)  # fmt: skip
            tl.store(h_ptr + p * sh + offs_n, h.to(h_ptr.dtype.element_ty), mask=n_mask)
        elif HAS_SHARED:
            t = p - T * top_k
            n_mask = offs_n < shared_inter
            k_end = tl.where(nb * BLOCK_N < shared_inter, H, 0)
            h = _swiglu_scaled_rows(x_ptr + t * sx, sg_ptr, ssg_ptr, su_ptr, ssu_ptr, offs_n, n_mask, k_end, H,
                                    sswn, sssn, BLOCK_N, BLOCK_K, NATIVE)  # fmt: skip
            tl.store(h_ptr + p * sh + offs_n, h.to(h_ptr.dtype.element_ty), mask=n_mask)

    @triton.jit
    def _moe_down_fp8_kernel(
        h_ptr, ids_ptr, wts_ptr, w_ptr, s_ptr, sd_ptr, ssd_ptr, out_ptr, T, H, inter, shared_inter, top_k,
        expert_offset, n_local, sh, swe, swn, sse, ssn, sdwn, sdsn, sot, sos,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NATIVE: tl.constexpr,
    ):  # fmt: skip
        """Slot ``j < k``: the token's j-th routed expert times its weight; ``j == k``: its shared experts."""
        t = tl.program_id(0)
        nb = tl.program_id(1)
        j = tl.program_id(2)
        offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < H
        if j < top_k:
            p = t * top_k + j
            e = tl.load(ids_ptr + p) - expert_offset
            valid = (e >= 0) & (e < n_local)
            e = tl.where(valid, e, 0).to(tl.int64)  # e × expert stride passes 2^31 (V3: 256 experts)
            wt = tl.load(wts_ptr + p).to(tl.float32)
            part = wt * _scaled_rows(
                h_ptr + p * sh, w_ptr + e * swe, s_ptr + e * sse, offs_n, n_mask, tl.where(valid, inter, 0), inter,
                swn, ssn, BLOCK_N, BLOCK_K, NATIVE,
            )  # fmt: skip
        else:
            part = _scaled_rows(h_ptr + (T * top_k + t) * sh, sd_ptr, ssd_ptr, offs_n, n_mask, shared_inter,
                                shared_inter, sdwn, sdsn, BLOCK_N, BLOCK_K, NATIVE)  # fmt: skip
        tl.store(out_ptr + t * sot + j * sos + offs_n, part, mask=n_mask)

    @triton.jit
    def _moe_up_fp8_by_expert_kernel(
        x_ptr, order_ptr, bounds_ptr, w_ptr, s_ptr, h_ptr, H, inter, top_k,
        sx, swe, swn, sse, ssn, sh,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NATIVE: tl.constexpr,
    ):  # fmt: skip
        """One program per (local expert, block of intermediate rows), over the pairs routed to it (its slice
        of the pairs sorted by expert): the expert's rows come from DRAM once and from cache for its other
        pairs."""
        e = tl.program_id(0).to(tl.int64)
        nb = tl.program_id(1)
        offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < inter
        w, s = w_ptr + e * swe, s_ptr + e * sse
        for i in range(tl.load(bounds_ptr + e), tl.load(bounds_ptr + e + 1)):
            p = tl.load(order_ptr + i)
            x_row = x_ptr + (p // top_k) * sx
            h = _swiglu_scaled_rows(x_row, w, s, w + inter * swn, s + (inter // 128) * ssn, offs_n, n_mask, H, H,
                                    swn, ssn, BLOCK_N, BLOCK_K, NATIVE)  # fmt: skip
            tl.store(h_ptr + p * sh + offs_n, h.to(h_ptr.dtype.element_ty), mask=n_mask)

    @triton.jit
    def _moe_down_fp8_by_expert_kernel(
        h_ptr, order_ptr, bounds_ptr, wts_ptr, w_ptr, s_ptr, out_ptr, H, inter, top_k,
        sh, swe, swn, sse, ssn, sot, sos,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NATIVE: tl.constexpr,
    ):  # fmt: skip
        e = tl.program_id(0).to(tl.int64)
        nb = tl.program_id(1)
        offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < H
        w, s = w_ptr + e * swe, s_ptr + e * sse
        for i in range(tl.load(bounds_ptr + e), tl.load(bounds_ptr + e + 1)):
            p = tl.load(order_ptr + i)
            wt = tl.load(wts_ptr + p).to(tl.float32)
            part = _scaled_rows(h_ptr + p * sh, w, s, offs_n, n_mask, inter, inter, swn, ssn, BLOCK_N, BLOCK_K, NATIVE)
            tl.store(out_ptr + (p // top_k) * sot + (p % top_k) * sos + offs_n, wt * part, mask=n_mask)

    @triton.jit
    def _dequant_tile(w_rows, s_rows, offs_n, n_mask, k0, offs_k, k_mask, K, swn, ssn,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NATIVE: tl.constexpr):  # fmt: skip
        """[BLOCK_N, BLOCK_K] of FP8 rows times their block scales (a K step spans BLOCK_K // 128 blocks)."""
        GROUPS: tl.constexpr = BLOCK_K // 128
        w = tl.load(w_rows + offs_n[:, None] * swn + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0)
        offs_g = k0 // 128 + tl.arange(0, GROUPS)
        s = tl.load(
            s_rows + (offs_n // 128)[:, None] * ssn + offs_g[None, :],
            mask=n_mask[:, None] & (offs_g < tl.cdiv(K, 128))[None, :], other=0.0,
        )  # fmt: skip
        return tl.reshape(
            tl.reshape(_decode_e4m3(w, NATIVE), [BLOCK_N, GROUPS, 128]) * s[:, :, None], [BLOCK_N, BLOCK_K]
        )

    @triton.jit
    def _tile_pairs(tile_expert_ptr, tile_row_ptr, bounds_ptr, order_ptr, BLOCK_M: tl.constexpr):
        """This program's tile (:func:`expert_tiles`): its expert (int64; -1 for an unused tile, whose program
        returns at once), the indices of its pairs and which of its BLOCK_M rows hold one."""
        t = tl.program_id(0)
        e = tl.load(tile_expert_ptr + t).to(tl.int64)
        offs_m = tl.load(tile_row_ptr + t) + tl.arange(0, BLOCK_M)
        m_mask = offs_m < tl.load(bounds_ptr + tl.maximum(e, 0) + 1)
        return e, tl.load(order_ptr + offs_m, mask=m_mask, other=0), m_mask

    @triton.jit
    def _store_weighted_rows(out_ptr, wts_ptr, acc, p, m_mask, offs_n, n_mask, top_k, sot, sos):
        """A down tile's rows times their pairs' routing weights, each to its (token, slot) row of the output."""
        wt = tl.load(wts_ptr + p, mask=m_mask, other=0.0).to(tl.float32)
        out = out_ptr + (p // top_k)[:, None] * sot + (p % top_k)[:, None] * sos + offs_n[None, :]
        tl.store(out, acc * wt[:, None], mask=m_mask[:, None] & n_mask[None, :])

    @triton.jit
    def _dot_rows(a, w, IEEE: tl.constexpr):
        """``a [M, K] @ w [N, K]ᵀ`` in ``a``'s dtype, fp32 products exact where IEEE (the interpreter's fp32)."""
        if IEEE:
            return tl.dot(a, tl.trans(w.to(a.dtype)), input_precision="ieee")
        return tl.dot(a, tl.trans(w.to(a.dtype)))

    @triton.jit
    def _moe_up_fp8_tiles_kernel(
        x_ptr, order_ptr, tile_expert_ptr, tile_row_ptr, bounds_ptr, w_ptr, s_ptr, h_ptr, H, inter, top_k,
        sx, swe, swn, sse, ssn, sh,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NATIVE: tl.constexpr,
        IEEE: tl.constexpr,
    ):  # fmt: skip
        """One program per (tile of up to BLOCK_M pairs of one expert, block of intermediate rows): the gate and
        up rows are dequantized once per K step and serve the tile's pairs through ``tl.dot``; silu(g)·u out."""
        e, p, m_mask = _tile_pairs(tile_expert_ptr, tile_row_ptr, bounds_ptr, order_ptr, BLOCK_M)
        if e < 0:
            return
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < inter
        w, s = w_ptr + e * swe, s_ptr + e * sse
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < H
            a = tl.load(x_ptr + (p // top_k)[:, None] * sx + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                        other=0.0)  # fmt: skip
            g = _dequant_tile(w, s, offs_n, n_mask, k0, offs_k, k_mask, H, swn, ssn, BLOCK_N, BLOCK_K, NATIVE)
            u = _dequant_tile(w, s, offs_n + inter, n_mask, k0, offs_k, k_mask, H, swn, ssn, BLOCK_N, BLOCK_K, NATIVE)
            acc_g += _dot_rows(a, g, IEEE)
            acc_u += _dot_rows(a, u, IEEE)
        h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
        tl.store(h_ptr + p[:, None] * sh + offs_n[None, :], h.to(h_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])  # fmt: skip

    @triton.jit
    def _moe_down_fp8_tiles_kernel(
        h_ptr, order_ptr, tile_expert_ptr, tile_row_ptr, bounds_ptr, wts_ptr, w_ptr, s_ptr, out_ptr, H, inter,
        top_k, sh, swe, swn, sse, ssn, sot, sos,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NATIVE: tl.constexpr,
        IEEE: tl.constexpr,
    ):  # fmt: skip
        e, p, m_mask = _tile_pairs(tile_expert_ptr, tile_row_ptr, bounds_ptr, order_ptr, BLOCK_M)
        if e < 0:
            return
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < H
        w, s = w_ptr + e * swe, s_ptr + e * sse
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, inter, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < inter
            a = tl.load(h_ptr + p[:, None] * sh + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            d = _dequant_tile(w, s, offs_n, n_mask, k0, offs_k, k_mask, inter, swn, ssn, BLOCK_N, BLOCK_K, NATIVE)
            acc += _dot_rows(a, d, IEEE)
        _store_weighted_rows(out_ptr, wts_ptr, acc, p, m_mask, offs_n, n_mask, top_k, sot, sos)

    @triton.jit
    def _moe_up_fp8_act_tiles_kernel(
        xq_ptr, xs_ptr, order_ptr, tile_expert_ptr, tile_row_ptr, bounds_ptr, w_ptr, s_ptr, hq_ptr, hs_ptr,
        H, inter, top_k, sx, sxs, swe, swn, sse, ssn, sh, shs,
        BLOCK_M: tl.constexpr,
    ):  # fmt: skip
        """One program per (tile of one expert's pairs, 128 intermediate rows = one scale block): the gate and
        up products of the FP8 activations on FP8 tensor cores, a K step per scale block; silu(g)·u is then
        quantized per (pair, these 128 columns) and stored as e4m3 with its scale."""
        e, p, m_mask = _tile_pairs(tile_expert_ptr, tile_row_ptr, bounds_ptr, order_ptr, BLOCK_M)
        if e < 0:
            return
        nb = tl.program_id(1)
        offs_n = nb * 128 + tl.arange(0, 128)  # inter is whole blocks (runtime.moe.MoE.use_fp8)
        rows = p // top_k
        w, s = w_ptr + e * swe, s_ptr + e * sse
        up_block = inter // 128  # the up rows' first scale block
        acc_g = tl.zeros([BLOCK_M, 128], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, 128], dtype=tl.float32)
        for kb in range(0, tl.cdiv(H, 128)):
            offs_k = kb * 128 + tl.arange(0, 128)
            k_mask = offs_k < H
            a = tl.load(xq_ptr + rows[:, None] * sx + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                        other=0.0)  # fmt: skip
            a_s = tl.load(xs_ptr + rows * sxs + kb, mask=m_mask, other=0.0)
            g = tl.load(w + offs_n[:, None] * swn + offs_k[None, :], mask=k_mask[None, :], other=0.0)
            u = tl.load(w + (offs_n + inter)[:, None] * swn + offs_k[None, :], mask=k_mask[None, :], other=0.0)
            acc_g += tl.dot(a, tl.trans(g)) * (a_s * tl.load(s + nb * ssn + kb))[:, None]
            acc_u += tl.dot(a, tl.trans(u)) * (a_s * tl.load(s + (up_block + nb) * ssn + kb))[:, None]
        q, scale = _quantize_rows(acc_g / (1.0 + tl.exp(-acc_g)) * acc_u)
        tl.store(hq_ptr + p[:, None] * sh + offs_n[None, :], q.to(hq_ptr.dtype.element_ty), mask=m_mask[:, None])
        tl.store(hs_ptr + p * shs + nb, scale, mask=m_mask)

    @triton.jit
    def _moe_down_fp8_act_tiles_kernel(
        hq_ptr, hs_ptr, order_ptr, tile_expert_ptr, tile_row_ptr, bounds_ptr, wts_ptr, w_ptr, s_ptr, out_ptr,
        H, inter, top_k, sh, shs, swe, swn, sse, ssn, sot, sos,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        e, p, m_mask = _tile_pairs(tile_expert_ptr, tile_row_ptr, bounds_ptr, order_ptr, BLOCK_M)
        if e < 0:
            return
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < H
        w, s = w_ptr + e * swe, s_ptr + e * sse
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for kb in range(0, inter // 128):
            offs_k = kb * 128 + tl.arange(0, 128)
            a = tl.load(hq_ptr + p[:, None] * sh + offs_k[None, :], mask=m_mask[:, None], other=0.0)
            a_s = tl.load(hs_ptr + p * shs + kb, mask=m_mask, other=0.0)
            d = tl.load(w + offs_n[:, None] * swn + offs_k[None, :], mask=n_mask[:, None], other=0.0)
            d_s = tl.load(s + (offs_n // 128) * ssn + kb, mask=n_mask, other=0.0)
            acc += tl.dot(a, tl.trans(d)) * a_s[:, None] * d_s[None, :]
        _store_weighted_rows(out_ptr, wts_ptr, acc, p, m_mask, offs_n, n_mask, top_k, sot, sos)


# ---- host side --------------------------------------------------------------------------------------


def _moe_fp8_pairs(x, ids, weights, w13, s13, w2, s2, expert_offset: int, n_local: int, shared=None) -> torch.Tensor:
    """``shared``: the shared experts' (gate, gate scales, up, up scales, down, down scales), run as one more
    pair per token and returned as slot k."""
    T, H = x.shape
    k = ids.shape[1]
    inter = w2.shape[-1]
    if shared is not None:
        sg, ssg, su, ssu, sd, ssd = shared
        assert sg.stride() == su.stride() and ssg.stride() == ssu.stride(), "shared gate and up differ in layout"
        shared_inter = sg.shape[0]
    else:
        sg, ssg, su, ssu, sd, ssd = w13, s13, w13, s13, w2, s2  # never read
        shared_inter = 0
    rows = T * k + (T if shared is not None else 0)
    width = max(inter, shared_inter)
    native = native_fp8(x)
    h = torch.empty(rows, width, dtype=x.dtype, device=x.device)
    _moe_up_fp8_kernel[(rows, triton.cdiv(width, MOE_BLOCK_N))](
        x, ids, w13.view(torch.uint8), s13, sg.view(torch.uint8), ssg, su.view(torch.uint8), ssu, h, T, H, inter,
        shared_inter, k, expert_offset, n_local, x.stride(0), w13.stride(0), w13.stride(1), s13.stride(0),
        s13.stride(1), sg.stride(0), ssg.stride(0), h.stride(0),
        HAS_SHARED=shared is not None, BLOCK_N=MOE_BLOCK_N, BLOCK_K=MOE_BLOCK_K, NATIVE=native,
        num_warps=MOE_NUM_WARPS, num_stages=3,
    )  # fmt: skip
    slots = k + (1 if shared is not None else 0)
    out = torch.empty(T, slots, H, dtype=torch.float32, device=x.device)
    _moe_down_fp8_kernel[(T, triton.cdiv(H, MOE_BLOCK_N), slots)](
        h, ids, weights, w2.view(torch.uint8), s2, sd.view(torch.uint8), ssd, out, T, H, inter, shared_inter, k,
        expert_offset, n_local, h.stride(0), w2.stride(0), w2.stride(1), s2.stride(0), s2.stride(1), sd.stride(0),
        ssd.stride(0), out.stride(0), out.stride(1),
        BLOCK_N=MOE_BLOCK_N, BLOCK_K=MOE_BLOCK_K, NATIVE=native, num_warps=MOE_NUM_WARPS, num_stages=3,
    )  # fmt: skip
    return out


def _shared_fp8(x: torch.Tensor, shared) -> torch.Tensor:
    """The shared experts as weight-only FP8 products, fp32 ``[T, H]`` (the kernels other than ``pairs``)."""
    sg, ssg, su, ssu, sd, ssd = shared
    h = F.silu(w8_linear_triton(x, sg, ssg).float()) * w8_linear_triton(x, su, ssu).float()
    return w8_linear_triton(h.to(x.dtype), sd, ssd).float()


def _moe_fp8_experts(x, ids, weights, w13, s13, w2, s2, expert_offset: int, n_local: int) -> torch.Tensor:
    T, H = x.shape
    k = ids.shape[1]
    inter = w2.shape[-1]
    # the pairs sorted by local expert, and where each expert's slice starts (on the device: no host sync, so
    # a decode step stays capturable); pairs of other ranks' experts sort outside every slice
    local = ids.reshape(-1) - expert_offset
    order = torch.argsort(local, stable=True)
    bounds = torch.searchsorted(local[order], torch.arange(n_local + 1, device=x.device, dtype=local.dtype))
    h = torch.empty(T * k, inter, dtype=x.dtype, device=x.device)  # rows of other ranks' pairs: never read
    _moe_up_fp8_by_expert_kernel[(n_local, triton.cdiv(inter, MOE_BLOCK_N))](
        x, order, bounds, w13.view(torch.uint8), s13, h, H, inter, k,
        x.stride(0), w13.stride(0), w13.stride(1), s13.stride(0), s13.stride(1), h.stride(0),
        BLOCK_N=MOE_BLOCK_N, BLOCK_K=MOE_BLOCK_K, NATIVE=native_fp8(x), num_warps=MOE_NUM_WARPS, num_stages=3,
    )  # fmt: skip
    out = torch.zeros(T, k, H, dtype=torch.float32, device=x.device)  # other ranks' pairs stay zero
    _moe_down_fp8_by_expert_kernel[(n_local, triton.cdiv(H, MOE_BLOCK_N))](
        h, order, bounds, weights, w2.view(torch.uint8), s2, out, H, inter, k,
        h.stride(0), w2.stride(0), w2.stride(1), s2.stride(0), s2.stride(1), out.stride(0), out.stride(1),
        BLOCK_N=MOE_BLOCK_N, BLOCK_K=MOE_BLOCK_K, NATIVE=native_fp8(x), num_warps=MOE_NUM_WARPS, num_stages=3,
    )  # fmt: skip
    return out


def expert_tiles(local: torch.Tensor, n_local: int, block_m: int) -> tuple[torch.Tensor, ...]:
    """The pairs of expert ids ``local`` (already less ``expert_offset``; others' outside ``[0, n_local)``) cut
    into tiles of at most ``block_m`` pairs of one expert, on the device (no host sync: a decode step stays
    capturable) → (order: pair indices sorted by expert, bounds [n_local + 1]: each expert's slice of
    ``order``, tile_expert: each tile's expert or -1, tile_row: its first row in ``order``). There are
    ``cdiv(pairs, block_m) + n_local`` tiles, a bound on what any routing needs; the unused are -1."""
    order = torch.argsort(local, stable=True)
    bounds = torch.searchsorted(local[order], torch.arange(n_local + 1, device=local.device, dtype=local.dtype))
    tiles = (bounds[1:] - bounds[:-1] + block_m - 1) // block_m
    ends = tiles.cumsum(0)
    t = torch.arange(-(-local.numel() // block_m) + n_local, device=local.device)
    tile_expert = torch.searchsorted(ends, t, right=True)
    e = tile_expert.clamp(max=n_local - 1)
    tile_row = bounds[e] + (t - (ends[e] - tiles[e])) * block_m
    return order, bounds, torch.where(tile_expert < n_local, tile_expert, -1), tile_row


def _moe_fp8_tiles(x, ids, weights, w13, s13, w2, s2, expert_offset: int, n_local: int, config=None) -> torch.Tensor:
    T, H = x.shape
    k = ids.shape[1]
    inter = w2.shape[-1]
    bm, bn, bk, warps, stages = config or (MOE_TILES_SMALL if T * k <= 16 * n_local else MOE_TILES_LARGE)
    order, bounds, tile_expert, tile_row = expert_tiles(ids.reshape(-1) - expert_offset, n_local, bm)
    tiles, ieee, native = tile_expert.numel(), x.dtype == torch.float32, native_fp8(x)
    h = torch.empty(T * k, inter, dtype=x.dtype, device=x.device)  # rows of other ranks' pairs: never read
    _moe_up_fp8_tiles_kernel[(tiles, triton.cdiv(inter, bn))](
        x, order, tile_expert, tile_row, bounds, w13.view(torch.uint8), s13, h, H, inter, k,
        x.stride(0), w13.stride(0), w13.stride(1), s13.stride(0), s13.stride(1), h.stride(0),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, NATIVE=native, IEEE=ieee, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    out = torch.zeros(T, k, H, dtype=torch.float32, device=x.device)  # other ranks' pairs stay zero
    _moe_down_fp8_tiles_kernel[(tiles, triton.cdiv(H, bn))](
        h, order, tile_expert, tile_row, bounds, weights, w2.view(torch.uint8), s2, out, H, inter, k,
        h.stride(0), w2.stride(0), w2.stride(1), s2.stride(0), s2.stride(1), out.stride(0), out.stride(1),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, NATIVE=native, IEEE=ieee, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


def _moe_fp8_act_tiles(x, ids, weights, w13, s13, w2, s2, expert_offset: int, n_local: int, config=None):
    T, H = x.shape
    k = ids.shape[1]
    inter = w2.shape[-1]
    bm, bn, warps, stages = config or (MOE_FP8_TILES_SMALL if T * k <= 16 * n_local else MOE_FP8_TILES_LARGE)
    order, bounds, tile_expert, tile_row = expert_tiles(ids.reshape(-1) - expert_offset, n_local, bm)
    tiles = tile_expert.numel()
    xq, xs = act_quant(x)  # once per token: every expert it chose reads the same quantized row
    hq = torch.empty(T * k, inter, dtype=w13.dtype, device=x.device)  # rows of other ranks' pairs: never read
    hs = torch.empty(T * k, inter // GROUP, dtype=torch.float32, device=x.device)
    _moe_up_fp8_act_tiles_kernel[(tiles, inter // GROUP)](
        xq, xs, order, tile_expert, tile_row, bounds, w13, s13, hq, hs, H, inter, k,
        xq.stride(0), xs.stride(0), w13.stride(0), w13.stride(1), s13.stride(0), s13.stride(1), hq.stride(0),
        hs.stride(0), BLOCK_M=bm, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    out = torch.zeros(T, k, H, dtype=torch.float32, device=x.device)  # other ranks' pairs stay zero
    _moe_down_fp8_act_tiles_kernel[(tiles, triton.cdiv(H, bn))](
        hq, hs, order, tile_expert, tile_row, bounds, weights, w2, s2, out, H, inter, k,
        hq.stride(0), hs.stride(0), w2.stride(0), w2.stride(1), s2.stride(0), s2.stride(1), out.stride(0),
        out.stride(1), BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


def moe_fp8_reference(
    x, ids, weights, w13, s13, w2, s2, expert_offset: int, n_local: int, shared=None
) -> torch.Tensor:  # fmt: skip
    """Each (token, expert) pair against its gathered, dequantized expert weights (runtime.kernels.moe_decode),
    and the shared experts dequantized as slot k: what the weight-only kernels compute."""
    e = (ids.reshape(-1) - expert_offset).clamp(0, n_local - 1).unique()
    full13 = torch.zeros(n_local, *w13.shape[1:], dtype=x.dtype, device=x.device)
    full2 = torch.zeros(n_local, *w2.shape[1:], dtype=x.dtype, device=x.device)
    full13[e] = _dequant(w13[e], s13[e]).to(x.dtype)
    full2[e] = _dequant(w2[e], s2[e]).to(x.dtype)
    plain = None
    if shared is not None:
        plain = tuple(_dequant(w, s).to(x.dtype) for w, s in zip(shared[::2], shared[1::2], strict=True))
    return moe_decode_reference(x, ids, weights, full13, full2, plain, expert_offset, n_local)


def moe_fp8_act_reference(x, ids, weights, w13, s13, w2, s2, expert_offset: int, n_local: int) -> torch.Tensor:
    """What the ``fp8_tiles`` kernel computes, in fp32: the activations and the intermediate quantized per
    1×128 group (:func:`runtime.kernels.fp8.act_quant_reference`), the weights dequantized."""
    T, H = x.shape
    k = ids.shape[1]
    xd = _act_dequant(*act_quant_reference(x.float()))
    local = ids - expert_offset
    valid = (local >= 0) & (local < n_local)
    e = local.clamp(0, n_local - 1).reshape(-1)
    w13d, w2d = _dequant(w13[e], s13[e]), _dequant(w2[e], s2[e])  # [T·k, ...]
    gu = torch.bmm(w13d, xd.repeat_interleave(k, dim=0)[:, :, None]).squeeze(-1)
    g, u = gu.chunk(2, dim=-1)
    h = _act_dequant(*act_quant_reference(F.silu(g) * u))
    out = torch.bmm(w2d, h[:, :, None]).view(T, k, H)
    return torch.where(valid[..., None], out * weights.float()[..., None], 0.0)


def moe_fp8_kernel(x: torch.Tensor) -> str:
    """Which kernel a step of ``x``'s token count runs (module docstring)."""
    T = x.shape[0]
    if T <= MOE_BY_PAIR_MAX_TOKENS:
        return "pairs"
    if MOE_FP8_ACT_MIN_TOKENS is not None and T >= MOE_FP8_ACT_MIN_TOKENS and native_fp8(x):
        return "fp8_tiles"
    if (MOE_TILES_MIN_TOKENS is not None and T >= MOE_TILES_MIN_TOKENS) or T > MOE_BY_EXPERT_MAX_TOKENS:
        return "tiles"
    return "experts"


KERNELS = {
    "pairs": _moe_fp8_pairs,
    "experts": _moe_fp8_experts,
    "tiles": _moe_fp8_tiles,
    "fp8_tiles": _moe_fp8_act_tiles,
}


def moe_fp8_triton(
    x, ids, weights, w13, s13, w2, s2, expert_offset: int, n_local: int, shared=None, kernel: str | None = None
):  # fmt: skip
    """The routed experts through the kernel :func:`moe_fp8_kernel` picks, or ``kernel`` (a key of
    :data:`KERNELS`); ``shared`` as in :func:`_moe_fp8_pairs`, which runs it in its own launches (the other
    kernels leave it to three weight-only products)."""
    x, ids, weights = x.contiguous(), ids.contiguous(), weights.contiguous()
    kernel = kernel or moe_fp8_kernel(x)
    if kernel == "pairs":
        return _moe_fp8_pairs(x, ids, weights, w13, s13, w2, s2, expert_offset, n_local, shared)
    out = KERNELS[kernel](x, ids, weights, w13, s13, w2, s2, expert_offset, n_local)
    return out if shared is None else torch.cat([out, _shared_fp8(x, shared)[:, None]], dim=1)


@torch.library.custom_op("moefleet::moe_fp8", mutates_args=())
def moe_fp8(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    w13: torch.Tensor,
    s13: torch.Tensor,
    w2: torch.Tensor,
    s2: torch.Tensor,
    expert_offset: int,
    n_local: int,
    shared_gate: torch.Tensor | None = None,
    shared_gate_scale: torch.Tensor | None = None,
    shared_up: torch.Tensor | None = None,
    shared_up_scale: torch.Tensor | None = None,
    shared_down: torch.Tensor | None = None,
    shared_down_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """fp32 ``[T, k (+1), H]``: each routed expert's output times its weight, and with the ``shared_*`` FP8
    weights the shared experts' output as one more slot, for the caller to sum. Where Triton does not run,
    the weight-only reference (the CPU path dequantizes)."""
    shared = None
    if shared_gate is not None:
        shared = (shared_gate, shared_gate_scale, shared_up, shared_up_scale, shared_down, shared_down_scale)
    fn = moe_fp8_triton if triton_usable(x) else moe_fp8_reference
    return fn(x, ids, weights, w13, s13, w2, s2, expert_offset, n_local, shared)


@moe_fp8.register_fake
def _(
    x, ids, weights, w13, s13, w2, s2, expert_offset, n_local,
    shared_gate=None, shared_gate_scale=None, shared_up=None, shared_up_scale=None, shared_down=None,
    shared_down_scale=None,
):  # fmt: skip
    slots = ids.shape[1] + (0 if shared_gate is None else 1)
    return x.new_empty(x.shape[0], slots, x.shape[1], dtype=torch.float32)
