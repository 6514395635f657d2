"""The decode kernels (runtime/kernels) on the CPU.

Two layers of checks, both fp32:
* the Triton code itself, run by Triton's interpreter (``TRITON_INTERPRET=1``, in a subprocess because the
  interpreter is chosen when a kernel is defined) against its PyTorch reference, over the shapes that
  exercise masking, expert parallelism, shared experts and split contexts;
* the model with each kernel's dispatch forced (the reference runs on CPU) against the general paths, eager
  and through torch.compile (the custom ops must trace), including greedy tokens and expert-load counts.
On the GPU the same comparisons run in benchmarks/model_gpu.py.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from runtime.execution import AttentionDecode, ExecutionOptions, MoEImpl, compile_failures
from runtime.kernels.mla_decode import num_splits
from runtime.loader import load_model
from tests.runtime.decoding import prefill_then_decode, rel

ROOT = Path(__file__).resolve().parents[2]

INTERPRETED = textwrap.dedent(
    """
    import torch
    from runtime.kernels import linear as ln, mla_decode as ml, moe_decode as md, router as rt

    torch.manual_seed(0)
    worst = 0.0

    def check(a, b, what):
        global worst
        err = ((a - b).abs().max() / b.abs().max()).item()
        assert err < 1e-5, (what, err)
        worst = max(worst, err)

    # MoE: odd sizes (masking), 8 experts of which this "rank" holds 4 (EP) or all, shared experts or not
    T, H, inter, E, k, shared_inter = 3, 80, 40, 8, 2, 72
    x = torch.randn(T, H)
    w13, w2 = torch.randn(E, 2 * inter, H) * 0.1, torch.randn(E, H, inter) * 0.1
    shared = (torch.randn(shared_inter, H) * 0.1, torch.randn(shared_inter, H) * 0.1,
              torch.randn(H, shared_inter) * 0.1)
    ids = torch.tensor([[0, 5], [7, 2], [4, 3]])
    wts = torch.rand(T, k)
    cases = 0
    for sh in (None, shared):
        for off, n in ((0, E), (4, 4), (0, 4)):
            args = (x, ids, wts, w13[off:off + n], w2[off:off + n], sh, off, n)
            check(md.moe_decode_triton(*args), md.moe_decode_reference(*args), ("moe", sh is None, off))
            cases += 1
    # every pair on another rank and no shared experts: exactly zero
    z = md.moe_decode_triton(x, ids.clamp(max=3), wts, w13[4:], w2[4:], None, 4, 4)
    assert z.shape == (T, k, H)
    assert torch.count_nonzero(z) == 0

    # the greedy router kernel: softmax or sigmoid, renormalised or scaled, k = 2, 3 or 6 of 8 (all but
    # two), a padded expert block (E = 6 < 8) and T = 1; the ids as a set per token (their order is free)
    for T_r, E_r in ((5, 8), (1, 6)):
        logits = torch.randn(T_r, E_r)
        for routing in (rt.Routing(2, True, True, 1.0), rt.Routing(3, False, False, 2.5),
                        rt.Routing(min(6, E_r - 2), True, False, 1.0)):
            loads = [torch.full((E_r,), 7), torch.full((E_r,), 7)]
            (ids_a, w_a), (ids_b, w_b) = (fn(logits, load, routing) for fn, load in
                                          zip((rt.route_triton, rt.route_reference), loads))
            a, b = ids_a.sort(dim=1), ids_b.sort(dim=1)
            assert torch.equal(a.values, b.values), (routing, ids_a, ids_b)
            check(w_a.gather(1, a.indices), w_b.gather(1, b.indices), ("route", routing))
            assert torch.equal(loads[0], loads[1]) and loads[0].sum() == 7 * E_r + T_r * routing.top_k, loads
            cases += 1

    # MLA: ragged contexts incl. a padded row (context 0), one split and several
    B, nh, R, Dr, page = 3, 4, 24, 8, 4  # widths below 16 and not powers of two: padded in the kernel
    cache = torch.randn(20, page, R + Dr)
    q = torch.randn(B, nh, R + Dr)
    tables = torch.randint(1, 20, (B, 6))
    ctx = torch.tensor([5, 0, 24])
    ml.BLOCK_S = 16
    for split_min in (128, 16):
        ml.SPLIT_MIN = split_min
        args = (q, cache, tables, ctx, 0.3, R)
        got = ml.combine_splits(*ml.mla_decode_triton(*args))
        check(got, ml.combine_splits(*ml.mla_decode_reference(*args)), ("mla", ml.num_splits(B, 24)))
        cases += 1
    # more heads than one program takes (40 = 3 blocks of 16, the last one partly masked)
    q40 = torch.randn(B, 40, R + Dr)
    args = (q40, cache, tables, ctx, 0.3, R)
    check(ml.combine_splits(*ml.mla_decode_triton(*args)), ml.combine_splits(*ml.mla_decode_reference(*args)), "heads")
    cases += 1

    # small linear: 1, 3 and 16 tokens; odd N (masked row blocks) and K (a masked last K block); the
    # default row block and one row per program; fp16 tokens against an fp32 weight give fp32 (the router)
    for T_l in (1, 3, 16):
        x = torch.randn(T_l, 200)
        w = torch.randn(37, 200)
        for config in (None, (1, 64, 2, 1)):
            check(ln.small_linear_triton(x, w, config), ln.small_linear_reference(x, w), ("linear", T_l, config))
            cases += 1
    xh = torch.randn(2, 200).half()
    got = ln.small_linear_triton(xh, w)
    assert got.dtype == torch.float32
    check(got, ln.small_linear_reference(xh, w), "linear fp16 x fp32")
    # per head, with the weight read transposed (W_UK's layout: no copy) and the tokens a strided view
    wg = torch.randn(3, 24, 40)  # [G, K, N] stored; read as [G, N, K]
    xg = torch.randn(5, 3, 24).transpose(0, 1)  # [G, T, K], not contiguous
    check(ln.small_linear_triton(xg, wg.transpose(1, 2)), torch.bmm(xg, wg), "linear per head")
    cases += 2
    print(f"OK {cases} cases, worst relative error {worst:.2e}")
    """
)


def test_triton_kernels_under_the_interpreter() -> None:
    pytest.importorskip("triton", reason="triton is a dev dependency (pyproject): install it")
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    r = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("OK 23 cases"), r.stdout


def test_small_linear_is_the_plain_product_off_the_gpu() -> None:
    """Where Triton does not run, the decode projections compute exactly what F.linear / bmm did before the
    kernel existed (the CPU path's numbers must not move); biased or wrapped projections keep their forward."""
    from torch import nn
    from torch.nn import functional as F

    from runtime.kernels.linear import project, small_linear

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 64, generator=g).bfloat16()
    w = torch.randn(40, 64, generator=g).bfloat16()
    assert torch.equal(small_linear(x, w), F.linear(x, w))
    router = torch.randn(8, 64, generator=g)
    got = small_linear(x, router, max_tokens=16)
    assert got.dtype == torch.float32 and torch.equal(got, F.linear(x.float(), router))
    xh, wh = torch.randn(4, 3, 16, generator=g), torch.randn(4, 16, 24, generator=g)
    assert torch.equal(small_linear(xh, wh.transpose(1, 2)), torch.bmm(xh, wh))
    biased = nn.Linear(64, 8).bfloat16()
    assert torch.equal(project(biased, x), biased(x))


