"""The FP8 kernels (runtime.kernels.fp8) against their references, run by the Triton interpreter on the CPU
(``TRITON_INTERPRET=1`` is set before triton is imported, in a subprocess as tests/runtime/test_kernels.py
does); the same checks run on a GPU as ``python -m tests.runtime.fp8_kernel_checks cuda``. Shapes have partial
last blocks (K, N not multiples of 128)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_fp8_kernels_under_the_interpreter() -> None:
    """act_quant byte-exact; FP8 GEMM, weight-only GEMV / GEMM and each FP8 MoE kernel within 1e-5 of its
    reference (fp32; the FP8-activation tiles against the reference that quantizes activations and the
    intermediate the same way), EP offsets included (see tests/runtime/fp8_kernel_checks.py)."""
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    r = subprocess.run(
        [sys.executable, "-m", "tests.runtime.fp8_kernel_checks", "cpu"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "fp8 kernels ok" in r.stdout


def test_fp8_moe_kernel_by_step_size(monkeypatch) -> None:
    """runtime.kernels.moe_fp8's choice: a program per pair up to MOE_BY_PAIR_MAX_TOKENS; the FP8-activation
    tiles from MOE_FP8_ACT_MIN_TOKENS on GPUs with FP8 tensor cores only; else the weight-only tiles from
    MOE_TILES_MIN_TOKENS, and always above MOE_BY_EXPERT_MAX_TOKENS; per expert in between."""
    import torch

    from runtime.kernels import moe_fp8 as mf

    pairs, experts = mf.MOE_BY_PAIR_MAX_TOKENS, mf.MOE_BY_EXPERT_MAX_TOKENS

    def kernel(tokens: int) -> str:
        return mf.moe_fp8_kernel(torch.zeros(tokens, 8))

    monkeypatch.setattr(mf, "MOE_FP8_ACT_MIN_TOKENS", 100)
    monkeypatch.setattr(mf, "MOE_TILES_MIN_TOKENS", None)
    monkeypatch.setattr(mf, "native_fp8", lambda x: False)  # Ampere (or the interpreter)
    assert [kernel(t) for t in (1, pairs, pairs + 1, experts, experts + 1, 8192)] == [
        "pairs", "pairs", "experts", "experts", "tiles", "tiles",
    ]  # fmt: skip
    monkeypatch.setattr(mf, "native_fp8", lambda x: True)  # Hopper
    assert [kernel(t) for t in (pairs, 99, 100, 8192)] == ["pairs", "experts", "fp8_tiles", "fp8_tiles"]
    monkeypatch.setattr(mf, "MOE_TILES_MIN_TOKENS", pairs + 1)
    assert [kernel(t) for t in (pairs + 1, 100)] == ["tiles", "fp8_tiles"]
    monkeypatch.setattr(mf, "MOE_FP8_ACT_MIN_TOKENS", None)
    assert [kernel(t) for t in (pairs, pairs + 1, 8192)] == ["pairs", "tiles", "tiles"]


def test_fp8_dispatch_by_hardware(monkeypatch) -> None:
    """runtime.execution's rules: no Triton → the dequantizing reference; FP8 tensor cores (sm89 / sm90) →
    FP8 GEMM from FP8_GEMM_MIN_TOKENS tokens, weight-only below; no FP8 tensor cores (sm80) → weight-only.
    FP8 experts: the FP8 experts op at every step size; with FP8_FUSED_MAX_TOKENS set, longer prefill steps
    take the grouped GEMM over dequantized stacks where it runs (Hopper), else a per-expert FP8 loop; the
    given path where Triton does not run."""
    import torch

    from runtime import execution as ex

    n = ex.FP8_GEMM_MIN_TOKENS
    assert ex.fp8_linear_path(torch.zeros(n, 8)) is ex.Fp8Path.DEQUANT  # CPU, not interpreted
    assert ex.moe_dispatch_fp8(ex.MoEImpl.GROUPED, torch.zeros(2, 8)) is ex.MoEImpl.GROUPED
    monkeypatch.setattr(ex, "triton_usable", lambda t: True)
    for sm90, tokens, want in (
        (True, n, ex.Fp8Path.FP8_GEMM),
        (True, n - 1, ex.Fp8Path.WEIGHT_ONLY),
        (False, 4 * n, ex.Fp8Path.WEIGHT_ONLY),
    ):
        monkeypatch.setattr(ex, "fp8_gemm_supported", lambda device, sm90=sm90: sm90)
        assert ex.fp8_linear_path(torch.zeros(tokens, 8)) is want, (sm90, tokens)
    assert ex.FP8_FUSED_MAX_TOKENS is None
    for tokens in (1, 256, 8192):
        assert ex.moe_dispatch_fp8(ex.MoEImpl.GROUPED, torch.zeros(tokens, 8)) is ex.MoEImpl.FUSED
    m = 256
    monkeypatch.setattr(ex, "FP8_FUSED_MAX_TOKENS", m)
    assert ex.moe_dispatch_fp8(ex.MoEImpl.GROUPED, torch.zeros(m, 8)) is ex.MoEImpl.FUSED
    assert ex.moe_dispatch_fp8(ex.MoEImpl.GROUPED, torch.zeros(m + 1, 8)) is ex.MoEImpl.LOOP
    monkeypatch.setattr(ex, "grouped_mm_supported", lambda device, dtype: True)
    assert ex.moe_dispatch_fp8(ex.MoEImpl.AUTO, torch.zeros(m + 1, 8)) is ex.MoEImpl.GROUPED
    monkeypatch.setattr(ex, "grouped_mm_supported", lambda device, dtype: False)
    # a decode step of any batch (--max-num-seqs 512 is captured too) never reads the routing on the host
    assert ex.moe_dispatch_fp8(ex.MoEImpl.GROUPED, torch.zeros(2 * m, 8), decode=True) is ex.MoEImpl.FUSED
    from runtime.kv_cache import AttentionMetadata

    decode = AttentionMetadata(context_lens=torch.ones(2 * m, dtype=torch.int64))
    prefill = AttentionMetadata(context_lens=torch.tensor([2 * m]), query_lens=[2 * m], context_lens_cpu=[2 * m])
    x = torch.zeros(2 * m, 8, dtype=torch.bfloat16)
    assert ex.plan_step(ex.ExecutionOptions(), x, decode, fp8_experts=True).moe is ex.MoEImpl.FUSED
    assert ex.plan_step(ex.ExecutionOptions(), x, prefill, fp8_experts=True).moe is ex.MoEImpl.LOOP
    assert ex.plan_step(ex.ExecutionOptions(), x, decode).moe is not ex.MoEImpl.FUSED  # bf16 experts: unchanged


MODEL_INTERPRETED = """
import torch
from runtime.execution import AttentionDecode, ExecutionOptions
from runtime.loader import load_model
from runtime.tiny import make_tiny
from tests.runtime.decoding import prefill_then_decode, rel
from tests.runtime.test_fp8 import ALIGNED, dequantize_folder
import sys
root = sys.argv[1]
over = {**ALIGNED, "num_hidden_layers": 1, "first_k_dense_replace": 0}
q = make_tiny(root + "/fp8", arch="v3", seed=5, fp8=True, **over)
got, ref = load_model(q, fp8="keep"), load_model(dequantize_folder(q, root + "/deq"))
for m in (got, ref):
    m.configure(ExecutionOptions(attention_decode=AttentionDecode.GATHER))
