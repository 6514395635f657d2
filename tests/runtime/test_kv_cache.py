"""Block pool, allocator and metadata builders used by the service's engine."""

from __future__ import annotations

import pytest
import torch

from runtime.config import ModelConfig
from runtime.kv_cache import (
    NULL_BLOCK,
    BlockAllocator,
    OutOfBlocksError,
    PagedKVCache,
    SequenceBlocks,
    decode_metadata,
    prefill_metadata,
)
from runtime.tiny import tiny_config


def test_pool_shape_and_sizing() -> None:
    cfg = ModelConfig.from_dict(tiny_config("v3"))
    cache = PagedKVCache(cfg, num_blocks=10, block_size=8)
    assert cache.tensor.shape == (cfg.num_hidden_layers, 10, 8, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    per_block = PagedKVCache.bytes_per_block(cfg, 8, torch.float32)
    assert per_block == cfg.num_hidden_layers * 8 * 40 * 4
    assert PagedKVCache.for_memory(cfg, per_block * 7 + 5, 8).num_blocks == 7


def test_allocator_allocate_free_usage() -> None:
    a = BlockAllocator(5)
    assert a.capacity == 4 and a.usage() == 0.0
    got = a.allocate(3)
    assert NULL_BLOCK not in got and len(set(got)) == 3
    assert a.usage() == 0.75 and a.num_free == 1
    with pytest.raises(OutOfBlocksError, match="need 2 KV blocks, 1 free of 4"):
        a.allocate(2)
    a.free(got)
    assert a.usage() == 0.0
    with pytest.raises(ValueError, match="not allocated"):
        a.free([got[0]])


def test_sequence_slots_follow_block_table() -> None:
    a = BlockAllocator(10)
    s = SequenceBlocks(a, block_size=4)
    slots = s.append(6)
    assert len(s.blocks) == 2
    b0, b1 = s.blocks
    assert slots == [b0 * 4 + i for i in range(4)] + [b1 * 4, b1 * 4 + 1]
    assert s.append(2) == [b1 * 4 + 2, b1 * 4 + 3] and len(s.blocks) == 2
    assert s.append(1) == [s.blocks[2] * 4]
    s.release()
    assert a.usage() == 0.0 and s.num_tokens == 0


def test_metadata_static_shapes() -> None:
    meta = decode_metadata([5, 9], [[3, 4], [5, 6, 7]], [20, 30], max_blocks=8)
    assert meta.is_decode
    assert meta.block_tables.shape == (2, 8)
    assert meta.block_tables[0].tolist() == [3, 4] + [NULL_BLOCK] * 6
    with pytest.raises(ValueError, match="needs 3 blocks > max_blocks=2"):
        decode_metadata([5], [[1, 2, 3]], [0], max_blocks=2)
    pm = prefill_metadata([3, 2], [3, 2], [[1], [2]], [4, 5, 6, 8, 9])
    assert not pm.is_decode and pm.query_lens == [3, 2]


def test_graph_inputs_staged_from_host_lists_equal_the_decode_metadata() -> None:
    """CUDAGraphDecoder.run_host packs host lists into one flat buffer (one pinned copy on the GPU); the
    views the captured graph reads must equal decode_metadata's tensors, with zero padding rows."""
    import numpy as np

    from runtime.cuda_graph import ROW_FIELDS, fed_token_ids, input_views, pack_decode_inputs

    n, width = 4, 5
    toks, ctx, tables, slots = [11, 12, 13], [17, 3, 33], [[4, 2], [7], [1, 5, 9]], [36, 114, 144]
    fields = np.full(n * (ROW_FIELDS + width), 7, dtype=np.int64)  # stale values from an earlier step
    used = pack_decode_inputs(fields, n, width, toks, ctx, tables, slots, rows=n - 1)  # a bucket of 3
    assert used == ROW_FIELDS * n + 3 * width and (fields[used:] == 7).all()  # not the bucket's: untouched
    ids, pos, c, sl, fed, tb = input_views(torch.from_numpy(fields), n, width)
    meta = decode_metadata(ctx, tables, slots, max_blocks=width)
    assert ids.tolist() == [*toks, 0] and pos.tolist() == [16, 2, 32, 0]
    assert fed.tolist() == [-1] * n  # every token from the host
    assert torch.equal(c[:3], meta.context_lens) and torch.equal(sl[:3], meta.slot_mapping)
    assert torch.equal(tb[:3], meta.block_tables)
    assert c[3] == 0 and sl[3] == 0
    # rows 0 and 2 take the tokens the previous step sampled (rows 2 and 0 of its output), on the device
    pack_decode_inputs(fields, n, width, [11, -1, -1], ctx, tables, slots, rows=n - 1, feed_rows=[-1, 2, 0])
    ids, _, _, _, fed, _ = input_views(torch.from_numpy(fields), n, width)
    assert fed.tolist() == [-1, 2, 0, -1]
    assert fed_token_ids(ids, fed, torch.tensor([90, 91, 92, 93])).tolist() == [11, 92, 90, 0]