def test_split_choice() -> None:
    assert num_splits(1, 208) == (7, 32)  # short context at batch 1: a program per tile of rows
    assert num_splits(64, 208) == (4, 64)  # a batch of 64: enough splits to fill the card
    assert num_splits(300, 208) == (1, 224)  # enough sequences to fill the card: one program each
    n, rows = num_splits(1, 32768)
    assert n * rows >= 32768 and rows % 32 == 0 and n <= 264


# each kernel's dispatch forced (their PyTorch references off the GPU)
KERNELS = ExecutionOptions(moe_impl=MoEImpl.FUSED, attention_decode=AttentionDecode.PAGED)


def _run(ours, lens: list[int], steps: int) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Decode-step logits and greedy tokens; small pages, so contexts span several blocks."""
    outs = prefill_then_decode(ours, lens, steps, block_size=4, num_blocks=24, max_blocks=8)[1:]
    return outs, [o.argmax(-1).tolist() for o in outs]


@pytest.mark.parametrize("name", ["v2_greedy", "v2_group", "v3_noaux"])
def test_fused_moe_and_paged_attention_equal_general_paths(ckpts: dict[str, Path], name: str) -> None:
    ours = load_model(ckpts[name])
    lens = [13, 6, 9]
    ours.configure(ExecutionOptions(moe_impl=MoEImpl.LOOP, attention_decode=AttentionDecode.GATHER))
    ref, ref_tok = _run(ours, lens, steps=4)
    ours.reset_expert_load()
    ours.configure(KERNELS)
    try:
        got, got_tok = _run(ours, lens, steps=4)
        loads = ours.expert_load()
    finally:
        ours.configure(ExecutionOptions())
    assert got_tok == ref_tok
    for a, b in zip(ref, got, strict=True):
        assert rel(b, a) < 1e-5
    # the fused path counts the tokens it routes (4 decode steps of 3 sequences; prefill took "fused" too)
    for counts in loads.values():
        assert int(counts.sum()) == (sum(lens) + 4 * len(lens)) * ours.config.num_experts_per_tok


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="no C++ compiler")
@pytest.mark.parametrize("name", ["v2_group", "v2_greedy"])  # the Gate's routing / the router op (in place)
def test_kernels_trace_through_torch_compile(ckpts: dict[str, Path], name: str) -> None:
    ours = load_model(ckpts[name])
    ours.configure(KERNELS)
    try:
        ref, _ = _run(ours, [7, 5], steps=2)
        ref_load = {i: c.clone() for i, c in ours.expert_load().items()}
        ours.reset_expert_load()
        ours.configure(dataclasses.replace(KERNELS, compile=True))
        got, _ = _run(ours, [7, 5], steps=2)
        got_load = ours.expert_load()
    finally:
        ours.configure(ExecutionOptions())
    assert not compile_failures(), compile_failures()
    for a, b in zip(ref, got, strict=True):
        assert rel(b, a) < 1e-5
    for i, counts in ref_load.items():  # the router op's in-place count survives compilation
        assert torch.equal(got_load[i], counts), i


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="no C++ compiler")
def test_compiled_decode_writes_the_cache_in_place(ckpts: dict[str, Path]) -> None:
    """In the compiled decode layer the cache write is the in-place op and nothing else touches the pool.
    Written as a plain ``index_copy_`` there (the attention reads the pool afterwards), inductor copied the
    whole pool per layer and step; its generated code then holds an ``index_copy`` kernel instead."""
    import torch._dynamo
    import torch._inductor.config
    from torch._inductor.utils import run_and_get_code

    from runtime.kv_cache import PagedKVCache, decode_metadata

    ours = load_model(ckpts["v2_greedy"])
    cache = PagedKVCache(ours.config, 16, 16)
    meta = decode_metadata([3, 9], [[1], [2]], [18, 40], max_blocks=2)
    torch._dynamo.reset()  # compile here, whatever earlier tests compiled
    ours.configure(dataclasses.replace(KERNELS, compile=True))
    try:
        with torch.inference_mode(), torch._inductor.config.patch(fx_graph_cache=False):
            _, codes = run_and_get_code(ours, torch.tensor([5, 6]), meta.context_lens - 1, meta, cache)
    finally:
        ours.configure(ExecutionOptions())
    assert not compile_failures(), compile_failures()
    layers = [c for c in codes if "moefleet.mla_decode" in c]
    assert len(layers) == 2, len(codes)  # the dense first layer and the MoE layers' shared graph
    for code in layers:
        assert "moefleet.write_cache" in code and "index_copy" not in code and "auto_functionalized" not in code


def test_bad_settings_are_named() -> None:
    with pytest.raises(ValueError, match="attention decode 'flash'; allowed: auto, paged, gather"):
        AttentionDecode.parse("flash")
    with pytest.raises(ValueError, match="moe impl 'cutlass'; allowed: auto, fused"):
        MoEImpl.parse("cutlass")
    assert MoEImpl.parse("loop") is MoEImpl.LOOP and AttentionDecode.parse("paged") is AttentionDecode.PAGED
    with pytest.raises(TypeError, match="moe_impl must be a MoEImpl"):
        ExecutionOptions(moe_impl="loop")
