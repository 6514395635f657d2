"""The memory planner (`moe-runtime plan`, runtime/plan.py) on the published DeepSeek configs, and the
deployment sizes checked against it: a size whose default model does not fit its replica fails here.

The configs in tests/data/configs are the Hugging Face repos' config.json (deepseek-ai/DeepSeek-V3,
-V2, -V2-Lite); deepseek-v2-fp8.json is V2's with V3's ``quantization_config`` added."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from infra.catalog.sizes import SIZES, Size, SizeName, WeightFormat
from runtime.cli import main
from runtime.config import ConfigError
from runtime.engine.config import EngineConfig
from runtime.plan import GIB, Plan, load_config, parameter_count, plan, weight_bytes

CONFIGS = Path(__file__).resolve().parents[1] / "data" / "configs"

#: (size's default model, its checkpoint format) → the config.json it is served from
DEFAULT_MODEL_CONFIGS = {
    ("deepseek-v2-lite", WeightFormat.BF16): "deepseek-v2-lite.json",
    ("deepseek-v2", WeightFormat.FP8): "deepseek-v2-fp8.json",
    ("deepseek-v3", WeightFormat.FP8): "deepseek-v3.json",
}


def _plan(name: str, gpus: int, gib: float, **kw) -> Plan:
    config, quant = load_config(CONFIGS / name)
    return plan(config, quant, gpus=gpus, gpu_memory_gib=gib, name=name, **kw)


# ---- hand checks -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, published",
    [("deepseek-v3.json", 671e9), ("deepseek-v2.json", 236e9), ("deepseek-v2-lite.json", 15.7e9)],
)
def test_parameter_count_matches_the_published_size(name, published):
    config, _ = load_config(CONFIGS / name)
    assert parameter_count(config) == pytest.approx(published, rel=0.01)


def test_v3_fp8_routed_experts_by_hand():
    """58 MoE layers × 256/16 experts × 3 projections of 2048×7168 fp8 bytes + a float32 scale per 128×128."""
    config, quant = load_config(CONFIGS / "deepseek-v3.json")
    assert quant is not None and quant.block == (128, 128) and quant.fmt == "e4m3"
    per_projection = 2048 * 7168 + (2048 // 128) * (7168 // 128) * 4
    got = weight_bytes(config, quant, "bfloat16", tp=8, ep=16)
    assert got["routed experts (ep-sharded)"] == 58 * 16 * 3 * per_projection
    assert got["embeddings + LM head (replicated)"] == 2 * 129280 * 7168 * 2  # bf16, never fp8
    assert got["router (replicated, fp32)"] == 58 * (256 * 7168 + 256) * 4  # weight + noaux_tc correction bias


@pytest.mark.parametrize("arch, tp, ep", [("v2", 1, 1), ("v2", 2, 4), ("v3", 4, 2), ("v3", 2, 2)])
def test_weights_equal_what_the_runtime_allocates_for_a_rank(arch, tp, ep):
    """The planner's per-rank bytes are exactly the bytes of the shard runtime.parallel builds."""
    import torch

    from runtime.config import ModelConfig
    from runtime.parallel.dist import ParallelState
    from runtime.parallel.layout import ParallelLayout
    from runtime.registry import build_model
    from runtime.tiny import tiny_config

    config = ModelConfig.from_dict(tiny_config(arch))
    world = math.lcm(tp, ep)
    model = build_model(config, torch.bfloat16, "cpu", ParallelState(ParallelLayout(tp, ep, world), rank=world - 1))
    allocated = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert sum(weight_bytes(config, None, "bfloat16", tp, ep).values()) == allocated


# ---- the published models on the sizes' GPUs -------------------------------------------------------------


def test_v3_fp8_fits_16_h100_over_two_nodes_with_the_large_layout():
    req = SIZES[SizeName.LARGE].requirements
    p = _plan("deepseek-v3.json", 16, 80, nodes=2, tp=req.tensor_parallel, ep=req.expert_parallel)
    assert (p.tp, p.ep) == (8, 16)
    assert p.fits, p.problem
    assert p.kv_bytes_per_token == 61 * (512 + 64) * 2
    assert p.sequences(163840) >= 1 and p.kv_tokens == (p.kv_blocks - 1) * 16
    assert p.used + p.kv_bytes <= 80 * GIB


