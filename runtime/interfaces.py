"""What the rest of the runtime needs from a model, as protocols: the engine, the offline generator, the CUDA
graphs and the loader are written against these, not against one architecture's class.

* :class:`CausalLM` - a forward over packed tokens, the execution options, the expert-load statistics. The
  engine and the generator need only this; a distributed replica's leader
  (:class:`runtime.parallel.lockstep.Leader`) provides it for the whole replica.
* :class:`PiecewiseCausalLM` - also the forward in three parts (``begin`` / ``run_layers`` / ``finish``),
  which is what :class:`runtime.cuda_graph.CUDAGraphDecoder` captures; every registered architecture
  (:mod:`runtime.registry`) provides it.
* :class:`GraphDecoder` - a captured decode step the engine replays from host lists.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from runtime.config import ModelConfig
from runtime.execution import ExecutionOptions
from runtime.kv_cache import AttentionMetadata, PagedKVCache


class CausalLM(Protocol):
    config: ModelConfig

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def options(self) -> ExecutionOptions: ...

    def configure(self, options: ExecutionOptions) -> None:
        """Run every later forward with ``options`` (kernels, compiled regions)."""

    def __call__(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn_metadata: AttentionMetadata,
        kv_cache: PagedKVCache | None = None,
        logits_indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Packed ``input_ids`` / ``positions`` [T] → logits [len(logits_indices) or T, vocab]."""

    def moe_layers(self) -> list[tuple[int, torch.nn.Module]]:
        """(layer index, MoE block) of every MoE layer."""

    def expert_load(self) -> dict[int, torch.Tensor]:
        """Tokens routed to each expert since the last reset, per MoE layer (device tensors)."""

    def expert_load_imbalance(self) -> dict[int, float]:
        """max / mean tokens per expert, per MoE layer."""

    def reset_expert_load(self) -> None: ...


class PiecewiseCausalLM(CausalLM, Protocol):
    @property
    def num_layers(self) -> int: ...

    def begin(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, kv_cache: PagedKVCache | None
    ) -> Any:
        """Everything before the first layer; returns the step state the other two parts take."""

    def run_layers(self, step: Any, start: int, end: int) -> None:
        """Layers ``[start, end)`` on the step state."""

    def finish(self, step: Any, logits_indices: torch.Tensor | None = None) -> torch.Tensor:
        """Final norm and LM head → logits."""


class GraphDecoder(Protocol):
    batch_sizes: Sequence[int]

    def bucket(self, b: int) -> int:
        """The captured batch size that serves a batch of ``b``."""

    def run_host(
        self,
        token_ids: Sequence[int],
        context_lens: Sequence[int],
        tables: Sequence[Sequence[int]],
        slots: Sequence[int],
    ) -> torch.Tensor:
        """A decode step from host lists → logits [b, vocab]. A decoder that also takes device-fed tokens
        accepts ``feed`` / ``feed_rows`` keywords (:meth:`runtime.cuda_graph.CUDAGraphDecoder.run_host`)."""


#: Captures the decode step's graphs: (KV pool, block-table width, batch sizes) → a graph decoder.
GraphCapture = Callable[[PagedKVCache, int, Sequence[int]], GraphDecoder]