errs = [rel(a, b) for a, b in zip(prefill_then_decode(got, [4], 1), prefill_then_decode(ref, [4], 1), strict=True)]
assert max(errs) < 1e-5, errs
print("fp8 model ok", errs)
"""


@pytest.mark.slow
def test_fp8_resident_model_through_the_interpreted_kernels(tmp_path) -> None:
    """The FP8-resident model with its kernels in place (weight-only linears, the FP8 MoE decode kernel,
    interpreted): one V3 MoE layer, prefill and a decode step equal the dequantized twin's."""
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    r = subprocess.run(
        [sys.executable, "-c", MODEL_INTERPRETED, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "fp8 model ok" in r.stdout


def test_fp8_custom_ops_trace() -> None:
    """torch.compile sees the FP8 kernels as custom ops: their fake (shape) functions agree with the real ones
    (``torch.library.opcheck``; the CPU runs the references)."""
    import torch

    from runtime.kernels import fp8 as k8
    from runtime.kernels.moe_fp8 import moe_fp8
    from runtime.quant.fp8 import quantize

    # the schema check multiplies inputs, which the CPU has no fp8 kernel for: fake tensors and AOT dispatch
    utils = ("test_faketensor", "test_aot_dispatch_dynamic")
    torch.manual_seed(0)
    w, s = quantize(torch.randn(200, 136))
    x = torch.randn(3, 136)
    torch.library.opcheck(k8.w8_linear, (x, w, s), test_utils=utils)
    torch.library.opcheck(k8.fp8_gemm, (x, w, s), test_utils=utils)
    w13, s13 = quantize(torch.randn(4, 256, 136))
    w2, s2 = quantize(torch.randn(4, 136, 128))
    ids, wts = torch.tensor([[0, 3], [1, 2], [3, 1]]), torch.rand(3, 2)
    torch.library.opcheck(moe_fp8, (x, ids, wts, w13, s13, w2, s2, 0, 4), test_utils=utils)
    shared = (*quantize(torch.randn(200, 136)), *quantize(torch.randn(200, 136)), *quantize(torch.randn(136, 200)))
    torch.library.opcheck(moe_fp8, (x, ids, wts, w13, s13, w2, s2, 0, 4, *shared), test_utils=utils)


def test_long_fp8_prefill_grouped_over_dequantized_stacks_equals_the_expert_loop() -> None:
    """With FP8_FUSED_MAX_TOKENS set, longer prefill steps on Hopper run the grouped GEMM over the FP8 stacks
    dequantized for the step, in place of one FP8 GEMM pair per active expert: the same products (here, on
    the CPU, both read the dequantized weights in fp32)."""
    import torch

    from runtime.config import ModelConfig
    from runtime.execution import MoEImpl
    from runtime.moe import MoE
    from runtime.quant.fp8 import quantize
    from runtime.tiny import tiny_config
    from tests.runtime.test_fp8 import ALIGNED

    torch.manual_seed(0)
    moe = MoE(ModelConfig.from_dict(tiny_config("v2") | ALIGNED))
    moe.use_fp8((128, 128))
    for stack, scales in ((moe.w13, moe.w13_scale), (moe.w2, moe.w2_scale)):
        q, s = quantize(torch.randn(stack.shape) * 0.05)
        stack.copy_(q)
        scales.copy_(s)
    T, k, E = 300, moe.top_k, moe.n_experts
    x, w = torch.randn(T, moe.w13.shape[-1]), torch.rand(T, k)
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    grouped, loop = (moe.routed(x, ids, w, impl) for impl in (MoEImpl.GROUPED, MoEImpl.LOOP))
    torch.testing.assert_close(grouped, loop, rtol=1e-5, atol=1e-5)
    assert grouped.abs().mean() > 1e-3  # not two zero tensors
