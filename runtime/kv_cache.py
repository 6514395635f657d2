"""Paged latent KV cache: one block pool allocated once, per-sequence block tables, slot mappings.

MLA caches per token only the normalized latent (``kv_lora_rank``) and the roped shared key
(``qk_rope_head_dim``) - 576 values for DeepSeek-V2/V3 instead of 2·heads·head_dim. The pool is a single
tensor ``[num_layers, num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]`` allocated at start-up
(the source document's "memory pool": no allocation, hence no fragmentation, while serving). Block 0 is reserved as
a scratch block: padded rows of a static-shape decode batch write there and never read anything real.

The engine owns a :class:`BlockAllocator` and one :class:`SequenceBlocks` per request; it builds an
:class:`AttentionMetadata` per step with :func:`prefill_metadata` / :func:`decode_metadata`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from runtime.config import ModelConfig

NULL_BLOCK = 0


class OutOfBlocksError(RuntimeError):
    """The pool has fewer free blocks than a request needs; the engine should queue or reject it."""


class PagedKVCache:
    """The block pool tensor plus its geometry."""

    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is reserved), got {num_blocks}")
        self.num_layers = config.num_hidden_layers
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.kv_lora_rank = config.kv_lora_rank
        self.dim = config.kv_cache_dim
        self.tensor = torch.zeros((self.num_layers, num_blocks, block_size, self.dim), dtype=dtype, device=device)

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return config.num_hidden_layers * block_size * config.kv_cache_dim * elem

    @classmethod
    def for_memory(
        cls,
        config: ModelConfig,
        memory_bytes: int,
        block_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> PagedKVCache:
        """Size the pool from a byte budget (e.g. a fraction of free GPU memory)."""
        n = memory_bytes // cls.bytes_per_block(config, block_size, dtype)
        return cls(config, int(n), block_size, dtype, device)

    def layer(self, idx: int) -> torch.Tensor:
        return self.tensor[idx]


@torch.library.custom_op("moefleet::write_cache", mutates_args=("cache",))
def write_cache(cache: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
    """Store ``rows`` [T, D] at flat ``slots`` of one layer's pool ``cache`` [blocks, block_size, D], in
    place. An op of its own so that compiled code reading the cache afterwards (the decode attention) stays
    in place: written as a plain ``index_copy_`` there, inductor materialises a copy of the whole pool."""
    cache.view(-1, cache.shape[-1]).index_copy_(0, slots, rows)


class BlockAllocator:
    """Free list over block ids 1..num_blocks-1 (block 0 is the scratch block)."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free: list[int] = list(range(num_blocks - 1, NULL_BLOCK, -1))  # pop() hands out 1, 2, ...
        self._used: set[int] = set()

    @property
    def capacity(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    def usage(self) -> float:
        """Fraction of usable blocks in use, in [0, 1] (the `moe_kv_cache_usage_perc` gauge)."""
        return len(self._used) / self.capacity

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocksError(f"need {n} KV blocks, {len(self._free)} free of {self.capacity}")
        blocks = [self._free.pop() for _ in range(n)]
        self._used.update(blocks)
        return blocks

    def free(self, blocks: Sequence[int]) -> None:
        for b in blocks:
            if b not in self._used:
                raise ValueError(f"block {b} is not allocated")
            self._used.remove(b)
            self._free.append(b)


class SequenceBlocks:
    """Block table of one sequence; grows a block at a time as tokens are appended."""

    def __init__(self, allocator: BlockAllocator, block_size: int) -> None:
        self.allocator = allocator
        self.block_size = block_size
        self.blocks: list[int] = []
        self.num_tokens = 0

    def blocks_needed(self, n_new: int) -> int:
        return max(0, math.ceil((self.num_tokens + n_new) / self.block_size) - len(self.blocks))

    def append(self, n_new: int) -> list[int]:
        """Reserve room for ``n_new`` more tokens; returns their cache slots."""
        need = self.blocks_needed(n_new)
        if need:
            self.blocks.extend(self.allocator.allocate(need))
        start = self.num_tokens
        self.num_tokens += n_new
        bs = self.block_size
        return [self.blocks[p // bs] * bs + p % bs for p in range(start, self.num_tokens)]

    def release(self) -> None:
        if self.blocks:
            self.allocator.free(self.blocks)
        self.blocks = []
        self.num_tokens = 0


@dataclass
class AttentionMetadata:
    """Where this step's tokens go in the cache and what each sequence attends to.

    Tokens are packed: sequence i owns ``query_lens[i]`` consecutive rows of ``input_ids``.
    ``query_lens is None`` marks a decode step: one token per sequence, all tensors of fixed shape
    (``[B]`` and ``[B, max_blocks]``) so the step can be captured in a CUDA graph.
    """

    context_lens: torch.Tensor  # [B] tokens of each sequence in the cache after this step
    block_tables: torch.Tensor | None = None  # [B, max_blocks] block ids, padded with NULL_BLOCK
    slot_mapping: torch.Tensor | None = None  # [T] flat cache slot of each new token
    query_lens: list[int] | None = None  # prefill only
    context_lens_cpu: list[int] | None = None  # prefill only (drives a per-sequence loop)

    _padded: torch.Tensor | None = field(default=None, repr=False)

    @property
    def is_decode(self) -> bool:
        return self.query_lens is None

    def padded_index(self) -> torch.Tensor | None:
        """For a prefill of several fresh sequences whose lengths are close (≥ 75% of a right-padded
        [B, max_len] batch is real tokens): each packed token's row in that padded batch, so attention
        runs as one batched call. None otherwise (attention then loops over sequences)."""
        ql, cl = self.query_lens, self.context_lens_cpu
        if ql is None or len(ql) < 2 or ql != cl or sum(ql) < 0.75 * len(ql) * max(ql):
            return None
        if self._padded is None:
            L = max(ql)
            rows = [torch.arange(n) + i * L for i, n in enumerate(ql)]
            self._padded = torch.cat(rows).to(self.context_lens.device)
        return self._padded


def _pad_tables(tables: Sequence[Sequence[int]], max_blocks: int | None, device) -> torch.Tensor:
    width = max_blocks or max((len(t) for t in tables), default=1) or 1
    for i, t in enumerate(tables):
        if len(t) > width:
            raise ValueError(f"sequence {i} needs {len(t)} blocks > max_blocks={width}")
    # padded on the host and built with one tensor call (one per row is a visible share of a CPU decode step)
    padded = [list(t) + [NULL_BLOCK] * (width - len(t)) for t in tables]
    return torch.tensor(padded, dtype=torch.int64, device=device).view(len(tables), width)


def prefill_metadata(
    query_lens: Sequence[int],
    context_lens: Sequence[int],
    block_tables: Sequence[Sequence[int]] | None,
    slots: Sequence[int] | None,
    device: torch.device | str = "cpu",
) -> AttentionMetadata:
    """Metadata for packed prefill (``context_lens[i] > query_lens[i]`` means a cached prefix).

    With ``block_tables=None`` the forward runs without a cache (scoring only, fresh sequences)."""
    return AttentionMetadata(
        context_lens=torch.tensor(list(context_lens), dtype=torch.int64, device=device),
        block_tables=None if block_tables is None else _pad_tables(block_tables, None, device),
        slot_mapping=None if slots is None else torch.tensor(list(slots), dtype=torch.int64, device=device),
        query_lens=list(query_lens),
        context_lens_cpu=list(context_lens),
    )


def decode_metadata(
    context_lens: Sequence[int],
    block_tables: Sequence[Sequence[int]],
    slots: Sequence[int],
    max_blocks: int | None = None,
    device: torch.device | str = "cpu",
) -> AttentionMetadata:
    """Metadata for one decode token per sequence; pass a fixed ``max_blocks`` for static shapes."""
    return AttentionMetadata(
        context_lens=torch.tensor(list(context_lens), dtype=torch.int64, device=device),
        block_tables=_pad_tables(block_tables, max_blocks, device),
        slot_mapping=torch.tensor(list(slots), dtype=torch.int64, device=device),
    )
