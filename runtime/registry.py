"""Architecture registry: config.json's ``architectures`` → the model class, how checkpoint tensor names map
onto its parameters, and how it is sharded; :func:`build_model` builds whichever class the config names.

Adding an architecture is one :data:`ARCHITECTURES` entry plus the module with its class: an ``nn.Module``
built from a :class:`~runtime.config.ModelConfig` that provides :class:`runtime.interfaces.PiecewiseCausalLM`
and ``on_materialized()`` (what :func:`build_model` calls once the weights have their dtype and device). An
``architectures`` value with no entry is refused with the list of registered names.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from runtime.config import ConfigError, ModelConfig
from runtime.interfaces import PiecewiseCausalLM
from runtime.model import DeepseekForCausalLM
from runtime.moe import MoE
from runtime.parallel.dist import ParallelState
from runtime.parallel.shard import shard_model
from runtime.quant.fp8 import DEQUANTIZED_IN_FP8_MODELS, Fp8Linear, is_quantized


@dataclass(frozen=True)
class WeightNames:
    """Checkpoint tensor name → model parameter name (``state_dict`` key), or None for a tensor the model does
    not run. The default is one-to-one."""

    def parameter(self, name: str, config: ModelConfig) -> str | None:
        return name

    def skipped_reason(self, config: ModelConfig) -> str:
        """What the tensors :meth:`parameter` leaves out are (for the loader's log line)."""
        return "not part of the model"


@dataclass(frozen=True)
class DeepseekWeightNames(WeightNames):
    """One-to-one, DeepSeek-V3's multi-token-prediction layers (``model.layers.{>= num_hidden_layers}``) left
    out, as transformers does. The stacks the fast paths read - each MoE's ``w13`` (gate rows, then up rows)
    and ``w2`` over its experts, each attention's ``in_proj_weight`` (``q_proj`` or ``q_a_proj``, then
    ``kv_a_proj_with_mqa``) - are non-persistent buffers whose slices are those parameters, so loading a
    named tensor fills its stack in place and no name needs rewriting."""

    def parameter(self, name: str, config: ModelConfig) -> str | None:
        if config.num_nextn_predict_layers > 0:
            m = re.match(r"model\.layers\.(\d+)\.", name)
            if m and int(m.group(1)) >= config.num_hidden_layers:
                return None
        return name

    def skipped_reason(self, config: ModelConfig) -> str:
        first = config.num_hidden_layers
        last = first + config.num_nextn_predict_layers - 1
        layers = f"model.layers.{first}" if last == first else f"model.layers.{first}-{last}"
        return f"multi-token-prediction layer(s) {layers}: not used for decoding"


@dataclass(frozen=True)
class Architecture:
    model_class: Callable[[ModelConfig], nn.Module]
    weight_names: WeightNames = WeightNames()
    # cut a model on the meta device to one rank's shard (tensor / expert parallelism); None: unsupported
    shard: Callable[[nn.Module, ParallelState], object] | None = None


_DEEPSEEK = Architecture(DeepseekForCausalLM, DeepseekWeightNames(), shard_model)

ARCHITECTURES: dict[str, Architecture] = {
    "DeepseekV2ForCausalLM": _DEEPSEEK,
    "DeepseekV3ForCausalLM": _DEEPSEEK,
}


def architecture(config: ModelConfig) -> Architecture:
    """The entry for the config's first registered ``architectures`` name; ConfigError when none is."""
    for name in config.architectures:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise ConfigError("architectures", list(config.architectures), ", ".join(ARCHITECTURES))


@contextlib.contextmanager
def _skip_init() -> Iterator[None]:
    """No-op ``torch.nn.init`` while building on meta: nothing is initialized there anyway, and ``normal_``
    on meta alone pulls in torch._dynamo the first time (seconds)."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_")
    saved = {n: getattr(nn.init, n) for n in names}
    try:
        for n in names:
            setattr(nn.init, n, lambda t, *a, **k: t)
        yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


def build_model(
    config: ModelConfig,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    parallel: ParallelState | None = None,
    fp8: bool = False,
) -> PiecewiseCausalLM:
    """An uninitialized model on ``device``: built on the meta device then materialized, so no time is spent
    on random init that the checkpoint overwrites (and no CPU detour for GPU models). With ``parallel``
    (several ranks), layers are cut to this rank's shard while still on meta, so only the shard is allocated.
    ``fp8``: the quantized projections and expert stacks hold the checkpoint's FP8 weights and block scales
    (runtime.quant.fp8; the config must have a ``quantization_config``)."""
    arch = architecture(config)
    with torch.device("meta"), _skip_init():
        model = arch.model_class(config)
    if parallel is not None and parallel.world_size > 1:
        if arch.shard is None:
            raise ValueError(f"{type(model).__name__} cannot be sharded (tensor / expert parallelism)")
        arch.shard(model, parallel)
    if fp8:
        if config.quantization is None:
            raise ValueError("fp8 weights need a quantization_config in config.json")
        use_fp8(model, config.quantization.weight_block_size)
    model = model.to(dtype).to_empty(device=device)
    model.on_materialized()
    model.requires_grad_(False)
    return model.eval()


def use_fp8(model: nn.Module, block: tuple[int, int]) -> nn.Module:
    """In place, on the meta device, after sharding: every quantized projection (:func:`is_quantized`) becomes
    an :class:`Fp8Linear` of the same (local) shape, a row-parallel one keeping its all-reduce group, and
    every MoE keeps its experts' stacks in FP8 (``MoE.use_fp8``)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, MoE):
            module.use_fp8(block)
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if (
                isinstance(child, nn.Linear)
                and child.bias is None
                and child_name not in DEQUANTIZED_IN_FP8_MODELS
                and is_quantized(full + ".weight")
            ):
                with torch.device(child.weight.device):
                    fp8 = Fp8Linear(child.in_features, child.out_features, block)
                fp8.group = getattr(child, "group", None)
                setattr(module, child_name, fp8)
    return model
