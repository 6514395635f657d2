"""The decode step's small projections: :mod:`runtime.kernels.linear` against what PyTorch runs for them
(cuBLAS through ``F.linear`` / ``torch.bmm``), on the DeepSeek-V2-Lite shapes, in one GPU run.

Timing: one CUDA graph of many calls, each call reading another copy of the weight (≥ 128 MB of copies in
all, beyond the 50 MB L2), so every call reads its weight from HBM as a decode step's 27 layers do.

First a sweep of the kernel's launch configs (row block, K block, warps) per shape at 1 and at 8 tokens;
then per shape and token count: the default config (what the model runs), the sweep's best, and cuBLAS,
with the bytes each must read and the bandwidth that makes. Every kernel result is checked against the
PyTorch product (relative error). Prints JSON lines, then a table.

    python -m benchmarks.linear_gpu [--no-sweep]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.model_gpu import V2_LITE, copy_bandwidth, log
from runtime.kernels import linear as ln

H = V2_LITE["hidden_size"]
NH = V2_LITE["num_attention_heads"]
R, DN, DV = V2_LITE["kv_lora_rank"], V2_LITE["qk_nope_head_dim"], V2_LITE["v_head_dim"]
DR = V2_LITE["qk_rope_head_dim"]
Q_OUT = NH * (DN + DR) + R + DR
COLD_BYTES = 128e6


class Case:
    """One projection: the tokens, weight copies, and per copy the kernel's (x, w) and the PyTorch call."""

    def __init__(self, T: int, shape: tuple[int, ...], dtype, kernel_args, torch_call, read: float = 1.0) -> None:
        g = torch.Generator(device="cuda").manual_seed(T)
        one = torch.empty(shape, dtype=dtype).element_size() * torch.Size(shape).numel()
        self.bytes = one * read  # the bytes one call must read (W_UK / W_UV: half of kv_b_proj each)
        self.weights = [
            (torch.randn(shape, device="cuda", generator=g) * 0.05).to(dtype)
            for _ in range(max(2, int(COLD_BYTES // one) + 1))
        ]
        self.kernel_args, self.torch_call = kernel_args, torch_call

    def dims(self) -> tuple[int, int, int]:
        """(N, K, G) of the weight as the kernel reads it."""
        w = self.kernel_args(self.weights[0])[1]
        return (w.shape[-2], w.shape[-1], w.shape[0] if w.dim() == 3 else 1)

    def kernel(self, i: int, config=None) -> torch.Tensor:
        return ln.small_linear_triton(*self.kernel_args(self.weights[i % len(self.weights)]), config)

    def reference(self, i: int) -> torch.Tensor:
        return self.torch_call(self.weights[i % len(self.weights)])


def cases(T: int) -> dict[str, Case]:
    g = torch.Generator(device="cuda").manual_seed(100 + T)

    def rnd(*s):
        return (torch.randn(*s, device="cuda", generator=g) * 0.5).to(torch.bfloat16)

    x, xo, h = rnd(T, H), rnd(T, NH * DV), rnd(T, V2_LITE["intermediate_size"])
    q_nope = rnd(T, NH, DN + DR)[..., :DN].transpose(0, 1)  # a slice of the projection's output, per head
    o_lat = rnd(T, NH, R).transpose(0, 1)
    bf16 = torch.bfloat16
    return {
        "q+kv_a": Case(T, (Q_OUT, H), bf16, lambda w: (x, w), lambda w: F.linear(x, w)),
        "o_proj": Case(T, (H, NH * DV), bf16, lambda w: (xo, w), lambda w: F.linear(xo, w)),
        # kv_b_proj per head [nh, dn + dv, r]: W_UK = [:, :dn] read transposed, W_UV = [:, dn:]
        "W_UK": Case(
            T,
            (NH, DN + DV, R),
            bf16,
            lambda w: (q_nope, w[:, :DN].transpose(1, 2)),
            lambda w: torch.bmm(q_nope, w[:, :DN]),
            read=DN / (DN + DV),
        ),
        "W_UV": Case(
            T,
            (NH, DN + DV, R),
            bf16,
            lambda w: (o_lat, w[:, DN:]),
            lambda w: torch.bmm(o_lat, w[:, DN:].transpose(1, 2)),
            read=DV / (DN + DV),
        ),
        "router": Case(
            T, (V2_LITE["n_routed_experts"], H), torch.float32, lambda w: (x, w), lambda w: F.linear(x.float(), w)
        ),
        "dense gate": Case(T, (V2_LITE["intermediate_size"], H), bf16, lambda w: (x, w), lambda w: F.linear(x, w)),
        "dense down": Case(T, (H, V2_LITE["intermediate_size"]), bf16, lambda w: (h, w), lambda w: F.linear(h, w)),
    }


def graph_us(call: Callable[[int], object], n: int) -> float:
    """µs per call of ``call(i)`` for i = 0..n-1, captured in one CUDA graph, median of 5 replays."""
    call(0)  # compile / warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(n):
            call(i)
    graph.replay()
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / n)
    return sorted(times)[2]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-sweep", action="store_true", help="only the default config against cuBLAS")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--save", help="write the sweep's best configs here (JSON; decode_ablation_gpu --linear-configs)")
    args = ap.parse_args()
    bw = copy_bandwidth()
    log(f"card {torch.cuda.get_device_name()}, torch {torch.__version__}, copy bandwidth {bw / 1e12:.2f} TB/s")
    cands = [
        (bn, bk, nw, 1) for bn in (1, 2, 4, 8, 16) for bk in (256, 512, 1024) for nw in (1, 2, 4) if bn * bk <= 8192
    ]
    best: dict[tuple[str, int], tuple] = {}
    tuned: list[dict] = []
    with torch.inference_mode():
        if not args.no_sweep:
            for T in (1, 8):
                for name, case in cases(T).items():
                    n = len(case.weights)
                    scores = []
                    for c in cands:
                        try:
                            scores.append((graph_us(lambda i, c=c, case=case: case.kernel(i, c), n), c))
                        except Exception as exc:  # a config that does not compile is skipped
                            log(f"  {name} {c}: {type(exc).__name__}")
                    scores.sort()
                    best[(name, T)] = scores[0][1]
                    tuned.append({"shape": name, "dims": case.dims(), "tokens": T, "config": scores[0][1]})
                    if args.save:  # after each shape: a cut-short run still leaves what it found
                        Path(args.save).write_text(json.dumps(tuned))
                    log(json.dumps({"sweep": name, "T": T, "top": [(c, round(t, 2)) for t, c in scores[:6]]}))
        rows = []
        for T in args.tokens:
            for name, case in cases(T).items():
                n = len(case.weights)
                default = ln.launch_config(*case.dims(), T)
                r = {"shape": name, "T": T, "MB": case.bytes / 1e6, "roofline_us": case.bytes / bw * 1e6,
                     "cublas_us": graph_us(case.reference, n), "default": default,
                     "default_us": graph_us(case.kernel, n)}  # fmt: skip
                r["rel_err"] = rel(case.kernel(0), case.reference(0))
                c = best.get((name, T)) or best.get((name, 1 if T < 4 else 8))
                if c:
                    r["best"], r["best_us"] = c, graph_us(lambda i, c=c, case=case: case.kernel(i, c), n)
                rows.append(r)
                log(json.dumps(r))
    log("")
    log("| shape | tokens | MB | roofline µs | cuBLAS µs | kernel µs | GB/s | best config | best µs | rel err |")
    log("|---|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    for r in rows:
        log(
            f"| {r['shape']} | {r['T']} | {r['MB']:.2f} | {r['roofline_us']:.1f} | {r['cublas_us']:.1f} | "
            f"{r['default_us']:.1f} | {r['MB'] * 1e3 / r['default_us']:,.0f} | {r.get('best', '')} | "
            f"{r.get('best_us', float('nan')):.1f} | {r['rel_err']:.1e} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
