"""Tiny random DeepSeek-V2/V3 checkpoints in exactly the Hugging Face layout.

Tests, the local demo and the CPU benchmarks use these; nothing downloads weights. The folder holds
``config.json``, two or more safetensors shards with ``model.safetensors.index.json`` (so sharded loading
is always exercised), ``tokenizer.json`` (a byte-level BPE trained here on a small built-in corpus),
``tokenizer_config.json`` with a chat template, and ``generation_config.json``. transformers'
``AutoModelForCausalLM.from_pretrained`` loads the folder too.

Weights are drawn at scale 1/sqrt(fan_in) (not 0.02) so activations, router scores and logits are
well spread: greedy decoding then has no near-ties and parity tests are meaningful.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from runtime.config import ModelConfig

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜pad｜>"

CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n\n"
    "{% elif message['role'] == 'assistant' %}Assistant: {{ message['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)

CORPUS = """\
The order was placed at night from a new device and the payment card was issued in another country.
Is this transaction a fraud risk? Answer yes or no. The answer is no. The answer is yes.
Risk score: low. Risk score: high. Risk level is medium. The risk is low because the account is old.
The customer has 3 previous orders, 0 chargebacks and an account age of 365 days.
Amount 1250.00 USD, shipping address differs from billing address, email domain is new.
User: Is the order risky? Assistant: The order looks safe, the risk is low.
User: Summarize the factors. Assistant: High amount, new device, foreign card, many attempts.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 20 50 100 250 500 1000 2024 2025.
The model reads the features and returns a score between 0 and 1 and a list of factors.
Feedback with the true label keeps the accuracy of the service under watch.
A mixture of experts routes each token to a few experts, and shared experts see every token.
The quick brown fox jumps over the lazy dog. Hello world, this is a tiny language model.
Please answer the question with one word: yes, no, low, high, true, false, safe, unsafe.
velocity ip_country card_country device_age account_age amount merchant category hour attempts
"""


def tiny_config(arch: str = "v2", **overrides: Any) -> dict[str, Any]:
    """config.json contents. v2: softmax + greedy, q_lora_rank null. v3: sigmoid + noaux_tc with
    e_score_correction_bias, q_lora_rank set, YaRN rope scaling."""
    common: dict[str, Any] = {
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "moe_intermediate_size": 32,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "kv_lora_rank": 32,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "n_group": 4,
        "topk_group": 2,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 2,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    if arch == "v2":
        cfg = {
            "architectures": ["DeepseekV2ForCausalLM"],
            "model_type": "deepseek_v2",
            **common,
            "q_lora_rank": None,
            "n_shared_experts": 2,
            "topk_method": "greedy",
            "scoring_func": "softmax",
            "norm_topk_prob": False,
            "routed_scaling_factor": 1.0,
            "rope_scaling": None,
        }
    elif arch == "v3":
        cfg = {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3",
            **common,
            "q_lora_rank": 24,
            "n_shared_experts": 1,
            "topk_method": "noaux_tc",
            "scoring_func": "sigmoid",
            "norm_topk_prob": True,
            "routed_scaling_factor": 2.5,
            "num_nextn_predict_layers": 0,
            "rope_scaling": {
                "type": "yarn",
                "factor": 8.0,
                "original_max_position_embeddings": 64,
                "beta_fast": 32,
                "beta_slow": 1,
                "mscale": 1.0,
                "mscale_all_dim": 0.8,
            },
        }
    else:
        raise ValueError(f"arch {arch!r}; allowed: v2, v3")
    cfg.update(overrides)
    return cfg


def random_state_dict(config: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """fp32 tensors for every checkpoint name, in the model's (checkpoint) order."""
    from runtime.registry import build_model

    names = {k: v.shape for k, v in build_model(config, device="meta").state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, shape in names.items():
        if name.endswith("norm.weight") or "layernorm" in name:
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith("e_score_correction_bias"):
            t = 0.1 * torch.randn(shape, generator=g)
        elif name.endswith("embed_tokens.weight"):
            t = torch.randn(shape, generator=g)
        elif name == "lm_head.weight":
            t = 2.0 * torch.randn(shape, generator=g) / math.sqrt(shape[1])
        else:
            t = torch.randn(shape, generator=g) / math.sqrt(shape[-1])
        out[name] = t.contiguous()
    return out


def save_sharded(tensors: dict[str, torch.Tensor], out_dir: Path, num_shards: int = 2) -> None:
    """Write ``model-0000i-of-0000n.safetensors`` shards of about equal size plus the index json."""
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    per_shard = total / num_shards
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if size >= per_shard * len(shards) and len(shards) < num_shards:
            shards.append({})
        shards[-1][name] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def train_tokenizer(vocab_size: int):
    """Byte-level BPE with DeepSeek's special tokens. Its post-processor prepends BOS, as DeepSeek's
    tokenizer.json does, so transformers' ``AutoTokenizer`` encodes text with BOS exactly as the server
    does (the server adds it from ``add_bos_token``; without a post-processor transformers would not)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer)
    bos = (BOS, tok.token_to_id(BOS))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[bos]
    )
    return tok


def make_tiny(out_dir: str | Path, arch: str = "v2", seed: int = 0, fp8: bool = False, **overrides: Any) -> Path:
    """Write a complete tiny checkpoint folder; ``overrides`` change config.json fields. ``fp8``: the
    DeepSeek-V3 FP8 layout (runtime.quant.fp8): the same random weights block-quantized (the tiny dims are
    not multiples of 128, so the last scale blocks are partial), the rest bf16."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw = tiny_config(arch, **overrides)
    config = ModelConfig.from_dict(raw)
    tensors = random_state_dict(config, seed)
    if fp8:
        from runtime.config import QuantConfig
        from runtime.quant.fp8 import quantize_state_dict

        q = QuantConfig()
        raw = {**raw, "quantization_config": q.to_json(), "torch_dtype": "bfloat16"}
        tensors = quantize_state_dict(tensors, q.weight_block_size)
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    save_sharded(tensors, out, num_shards=2)

    tok = train_tokenizer(raw["vocab_size"])
    if tok.get_vocab_size() > raw["vocab_size"]:
        raise RuntimeError("tokenizer larger than vocab_size")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": BOS,
                "eos_token": EOS,
                "pad_token": PAD,
                "add_bos_token": True,
                "add_eos_token": False,
                "model_max_length": raw["max_position_embeddings"],
                "chat_template": CHAT_TEMPLATE,
            },
            indent=2,
            ensure_ascii=False,
        )
    )
    (out / "generation_config.json").write_text(
        json.dumps(
            {"bos_token_id": raw["bos_token_id"], "eos_token_id": raw["eos_token_id"], "do_sample": False},
            indent=2,
        )
    )
    return out
