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

import collections
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
    """Reference-counted blocks 1..num_blocks-1 (block 0 is the scratch block), with an optional prefix cache.

    Prefix caching (``caching=True``): a full block can be registered under a content hash
    (:func:`block_hash`: its tokens chained to the hash of the block before, so equal hashes mean equal
    prefixes). A later sequence with the same prefix takes that block by reference (:meth:`take_cached`)
    instead of prefilling it again. A registered block whose last holder releases it stays cached on an LRU
    list of free blocks; it is evicted (its hash forgotten) only when a fresh block is needed and no
    never-cached block is left. Free blocks = uncached free + cached free, so caching never costs capacity.
    """

    def __init__(self, num_blocks: int, caching: bool = False) -> None:
        self.num_blocks = num_blocks
        self.caching = caching
        self._free: list[int] = list(range(num_blocks - 1, NULL_BLOCK, -1))  # pop() hands out 1, 2, ...
        self._refs: dict[int, int] = {}  # held blocks → holders
        self._hash_of: dict[int, int] = {}  # registered block → its hash
        self._by_hash: dict[int, int] = {}  # hash → registered block
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # cached, no holder; LRU first

    @property
    def capacity(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._evictable)

    def usage(self) -> float:
        """Fraction of usable blocks held by sequences, in [0, 1] (the `moe_kv_cache_usage_perc` gauge;
        cached blocks nobody holds count as free)."""
        return len(self._refs) / self.capacity

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise OutOfBlocksError(f"need {n} KV blocks, {self.num_free} free of {self.capacity}")
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.pop()
            else:  # evict the least recently used cached block
                b, _ = self._evictable.popitem(last=False)
                del self._by_hash[self._hash_of.pop(b)]
            self._refs[b] = 1
            out.append(b)
        return out

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block. Pass a sequence's blocks tail first: among cached blocks the
        later ones of a prefix are then evicted first (the earlier ones are shared by more prompts)."""
        for b in blocks:
            refs = self._refs.get(b)
            if refs is None:
                raise ValueError(f"block {b} is not allocated")
            if refs > 1:
                self._refs[b] = refs - 1
                continue
            del self._refs[b]
            if b in self._hash_of:
                self._evictable[b] = None
            else:
                self._free.append(b)

    # ---- prefix cache ------------------------------------------------------------------------
    def cached(self, h: int) -> int | None:
        """The block registered under hash ``h``, if any."""
        return self._by_hash.get(h) if self.caching else None

    def take_cached(self, b: int) -> None:
        """Hold cached block ``b`` (one more reference; out of the LRU list if nobody held it)."""
        if b in self._refs:
            self._refs[b] += 1
        else:
            del self._evictable[b]
            self._refs[b] = 1

    def is_evictable(self, b: int) -> bool:
        """Cached with no holder: taking it uses up one free block."""
        return b in self._evictable

    def register(self, b: int, h: int) -> None:
        """Block ``b`` (held, full, its content written by this step at the latest) holds the prefix
        hashed ``h``. A hash already registered keeps its block (``b`` then stays a private copy)."""
        if self.caching and h not in self._by_hash and b not in self._hash_of:
            self._by_hash[h] = b
            self._hash_of[b] = h

    def reset_cache(self) -> None:
        """Forget every cached prefix (held blocks stay held)."""
        for b in self._evictable:
            self._free.append(b)
        self._evictable.clear()
        self._by_hash.clear()
        self._hash_of.clear()


def block_hash(parent: int | None, tokens: Sequence[int]) -> int:
    """Content hash of a full block: its token ids chained to the previous block's hash (None for the
    first), so a hit on block i implies the same tokens in blocks 0..i."""
    return hash((parent, tuple(tokens)))


class SequenceBlocks:
    """Block table of one sequence; grows a block at a time as tokens are appended."""

    def __init__(self, allocator: BlockAllocator, block_size: int) -> None:
        self.allocator = allocator
        self.block_size = block_size
        self.blocks: list[int] = []
        self.num_tokens = 0
        self.hashes: list[int] = []  # content hashes of the leading full blocks (prefix caching)

    def blocks_needed(self, n_new: int) -> int:
        return max(0, math.ceil((self.num_tokens + n_new) / self.block_size) - len(self.blocks))

    def reserve(self, n_new: int) -> None:
        """Hold the blocks that ``n_new`` more tokens need, without appending them yet."""
        need = self.blocks_needed(n_new)
        if need:
            self.blocks.extend(self.allocator.allocate(need))

    def append(self, n_new: int) -> list[int]:
        """Reserve room for ``n_new`` more tokens; returns their cache slots."""
        self.reserve(n_new)
        start = self.num_tokens
        self.num_tokens += n_new
        bs = self.block_size
        return [self.blocks[p // bs] * bs + p % bs for p in range(start, self.num_tokens)]

    def adopt_cached(self, blocks: Sequence[int], hashes: Sequence[int]) -> None:
        """Start from cached full blocks (a prefix-cache hit): the table begins with them, their tokens count
        as in the cache."""
        for b in blocks:
            self.allocator.take_cached(b)
        self.blocks = list(blocks)
        self.hashes = list(hashes)
        self.num_tokens = len(blocks) * self.block_size

    def seal(self, tokens: Sequence[int], computed: int) -> None:
        """Register the full blocks among the first ``computed`` tokens (``tokens``: the sequence's ids)
        in the prefix cache."""
        if not self.allocator.caching:
            return
        bs = self.block_size
        for j in range(len(self.hashes), min(computed // bs, len(self.blocks))):
            h = block_hash(self.hashes[-1] if self.hashes else None, tokens[j * bs : (j + 1) * bs])
            self.hashes.append(h)
            self.allocator.register(self.blocks[j], h)

    def release(self) -> None:
        if self.blocks:
            self.allocator.free(self.blocks[::-1])
        self.blocks = []
        self.hashes = []
        self.num_tokens = 0


@dataclass
class AttentionMetadata:
    """Where this step's tokens go in the cache and what each sequence attends to.

    Tokens are packed: sequence i owns ``query_lens[i]`` consecutive rows of ``input_ids``.
    ``query_lens is None`` marks a decode step: one token per sequence, all tensors of fixed shape
    (``[B]`` and ``[B, max_blocks]``) so the step can be captured in a CUDA graph. A mixed step
    (``num_decode > 0``) is packed too: its first ``num_decode`` sequences decode one token each, the rest
    are prompt chunks, and attention runs each part its own way (:meth:`split`).
    """

    context_lens: torch.Tensor  # [B] tokens of each sequence in the cache after this step
    block_tables: torch.Tensor | None = None  # [B, max_blocks] block ids, padded with NULL_BLOCK
    slot_mapping: torch.Tensor | None = None  # [T] flat cache slot of each new token
    query_lens: list[int] | None = None  # prefill only
    context_lens_cpu: list[int] | None = None  # prefill only (drives a per-sequence loop)
    num_decode: int = 0  # a mixed step: its first sequences each decode one token
    # sizes, in sequences, of consecutive groups of the prompt chunks that attention runs apart (each one
    # padded when its lengths are close, else looped: :meth:`prompt_parts`); None: all in one group
    prompt_groups: tuple[int, ...] | None = None

    _padded: torch.Tensor | None = field(default=None, repr=False)
    _parts: tuple[AttentionMetadata, AttentionMetadata] | None = field(default=None, repr=False)
    _groups: list[tuple[int, int, AttentionMetadata]] | None = field(default=None, repr=False)
    _offsets: torch.Tensor | None = field(default=None, repr=False)

    @property
    def is_decode(self) -> bool:
        return self.query_lens is None

    def split(self) -> tuple[AttentionMetadata, AttentionMetadata]:
        """A mixed step's decode rows and its prompt chunks as metadata of their own (built once a step,
        then shared by every layer)."""
        if self._parts is None:
            n = self.num_decode
            tables, slots = self.block_tables, self.slot_mapping
            decode = AttentionMetadata(
                context_lens=self.context_lens[:n], block_tables=tables[:n], slot_mapping=slots[:n]
            )
            prompts = AttentionMetadata(
                context_lens=self.context_lens[n:],
                block_tables=tables[n:],
                slot_mapping=slots[n:],
                query_lens=self.query_lens[n:],
                context_lens_cpu=self.context_lens_cpu[n:],
                prompt_groups=self.prompt_groups,
            )
            self._parts = decode, prompts
        return self._parts

    def prompt_parts(self) -> list[tuple[int, int, AttentionMetadata]]:
        """A prefill's groups (:attr:`prompt_groups`) as (first row, end row, metadata of their own), built
        once a step and shared by every layer: one forward runs all of a step's prompt chunks (one launch
        of each layer's other kernels), and only attention treats the groups apart."""
        if self._groups is None:
            sizes = self.prompt_groups or (len(self.query_lens),)
            if sum(sizes) != len(self.query_lens):
                raise ValueError(f"prompt_groups {sizes} do not cover the {len(self.query_lens)} sequences")
            if len(sizes) == 1:
                self._groups = [(0, sum(self.query_lens), self)]
            else:
                self._groups, seq, row = [], 0, 0
                for size in sizes:
                    ql = self.query_lens[seq : seq + size]
                    part = AttentionMetadata(
                        context_lens=self.context_lens[seq : seq + size],
                        block_tables=None if self.block_tables is None else self.block_tables[seq : seq + size],
                        query_lens=ql,
                        context_lens_cpu=self.context_lens_cpu[seq : seq + size],
                    )
                    self._groups.append((row, row + sum(ql), part))
                    seq, row = seq + size, row + sum(ql)
        return self._groups

    def padded_index(self) -> torch.Tensor | None:
        """For a prefill of several fresh sequences whose lengths are close (≥ 75% of a right-padded
        [B, max_len] batch is real tokens): each packed token's row in that padded batch, so attention
        runs as one batched call. None otherwise (attention then loops over sequences)."""
        ql, cl = self.query_lens, self.context_lens_cpu
        if ql is None or not fresh_batch(ql, cl):
            return None
        return self._padded_rows()

    def cached_padded_index(self) -> torch.Tensor | None:
        """The same for chunks that attend to context in the cache (a cached prefix, or earlier chunks): when
        both their chunk lengths and their context lengths are close, and the padded context (sequences ×
        longest context) is at most :data:`CACHED_BATCH_MAX_CONTEXT_ROWS`, they attend as one batched call
        over the context gathered from the pool. Prompts that share a cached system prompt arrive so."""
        ql, cl = self.query_lens, self.context_lens_cpu
        if ql is None or not cached_batch(ql, cl):
            return None
        return self._padded_rows()

    def chunk_offsets(self) -> torch.Tensor:
        """[B] on the device: each chunk's first position (its cached context before this step); built with
        the padded rows, in the same copy."""
        self._padded_rows()
        return self._offsets

    def _padded_rows(self) -> torch.Tensor:
        """Built at the first layer that asks, once a step: one host-to-device copy that does not wait for
        the GPU (a plain copy would drain the stream mid-forward, and the host would stop running ahead)."""
        if self._padded is None:
            ql, L = self.query_lens, max(self.query_lens)
            rows = torch.cat([torch.arange(n) + i * L for i, n in enumerate(ql)])
            offsets = torch.tensor([c - q for q, c in zip(ql, self.context_lens_cpu, strict=True)])
            both = to_device(torch.cat([rows, offsets]), self.context_lens.device)
            self._padded, self._offsets = both[: len(rows)], both[len(rows) :]
        return self._padded


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``; to a GPU through pinned memory without synchronizing (the caching host
    allocator keeps the pinned block until the copy is done)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


