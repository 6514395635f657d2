"""``moe_layer_freq``: DeepSeek's rule puts MoE at layer_idx >= first_k_dense_replace and
layer_idx % moe_layer_freq == 0. transformers ignores the field, so the reference here is a transformers
model whose layers we re-arrange by that rule and fill from the same checkpoint."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from runtime.config import ModelConfig
from runtime.kv_cache import prefill_metadata
from runtime.loader import load_model
from runtime.moe import MoE
from runtime.tiny import make_tiny, tiny_config

transformers = pytest.importorskip("transformers")


def test_placement_rule() -> None:
    cfg = ModelConfig.from_dict(tiny_config("v2", num_hidden_layers=7, first_k_dense_replace=1, moe_layer_freq=2))
    assert [cfg.is_moe_layer(i) for i in range(7)] == [False, False, True, False, True, False, True]
    cfg = ModelConfig.from_dict(tiny_config("v3", num_hidden_layers=5, first_k_dense_replace=3))
    assert [cfg.is_moe_layer(i) for i in range(5)] == [False, False, False, True, True]


def _hf_with_our_rule(path: Path, config: ModelConfig):
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2MLP

    hf_cfg = transformers.AutoConfig.from_pretrained(path)
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32).eval()
    for i, layer in enumerate(hf.model.layers):
        if not config.is_moe_layer(i):
            layer.mlp = DeepseekV2MLP(hf_cfg)
    sd: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        sd.update(load_file(shard))
    packed: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    out = {}
    for name, t in sd.items():
        m = re.match(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(\w+)_proj\.weight", name)
        if m:
            packed.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = t
        else:
            out[name] = t
    for prefix, experts in packed.items():
        order = sorted(experts)
        out[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([experts[e]["gate"], experts[e]["up"]]) for e in order])
        out[f"{prefix}.down_proj"] = torch.stack([experts[e]["down"] for e in order])
    hf.load_state_dict(out, strict=True)
    return hf


def test_moe_layer_freq_matches_reference(tmp_path: Path) -> None:
    path = make_tiny(tmp_path / "freq", arch="v2", seed=7, num_hidden_layers=5, moe_layer_freq=2)
    ours = load_model(path)
    kinds = [isinstance(layer.mlp, MoE) for layer in ours.model.layers]
    assert kinds == [False, False, True, False, True]
    names = ours.state_dict().keys()
    assert "model.layers.3.mlp.gate_proj.weight" in names
    assert "model.layers.3.mlp.gate.weight" not in names
    assert "model.layers.4.mlp.experts.7.down_proj.weight" in names
    hf = _hf_with_our_rule(path, ours.config)
    ids = list(range(3, 40))
    with torch.inference_mode():
        ref = hf(torch.tensor([ids])).logits[0]
        out = ours(torch.tensor(ids), torch.arange(len(ids)), prefill_metadata([len(ids)], [len(ids)], None, None))
    assert ((out - ref).norm() / ref.norm()).item() < 1e-4
