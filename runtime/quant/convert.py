"""``moe-runtime quantize``: a bf16 / fp32 Hugging Face checkpoint → the block-scaled FP8 layout.

One input shard at a time (memory stays at one shard), each written as an output shard of the same name,
so the output keeps the input's sharding; ``model.safetensors.index.json`` lists them and config.json gains
``quantization_config``. Other files (tokenizer, generation config) are copied as they are.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from runtime.config import QuantConfig
from runtime.quant import fp8


class QuantizeError(ValueError):
    """The input folder cannot be quantized (the message says why)."""


def _input_shards(src: Path) -> list[str]:
    index = src / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if (src / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise QuantizeError(f"{src}: neither model.safetensors nor model.safetensors.index.json found")


def quantize_checkpoint(src: str | Path, dst: str | Path, block: tuple[int, int] = (128, 128)) -> dict[str, int]:
    """Write the FP8 checkpoint of ``src`` to ``dst``; returns counts of quantized and kept tensors."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    cfg_file = src / "config.json"
    if not cfg_file.is_file():
        raise QuantizeError(f"{src}: no config.json")
    raw = json.loads(cfg_file.read_text())
    if raw.get("quantization_config") is not None:
        raise QuantizeError(f"{src}: config.json already has a quantization_config ({raw['quantization_config']})")
    shards = _input_shards(src)
    if dst.resolve() == src.resolve():
        raise QuantizeError(f"{dst}: the output folder must differ from the input")
    dst.mkdir(parents=True, exist_ok=True)
    n = len(shards)
    weight_map: dict[str, str] = {}
    total, counts = 0, {"quantized": 0, "kept": 0}
    for i, shard in enumerate(shards, 1):
        with safe_open(str(src / shard), framework="pt") as sf:
            tensors = {name: sf.get_tensor(name) for name in sf.keys()}  # noqa: SIM118
        for name, t in tensors.items():
            if t.dtype == fp8.FP8_DTYPE:
                raise QuantizeError(f"{src / shard}: {name} is already float8_e4m3fn")
        out = fp8.quantize_state_dict(tensors, block)
        counts["quantized"] += sum(1 for k in out if fp8.is_scale(k))
        counts["kept"] += sum(1 for k in out if not fp8.is_scale(k) and not fp8.is_quantized(k))
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file(out, str(dst / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(out, fname))
        total += sum(t.numel() * t.element_size() for t in out.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    raw["quantization_config"] = QuantConfig(weight_block_size=block).to_json()
    raw["torch_dtype"] = "bfloat16"
    (dst / "config.json").write_text(json.dumps(raw, indent=2))
    for f in src.iterdir():
        if (
            f.is_file()
            and not f.name.endswith(".safetensors")
            and f.name
            not in (
                "config.json",
                "model.safetensors.index.json",
            )
        ):
            shutil.copy2(f, dst / f.name)
    return counts
