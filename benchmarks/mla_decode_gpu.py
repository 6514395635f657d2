"""The paged MLA decode kernel alone against the gathered-copy reference, on one GPU.

    python benchmarks/mla_decode_gpu.py [--small]

For head counts 16 (V2-Lite, or a TP rank's share), 40 and 128 (DeepSeek-V2/V3 on one GPU: several head
blocks per sequence) and batch × context from 1 × 200 to 64 × 4,096, bf16: relative error of the kernel
against the fp32 reference on the same bf16 inputs, and the time of each (CUDA-graph timed). The
reference gathers each sequence's rows into a copy first, as the model's `gather` decode path does, so its
time grows with the block table's width; the kernel reads the rows in place.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.kernels.mla_decode import combine_splits, mla_decode_reference, mla_decode_triton, num_splits

R, DR, PAGE = 512, 64, 16
SCALE = (R + DR) ** -0.5


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="two small shapes (a smoke run)")
    args = ap.parse_args()
    import triton.testing

    dev = "cuda"
    shapes = [(16, 1, 200), (16, 8, 2000)] if args.small else [
        (16, 1, 200), (16, 1, 4096), (16, 8, 2000), (16, 64, 4096), (40, 8, 2000), (128, 1, 4096), (128, 64, 1024)
    ]  # fmt: skip
    print(f"card: {torch.cuda.get_device_name()}; torch {torch.__version__}; triton {triton.__version__}")
    print("| heads | batch | context | splits | rel. error | kernel µs | gather reference µs | KV bytes/s (kernel) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    g = torch.Generator(device=dev).manual_seed(0)
    for nh, B, ctx in shapes:
        width = -(-ctx // PAGE)
        n_blocks = 1 + B * width
        cache = torch.randn(n_blocks, PAGE, R + DR, device=dev, generator=g).to(torch.bfloat16)
        tables = (1 + torch.randperm(B * width, device=dev, generator=g)).view(B, width)
        lens = torch.full((B,), ctx, device=dev)
        lens[0] = max(1, ctx // 3)  # ragged: the first sequence is shorter
        q = torch.randn(B, nh, R + DR, device=dev, generator=g).to(torch.bfloat16)
        got = combine_splits(*mla_decode_triton(q, cache, tables, lens, SCALE, R))
        ref = combine_splits(*mla_decode_reference(q.float(), cache.float(), tables, lens, SCALE, R))
        err = ((got.float() - ref).norm() / ref.norm()).item()
        t_kernel = 1e3 * triton.testing.do_bench_cudagraph(
            lambda q=q, c=cache, t=tables, n=lens: combine_splits(*mla_decode_triton(q, c, t, n, SCALE, R)), rep=50
        )
        t_ref = 1e3 * triton.testing.do_bench_cudagraph(
            lambda q=q, c=cache, t=tables, n=lens: combine_splits(*mla_decode_reference(q, c, t, n, SCALE, R)), rep=50
        )
        kv_bytes = int(lens.sum()) * (R + DR) * 2
        print(
            f"| {nh} | {B} | {ctx} | {num_splits(B, width * PAGE)[0]} | {err:.1e} | {t_kernel:.1f} | {t_ref:.1f} | "
            f"{kv_bytes / t_kernel / 1e3:,.0f} GB/s |"
        )
        assert err < 2e-2, f"kernel differs from the reference by {err:.2e} at heads {nh}, batch {B}, context {ctx}"
    return 0


if __name__ == "__main__":
    sys.exit(main())
