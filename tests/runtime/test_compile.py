"""The torch.compile'd layer regions (``ExecutionOptions.compile``) compute the same function as eager, on CPU (fp32,
inductor's C++ backend): packed prefill, a batched decode step and a batch-1 decode step (its own
specialised graph), with one compiled graph shared by all layers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from runtime.execution import ExecutionOptions, MoEImpl, compile_failures
from runtime.kv_cache import prefill_metadata
from runtime.loader import load_model
from tests.runtime.decoding import prefill_then_decode, rel

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="no C++")


# batch 3 runs the dynamic graph, batch 1 its own specialised graph. The routing (group-limited or noaux) is
# what differs between the layouts, and batch 3 covers it on both; the batch-1 graph is the same compiled
# region code, so one layout checks it (each compiled graph costs about 17 s on a 2-core CPU).
@pytest.mark.parametrize(("name", "batches"), [("v2_group", ([20, 18, 17],)), ("v3_noaux", ([20, 18, 17], [9]))])
def test_compiled_equals_eager(ckpts: dict[str, Path], name: str, batches: tuple[list[int], ...]) -> None:
    ours = load_model(ckpts[name])
    for lens in batches:
        ref = prefill_then_decode(ours, lens, steps=2)
        ours.configure(ExecutionOptions(compile=True))
        try:
            got = prefill_then_decode(ours, lens, steps=2)
        finally:
            ours.configure(ExecutionOptions())
        assert not compile_failures(), compile_failures()
        for a, b in zip(ref, got, strict=True):
            assert rel(b, a) < 1e-5
    assert not ours.compile_enabled


def test_gather_dispatch_equals_loop(ckpts: dict[str, Path]) -> None:
    """The static-shape 'gather' expert path (compiled code without grouped GEMM) equals the loop."""
    ours = load_model(ckpts["v2_greedy"])
    ids = torch.arange(5, 40)
    meta = prefill_metadata([len(ids)], [len(ids)], None, None)
    with torch.inference_mode():
        ours.configure(ExecutionOptions(moe_impl=MoEImpl.LOOP))
        a = ours(ids, torch.arange(len(ids)), meta)
        ours.configure(ExecutionOptions(moe_impl=MoEImpl.GATHER))
        b = ours(ids, torch.arange(len(ids)), meta)
    ours.configure(ExecutionOptions())
    assert rel(b, a) < 1e-5


def test_real_rope_equals_complex(ckpts: dict[str, Path]) -> None:
    """The compiled path's interleaved rope (real arithmetic) equals the eager complex multiply."""
    ours = load_model(ckpts["v2_group"])
    rot = ours.rotary
    cos, sin, cis = rot(torch.arange(7) * 5)
    x = torch.randn(7, 3, rot.dim)
    assert rel(rot.apply(x, (cos, sin, None)), rot.apply(x, (cos, sin, cis))) < 1e-6


def test_forward_in_pieces_equals_forward(ckpts: dict[str, Path]) -> None:
    """begin / run_layers / finish (how CUDAGraphDecoder captures a step in pieces) is forward."""
    ours = load_model(ckpts["v2_greedy"])
    ids = torch.arange(5, 17)
    meta = prefill_metadata([len(ids)], [len(ids)], None, None)
    with torch.inference_mode():
        whole = ours(ids, torch.arange(len(ids)), meta)
        step = ours.begin(ids, torch.arange(len(ids)), meta, None)
        n = ours.num_layers
        for start, end in ((0, 1), (1, 1), (1, n)):
            ours.run_layers(step, start, end)
        pieces = ours.finish(step)
    assert torch.equal(pieces, whole)


def test_stacked_input_projections_survive_conversion(ckpts: dict[str, Path]) -> None:
    """q_proj and kv_a_proj_with_mqa are views of one stacked weight (one GEMM at decode) after loading and
    after a dtype round trip (benchmarks/model_gpu.py's fp32 check once dropped the stack silently), with
    the checkpoint's names and the same outputs."""
    ours = load_model(ckpts["v2_greedy"])
    ids = torch.arange(5, 17)
    meta = prefill_metadata([len(ids)], [len(ids)], None, None)

    def stacked() -> bool:
        return all(
            (a := layer.self_attn).in_proj_weight is not None
            and a.q_proj.weight.data_ptr() == a.in_proj_weight.data_ptr()
            and a.kv_a_proj_with_mqa.weight.data_ptr() == a.in_proj_weight[a.q_proj.weight.shape[0] :].data_ptr()
            for layer in ours.model.layers
        )

    with torch.inference_mode():
        before = ours(ids, torch.arange(len(ids)), meta)
        assert stacked()
        ours.double()
        assert stacked()
        ours.float()
        after = ours(ids, torch.arange(len(ids)), meta)
    assert stacked() and torch.equal(after, before)
    assert not any("in_proj" in k for k in ours.state_dict())


def test_the_expert_loop_is_never_traced_into_a_compiled_region() -> None:
    """``LOOP`` reads each expert's slice size on the host. Traced, dynamo unrolls it over the active experts
    and specialises on their counts (FP8 experts take it for long prefills, compiled regions included), so
    routings would keep compiling graphs of two GEMMs per expert. It runs eagerly instead: one graph on each
    side of it, however the tokens are routed, and the same values as eager."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from runtime.config import ModelConfig
    from runtime.moe import MoE
    from runtime.tiny import tiny_config

    torch.manual_seed(0)
    cfg = ModelConfig.from_dict(tiny_config("v2"))
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.05)
    E, k = cfg.n_routed_experts, cfg.num_experts_per_tok

    def routed(x, ids, w):
        return moe.routed(x, ids, w, MoEImpl.LOOP)

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(routed, backend="eager")  # dynamo's tracing is what is checked, not inductor
    for i in range(6):
        x, w = torch.randn(24, cfg.hidden_size), torch.rand(24, k)
        ids = torch.stack([torch.randperm(E)[:k] for _ in range(24)]) if i % 2 else torch.randint(0, 2 + i, (24, k))
        torch.testing.assert_close(compiled(x, ids, w), routed(x, ids, w))
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    torch._dynamo.reset()
