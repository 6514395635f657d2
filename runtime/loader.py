"""Checkpoint and tokenizer loading from a Hugging Face model folder.

Weights: ``model.safetensors`` or shards listed in ``model.safetensors.index.json``, opened with
``safe_open`` (memory-mapped, zero-copy until the cast/copy into the model's own storage). The model class
and the checkpoint-name → parameter mapping come from :mod:`runtime.registry`. Everything is validated before
any tensor is copied: every missing, unexpected and mis-shaped tensor is reported in one
:class:`CheckpointError`, as are missing or truncated shard files.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from runtime.config import ModelConfig
from runtime.interfaces import PiecewiseCausalLM
from runtime.parallel.dist import ParallelState
from runtime.parallel.shard import checkpoint_slice
from runtime.quant import fp8 as fp8_format
from runtime.registry import WeightNames, architecture, build_model

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


SHOWN_TENSORS = 5  # tensors listed per kind of mismatch; the rest are counted
log = logging.getLogger(__name__)
FP8_MODES = ("auto", "keep", "dequantize")


class CheckpointError(RuntimeError):
    """The checkpoint folder cannot be loaded; the message lists every problem found."""


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
        dtype = str(dtype)
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; allowed: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_config(path: str | Path) -> ModelConfig:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{path}: no config.json")
    return ModelConfig.from_json_file(cfg)


def _shard_files(path: Path) -> tuple[dict[str, str] | None, list[str]]:
    """(weight_map or None, shard file names)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from exc
        return weight_map, sorted(set(weight_map.values()))
    if (path / "model.safetensors").is_file():
        return None, ["model.safetensors"]
    raise CheckpointError(f"{path}: neither model.safetensors nor model.safetensors.index.json found")


@dataclass
class _Inventory:
    where: dict[str, str] = field(default_factory=dict)  # tensor name → shard file
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)  # safetensors dtype strings ("BF16", "F8_E4M3", ...)


def _inventory(path: Path) -> _Inventory:
    from safetensors import safe_open

    weight_map, files = _shard_files(path)
    missing_files = [f for f in files if not (path / f).is_file()]
    if missing_files:
        raise CheckpointError(
            f"{path}: missing shard file(s) named in model.safetensors.index.json: {', '.join(missing_files)}"
        )
    inv, problems, unreadable = _Inventory(), [], set()
    for f in files:
        fp = path / f
        try:
            with safe_open(str(fp), framework="pt") as sf:
                for name in sf.keys():  # noqa: SIM118 (safe_open is not a dict)
                    inv.where[name] = f
                    sl = sf.get_slice(name)
                    inv.shapes[name] = tuple(sl.get_shape())
                    inv.dtypes[name] = sl.get_dtype()
        except Exception as exc:  # safetensors raises SafetensorError / OSError for corrupt files
            problems.append(f"{f}: unreadable or truncated safetensors file ({exc})")
            unreadable.add(f)
            continue
        expected_end = _data_end(fp)
        if expected_end is not None and fp.stat().st_size < expected_end:
            problems.append(f"{f}: truncated ({fp.stat().st_size} bytes, header needs {expected_end})")
    if weight_map is not None:
        for name, f in weight_map.items():
            if f in unreadable:
                continue
            if name not in inv.where:
                problems.append(f"index maps {name} to {f}, but no shard contains it")
            elif inv.where[name] != f:
                problems.append(f"index maps {name} to {f}, but it is in {inv.where[name]}")
    if problems:
        raise CheckpointError(f"{path}: corrupt checkpoint:\n  " + "\n  ".join(problems))
    return inv


def _data_end(fp: Path) -> int | None:
    """Byte offset where the last tensor ends, from the safetensors header (8-byte length + JSON)."""
    try:
        with fp.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
    except (OSError, ValueError):
        return None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return 8 + n + max(ends, default=0)


def check_names(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]]) -> None:
    """``expected``: the model's parameter shapes; ``found``: the checkpoint's, under parameter names."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = sorted(
        f"{n}: checkpoint {list(found[n])} vs model {list(expected[n])}"
        for n in set(expected) & set(found)
        if tuple(found[n]) != tuple(expected[n])
    )
    if missing or unexpected or misshaped:
        parts = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                shown = items[:SHOWN_TENSORS]
                more = [f"... and {len(items) - len(shown)} more"] if len(items) > len(shown) else []
                parts.append(f"{len(items)} {title} tensor(s):\n    " + "\n    ".join([*shown, *more]))
        hint = "\n  (config.json does not describe these weights)" if misshaped else ""
        raise CheckpointError("checkpoint does not match the model:\n  " + "\n  ".join(parts) + hint)


def _parameters(model: PiecewiseCausalLM, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint fills, by name (a tied LM head is the embedding's)."""
    params = dict(model.state_dict(keep_vars=True))
    if config.tie_word_embeddings:
        params.pop("lm_head.weight", None)
    return params