#: Chunks over cached context attend as one batched call only while their padded contexts stay within this many
#: rows (keys and values are expanded per head for them: about 10 KB a row at V2/V3's heads per GPU, 320 MB).
CACHED_BATCH_MAX_CONTEXT_ROWS = 32768


#: a right-padded attention batch must be at least this full of real rows (else attention loops, unpadded)
MIN_FILL = 0.75


def fresh_batch(query_lens: Sequence[int], context_lens: Sequence[int]) -> bool:
    """Whether these fresh prompts attend as one padded batch (:meth:`AttentionMetadata.padded_index`)."""
    ql = list(query_lens)
    return len(ql) >= 2 and ql == list(context_lens) and _close(ql)


def cached_batch(query_lens: Sequence[int], context_lens: Sequence[int]) -> bool:
    """Whether these chunks, some over cached context, attend as one padded batch
    (:meth:`AttentionMetadata.cached_padded_index`)."""
    ql, cl = list(query_lens), list(context_lens)
    if len(ql) < 2 or ql == cl or not (_close(ql) and _close(cl)):
        return False
    return len(cl) * max(cl) <= CACHED_BATCH_MAX_CONTEXT_ROWS


def _close(lengths: Sequence[int]) -> bool:
    """Right-padding these lengths to the longest leaves at least 75% real rows."""
    return sum(lengths) >= MIN_FILL * len(lengths) * max(lengths)


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
    num_decode: int = 0,
    prompt_groups: Sequence[int] | None = None,
) -> AttentionMetadata:
    """Metadata for packed prefill (``context_lens[i] > query_lens[i]`` means a cached prefix).

    With ``block_tables=None`` the forward runs without a cache (scoring only, fresh sequences).
    ``num_decode``: the first sequences are decode rows of a mixed step (query length 1 each).
    ``prompt_groups``: see :attr:`AttentionMetadata.prompt_groups`."""
    if any(q != 1 for q in query_lens[:num_decode]):
        raise ValueError(f"a mixed step's {num_decode} decode rows must have query length 1: {query_lens[:num_decode]}")
    return AttentionMetadata(
        num_decode=num_decode,
        prompt_groups=None if prompt_groups is None else tuple(prompt_groups),
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
