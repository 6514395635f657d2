"""The FP8 kernels against their references; run as ``python -m tests.runtime.fp8_kernel_checks DEVICE``.

On the CPU under ``TRITON_INTERPRET=1`` (fp32, the interpreter runs the Triton code itself; tolerance 1e-5)
from tests/runtime/test_fp8_kernels.py, and as is on a GPU (bf16 activations; tolerance 2e-2, the bf16
products' rounding). Shapes have partial last blocks (K, N not multiples of 128) and token counts on both
sides of the weight-only kernel's GEMV / GEMM switch."""

from __future__ import annotations

import sys

import torch

from runtime.kernels import fp8 as k8
from runtime.quant.fp8 import quantize


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def main(device: str) -> None:
    torch.manual_seed(0)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    tol = 1e-5 if device == "cpu" else 2e-2
    worst: dict[str, float] = {}

    def check(what: str, got: torch.Tensor, ref: torch.Tensor, limit: float = tol) -> None:
        err = rel(got, ref)
        assert err <= limit, (what, err)
        worst[what.split()[0]] = max(worst.get(what.split()[0], 0.0), err)

    # activation quantization: exactly the reference's scales and bytes, except that Triton's interpreter
    # converts fp32 → e4m3 without the carry when rounding up to a power of two (the GPU rounds correctly)
    x = torch.randn(5, 300, device=device) * 3
    q, s = k8.act_quant(x)
    rq, rs = k8.act_quant_reference(x)
    assert torch.equal(s, rs), "act_quant scales"
    differ = q.view(torch.uint8) != rq.view(torch.uint8)
    if device == "cpu":
        r = rq.float().abs()
        differ &= ~((r > 0) & (r == 2 ** r.log2().round()))
    assert not differ.any(), ("act_quant", int(differ.sum()))

    for n, kdim in ((200, 300), (256, 136), (320, 512)):
        w, ws = quantize(torch.randn(n, kdim) / kdim**0.5)
        w, ws = w.to(device), ws.to(device)
        for t in (1, 5, 20):
            x = torch.randn(t, kdim, device=device, dtype=dtype)
            want = k8.w8_linear_reference(x.float(), w, ws)
            check(f"w8_linear {t}x{kdim}->{n}", k8.w8_linear_triton(x, w, ws), want)
            # the tensor-core kernel with K steps of several scale blocks, as the decode sweep launches it
            wide = k8.w8_linear_triton(x, w, ws, (16, 32, 256, 4, 2))
            check(f"w8_linear wide-K {t}x{kdim}->{n}", wide, want)
            if 1 < t <= k8.GEMV_MAX_TOKENS:  # what a tuned run turns on: 2..16 tokens on the tensor-core kernel
                saved, k8.W8_SKINNY_CONFIG = k8.W8_SKINNY_CONFIG, (16, 32, 256, 4, 2)
                check(f"w8_linear skinny {t}x{kdim}->{n}", k8.w8_linear_triton(x, w, ws), want)
                k8.W8_SKINNY_CONFIG = saved
            ref = k8.fp8_gemm_reference(x.float(), w, ws)
            check(f"fp8_gemm {t}x{kdim}->{n}", k8.fp8_gemm_triton(x, w, ws), ref)
            # the op as the model calls it: cuBLAS's blockwise GEMM on Hopper where K is whole blocks
            check(f"fp8_gemm_op {t}x{kdim}->{n}", k8.fp8_gemm(x, w, ws), ref)
            # FP8 activations cost e4m3's precision against the unquantized product: bounded, not zero
            check(f"fp8_act_error {t}x{kdim}->{n}", ref, k8.w8_linear_reference(x.float(), w, ws), 0.1)

    # experts at decode: 8 experts (4 on this "rank" for EP), block-aligned intermediate
    T, H, inter, E, topk = 3, 200, 128, 8, 2
    w13, s13 = quantize(torch.randn(E, 2 * inter, H) / H**0.5)
    w2, s2 = quantize(torch.randn(E, H, inter) / inter**0.5)
    w13, s13, w2, s2 = (t.to(device) for t in (w13, s13, w2, s2))
    x = torch.randn(T, H, device=device, dtype=dtype)
    ids = torch.tensor([[0, 5], [5, 2], [0, 7]], device=device)  # experts 0 and 5 serve two tokens each
    wts = torch.rand(T, topk, device=device)
    for off, nl in ((0, E), (4, 4)):
        args = (ids, wts, w13[off : off + nl], s13[off : off + nl], w2[off : off + nl], s2[off : off + nl], off, nl)
        ref = k8.moe_decode_fp8_reference(x.float(), *args)
        # per (token, expert) pair, per expert over its pairs, and tiles of an expert's pairs on tensor cores
        for kind in ({"by_expert": False}, {"by_expert": True}, {"tiles": True}):
            got = k8.moe_decode_fp8_triton(x, *args, **kind)
            check(f"moe_decode_fp8 offset {off} {kind}", got, ref)
            if off:  # pairs routed to the other rank's experts add exactly zero
                mask = ((ids - off < 0) | (ids - off >= nl))[..., None].expand_as(got)
                assert (got[mask] == 0).all(), "EP zero"

    # tiles with several per expert (and partial ones), both tile shapes
    T, topk = 37, 3
    x = torch.randn(T, H, device=device, dtype=dtype)
    ids = torch.stack([torch.randperm(E)[:topk] for _ in range(T)]).to(device)
    ids[:20, 0] = 2  # one expert with more pairs than a small tile holds
    wts = torch.rand(T, topk, device=device)
    for (off, nl), cfg in zip(((0, E), (4, 4)), ((16, 64, 256, 4, 2), (32, 128, 128, 4, 2)), strict=True):
        args = (ids, wts, w13[off : off + nl], s13[off : off + nl], w2[off : off + nl], s2[off : off + nl], off, nl)
        ref = k8.moe_decode_fp8_reference(x.float(), *args)
        check(f"moe_fp8_tiles {cfg} offset {off}", k8._moe_fp8_tiles(x, *args, config=cfg), ref)
    saved, k8.MOE_TILES_MIN_TOKENS = k8.MOE_TILES_MIN_TOKENS, T  # what a sweep that found the tiles faster sets
    try:
        check("moe_fp8_tiles by default", k8.moe_decode_fp8_triton(x, *args), ref)
    finally:
        k8.MOE_TILES_MIN_TOKENS = saved
    if device != "cpu" and k8._SCALED_MM_FAILED:
        print("cuBLAS blockwise GEMM refused, Triton used:", k8._SCALED_MM_FAILED[0])
    print("fp8 kernels ok; worst relative errors:", {k: f"{v:.1e}" for k, v in worst.items()})


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "cpu")