def _checkpoint_names(inv: _Inventory, names: WeightNames, config: ModelConfig) -> dict[str, str]:
    """Parameter name → the checkpoint tensor that fills it (tensors the model does not run are left out,
    with one log line saying which)."""
    out, skipped = {}, []
    for name in inv.shapes:
        param = names.parameter(name, config)
        if param is not None:
            out[param] = name
        else:
            skipped.append(name)
    if skipped:
        log.info(
            "skipping %d checkpoint tensor(s) the model does not run (%s), e.g. %s",
            len(skipped),
            names.skipped_reason(config),
            skipped[0],
        )
    return out


def _fp8_scales(inv: _Inventory, source: dict[str, str], config: ModelConfig, model_params: set[str]) -> dict[str, str]:
    """Check the block-scaled FP8 layout and take out of ``source`` the scales the model has no parameter for
    (its weight is dequantized at load). Returns weight parameter → the ``weight_scale_inv`` tensor to
    dequantize it with; scales the model holds (FP8 modules) stay in ``source``, loaded as they are.

    Every problem is reported in one CheckpointError naming the tensor and what was expected: a quantized
    weight that is not e4m3, a missing, mis-shaped or non-fp32 scale, a scale with no weight, an FP8 tensor
    where the format keeps bf16, or FP8 tensors in a checkpoint whose config.json declares no
    ``quantization_config``."""
    q = config.quantization
    problems: list[str] = []
    scales: dict[str, str] = {}
    for param, name in list(source.items()):
        if fp8_format.is_scale(name):
            if param not in model_params:
                del source[param]
            weight = fp8_format.weight_of_scale(name)
            if q is None:
                problems.append(f"{name}: an FP8 block scale, but config.json has no quantization_config")
            elif not fp8_format.is_quantized(weight) or weight not in inv.shapes:
                problems.append(f"{name}: a block scale with no FP8 weight {weight} to scale")
    for param, name in source.items():
        dtype = inv.dtypes[name]
        if q is None or not fp8_format.is_quantized(name):
            if dtype == fp8_format.SAFETENSORS_FP8:
                why = "no quantization_config in config.json" if q is None else "the FP8 format keeps it bf16"
                problems.append(f"{name}: dtype {dtype}, expected a bf16/fp16/fp32 tensor ({why})")
            continue
        if dtype != fp8_format.SAFETENSORS_FP8:
            problems.append(
                f"{name}: dtype {dtype}, expected {fp8_format.SAFETENSORS_FP8} (float8_e4m3fn, quant_method fp8)"
            )
        sname = fp8_format.scale_name(name)
        want = fp8_format.scale_shape(inv.shapes[name], q.weight_block_size)
        grid = f"{list(want)} fp32 ({list(inv.shapes[name])} in {list(q.weight_block_size)} blocks)"
        if sname not in inv.shapes:
            problems.append(f"{sname}: missing; expected the block scales of {name}: {grid}")
            continue
        if tuple(inv.shapes[sname]) != want:
            problems.append(f"{sname}: shape {list(inv.shapes[sname])}, expected {grid}")
        if inv.dtypes[sname] != fp8_format.SAFETENSORS_SCALE:
            problems.append(f"{sname}: dtype {inv.dtypes[sname]}, expected {fp8_format.SAFETENSORS_SCALE}")
        if fp8_format.scale_name(param) not in model_params:
            scales[param] = sname
    if problems:
        raise CheckpointError("FP8 checkpoint does not match its format:\n  " + "\n  ".join(sorted(problems)))
    return scales


