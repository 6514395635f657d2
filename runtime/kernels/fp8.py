"""Kernels for block-scaled FP8 weights (:mod:`runtime.quant.fp8`: e4m3, one fp32 scale per 128×128 block).

* :func:`fp8_gemm` - prefill on FP8 tensor cores (sm89 / sm90): the activations are quantized on the fly,
  one scale per token and 128 input features (:func:`act_quant`, DeepSeek's ``activation_scheme:
  dynamic``), then each 128-wide K step is one FP8 ``tl.dot`` whose fp32 result is scaled by the token's
  and the weight block's scales before it joins the accumulator.
* :func:`w8_linear` - weight-only: reads the FP8 weight and its block scales, dequantizes in registers and
  multiplies in the activations' dtype (bf16 tensor cores; the Ampere path, and decode everywhere, where
  reading the weight's bytes is the cost): a GEMV-shaped kernel up to :data:`GEMV_MAX_TOKENS` tokens, a
  ``tl.dot`` kernel above (and from two tokens with :data:`W8_SKINNY_CONFIG`, a 16-row tile in place of
  the GEMV's token loop).
* :func:`moe_decode_fp8` - :mod:`runtime.kernels.moe_decode`'s two launches over FP8 expert stacks.

Each is a ``torch.library`` custom op (Triton where :func:`runtime.kernels.triton_usable`, the
dequantizing reference elsewhere); :func:`runtime.execution.fp8_linear_path` picks between the first two by
hardware and token count. K steps are whole scale blocks (128) wide, so a partial last block is masked and
needs no special case.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from runtime.kernels import HAS_TRITON, INTERPRET, triton_usable
from runtime.kernels.moe_decode import moe_decode_reference

FP8_MAX = 448.0
GROUP = 128  # activation quantization group = the weight's scale block along K
GEMV_MAX_TOKENS = 16  # up to this many tokens the weight-only path is the GEMV-shaped kernel
# (BLOCK_M, BLOCK_N, num_warps, num_stages)
GEMM_CONFIG = (64, 128, 4, 3)
# weight-only tl.dot kernel: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); BLOCK_K whole scale blocks
W8_GEMM_CONFIG = (64, 128, 128, 4, 3)
# the same kernel for 2..GEMV_MAX_TOKENS tokens in place of the GEMV (None: the GEMV): on an H100 a 16-row
# tensor-core tile ran 1.5-2.2x faster than the GEMV's loop over tokens at 8 tokens
W8_SKINNY_CONFIG: tuple[int, int, int, int, int] | None = (16, 32, 256, 4, 3)
# GEMV: (BLOCK_N, BLOCK_K, num_warps, num_stages); BLOCK_K a multiple of the 128 scale block. The defaults
# here are the launch sweep's best on an H100 (benchmarks/fp8_gpu.py --tune; docs/benchmarks.md)
GEMV_CONFIG = (4, 512, 1, 3)
ACT_QUANT_BLOCK_T = 16
MOE_BLOCK_N = 8
MOE_BLOCK_K = 512
MOE_NUM_WARPS = 1
# up to this many tokens the FP8 MoE decode kernel runs a program per (token, expert) pair; above, per expert
# (each expert's weights read about once per step however many of the batch's tokens chose it)
MOE_BY_PAIR_MAX_TOKENS = 16
# the tensor-core kernel over tiles of one expert's pairs: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages),
# the small tile while experts average at most 16 pairs (decode batches), the large one above (prefill)
MOE_TILES_SMALL = (16, 64, 256, 4, 3)
MOE_TILES_LARGE = (64, 128, 128, 4, 3)
# from this many tokens the FP8 MoE kernel is the tile kernel; None: the per-expert one above
# MOE_BY_PAIR_MAX_TOKENS. The interpreter checks both; a launch sweep (benchmarks/fp8_gpu.py --tune) times
# them on the card and turns the tiles on where they win
MOE_TILES_MIN_TOKENS: int | None = None


@functools.cache
def _has_fp8_conversion(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (8, 9)


def native_fp8(t: torch.Tensor) -> bool:
    """Whether the kernels convert e4m3 with the GPU's own instruction (sm89+) rather than bit placement."""
    return t.device.type == "cuda" and not INTERPRET and _has_fp8_conversion(t.device.index or 0)


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _e4m3_to_f32(b):
        """e4m3fn bytes (uint8) → fp32 by bit placement: sign and the 7 exponent / mantissa bits moved into an
        fp16's, times 2^8 for the exponent biases' difference (exact, subnormals included). Integer ops only,
        so the weight-only kernels run where Triton has no fp8 type (Ampere) as well as on Hopper."""
        h = ((b & 0x80).to(tl.uint16) << 8) | ((b & 0x7F).to(tl.uint16) << 7)
        return h.to(tl.float16, bitcast=True).to(tl.float32) * 256.0

    @triton.jit
    def _decode_e4m3(b, NATIVE: tl.constexpr):
        """e4m3fn bytes → fp32: the hardware conversion where the GPU has FP8 (sm89+), bit placement elsewhere
        (Ampere, the interpreter)."""
        if NATIVE:
            return b.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        return _e4m3_to_f32(b)

    @triton.jit
    def _act_quant_kernel(x_ptr, q_ptr, s_ptr, T, K, sx, sq, ss, BLOCK_T: tl.constexpr, GROUP_K: tl.constexpr):
        """One program per (block of BLOCK_T tokens, 128-wide group): enough work per program that launching
        a program per group of every token does not dominate (prefill quantizes T × K/128 groups)."""
        offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        g = tl.program_id(1)
        offs = g * GROUP_K + tl.arange(0, GROUP_K)
        m = (offs_t < T)[:, None] & (offs < K)[None, :]
        x = tl.load(x_ptr + offs_t[:, None] * sx + offs[None, :], mask=m, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=1)
        s = tl.where(amax > 0, amax / 448.0, 1.0)
        q = tl.clamp(x / s[:, None], -448.0, 448.0)
        tl.store(q_ptr + offs_t[:, None] * sq + offs[None, :], q.to(q_ptr.dtype.element_ty), mask=m)
        tl.store(s_ptr + offs_t * ss + g, s, mask=offs_t < T)

    @triton.jit
    def _fp8_gemm_kernel(
        a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, M, N, K,
        sam, sak, sasm, bsn, bsk, sbsn, sbsk, scm, scn,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask, n_mask = offs_m < M, offs_n < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for kb in range(0, tl.cdiv(K, BLOCK_K)):
            offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            # masked lanes must read zero: an arbitrary byte may be an e4m3 NaN
            a = tl.load(
                a_ptr + offs_m[:, None] * sam + offs_k[None, :] * sak, mask=m_mask[:, None] & k_mask[None, :], other=0.0
            )
            b = tl.load(
                b_ptr + offs_n[:, None] * bsn + offs_k[None, :] * bsk, mask=n_mask[:, None] & k_mask[None, :], other=0.0
            )
            a_s = tl.load(as_ptr + offs_m * sasm + kb, mask=m_mask, other=0.0)
            b_s = tl.load(bs_ptr + (offs_n // BLOCK_K) * sbsn + kb * sbsk, mask=n_mask, other=0.0)
            acc += tl.dot(a, tl.trans(b)) * a_s[:, None] * b_s[None, :]
        c = c_ptr + offs_m[:, None] * scm + offs_n[None, :] * scn
        tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])

    @triton.jit
    def _w8_gemm_kernel(
        a_ptr, b_ptr, bs_ptr, c_ptr, M, N, K,
        sam, sak, bsn, bsk, sbsn, sbsk, scm, scn,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
        NATIVE: tl.constexpr,
    ):  # fmt: skip
        """A K step spans BLOCK_K // 128 scale blocks: the weight tile is dequantized block by block (a
        reshape), then one ``tl.dot`` in the activations' dtype."""
        GROUPS: tl.constexpr = BLOCK_K // 128
        n_groups = tl.cdiv(K, 128)
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask, n_mask = offs_m < M, offs_n < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for kb in range(0, tl.cdiv(K, BLOCK_K)):
            offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            a = tl.load(
                a_ptr + offs_m[:, None] * sam + offs_k[None, :] * sak, mask=m_mask[:, None] & k_mask[None, :], other=0.0
            )
            b = tl.load(
                b_ptr + offs_n[:, None] * bsn + offs_k[None, :] * bsk, mask=n_mask[:, None] & k_mask[None, :], other=0
            )
            offs_g = kb * GROUPS + tl.arange(0, GROUPS)
            b_s = tl.load(
                bs_ptr + (offs_n // 128)[:, None] * sbsn + offs_g[None, :] * sbsk,
                mask=n_mask[:, None] & (offs_g < n_groups)[None, :], other=0.0,
            )  # fmt: skip
            b = tl.reshape(_decode_e4m3(b, NATIVE), [BLOCK_N, GROUPS, 128]) * b_s[:, :, None]
            b = tl.reshape(b, [BLOCK_N, BLOCK_K]).to(a.dtype)
            if IEEE:
                acc += tl.dot(a, tl.trans(b), input_precision="ieee")
            else:
                acc += tl.dot(a, tl.trans(b))
        c = c_ptr + offs_m[:, None] * scm + offs_n[None, :] * scn
        tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])

    @triton.jit
    def _w8_gemv_kernel(
        x_ptr, w_ptr, s_ptr, y_ptr, T, N, K,
        sxt, sxk, swn, swk, ssn, ssk, syt, syn,
        BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NATIVE: tl.constexpr,
    ):  # fmt: skip
        """Each K step covers BLOCK_K // 128 scale blocks (wide loads keep enough bytes in flight for the
        bandwidth); the weight tile is dequantized once per step and serves every token."""
        GROUPS: tl.constexpr = BLOCK_K // 128
        nb = tl.program_id(0)
        offs_t = tl.arange(0, BLOCK_T)
        offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        n_groups = tl.cdiv(K, 128)
        acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            w = tl.load(
                w_ptr + offs_n[:, None] * swn + offs_k[None, :] * swk, mask=n_mask[:, None] & k_mask[None, :], other=0
            )
            offs_g = k0 // 128 + tl.arange(0, GROUPS)
            s = tl.load(
                s_ptr + (offs_n // 128)[:, None] * ssn + offs_g[None, :] * ssk,
                mask=n_mask[:, None] & (offs_g < n_groups)[None, :], other=0.0,
            )  # fmt: skip
            wf = _decode_e4m3(w, NATIVE)
            wf = tl.reshape(tl.reshape(wf, [BLOCK_N, GROUPS, 128]) * s[:, :, None], [BLOCK_N, BLOCK_K])
            for t in tl.static_range(BLOCK_T):  # padding tokens (t >= T) read the last real one, never stored
                xt = tl.load(x_ptr + tl.minimum(t, T - 1) * sxt + offs_k * sxk, mask=k_mask, other=0.0).to(tl.float32)
                part = tl.sum(wf * xt[None, :], axis=1)
                acc += tl.where(offs_t[:, None] == t, part[None, :], 0.0)
        y = y_ptr + offs_t[:, None] * syt + offs_n[None, :] * syn
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=(offs_t < T)[:, None] & n_mask[None, :])

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
    def _moe_up_fp8_kernel(
        x_ptr, ids_ptr, w_ptr, s_ptr, h_ptr, H, inter, top_k, expert_offset, n_local,
        sx, swe, swn, sse, ssn, sh,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NATIVE: tl.constexpr,
    ):  # fmt: skip
        p = tl.program_id(0)
        nb = tl.program_id(1)
        offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < inter
        t = p // top_k
        e = tl.load(ids_ptr + p) - expert_offset
        valid = (e >= 0) & (e < n_local)
        e = tl.where(valid, e, 0).to(tl.int64)  # e × expert stride passes 2^31 (V3: 256 experts)
        k_end = tl.where(valid, H, 0)
        w, s = w_ptr + e * swe, s_ptr + e * sse
        g = _scaled_rows(x_ptr + t * sx, w, s, offs_n, n_mask, k_end, H, swn, ssn, BLOCK_N, BLOCK_K, NATIVE)
        u = _scaled_rows(x_ptr + t * sx, w, s, offs_n + inter, n_mask, k_end, H, swn, ssn, BLOCK_N, BLOCK_K, NATIVE)
        h = g / (1.0 + tl.exp(-g)) * u
        tl.store(h_ptr + p * sh + offs_n, h.to(h_ptr.dtype.element_ty), mask=n_mask)

    @triton.jit
    def _moe_down_fp8_kernel(
        h_ptr, ids_ptr, wts_ptr, w_ptr, s_ptr, out_ptr, H, inter, top_k, expert_offset, n_local,
        sh, swe, swn, sse, ssn, sot, sos,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NATIVE: tl.constexpr,
    ):  # fmt: skip
        t = tl.program_id(0)
        nb = tl.program_id(1)
        j = tl.program_id(2)
        offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < H
        p = t * top_k + j
        e = tl.load(ids_ptr + p) - expert_offset
        valid = (e >= 0) & (e < n_local)
        e = tl.where(valid, e, 0).to(tl.int64)  # e × expert stride passes 2^31 (V3: 256 experts)
        wt = tl.load(wts_ptr + p).to(tl.float32)
        part = _scaled_rows(
            h_ptr + p * sh, w_ptr + e * swe, s_ptr + e * sse, offs_n, n_mask, tl.where(valid, inter, 0), inter,
            swn, ssn, BLOCK_N, BLOCK_K, NATIVE,
        )  # fmt: skip
        tl.store(out_ptr + t * sot + j * sos + offs_n, wt * part, mask=n_mask)

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
            g = _scaled_rows(x_row, w, s, offs_n, n_mask, H, H, swn, ssn, BLOCK_N, BLOCK_K, NATIVE)
            u = _scaled_rows(x_row, w, s, offs_n + inter, n_mask, H, H, swn, ssn, BLOCK_N, BLOCK_K, NATIVE)
            h = g / (1.0 + tl.exp(-g)) * u
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
        wt = tl.load(wts_ptr + p, mask=m_mask, other=0.0).to(tl.float32)
        out = out_ptr + (p // top_k)[:, None] * sot + (p % top_k)[:, None] * sos + offs_n[None, :]
        tl.store(out, acc * wt[:, None], mask=m_mask[:, None] & n_mask[None, :])


# ---- activation quantization --------------------------------------------------------------------------


def act_quant_reference(x: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [T, K] → (e4m3 [T, K], fp32 scales [T, ceil(K/group)]): each token's 1×group slice's absmax → 448."""
    T, K = x.shape
    n = -(-K // group)
    xp = F.pad(x.float(), (0, n * group - K)).view(T, n, group)
    amax = xp.abs().amax(dim=-1)
    s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (xp / s[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(T, n * group)[:, :K].contiguous(), s


def act_quant(x: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    if not triton_usable(x):
        return act_quant_reference(x, group)
    x = x if x.stride(-1) == 1 else x.contiguous()  # the kernel walks a row with unit stride
    T, K = x.shape
    n = -(-K // group)
    q = torch.empty(T, K, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(T, n, dtype=torch.float32, device=x.device)
    if T:
        bt = min(ACT_QUANT_BLOCK_T, triton.next_power_of_2(T))
        _act_quant_kernel[(triton.cdiv(T, bt), n)](
            x, q, s, T, K, x.stride(0), q.stride(0), s.stride(0), BLOCK_T=bt, GROUP_K=group
        )
    return q, s


def _dequant(w: torch.Tensor, s: torch.Tensor, block: int = GROUP) -> torch.Tensor:
    rows = s.float().repeat_interleave(block, dim=-2)[..., : w.shape[-2], :]
    return w.float() * rows.repeat_interleave(block, dim=-1)[..., : w.shape[-1]]


# ---- FP8 GEMM (prefill, sm89+) ------------------------------------------------------------------------


def fp8_gemm_reference(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """What :func:`fp8_gemm` computes, in fp32: the activations quantized per 1×128 group, times the
    dequantized weight."""
    q, qs = act_quant_reference(x)
    return _act_dequant(q, qs) @ _dequant(w, s).T


def _act_dequant(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return q.float() * s.repeat_interleave(GROUP, dim=-1)[:, : q.shape[-1]]


def fp8_gemm_triton(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, config=None) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1])
    M, K = x.shape
    N = w.shape[0]
    # Triton's interpreter converts fp32 → e4m3 without the carry when rounding up to a power of two (124.3 →
    # 64, not 128); the GPU's conversion rounds to nearest even. Interpreted, the activations are quantized
    # by torch so the GEMM itself is what is checked.
    q, qs = act_quant_reference(x) if INTERPRET else act_quant(x)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M and N:
        bm, bn, warps, stages = config or GEMM_CONFIG
        _fp8_gemm_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](
            q, qs, w, s, y, M, N, K, q.stride(0), q.stride(1), qs.stride(0), w.stride(0), w.stride(1),
            s.stride(0), s.stride(1), y.stride(0), y.stride(1),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=GROUP, num_warps=warps, num_stages=stages,
        )  # fmt: skip
    return y


def _blockwise_scaling():
    """torch's names for DeepSeek's scaling (1×128 activations, 128×128 weights), or None before torch had
    blockwise-scaled ``F.scaled_mm``."""
    st = getattr(F, "ScalingType", None)
    if st is None or not hasattr(F, "scaled_mm"):
        return None
    for act, wgt in (("BlockWise1x128", "BlockWise128x128"), ("Blockwise_1x128", "Blockwise_128x128")):
        if hasattr(st, act) and hasattr(st, wgt):
            return getattr(st, act), getattr(st, wgt)
    return None


_SCALED_MM_FAILED: list[str] = []  # the first failure's message; then every call takes the Triton GEMM


def scaled_mm_usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """cuBLAS's blockwise FP8 GEMM (via ``F.scaled_mm``): Hopper, a torch that has it, whole K blocks."""
    return (
        not _SCALED_MM_FAILED
        and not INTERPRET
        and x.device.type == "cuda"
        and torch.cuda.get_device_capability(x.device) == (9, 0)
        and x.shape[-1] % (4 * GROUP) == 0  # cuBLAS wants K's scale blocks in fours (else a ValueError)
        and _blockwise_scaling() is not None
    )


def fp8_gemm_scaled_mm(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The same product through cuBLAS (faster than the Triton GEMM on an H100: benchmarks/fp8_gpu.py);
    activation scales go outer-dim-major, as cuBLAS reads them."""
    act, wgt = _blockwise_scaling()
    q, qs = act_quant(x)
    return F.scaled_mm(q, w.t(), qs.t().contiguous().t(), act, s.t(), wgt, output_dtype=x.dtype)


@torch.library.custom_op("moefleet::fp8_gemm", mutates_args=())
def fp8_gemm(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``x [T, K] @ dequant(w [N, K], s).T`` on FP8 tensor cores, ``x`` quantized per 1×128 group: cuBLAS
    where it has the blockwise GEMM, else the Triton kernel (a cuBLAS refusal falls back once, for good)."""
    if not triton_usable(x):
        return fp8_gemm_reference(x, w, s).to(x.dtype)
    if scaled_mm_usable(x, w):
        try:
            return fp8_gemm_scaled_mm(x, w, s)
        except (RuntimeError, TypeError, ValueError, NotImplementedError) as exc:
            _SCALED_MM_FAILED.append(f"{type(exc).__name__}: {exc}"[:300])
    return fp8_gemm_triton(x, w, s)


@fp8_gemm.register_fake
def _(x, w, s):
    return x.new_empty(x.shape[0], w.shape[0])


# ---- weight-only ---------------------------------------------------------------------------------------


def w8_linear_reference(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return F.linear(x, _dequant(w, s).to(x.dtype))


def w8_linear_triton(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, config=None) -> torch.Tensor:
    """``config`` forces a kernel: four values the GEMV's, five the ``tl.dot`` kernel's."""
    M, K = x.shape
    N = w.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if not (M and N):
        return y
    wb = w.view(torch.uint8)  # the kernels decode e4m3 bytes themselves (any GPU generation)
    if config is None:
        if M > GEMV_MAX_TOKENS:
            config = W8_GEMM_CONFIG
        else:
            config = W8_SKINNY_CONFIG if M > 1 and W8_SKINNY_CONFIG is not None else GEMV_CONFIG
    if len(config) == 4:
        bn, bk, warps, stages = config
        _w8_gemv_kernel[(triton.cdiv(N, bn),)](
            x, wb, s, y, M, N, K, x.stride(0), x.stride(1), w.stride(0), w.stride(1), s.stride(0), s.stride(1),
            y.stride(0), y.stride(1), BLOCK_T=triton.next_power_of_2(M), BLOCK_N=bn, BLOCK_K=bk,
            NATIVE=native_fp8(x), num_warps=warps, num_stages=stages,
        )  # fmt: skip
        return y
    bm, bn, bk, warps, stages = config
    _w8_gemm_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](
        x, wb, s, y, M, N, K, x.stride(0), x.stride(1), w.stride(0), w.stride(1), s.stride(0), s.stride(1),
        y.stride(0), y.stride(1), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, IEEE=x.dtype == torch.float32,
        NATIVE=native_fp8(x), num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return y


@torch.library.custom_op("moefleet::w8_linear", mutates_args=())
def w8_linear(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``x [T, K] @ dequant(w [N, K], s).T`` reading the FP8 weight, the product in ``x``'s dtype."""
    if triton_usable(x):
        return w8_linear_triton(x, w, s)
    return w8_linear_reference(x, w, s)


@w8_linear.register_fake
def _(x, w, s):
    return x.new_empty(x.shape[0], w.shape[0])


# ---- the experts at decode -----------------------------------------------------------------------------


def _moe_decode_fp8_by_expert(x, ids, weights, w13, s13, w2, s2, expert_offset: int, n_local: int) -> torch.Tensor:
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


def moe_decode_fp8_reference(x, ids, weights, w13, s13, w2, s2, expert_offset: int, n_local: int) -> torch.Tensor:
    """Each (token, expert) pair against its gathered, dequantized expert weights (runtime.kernels.moe_decode)."""
    e = (ids.reshape(-1) - expert_offset).clamp(0, n_local - 1).unique()
    full13 = torch.zeros(n_local, *w13.shape[1:], dtype=x.dtype, device=x.device)
    full2 = torch.zeros(n_local, *w2.shape[1:], dtype=x.dtype, device=x.device)
    full13[e] = _dequant(w13[e], s13[e]).to(x.dtype)
    full2[e] = _dequant(w2[e], s2[e]).to(x.dtype)
    return moe_decode_reference(x, ids, weights, full13, full2, None, expert_offset, n_local)


def moe_decode_fp8_triton(
    x, ids, weights, w13, s13, w2, s2, expert_offset: int, n_local: int, by_expert: bool | None = None,
    tiles: bool | None = None,
) -> torch.Tensor:  # fmt: skip
    """Two launches. Up to MOE_BY_PAIR_MAX_TOKENS tokens one program per (pair, row block), each reading its
    expert's rows; above, one program per (expert, row block) looping over its pairs on CUDA cores, or from
    MOE_TILES_MIN_TOKENS (``tiles``) one program per (tile of one expert's pairs, row block) on tensor
    cores: either way a batch reads each chosen expert from DRAM about once. ``by_expert`` forces the first
    two."""
    T, H = x.shape
    k = ids.shape[1]
    inter = w2.shape[-1]
    x, ids, weights = x.contiguous(), ids.contiguous(), weights.contiguous()
    many = T > MOE_BY_PAIR_MAX_TOKENS
    if tiles is None:
        tiles = by_expert is None and MOE_TILES_MIN_TOKENS is not None and T >= MOE_TILES_MIN_TOKENS
    if tiles:
        return _moe_fp8_tiles(x, ids, weights, w13, s13, w2, s2, expert_offset, n_local)
    if by_expert if by_expert is not None else many:
        return _moe_decode_fp8_by_expert(x, ids, weights, w13, s13, w2, s2, expert_offset, n_local)
    h = torch.empty(T * k, inter, dtype=x.dtype, device=x.device)
    _moe_up_fp8_kernel[(T * k, triton.cdiv(inter, MOE_BLOCK_N))](
        x, ids, w13.view(torch.uint8), s13, h, H, inter, k, expert_offset, n_local,
        x.stride(0), w13.stride(0), w13.stride(1), s13.stride(0), s13.stride(1), h.stride(0),
        BLOCK_N=MOE_BLOCK_N, BLOCK_K=MOE_BLOCK_K, NATIVE=native_fp8(x), num_warps=MOE_NUM_WARPS, num_stages=3,
    )  # fmt: skip
    out = torch.empty(T, k, H, dtype=torch.float32, device=x.device)
    _moe_down_fp8_kernel[(T, triton.cdiv(H, MOE_BLOCK_N), k)](
        h, ids, weights, w2.view(torch.uint8), s2, out, H, inter, k, expert_offset, n_local,
        h.stride(0), w2.stride(0), w2.stride(1), s2.stride(0), s2.stride(1), out.stride(0), out.stride(1),
        BLOCK_N=MOE_BLOCK_N, BLOCK_K=MOE_BLOCK_K, NATIVE=native_fp8(x), num_warps=MOE_NUM_WARPS, num_stages=3,
    )  # fmt: skip
    return out


@torch.library.custom_op("moefleet::moe_decode_fp8", mutates_args=())
def moe_decode_fp8(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    w13: torch.Tensor,
    s13: torch.Tensor,
    w2: torch.Tensor,
    s2: torch.Tensor,
    expert_offset: int,
    n_local: int,
) -> torch.Tensor:
    """Routed experts only (shared experts run as their own FP8 linears): fp32 ``[T, k, H]``, each routed
    expert's output times its weight, for the caller to sum."""
    fn = moe_decode_fp8_triton if triton_usable(x) else moe_decode_fp8_reference
    return fn(x, ids, weights, w13, s13, w2, s2, expert_offset, n_local)


@moe_decode_fp8.register_fake
def _(x, ids, weights, w13, s13, w2, s2, expert_offset, n_local):
    return x.new_empty(x.shape[0], ids.shape[1], x.shape[1], dtype=torch.float32)
