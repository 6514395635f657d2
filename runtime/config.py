"""Model configuration parsed from a Hugging Face ``config.json`` (DeepSeek-V2 / DeepSeek-V3).

Defaults follow transformers' ``DeepseekV2Config`` / ``DeepseekV3Config`` for the fields those classes
define, and DeepSeek's original configuration code for the ones transformers dropped (``moe_layer_freq``,
``scoring_func``, ``topk_method`` for V3), so a checkpoint that omits a field is read the same way by us
and by the reference implementation. This module imports nothing heavy (no torch).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
# the model class a config.json without ``architectures`` means (runtime.registry maps names to classes)
DEFAULT_ARCHITECTURES = {"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SCORING_FUNCS = ("softmax", "sigmoid")
ROPE_TYPES = ("default", "yarn")
HIDDEN_ACTS = ("silu",)
# the published DeepSeek-V3/R1 weight format: e4m3 weights with one fp32 scale per 128×128 block
QUANT_METHODS = ("fp8",)
FP8_FORMATS = ("e4m3",)
FP8_ACTIVATION_SCHEMES = ("dynamic",)
FP8_BLOCK_SIZES = ((128, 128),)

# Per model_type defaults, copied from transformers 5.x config classes (first block) and DeepSeek's
# original configuration_deepseek.py (fields transformers does not model).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v2": {
        "vocab_size": 102400,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "moe_intermediate_size": 1407,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "n_shared_experts": 2,
        "n_routed_experts": 64,
        "num_experts_per_tok": None,
        "routed_scaling_factor": 1.0,
        "kv_lora_rank": 512,
        "q_lora_rank": 1536,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "qk_nope_head_dim": 128,
        "n_group": None,
        "topk_group": None,
        "topk_method": "greedy",
        "scoring_func": "softmax",
        "norm_topk_prob": False,
        "first_k_dense_replace": 0,
        "moe_layer_freq": 1,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_interleave": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    "deepseek_v3": {
        "vocab_size": 129280,
        "hidden_size": 7168,
        "intermediate_size": 18432,
        "moe_intermediate_size": 2048,
        "num_hidden_layers": 61,
        "num_attention_heads": 128,
        "n_shared_experts": 1,
        "n_routed_experts": 256,
        "num_experts_per_tok": 8,
        "routed_scaling_factor": 2.5,
        "kv_lora_rank": 512,
        "q_lora_rank": 1536,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "qk_nope_head_dim": 128,
        "n_group": 8,
        "topk_group": 4,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "first_k_dense_replace": 3,
        "moe_layer_freq": 1,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_interleave": True,
        "bos_token_id": 0,
        "eos_token_id": 1,
    },
}


class ConfigError(ValueError):
    """A config.json value we cannot run; the message names the field, the value and what is allowed."""

    def __init__(self, field_name: str, value: Any, allowed: str) -> None:
        self.field = field_name
        self.value = value
        self.allowed = allowed
        super().__init__(f"config field {field_name!r} has unsupported value {value!r}; allowed: {allowed}")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters; ``rope_type='yarn'`` follows DeepSeek's YaRN variant."""

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    truncate: bool = True
    attention_factor: float | None = None


@dataclass(frozen=True)
class QuantConfig:
    """config.json's ``quantization_config`` (block-scaled FP8): ``W ≈ W_fp8 × scale`` per
    ``block[0] × block[1]`` block of a linear weight, the scale stored as ``<name>.weight_scale_inv``."""

    quant_method: str = "fp8"
    fmt: str = "e4m3"
    activation_scheme: str = "dynamic"
    weight_block_size: tuple[int, int] = (128, 128)

    def to_json(self) -> dict[str, Any]:
        return {
            "quant_method": self.quant_method,
            "fmt": self.fmt,
            "activation_scheme": self.activation_scheme,
            "weight_block_size": list(self.weight_block_size),
        }

    @classmethod
    def from_dict(cls, raw: Any) -> QuantConfig:
        if not isinstance(raw, dict):
            raise ConfigError("quantization_config", raw, "an object with quant_method 'fp8'")
        method = raw.get("quant_method")
        if method not in QUANT_METHODS:
            raise ConfigError("quantization_config.quant_method", method, ", ".join(QUANT_METHODS))
        fmt = raw.get("fmt", "e4m3")
        if fmt not in FP8_FORMATS:
            raise ConfigError("quantization_config.fmt", fmt, ", ".join(FP8_FORMATS))
        scheme = raw.get("activation_scheme", "dynamic")
        if scheme not in FP8_ACTIVATION_SCHEMES:
            raise ConfigError("quantization_config.activation_scheme", scheme, ", ".join(FP8_ACTIVATION_SCHEMES))
        block = raw.get("weight_block_size")
        if not isinstance(block, list | tuple) or tuple(block) not in FP8_BLOCK_SIZES:
            raise ConfigError(
                "quantization_config.weight_block_size", block, " or ".join(str(list(b)) for b in FP8_BLOCK_SIZES)
            )
        return cls(method, fmt, scheme, (int(block[0]), int(block[1])))


