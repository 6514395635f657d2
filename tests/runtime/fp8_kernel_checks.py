"""The FP8 kernels against their references; run as ``python -m tests.runtime.fp8_kernel_checks DEVICE``.

On the CPU under ``TRITON_INTERPRET=1`` (fp32, the interpreter runs the Triton code itself; tolerance 1e-5)
from tests/runtime/test_fp8_kernels.py, and as is on a GPU (bf16 activations; tolerance 2e-2, the bf16
products' rounding). Shapes have partial last blocks (K, N not multiples of 128) and token counts on both
sides of the weight-only kernel's GEMV / GEMM switch."""

from __future__ import annotations

import sys

import torch

from runtime.kernels import fp8 as k8
from runtime.kernels import moe_fp8 as moe
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

    # activation quantization: exactly the reference's scales and bytes (the kernel rounds to e4m3 itself, so
    # the interpreter's conversion, which drops the carry of a round-up to a power of two, agrees too)
    x = torch.randn(5, 300, device=device) * 3
    q, s = k8.act_quant(x)
    rq, rs = k8.act_quant_reference(x)
    assert torch.equal(s, rs), "act_quant scales"
    differ = q.view(torch.uint8) != rq.view(torch.uint8)
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

    # the experts: 8 experts (4 on this "rank" for EP), block-aligned intermediate
    T, H, inter, E, topk = 3, 200, 128, 8, 2
    w13, s13 = quantize(torch.randn(E, 2 * inter, H) / H**0.5)
    w2, s2 = quantize(torch.randn(E, H, inter) / inter**0.5)
    w13, s13, w2, s2 = (t.to(device) for t in (w13, s13, w2, s2))
    x = torch.randn(T, H, device=device, dtype=dtype)
    ids = torch.tensor([[0, 5], [5, 2], [0, 7]], device=device)  # experts 0 and 5 serve two tokens each
    wts = torch.rand(T, topk, device=device)
    # shared experts (a partial last block of rows): slot k of the per-pair kernel, or weight-only products
    shared_inter = 200
    sg, ssg = quantize(torch.randn(shared_inter, H) / H**0.5)
    su, ssu = quantize(torch.randn(shared_inter, H) / H**0.5)
    sd, ssd = quantize(torch.randn(H, shared_inter) / shared_inter**0.5)
    shared = tuple(t.to(device) for t in (sg, ssg, su, ssu, sd, ssd))
    for off, nl in ((0, E), (4, 4)):
        args = (ids, wts, w13[off : off + nl], s13[off : off + nl], w2[off : off + nl], s2[off : off + nl], off, nl)
        ref = moe.moe_fp8_reference(x.float(), *args)
        act_ref = moe.moe_fp8_act_reference(x.float(), *args)
        shared_ref = moe.moe_fp8_reference(x.float(), *args, shared)[:, -1:]
        for kernel in moe.KERNELS:  # whatever the token count, each kernel computes the same
            got = moe.moe_fp8_triton(x, *args, kernel=kernel)
            check(f"moe_fp8_{kernel} offset {off}", got, act_ref if kernel == "fp8_tiles" else ref)
            if off:  # pairs routed to the other rank's experts add exactly zero
                mask = ((ids - off < 0) | (ids - off >= nl))[..., None].expand_as(got)
                assert (got[mask] == 0).all(), "EP zero"
            with_shared = moe.moe_fp8_triton(x, *args, shared, kernel=kernel)
            assert torch.equal(with_shared[:, :-1], got), (kernel, "routed slots change with the shared experts")
            check(f"moe_fp8_shared {kernel} offset {off}", with_shared[:, -1:], shared_ref)
        # FP8 activations cost e4m3's precision against the weight-only product: bounded, not zero
        check(f"moe_fp8_act_error offset {off}", act_ref, ref, 0.1)

    # tiles with several per expert (and partial ones), both tile shapes
    T, topk = 37, 3
    x = torch.randn(T, H, device=device, dtype=dtype)
    ids = torch.stack([torch.randperm(E)[:topk] for _ in range(T)]).to(device)
    ids[:20, 0] = 2  # one expert with more pairs than a small tile holds
    wts = torch.rand(T, topk, device=device)
    shapes = (((0, E), (16, 64, 256, 4, 2), (16, 64, 4, 2)), ((4, 4), (32, 128, 128, 4, 2), (32, 128, 4, 2)))
    for (off, nl), cfg, act_cfg in shapes:
        args = (ids, wts, w13[off : off + nl], s13[off : off + nl], w2[off : off + nl], s2[off : off + nl], off, nl)
        ref = moe.moe_fp8_reference(x.float(), *args)
        check(f"moe_fp8_tiles {cfg} offset {off}", moe._moe_fp8_tiles(x, *args, config=cfg), ref)
        act_ref = moe.moe_fp8_act_reference(x.float(), *args)
        check(f"moe_fp8_fp8_tiles {act_cfg} offset {off}", moe._moe_fp8_act_tiles(x, *args, config=act_cfg), act_ref)
    # what a sweep that found the tiles faster sets, then the FP8-activation tiles where the GPU has them
    saved = moe.MOE_TILES_MIN_TOKENS, moe.MOE_FP8_ACT_MIN_TOKENS
    try:
        moe.MOE_TILES_MIN_TOKENS = moe.MOE_FP8_ACT_MIN_TOKENS = T
        want = ("fp8_tiles", act_ref) if moe.native_fp8(x) else ("tiles", ref)
        assert moe.moe_fp8_kernel(x) == want[0], moe.moe_fp8_kernel(x)
        check(f"moe_fp8_{want[0]} by default", moe.moe_fp8_triton(x, *args), want[1])
    finally:
        moe.MOE_TILES_MIN_TOKENS, moe.MOE_FP8_ACT_MIN_TOKENS = saved
    if device != "cpu" and k8._SCALED_MM_FAILED:
        print("cuBLAS blockwise GEMM refused (weight shape: message), Triton used:", k8._SCALED_MM_FAILED)
    print("fp8 kernels ok; worst relative errors:", {k: f"{v:.1e}" for k, v in worst.items()})


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "cpu")