def load_model(
    path: str | Path,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    parallel: ParallelState | None = None,
    fp8: str = "auto",
) -> PiecewiseCausalLM:
    """Build the model for ``path``'s config.json and fill it from the safetensors shards.

    An FP8 checkpoint (``quantization_config``, runtime.quant.fp8) is either dequantized at load into
    ``dtype`` (``fp8="dequantize"``; the CPU's way, exact) or kept in FP8 (``"keep"``: FP8 modules run the FP8
    kernels; ``kv_b_proj`` is still dequantized). ``"auto"``: keep on CUDA, dequantize elsewhere.

    With ``parallel``, the rank builds only its shard and reads only that from the memory-mapped files:
    its own experts' tensors, and for tensor-parallel weights the rows / columns it owns
    (``get_slice(name)[...]``). The checkpoint is still validated against the whole model first."""
    from safetensors import safe_open

    path = Path(path)
    config = load_config(path)
    arch = architecture(config)
    dtype = parse_dtype(dtype)
    if fp8 not in FP8_MODES:
        raise ValueError(f"fp8 {fp8!r}; allowed: {', '.join(FP8_MODES)}")
    keep = config.quantization is not None and (
        fp8 == "keep" or (fp8 == "auto" and torch.device(device).type == "cuda")
    )
    if keep and fp8 == "auto" and config.moe_intermediate_size % config.quantization.weight_block_size[0]:
        log.warning(
            "moe_intermediate_size %d is not a multiple of the FP8 block %d: loading the FP8 weights dequantized",
            config.moe_intermediate_size,
            config.quantization.weight_block_size[0],
        )
        keep = False
    inv = _inventory(path)
    sharded = parallel is not None and parallel.world_size > 1
    full = build_model(config, dtype=dtype, device="meta", fp8=keep) if sharded else None
    model = build_model(config, dtype=dtype, device=device, parallel=parallel, fp8=keep)
    source = _checkpoint_names(inv, arch.weight_names, config)
    scales = _fp8_scales(inv, source, config, set(_parameters(full or model, config)))
    expected = {k: tuple(v.shape) for k, v in _parameters(full or model, config).items()}
    check_names(expected, {param: inv.shapes[name] for param, name in source.items()})
    params = _parameters(model, config)
    if sharded and keep:  # every FP8 shard must own whole scale blocks: checked before anything is read
        for param, dst in params.items():
            if dst.dtype == fp8_format.FP8_DTYPE:
                name = source[param]
                idx = checkpoint_slice(inv.shapes[name], tuple(dst.shape), parallel)
                if idx is not None:
                    _check_blocks(idx, inv.shapes[name], config, name)
    by_file: dict[str, list[str]] = {}
    for param in params:
        by_file.setdefault(inv.where[source[param]], []).append(param)
    with torch.no_grad():
        for f, names in by_file.items():
            with safe_open(str(path / f), framework="pt") as sf:
                for param in names:
                    dst, name = params[param], source[param]
                    idx = checkpoint_slice(inv.shapes[name], tuple(dst.shape), parallel) if sharded else None
                    src = sf.get_tensor(name) if idx is None else sf.get_slice(name)[idx]
                    if param in scales:
                        src = _dequantized(path, inv, name, scales[param], src, idx, config)
                    dst.copy_(src.to(device=dst.device, dtype=dst.dtype))
    return model


def _check_blocks(idx, full: tuple[int, ...], config: ModelConfig, name: str) -> None:
    try:
        fp8_format.block_slice(idx, full, config.quantization.weight_block_size, name)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc


def _dequantized(path: Path, inv: _Inventory, name: str, sname: str, q, idx, config: ModelConfig) -> torch.Tensor:
    """The fp32 weight of FP8 tensor ``name`` (already read: ``q``, this rank's slice ``idx`` of it), from the
    matching block rows / columns of its scales (a shard must fall on block boundaries)."""
    from safetensors import safe_open

    block = config.quantization.weight_block_size
    with safe_open(str(path / inv.where[sname]), framework="pt") as sf:
        if idx is None:
            scale = sf.get_tensor(sname)
        else:
            try:
                scale = sf.get_slice(sname)[fp8_format.block_slice(idx, inv.shapes[name], block, name)]
            except ValueError as exc:
                raise CheckpointError(str(exc)) from exc
    return fp8_format.dequantize(q, scale, block)


# ---- tokenizer ------------------------------------------------------------------------------------


class Tokenizer:
    """``tokenizers`` BPE plus the chat template and special tokens from tokenizer_config.json."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise CheckpointError(f"{path}: no tokenizer.json")
        self._tok = HFTokenizer.from_file(str(tj))
        cfg_file = path / "tokenizer_config.json"
        cfg: dict[str, Any] = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        self.bos_token = _token_str(cfg.get("bos_token"))
        self.eos_token = _token_str(cfg.get("eos_token"))
        self.pad_token = _token_str(cfg.get("pad_token"))
        self.add_bos = bool(cfg.get("add_bos_token", True)) and self.bos_token is not None
        self.chat_template: str | None = cfg.get("chat_template")
        self.bos_token_id = self._id(self.bos_token)
        self.eos_token_id = self._id(self.eos_token)
        self.pad_token_id = self._id(self.pad_token)
        self._special_ids = set(self._tok.get_added_tokens_decoder())  # token ids of added (special) tokens

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        want_bos = (self.add_bos if add_bos is None else add_bos) and self.bos_token_id is not None
        if want_bos and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (a byte-level BPE token may hold part of a UTF-8 character, so its
        text alone cannot say); special tokens give their text's bytes."""
        piece = self._tok.id_to_token(token_id) or ""
        if token_id not in self._special_ids and all(ch in _BYTE_OF for ch in piece):
            return bytes(_BYTE_OF[ch] for ch in piece)
        return self._tok.decode([token_id], skip_special_tokens=False).encode()

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render with jinja2 (sandboxed, as transformers does); the result already holds the BOS text."""
        if not self.chat_template:
            raise CheckpointError("tokenizer_config.json has no chat_template")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        text = self.apply_chat_template(messages, add_generation_prompt)
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return ids


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, character → byte (every byte maps to one printable character)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_OF = _byte_level_alphabet()


def _token_str(tok: Any) -> str | None:
    if isinstance(tok, dict):  # old transformers format {"content": ...}
        return tok.get("content")
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    return Tokenizer(path)