@dataclass(frozen=True)
class ModelConfig:
    """Everything the runtime needs to build a DeepSeek-V2/V3 model, read and validated from config.json."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    n_shared_experts: int
    n_routed_experts: int
    num_experts_per_tok: int
    routed_scaling_factor: float
    kv_lora_rank: int
    q_lora_rank: int | None
    qk_rope_head_dim: int
    v_head_dim: int
    qk_nope_head_dim: int
    n_group: int
    topk_group: int
    topk_method: str
    scoring_func: str
    norm_topk_prob: bool
    first_k_dense_replace: int
    moe_layer_freq: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig
    rope_interleave: bool = True
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    num_nextn_predict_layers: int = 0
    hidden_act: str = "silu"
    architectures: tuple[str, ...] = ()  # model class names, as config.json lists them (runtime.registry)
    quantization: QuantConfig | None = None  # block-scaled FP8 weights (runtime.quant.fp8); None: plain

    # ---- derived -------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Width of one cached token: normalized latent + roped shared key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        """DeepSeek's placement rule (original modeling code): MoE from ``first_k_dense_replace`` on,
        every ``moe_layer_freq``-th layer. transformers' port ignores ``moe_layer_freq``."""
        return (
            self.n_routed_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @property
    def softmax_scale(self) -> float:
        """Attention scale; YaRN multiplies it by mscale(factor, mscale_all_dim)² as DeepSeek does."""
        scale = self.qk_head_dim**-0.5
        r = self.rope
        if r.rope_type == "yarn" and r.mscale_all_dim:
            m = yarn_get_mscale(r.factor, r.mscale_all_dim)
            scale = scale * m * m
        return scale

    @property
    def scale_weights_after_norm(self) -> bool:
        """V3 multiplies normalized top-k weights by routed_scaling_factor; V2 only scales unnormalized."""
        return self.model_type == "deepseek_v3"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # ---- parsing -------------------------------------------------------------------------------
    @classmethod
    def from_json_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise
        except json.JSONDecodeError as exc:
            raise ConfigError("config.json", str(path), f"valid JSON ({exc})") from exc
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError("model_type", model_type, ", ".join(SUPPORTED_MODEL_TYPES))
        d = dict(_DEFAULTS[model_type])
        d.update({k: v for k, v in raw.items() if k in d})

        ints = [
            "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
            "num_hidden_layers", "num_attention_heads", "n_routed_experts", "kv_lora_rank",
            "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim", "max_position_embeddings",
        ]  # fmt: skip
        for name in ints:
            _check_int(name, d[name], minimum=1)
        _check_int("n_shared_experts", d["n_shared_experts"] or 0, minimum=0)
        _check_int("first_k_dense_replace", d["first_k_dense_replace"] or 0, minimum=0)
        _check_int("moe_layer_freq", d["moe_layer_freq"], minimum=1)
        if d["q_lora_rank"] is not None:
            _check_int("q_lora_rank", d["q_lora_rank"], minimum=1)
        if d["qk_rope_head_dim"] % 2:
            raise ConfigError("qk_rope_head_dim", d["qk_rope_head_dim"], "an even integer")
        if raw.get("hidden_act", "silu") not in HIDDEN_ACTS:
            raise ConfigError("hidden_act", raw.get("hidden_act"), ", ".join(HIDDEN_ACTS))
        nkv = raw.get("num_key_value_heads")
        if nkv is not None and nkv != d["num_attention_heads"]:
            raise ConfigError("num_key_value_heads", nkv, "null or equal to num_attention_heads (MLA)")

        if d["topk_method"] not in TOPK_METHODS:
            raise ConfigError("topk_method", d["topk_method"], ", ".join(TOPK_METHODS))
        if d["scoring_func"] not in SCORING_FUNCS:
            raise ConfigError("scoring_func", d["scoring_func"], ", ".join(SCORING_FUNCS))
        E = d["n_routed_experts"]
        k = d["num_experts_per_tok"]
        if k is None or not isinstance(k, int) or not 1 <= k <= E:
            raise ConfigError("num_experts_per_tok", k, f"an integer in [1, n_routed_experts={E}]")
        if d["topk_method"] == "greedy":
            n_group = d["n_group"] or 1
            topk_group = d["topk_group"] or n_group
        else:
            n_group, topk_group = d["n_group"], d["topk_group"]
            if not isinstance(n_group, int) or n_group < 1 or E % n_group:
                raise ConfigError(
                    "n_group", n_group, f"a positive divisor of n_routed_experts={E} for {d['topk_method']}"
                )
            if not isinstance(topk_group, int) or not 1 <= topk_group <= n_group:
                raise ConfigError("topk_group", topk_group, f"an integer in [1, n_group={n_group}]")
            if topk_group * (E // n_group) < k:
                raise ConfigError("topk_group", topk_group, f"enough groups to hold num_experts_per_tok={k} experts")
            if d["topk_method"] == "noaux_tc" and E // n_group < 2:
                raise ConfigError("n_group", n_group, "groups of at least 2 experts for noaux_tc")

        archs = raw.get("architectures") or [DEFAULT_ARCHITECTURES[model_type]]
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise ConfigError("architectures", archs, "a list of model class names")

        eos = raw.get("eos_token_id", d["eos_token_id"])
        eos_list = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))

        return cls(
            model_type=model_type,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            moe_intermediate_size=d["moe_intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            n_shared_experts=d["n_shared_experts"] or 0,
            n_routed_experts=E,
            num_experts_per_tok=k,
            routed_scaling_factor=float(d["routed_scaling_factor"]),
            kv_lora_rank=d["kv_lora_rank"],
            q_lora_rank=d["q_lora_rank"],
            qk_rope_head_dim=d["qk_rope_head_dim"],
            v_head_dim=d["v_head_dim"],
            qk_nope_head_dim=d["qk_nope_head_dim"],
            n_group=n_group,
            topk_group=topk_group,
            topk_method=d["topk_method"],
            scoring_func=d["scoring_func"],
            norm_topk_prob=bool(d["norm_topk_prob"]),
            first_k_dense_replace=d["first_k_dense_replace"] or 0,
            moe_layer_freq=d["moe_layer_freq"],
            max_position_embeddings=d["max_position_embeddings"],
            rms_norm_eps=float(d["rms_norm_eps"]),
            rope=_parse_rope(raw, d),
            rope_interleave=bool(d["rope_interleave"]) if model_type == "deepseek_v3" else True,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", False)),
            bos_token_id=raw.get("bos_token_id", d["bos_token_id"]),
            eos_token_id=eos_list,
            num_nextn_predict_layers=int(raw.get("num_nextn_predict_layers", 0) or 0),
            architectures=tuple(archs),
            quantization=None
            if raw.get("quantization_config") is None
            else QuantConfig.from_dict(raw["quantization_config"]),
        )


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(name, value, f"an integer >= {minimum}")


def _parse_rope(raw: dict[str, Any], d: dict[str, Any]) -> RopeConfig:
    """Accepts the checkpoint style (``rope_theta`` + ``rope_scaling``) and transformers 5's
    ``rope_parameters``; both spell the type as ``type`` or ``rope_type``."""
    theta = raw.get("rope_theta")
    params = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError("rope_scaling", params, "null or an object")
    if theta is None:
        theta = params.get("rope_theta", d["rope_theta"])
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ConfigError("rope_scaling.type", rope_type, ", ".join(ROPE_TYPES))
    if rope_type == "default":
        return RopeConfig(theta=float(theta))
    orig = params.get("original_max_position_embeddings", d["max_position_embeddings"])
    factor = params.get("factor")
    if factor is None:
        factor = d["max_position_embeddings"] / orig
    if not isinstance(factor, int | float) or factor < 1:
        raise ConfigError("rope_scaling.factor", factor, "a number >= 1")
    return RopeConfig(
        rope_type="yarn",
        theta=float(theta),
        factor=float(factor),
        original_max_position_embeddings=int(orig),
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        mscale=float(params.get("mscale") or 0.0),
        mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
        truncate=bool(params.get("truncate", True)),
        attention_factor=params.get("attention_factor"),
    )
