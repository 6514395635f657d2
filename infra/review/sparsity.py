"""Parameters a DeepSeek-style MoE model holds against those it uses per token, from its config.json.

The source document claims sparse activation cuts compute by more than 40% against a dense model; the
review checks that for the model actually served. Counting follows the modelling code of DeepSeek-V2/V3
(and ours in runtime/model.py), layer by layer:

- attention (MLA): ``q_proj`` (or ``q_a_proj`` + norm + ``q_b_proj`` with a ``q_lora_rank``),
  ``kv_a_proj_with_mqa``, its norm, ``kv_b_proj``, ``o_proj``; two RMSNorms per layer;
- a dense MLP (gate, up, down: 3 · hidden · intermediate) on the first ``first_k_dense_replace`` layers
  and on layers off ``moe_layer_freq``;
- an MoE layer: the router (``n_routed_experts`` · hidden, plus a correction bias with ``noaux_tc``),
  shared experts and routed experts of 3 · hidden · moe_intermediate each. Per token only the shared
  experts and ``num_experts_per_tok`` routed ones run.

Stated convention: *total* counts every weight, the input embedding included (what "671B" means).
*Activated* counts the weights a token's forward pass multiplies with: the input embedding is a table
lookup, not a matmul, so it is excluded; ``lm_head`` is included. With this convention DeepSeek-V3 gives
671.0B total / 36.6B activated and V2-Lite 15.7B / 2.45B, the figures DeepSeek publishes (37B, 2.4B).
The dense model "of the same size" uses every weight per token, so its compute counts the total less the
input embedding; compute saved = 1 − activated / that.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

#: config.json fields the count needs (q_lora_rank may be null; the others must be positive integers).
REQUIRED = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
)
MOE_FIELDS = ("moe_intermediate_size", "n_routed_experts", "num_experts_per_tok")


class ModelConfigError(ValueError):
    """config.json lacks a field the count needs, or holds a bad value; the message names it."""


@dataclass(frozen=True)
class Sparsity:
    total_params: int
    activated_params: int
    dense_equivalent_params: int  # what a dense model of the same size multiplies with per token
    embedding_params: int  # input embedding: in the total, not in compute
    attention_params: int  # all layers
    dense_mlp_params: int  # all dense-MLP layers
    shared_expert_params: int  # all MoE layers
    routed_expert_params: int  # all MoE layers, every expert
    activated_routed_params: int  # all MoE layers, top-k experts
    router_params: int
    moe_layers: int
    dense_layers: int
    experts_per_token: str  # "2 shared + 6 of 64 routed"

    @property
    def activated_fraction(self) -> float:
        return self.activated_params / self.dense_equivalent_params

    @property
    def compute_saved(self) -> float:
        """1 − activated / dense-equivalent: the share of per-token matmul work sparsity saves."""
        return 1.0 - self.activated_fraction

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"activated_fraction": self.activated_fraction, "compute_saved": self.compute_saved}


def _int(cfg: dict[str, Any], name: str, *, default: int | None = None) -> int:
    value = cfg.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ModelConfigError(f"model config: {name} = {value!r}: expected a non-negative integer")
    return value


def count(cfg: dict[str, Any]) -> Sparsity:
    """Total and activated parameters of a DeepSeek-V2/V3-style config (see the module docstring)."""
    missing = [name for name in REQUIRED if name not in cfg]
    if missing:
        raise ModelConfigError(f"model config: missing {', '.join(missing)} (a DeepSeek-V2/V3 config.json has them)")
    h = _int(cfg, "hidden_size")
    layers = _int(cfg, "num_hidden_layers")
    heads = _int(cfg, "num_attention_heads")
    nope, rope, v = _int(cfg, "qk_nope_head_dim"), _int(cfg, "qk_rope_head_dim"), _int(cfg, "v_head_dim")
    kv_lora = _int(cfg, "kv_lora_rank")
    q_lora = cfg.get("q_lora_rank")
    q_head = nope + rope
    if q_lora is None:
        q_params = h * heads * q_head
    else:
        q_lora = _int(cfg, "q_lora_rank")
        q_params = h * q_lora + q_lora + q_lora * heads * q_head  # q_a_proj, q_a_layernorm, q_b_proj
    attention = q_params + h * (kv_lora + rope) + kv_lora + kv_lora * heads * (nope + v) + heads * v * h
    norms = 2 * h
    dense_mlp = 3 * h * _int(cfg, "intermediate_size")

    routed = _int(cfg, "n_routed_experts", default=0) if cfg.get("n_routed_experts") is not None else 0
    if routed:
        missing = [name for name in MOE_FIELDS if cfg.get(name) is None]
        if missing:
            raise ModelConfigError(f"model config: n_routed_experts = {routed} but {', '.join(missing)} missing")
    first_dense = _int(cfg, "first_k_dense_replace", default=0)
    freq = _int(cfg, "moe_layer_freq", default=1) or 1
    moe_layers = sum(1 for i in range(layers) if routed and i >= first_dense and i % freq == 0)
    dense_layers = layers - moe_layers
    expert = 3 * h * _int(cfg, "moe_intermediate_size", default=0) if routed else 0
    shared = _int(cfg, "n_shared_experts", default=0) if cfg.get("n_shared_experts") is not None else 0
    top_k = _int(cfg, "num_experts_per_tok", default=0) if routed else 0
    if routed and not 0 < top_k <= routed:
        raise ModelConfigError(f"model config: num_experts_per_tok = {top_k}: expected 1..n_routed_experts ({routed})")
    router = routed * h + (routed if cfg.get("topk_method") == "noaux_tc" else 0)

    vocab = _int(cfg, "vocab_size")
    embedding = vocab * h
    lm_head = 0 if cfg.get("tie_word_embeddings") else vocab * h
    common = layers * (attention + norms) + dense_layers * dense_mlp + moe_layers * (router + shared * expert)
    total = embedding + lm_head + h + common + moe_layers * routed * expert
    activated = lm_head + h + common + moe_layers * top_k * expert
    return Sparsity(
        total_params=total,
        activated_params=activated,
        dense_equivalent_params=total - embedding,
        embedding_params=embedding,
        attention_params=layers * attention,
        dense_mlp_params=dense_layers * dense_mlp,
        shared_expert_params=moe_layers * shared * expert,
        routed_expert_params=moe_layers * routed * expert,
        activated_routed_params=moe_layers * top_k * expert,
        router_params=moe_layers * router,
        moe_layers=moe_layers,
        dense_layers=dense_layers,
        experts_per_token=f"{shared} shared + {top_k} of {routed} routed" if routed else "dense model",
    )


def load(path: Path) -> Sparsity:
    """Count from a config.json file; a missing or malformed file raises ModelConfigError naming it."""
    try:
        cfg = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ModelConfigError(f"model config {path}: file not found") from None
    except json.JSONDecodeError as err:
        raise ModelConfigError(f"model config {path}: not JSON ({err})") from None
    if not isinstance(cfg, dict):
        raise ModelConfigError(f"model config {path}: expected a JSON object")
    return count(cfg)