def test_v3_fp8_does_not_fit_8_h100():
    p = _plan("deepseek-v3.json", 8, 80)
    assert not p.fits
    assert "8× 80 GiB (--tp 8 --ep 8)" in p.problem and "GiB over the card" in p.problem
    assert p.weights_total > 80 * GIB  # the weights alone: why the large size spans two nodes


def test_v2_on_the_medium_size_fits_in_fp8_not_in_bf16():
    medium = SIZES[SizeName.MEDIUM]
    req, gib = medium.requirements, medium.instance.gpu_memory_gib
    kw = {"tp": req.tensor_parallel, "ep": req.expert_parallel}
    bf16 = _plan("deepseek-v2.json", req.gpus_per_replica, gib, **kw)
    fp8 = _plan("deepseek-v2-fp8.json", req.gpus_per_replica, gib, **kw)
    assert not bf16.fits and "over the card" in bf16.problem
    assert fp8.fits, fp8.problem
    assert fp8.weights_total < 0.52 * bf16.weights_total  # 1 byte per weight + scales, bf16 embeddings


def test_short_of_kv_names_the_shortfall():
    """A layout whose weights fit but whose KV cache cannot hold one full-length sequence."""
    p = _plan("deepseek-v3.json", 16, 58, nodes=2)
    assert not p.fits and "GiB short of one 163,840-token sequence's KV cache" in p.problem
    assert _plan("deepseek-v3.json", 16, 58, nodes=2, max_model_len=32768).fits


# ---- the deployment sizes --------------------------------------------------------------------------------


def plan_size(size: Size) -> Plan:
    """The size's default model on one replica of its GPUs, with the layout the runtime is rendered with."""
    key = (size.default_model, size.default_model_weights)
    assert key in DEFAULT_MODEL_CONFIGS, f"size {size.name}: no config.json for default model {key} in this test"
    name = DEFAULT_MODEL_CONFIGS[key]
    req = size.requirements
    p = _plan(
        name,
        req.gpus_per_replica,
        size.instance.gpu_memory_gib,
        nodes=req.nodes_per_replica,
        tp=req.tensor_parallel,
        ep=req.expert_parallel,
    )
    quantized = p.quantization != "none"
    assert quantized == (size.default_model_weights is WeightFormat.FP8), f"{name} is not {key[1]}"
    return p


@pytest.mark.parametrize("size", list(SIZES.values()), ids=lambda s: s.name)
def test_each_size_holds_its_default_model(size):
    p = plan_size(size)
    assert p.fits, f"size {size.name}: {p.problem}"
    # the catalog's checkpoint size (load time, disk) agrees with the whole model's weights as planned
    config, quant = load_config(CONFIGS / DEFAULT_MODEL_CONFIGS[size.default_model, size.default_model_weights])
    model_gb = sum(weight_bytes(config, quant, "bfloat16").values()) / 1e9
    assert size.pod.model_gb == pytest.approx(model_gb, rel=0.03)


def test_the_size_check_fails_for_a_large_size_cut_to_8_gpus():
    large = SIZES[SizeName.LARGE]
    req = dataclasses.replace(large.requirements, gpus_per_replica=8, total_gpus=8, nodes_per_replica=1)
    p = plan_size(dataclasses.replace(large, requirements=req))
    assert not p.fits and "deepseek-v3.json on 8× 80 GiB" in p.problem


