"""CUDA-graph replay of the decode step.

The decode step has static shapes (``[B]`` token ids / positions / context lengths / slots and a
``[B, max_blocks]`` block table) and no host synchronisation, so one graph per batch-size bucket can be
captured once and replayed: a few microseconds of launch cost instead of ~1,500 kernel launches from
Python per step. Rows beyond the real batch are padding: token 0 at position 0 writing to the reserved
scratch block (block 0) and reading one slot of it; their logits are dropped. (They are also counted in
the expert-load statistics, a small bias toward whichever experts token 0 picks.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from runtime.kv_cache import AttentionMetadata, PagedKVCache
from runtime.model import DeepseekForCausalLM


class CUDAGraphDecoder:
    def __init__(
        self,
        model: DeepseekForCausalLM,
        kv_cache: PagedKVCache,
        max_blocks: int,
        batch_sizes: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
    ) -> None:
        if model.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA model")
        self.model, self.kv_cache, self.max_blocks = model, kv_cache, max_blocks
        self.batch_sizes = sorted(batch_sizes)
        dev, n = model.device, self.batch_sizes[-1]
        self.ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.pos = torch.zeros(n, dtype=torch.int64, device=dev)
        self.ctx = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slots = torch.zeros(n, dtype=torch.int64, device=dev)
        self.tables = torch.zeros(n, max_blocks, dtype=torch.int64, device=dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        pool = None
        with torch.inference_mode():
            for B in reversed(self.batch_sizes):  # largest first: smaller graphs reuse its pool
                meta = self._meta(B)
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(2):  # warm-up (allocator, cuBLAS workspaces, lazy inits)
                        model(self.ids[:B], self.pos[:B], meta, kv_cache)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = model(self.ids[:B], self.pos[:B], meta, kv_cache)
                pool = graph.pool()
                self.graphs[B] = (graph, out)
        torch.cuda.synchronize()
        model.reset_expert_load()  # drop warm-up counts

    def _meta(self, B: int) -> AttentionMetadata:
        return AttentionMetadata(context_lens=self.ctx[:B], block_tables=self.tables[:B], slot_mapping=self.slots[:B])

    def bucket(self, b: int) -> int:
        for size in self.batch_sizes:
            if size >= b:
                return size
        raise ValueError(f"batch {b} > largest captured batch {self.batch_sizes[-1]}")

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Same contract as ``model(input_ids, positions, meta, kv_cache)`` for a decode step."""
        b = input_ids.shape[0]
        n = self.bucket(b)
        w = meta.block_tables.shape[1]
        if w > self.max_blocks:
            raise ValueError(f"block table width {w} > captured max_blocks {self.max_blocks}")
        self.ids[:b].copy_(input_ids)
        self.pos[:b].copy_(positions)
        self.ctx[:b].copy_(meta.context_lens)
        self.slots[:b].copy_(meta.slot_mapping)
        self.tables[:n].zero_()
        self.tables[:b, :w].copy_(meta.block_tables)
        if n > b:
            for t in (self.ids, self.pos, self.ctx, self.slots):
                t[b:n].zero_()
        graph, out = self.graphs[n]
        graph.replay()
        return out[:b]
