"""Corrupt or invalid checkpoints fail before anything is loaded, with a message naming the problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from runtime.cli import main
from runtime.config import ConfigError
from runtime.loader import CheckpointError, load_model

SHARD2 = "model-00002-of-00002.safetensors"


@pytest.fixture
def ckpt(v2_path: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(v2_path, dst)
    return dst


def _rewrite_shard(path: Path, shard: str, edit) -> None:
    tensors = load_file(path / shard)
    tensors = edit(dict(tensors))
    save_file(tensors, str(path / shard), metadata={"format": "pt"})
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard}
    index["weight_map"].update(dict.fromkeys(tensors, shard))
    index_file.write_text(json.dumps(index))


def _shard_of(path: Path, name: str) -> str:
    return json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][name]


def test_loads_clean(ckpt: Path) -> None:
    model = load_model(ckpt, dtype="bf16")
    assert model.dtype == torch.bfloat16
    assert model.model.layers[1].mlp.gate.weight.dtype == torch.float32  # router stays fp32


def test_truncated_shard(ckpt: Path) -> None:
    f = ckpt / SHARD2
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError) as exc:
        load_model(ckpt)
    msg = str(exc.value)
    assert SHARD2 in msg and "truncated" in msg


def test_garbage_header(ckpt: Path) -> None:
    (ckpt / SHARD2).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match=rf"{SHARD2}: unreadable or truncated"):
        load_model(ckpt)


def test_missing_shard(ckpt: Path) -> None:
    (ckpt / SHARD2).unlink()
    with pytest.raises(CheckpointError, match=rf"missing shard file\(s\).*{SHARD2}"):
        load_model(ckpt)


def test_renamed_tensor(ckpt: Path) -> None:
    old = "model.layers.2.self_attn.kv_b_proj.weight"
    new = "model.layers.2.self_attn.kv_b_projection.weight"
    shard = _shard_of(ckpt, old)

    def edit(t):
        t[new] = t.pop(old)
        return t

    _rewrite_shard(ckpt, shard, edit)
    with pytest.raises(CheckpointError) as exc:
        load_model(ckpt)
    msg = str(exc.value)
    assert f"1 missing tensor(s):\n    {old}" in msg
    assert f"1 unexpected tensor(s):\n    {new}" in msg


def test_wrong_shape(ckpt: Path) -> None:
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    shard = _shard_of(ckpt, name)

    def edit(t):
        t[name] = torch.zeros(33, 64)
        return t

    _rewrite_shard(ckpt, shard, edit)
    with pytest.raises(CheckpointError) as exc:
        load_model(ckpt)
    assert f"1 mis-shaped tensor(s):\n    {name}: checkpoint [33, 64] vs model [32, 64]" in str(exc.value)


def test_every_problem_listed_at_once(ckpt: Path) -> None:
    gone = ["model.norm.weight", "lm_head.weight", "model.layers.0.mlp.up_proj.weight"]
    bad = "model.layers.3.mlp.gate.weight"

    def edit(t):
        for g in gone:
            t.pop(g, None)
        if bad in t:
            t[bad] = torch.zeros(4, 4)
        t["model.layers.9.extra.weight"] = torch.zeros(1)
        return t

    for shard in ("model-00001-of-00002.safetensors", SHARD2):
        _rewrite_shard(ckpt, shard, edit)
    with pytest.raises(CheckpointError) as exc:
        load_model(ckpt)
    msg = str(exc.value)
    assert "3 missing tensor(s)" in msg and all(g in msg for g in gone)
    assert "1 unexpected tensor(s)" in msg and "model.layers.9.extra.weight" in msg
    assert f"{bad}: checkpoint [4, 4] vs model [8, 64]" in msg


def test_unknown_model_type(ckpt: Path) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "llama"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as exc:
        load_model(ckpt)
    assert str(exc.value) == (
        "config field 'model_type' has unsupported value 'llama'; allowed: deepseek_v2, deepseek_v3"
    )


def test_unknown_architecture_lists_the_registered_ones(ckpt: Path, capsys) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as exc:
        load_model(ckpt)
    assert str(exc.value) == (
        "config field 'architectures' has unsupported value ['LlamaForCausalLM']; "
        "allowed: DeepseekV2ForCausalLM, DeepseekV3ForCausalLM"
    )
    assert main(["serve", "--model", str(ckpt)]) == 2  # refused before anything loads
    assert "'architectures' has unsupported value" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("topk_method", "random", "greedy, group_limited_greedy, noaux_tc"),
        ("scoring_func", "relu", "softmax, sigmoid"),
        ("num_experts_per_tok", 9, "an integer in [1, n_routed_experts=8]"),
        ("kv_lora_rank", 0, "an integer >= 1"),
    ],
)
def test_bad_config_field(ckpt: Path, field: str, value, allowed: str) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg[field] = value
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as exc:
        load_model(ckpt)
    assert exc.value.field == field
    assert str(exc.value) == f"config field {field!r} has unsupported value {value!r}; allowed: {allowed}"


def test_bad_rope_scaling(ckpt: Path) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["rope_scaling"] = {"type": "dynamic", "factor": 2.0}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ConfigError, match=r"'rope_scaling.type' has unsupported value 'dynamic'; allowed: default, yarn"
    ):
        load_model(ckpt)


def test_no_weights(ckpt: Path) -> None:
    for f in ckpt.glob("model*"):
        f.unlink()
    with pytest.raises(CheckpointError, match=r"neither model\.safetensors nor model\.safetensors\.index\.json"):
        load_model(ckpt)


def test_single_file_checkpoint(ckpt: Path) -> None:
    tensors = {}
    for f in sorted(ckpt.glob("model-*.safetensors")):
        tensors.update(load_file(f))
        f.unlink()
    (ckpt / "model.safetensors.index.json").unlink()
    save_file(tensors, str(ckpt / "model.safetensors"))
    assert load_model(ckpt).config.model_type == "deepseek_v2"


def test_bad_dtype(ckpt: Path) -> None:
    with pytest.raises(ValueError, match="dtype 'int8' is not supported; allowed: float32"):
        load_model(ckpt, dtype="int8")