# ---- the command line ------------------------------------------------------------------------------------


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["plan", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_table_json_and_checkpoint_folder(capsys, tmp_path):
    v3 = str(CONFIGS / "deepseek-v3.json")
    code, out, err = _cli(capsys, "--model", v3, "--gpus", "16", "--nodes", "2", "--gpu-memory", "80")
    assert code == 0 and not err
    assert "--tp 8 --ep 16" in out and "routed experts (ep-sharded)" in out and "fits: serve with --kv-blocks" in out
    code, out, _ = _cli(capsys, "--model", v3, "--gpus", "16", "--nodes", "2", "--gpu-memory", "80", "--json")
    d = json.loads(out)
    assert code == 0 and d["fits"] and d["tp"] == 8 and d["ep"] == 16 and d["kv_blocks"] > 0
    assert d["sequences_at_seq_len"] >= d["sequences_at_max_model_len"] >= 1

    folder = tmp_path / "DeepSeek-V2-Lite"
    folder.mkdir()
    (folder / "config.json").write_text((CONFIGS / "deepseek-v2-lite.json").read_text())
    code, out, _ = _cli(capsys, "--model", str(folder), "--gpus", "1", "--gpu-memory", "48", "--seq-len", "8192")
    assert code == 0 and out.startswith("DeepSeek-V2-Lite: 15.7B parameters") and "at 8,192:" in out


def test_cli_does_not_fit_is_one_line_and_exit_1(capsys):
    code, out, err = _cli(capsys, "--model", str(CONFIGS / "deepseek-v3.json"), "--gpus", "8", "--gpu-memory", "80")
    assert code == 1 and out.rstrip().endswith("does not fit")
    assert err.count("\n") == 1 and err.startswith("error: does not fit: deepseek-v3 on 8× 80 GiB")
    assert "GiB over the card" in err


@pytest.mark.parametrize(
    "model, argv, message",
    [
        ("deepseek-v3.json", ["--gpus", "16", "--nodes", "2", "--tp", "8", "--ep", "8"], "lcm(tp, ep) must equal"),
        ("deepseek-v2.json", ["--gpus", "64", "--nodes", "8"], "--ep 64: the model's n_routed_experts = 160"),
        ("deepseek-v2-lite.json", ["--gpus", "32", "--nodes", "1"], "--tp 32: the model's num_attention_heads = 16"),
        ("deepseek-v3.json", ["--gpus", "16", "--nodes", "3"], "--nodes 3: must divide --gpus 16"),
        ("deepseek-v3.json", ["--gpus", "16", "--tp", "6"], "--tp 6: must divide the world size 16"),
        ("deepseek-v3.json", ["--gpus", "16", "--dtype", "fp8"], "--dtype fp8: bfloat16, float16, float32"),
        ("deepseek-v3.json", ["--gpus", "16", "--max-model-len", "200000"], "max_position_embeddings 163840"),
        ("missing.json", ["--gpus", "1"], "no such file"),
    ],
)
def test_cli_refuses_invalid_layouts(capsys, model, argv, message):
    code, out, err = _cli(capsys, "--model", str(CONFIGS / model), "--gpu-memory", "80", *argv)
    assert code == 2 and not out and message in err and err.count("\n") == 1


def test_unknown_quantization_is_refused_naming_the_field(tmp_path):
    raw = json.loads((CONFIGS / "deepseek-v3.json").read_text())
    raw["quantization_config"]["quant_method"] = "awq"
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(
        ConfigError, match=r"'quantization_config.quant_method' has unsupported value 'awq'; allowed: fp8"
    ):
        load_config(path)


def test_engine_limits_move_the_estimates():
    base = _plan("deepseek-v3.json", 16, 80, nodes=2)
    bigger = _plan(
        "deepseek-v3.json", 16, 80, nodes=2, engine=EngineConfig(max_num_batched_tokens=16384, max_num_seqs=256)
    )
    no_graphs = _plan("deepseek-v3.json", 16, 80, nodes=2, engine=EngineConfig(cuda_graphs=False))
    assert bigger.activations > base.activations and bigger.cuda_graphs > base.cuda_graphs
    assert no_graphs.cuda_graphs == 0 and no_graphs.kv_blocks > base.kv_blocks
    step = EngineConfig(max_num_batched_tokens=2048)  # a chunk small beside the context: the prefix dominates
    long_ctx = _plan("deepseek-v3.json", 16, 80, nodes=2, engine=step)
    short = _plan("deepseek-v3.json", 16, 80, nodes=2, max_model_len=8192, engine=step)
    assert short.activations < long_ctx.activations  # a shorter cached prefix to expand per chunk
