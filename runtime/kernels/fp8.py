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

The routed experts over FP8 stacks are :mod:`runtime.kernels.moe_fp8`, built from the pieces here.

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

FP8_MAX = 448.0
GROUP = 128  # activation quantization group = the weight's scale block along K
GEMV_MAX_TOKENS = 16  # up to this many tokens the weight-only path is the GEMV-shaped kernel
# (BLOCK_M, BLOCK_N, num_warps, num_stages)
GEMM_CONFIG = (64, 128, 4, 3)
# weight-only tl.dot kernel: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); BLOCK_K whole scale blocks
W8_GEMM_CONFIG = (64, 128, 128, 4, 3)
# the same kernel for 2..GEMV_MAX_TOKENS tokens in place of the GEMV (None: the GEMV): on an H100 a 16-row
# tensor-core tile ran 2.7-4x faster than the GEMV's loop over tokens at 8 tokens
W8_SKINNY_CONFIG: tuple[int, int, int, int, int] | None = (16, 32, 256, 4, 3)
# GEMV: (BLOCK_N, BLOCK_K, num_warps, num_stages); BLOCK_K a multiple of the 128 scale block. The defaults
# here are the launch sweep's best on an H100 (benchmarks/fp8_gpu.py --tune; docs/benchmarks.md)
GEMV_CONFIG = (4, 512, 2, 3)
ACT_QUANT_BLOCK_T = 16


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
    def _round_e4m3(q):
        """fp32 → the nearest e4m3 value (ties to even), still fp32, for ``|q| <= 448``: the 20 low mantissa bits
        rounded away (a carry moves into the exponent), and below e4m3's normal range (2^-6) multiples of
        2^-9. The conversion that follows is then exact: the GPU's and the interpreter's agree (the
        interpreter's own rounding drops the carry: 124.3 → 64, not 128)."""
        bits = q.to(tl.int32, bitcast=True)
        normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
        a = tl.abs(q)
        subnormal = tl.where(q < 0, -1.0, 1.0) * tl.floor(a * 512.0 + 0.5) / 512.0
        return tl.where(a < 0.015625, subnormal, normal)

    @triton.jit
    def _quantize_rows(x):
        """fp32 ``[rows, group]`` → (each row in e4m3 values, still fp32; each row's scale): the row's absmax maps
        to 448 (an all-zero row keeps scale 1), as :func:`act_quant_reference` does."""
        amax = tl.max(tl.abs(x), axis=1)
        s = tl.where(amax > 0, amax / 448.0, 1.0)
        return _round_e4m3(tl.clamp(x / s[:, None], -448.0, 448.0)), s

    @triton.jit
    def _act_quant_kernel(x_ptr, q_ptr, s_ptr, T, K, sx, sq, ss, BLOCK_T: tl.constexpr, GROUP_K: tl.constexpr):
        """One program per (block of BLOCK_T tokens, 128-wide group): enough work per program that launching
        a program per group of every token does not dominate (prefill quantizes T × K/128 groups)."""
        offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        g = tl.program_id(1)
        offs = g * GROUP_K + tl.arange(0, GROUP_K)
        m = (offs_t < T)[:, None] & (offs < K)[None, :]
        x = tl.load(x_ptr + offs_t[:, None] * sx + offs[None, :], mask=m, other=0.0).to(tl.float32)
        q, s = _quantize_rows(x)
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
    q, qs = act_quant(x)
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


# cuBLAS's blockwise GEMM where it runs (False: the Triton GEMM everywhere; the benchmark compares the two)
SCALED_MM = True
# weight shapes (N, K) cuBLAS refused, with the first refusal's message: those take the Triton GEMM from then
# on. Per shape, so one odd product does not send every other one to the slower kernel.
_SCALED_MM_FAILED: dict[tuple[int, int], str] = {}


def scaled_mm_usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """cuBLAS's blockwise FP8 GEMM (via ``F.scaled_mm``): Hopper, a torch that has it, whole K blocks, two
    tokens or more (it refuses a one-token activation scale: "scale_a must have strides (1, 1)")."""
    return (
        SCALED_MM
        and tuple(w.shape) not in _SCALED_MM_FAILED
        and not INTERPRET
        and x.device.type == "cuda"
        and x.shape[0] > 1
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
    where it has the blockwise GEMM, else the Triton kernel (a shape cuBLAS refused stays with Triton)."""
    if not triton_usable(x):
        return fp8_gemm_reference(x, w, s).to(x.dtype)
    if scaled_mm_usable(x, w):
        try:
            return fp8_gemm_scaled_mm(x, w, s)
        except (RuntimeError, TypeError, ValueError, NotImplementedError) as exc:
            _SCALED_MM_FAILED[tuple(w.shape)] = f"{type(exc).__name__}: {exc}"[:300]
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
