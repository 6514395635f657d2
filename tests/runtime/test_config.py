"""config.json parsing: defaults agree with transformers' config classes, YaRN fields, clear errors."""

from __future__ import annotations

import pytest

from runtime.config import ConfigError, ModelConfig, yarn_get_mscale
from runtime.tiny import tiny_config

transformers = pytest.importorskip("transformers")

SIZES = {
    "vocab_size": 100,
    "hidden_size": 32,
    "intermediate_size": 64,
    "moe_intermediate_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 4,
    "v_head_dim": 8,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
}
SHARED_FIELDS = [
    "first_k_dense_replace",
    "q_lora_rank",
    "n_shared_experts",
    "routed_scaling_factor",
    "norm_topk_prob",
    "max_position_embeddings",
    "rms_norm_eps",
    "tie_word_embeddings",
    "attention_bias",
    "bos_token_id",
]


@pytest.mark.parametrize("model_type", ["deepseek_v2", "deepseek_v3"])
def test_defaults_match_transformers(model_type: str) -> None:
    """A config.json that omits every optional field is read as transformers reads it."""
    raw = {"model_type": model_type, **SIZES, "n_group": 4, "topk_group": 2}
    ours = ModelConfig.from_dict(raw)
    cls = transformers.DeepseekV2Config if model_type == "deepseek_v2" else transformers.DeepseekV3Config
    theirs = cls(**{k: v for k, v in raw.items() if k != "model_type"})
    for f in SHARED_FIELDS:
        assert getattr(ours, f) == getattr(theirs, f), f
    assert ours.eos_token_id == [theirs.eos_token_id]
    assert ours.rope.theta == theirs.rope_parameters["rope_theta"]
    if model_type == "deepseek_v2":
        assert ours.topk_method == theirs.topk_method == "greedy"
        assert ours.scoring_func == "softmax"
    else:  # transformers' V3 router is always sigmoid + noaux_tc
        assert (ours.topk_method, ours.scoring_func) == ("noaux_tc", "sigmoid")
        assert ours.rope_interleave == theirs.rope_interleave


def test_v3_real_defaults() -> None:
    c = ModelConfig.from_dict({"model_type": "deepseek_v3"})
    assert (c.n_routed_experts, c.num_experts_per_tok, c.n_group, c.topk_group) == (256, 8, 8, 4)
    assert c.first_k_dense_replace == 3 and c.routed_scaling_factor == 2.5
    assert [c.is_moe_layer(i) for i in (0, 2, 3, 60)] == [False, False, True, True]


def test_v2_lite_style_config() -> None:
    """DeepSeek-V2-Lite's config.json (abridged): q_lora_rank null, YaRN with `type`."""
    raw = {
        "model_type": "deepseek_v2",
        "hidden_size": 2048,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "n_routed_experts": 64,
        "num_experts_per_tok": 6,
        "n_shared_experts": 2,
        "moe_intermediate_size": 1408,
        "intermediate_size": 10944,
        "q_lora_rank": None,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "topk_method": "greedy",
        "n_group": 1,
        "topk_group": 1,
        "scoring_func": "softmax",
        "aux_loss_alpha": 0.001,
        "seq_aux": True,
        "max_position_embeddings": 163840,
        "rope_theta": 10000,
        "rope_scaling": {
            "type": "yarn",
            "factor": 40,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
        },
    }
    c = ModelConfig.from_dict(raw)
    assert c.q_lora_rank is None and c.rope.rope_type == "yarn" and c.rope.factor == 40
    m = yarn_get_mscale(40, 0.707)
    assert c.softmax_scale == pytest.approx(192**-0.5 * m * m)
    assert c.kv_cache_dim == 576


def test_rope_parameters_spelling_accepted() -> None:
    raw = tiny_config("v2")
    raw.pop("rope_theta")
    raw["rope_parameters"] = {
        "rope_type": "yarn",
        "rope_theta": 5000.0,
        "factor": 2.0,
        "original_max_position_embeddings": 256,
    }
    c = ModelConfig.from_dict(raw)
    assert (c.rope.rope_type, c.rope.theta, c.rope.factor) == ("yarn", 5000.0, 2.0)


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"topk_method": "group_limited_greedy", "n_group": 3}, "n_group"),
        ({"topk_method": "group_limited_greedy", "topk_group": 5}, "topk_group"),
        ({"topk_method": "noaux_tc", "n_group": 1, "topk_group": 1, "num_experts_per_tok": 2}, None),
        ({"num_experts_per_tok": None}, "num_experts_per_tok"),
        ({"moe_layer_freq": 0}, "moe_layer_freq"),
        ({"qk_rope_head_dim": 7}, "qk_rope_head_dim"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"num_key_value_heads": 1}, "num_key_value_heads"),
        ({"q_lora_rank": -1}, "q_lora_rank"),
        ({"rope_scaling": {"type": "yarn", "factor": 0.5}}, "rope_scaling.factor"),
    ],
)
def test_invalid_values_name_the_field(override: dict, field: str | None) -> None:
    raw = tiny_config("v2", **override)
    if field is None:  # valid combination: must parse
        ModelConfig.from_dict(raw)
        return
    with pytest.raises(ConfigError) as exc:
        ModelConfig.from_dict(raw)
    assert exc.value.field == field
    assert f"config field {field!r} has unsupported value" in str(exc.value)
    assert "allowed:" in str(exc.value)
