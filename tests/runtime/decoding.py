"""Helpers shared by the runtime tests that run a model step by step."""

from __future__ import annotations

import torch

from runtime.kv_cache import BlockAllocator, PagedKVCache, SequenceBlocks, decode_metadata, prefill_metadata


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of ``a`` against ``b``."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def prefill_then_decode(
    model, lens: list[int], steps: int, block_size: int = 16, num_blocks: int = 16, max_blocks: int = 3
) -> list[torch.Tensor]:
    """A packed prefill of ``len(lens)`` sequences (token ids ``3 + i ...``), then ``steps`` greedy decode
    steps through a paged cache with a static ``max_blocks`` table: [prefill logits (every row), then the
    logits of each decode step]."""
    cache = PagedKVCache(model.config, num_blocks, block_size)
    alloc = BlockAllocator(num_blocks)
    seqs = [SequenceBlocks(alloc, block_size) for _ in lens]
    slots = [s for q, n in zip(seqs, lens, strict=True) for s in q.append(n)]
    meta = prefill_metadata(lens, lens, [q.blocks for q in seqs], slots)
    ids = torch.cat([torch.arange(3 + i, 3 + i + n) for i, n in enumerate(lens)])
    pos = torch.cat([torch.arange(n) for n in lens])
    last = torch.tensor(lens).cumsum(0) - 1
    outs = []
    with torch.inference_mode():
        outs.append(model(ids, pos, meta, cache))
        tok, ctx = outs[-1][last].argmax(-1), list(lens)
        for _ in range(steps):
            sl = [q.append(1)[0] for q in seqs]
            meta = decode_metadata([c + 1 for c in ctx], [q.blocks for q in seqs], sl, max_blocks=max_blocks)
            out = model(tok, torch.tensor(ctx), meta, cache)
            outs.append(out)
            tok, ctx = out.argmax(-1), [c + 1 for c in ctx]
    return outs
