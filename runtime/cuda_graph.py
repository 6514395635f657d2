"""CUDA-graph replay of the decode step.

The decode step has static shapes (``[B]`` token ids / positions / context lengths / slots and a
``[B, max_blocks]`` block table) and no host synchronisation, so one graph per batch-size bucket can be
captured once and replayed: one launch per graph instead of every kernel launched from Python per step.
Rows beyond the real batch are padding: token 0 at position 0 writing to the reserved scratch block
(block 0) and reading one slot of it; their logits are dropped. (They are also counted in
the expert-load statistics, a small bias toward whichever experts token 0 picks.)

The step is captured in a few pieces (``GRAPH_PIECES``): the host launches piece i+1 while the GPU runs
piece i, instead of the GPU waiting for the launch of one large graph.

The step's inputs live in one flat int64 device buffer, so a step that starts from host lists (the engine's
case: :meth:`CUDAGraphDecoder.run_host`) stages them with one pinned host-to-device copy instead of a
tensor and a copy per field: host time between two replays is time the GPU idles at batch 1.

A row's input token can also come from the device (``feed``): the token the previous step sampled for that
sequence, not yet read by the host. The engine launches step k+1 that way before it reads step k's tokens,
so the GPU never waits for the host's part of a step (see runtime/engine/model_runner.py).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch

from runtime.interfaces import PiecewiseCausalLM
from runtime.kv_cache import AttentionMetadata, PagedKVCache

# A decode step is captured as this many graphs, run back to back. Launching one graph of a whole step's
# kernels takes host time during which a batch-1 step's GPU would idle; in pieces, the GPU runs the first
# while the host launches the rest (benchmarks/decode_ablation_gpu.py measures it).
GRAPH_PIECES = 4


class PiecewiseGraph:
    """The captured pieces of one decode step; ``replay`` launches them in order on the current stream."""

    def __init__(self) -> None:
        self.pieces: list[torch.cuda.CUDAGraph] = []
        self.keep = None  # the step state whose tensors the pieces pass to each other

    def replay(self) -> None:
        for piece in self.pieces:
            piece.replay()


class CUDAGraphDecoder:
    def __init__(
        self,
        model: PiecewiseCausalLM,
        kv_cache: PagedKVCache,
        max_blocks: int,
        batch_sizes: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
        pieces: int = GRAPH_PIECES,
    ) -> None:
        if model.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA model")
        if pieces < 1:
            raise ValueError(f"pieces {pieces}: allowed 1 or more")
        self.model, self.kv_cache, self.max_blocks = model, kv_cache, max_blocks
        self.batch_sizes = sorted(batch_sizes)
        dev, n = model.device, self.batch_sizes[-1]
        # [ids | positions | context lens | slots | fed rows | tables (n × max_blocks)]: each a contiguous slice
        self.inputs = torch.zeros(n * (ROW_FIELDS + max_blocks), dtype=torch.int64, device=dev)
        self.ids, self.pos, self.ctx, self.slots, self.fed_rows, self.tables = input_views(self.inputs, n, max_blocks)
        self.fed_rows.fill_(-1)
        self.feed = torch.zeros(n, dtype=torch.int64, device=dev)  # device-side tokens rows may take (fed_rows)
        self._host = torch.zeros_like(self.inputs, device="cpu").pin_memory()
        self._host_fields = self._host.numpy()
        self._staged = torch.cuda.Event()  # the last host-to-device copy of _host (reused each step)
        self.graphs: dict[int, tuple[PiecewiseGraph, torch.Tensor]] = {}
        n_layers = model.num_layers
        pieces = min(pieces, max(1, n_layers))  # no empty piece
        bounds = [round(i * n_layers / pieces) for i in range(pieces + 1)]
        pool = None
        with torch.inference_mode():
            for B in reversed(self.batch_sizes):  # largest first: smaller graphs reuse its pool
                meta = self._meta(B)
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(2):  # warm-up (allocator, cuBLAS workspaces, lazy inits)
                        model(self._input_ids(B), self.pos[:B], meta, kv_cache)
                torch.cuda.current_stream().wait_stream(stream)
                graph = PiecewiseGraph()
                for i, (start, end) in enumerate(itertools.pairwise(bounds)):
                    piece = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(piece, pool=pool):
                        if i == 0:
                            step = model.begin(self._input_ids(B), self.pos[:B], meta, kv_cache)
                        model.run_layers(step, start, end)  # step.x: the next piece's input, kept alive
                        if end == n_layers:
                            out = model.finish(step)
                    pool = piece.pool()
                    graph.pieces.append(piece)
                graph.keep = step
                self.graphs[B] = (graph, out)
        torch.cuda.synchronize()
        model.reset_expert_load()  # drop warm-up counts

    def _input_ids(self, B: int) -> torch.Tensor:
        return fed_token_ids(self.ids[:B], self.fed_rows[:B], self.feed)

    def _meta(self, B: int) -> AttentionMetadata:
        return AttentionMetadata(context_lens=self.ctx[:B], block_tables=self.tables[:B], slot_mapping=self.slots[:B])

    def bucket(self, b: int) -> int:
        for size in self.batch_sizes:
            if size >= b:
                return size
        raise ValueError(f"batch {b} > largest captured batch {self.batch_sizes[-1]}")

    def _check_width(self, w: int) -> None:
        if w > self.max_blocks:
            raise ValueError(f"block table width {w} > captured max_blocks {self.max_blocks}")

    def run_host(
        self,
        token_ids: Sequence[int],
        context_lens: Sequence[int],
        tables: Sequence[Sequence[int]],
        slots: Sequence[int],
        feed: torch.Tensor | None = None,
        feed_rows: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """A decode step from host lists (each sequence's last token, its context length including that
        token, its block table and the token's slot): one pinned copy stages them all. → logits [b, V].
        Rows with ``feed_rows[i] >= 0`` take their token from the device tensor ``feed`` at that index
        instead (the previous step's sampled tokens, not yet read by the host)."""
        b, n = len(token_ids), self.max_batch
        bucket = self.bucket(b)
        self._check_width(max(map(len, tables), default=0))
        if feed is not None:
            self.feed[: feed.shape[0]].copy_(feed, non_blocking=True)
        self._staged.synchronize()  # the previous step's copy has left the pinned buffer
        used = pack_decode_inputs(
            self._host_fields, n, self.max_blocks, token_ids, context_lens, tables, slots, bucket, feed_rows
        )
        self.inputs[:used].copy_(self._host[:used], non_blocking=True)  # the bucket's graph reads no further
        self._staged.record()
        graph, out = self.graphs[bucket]
        graph.replay()
        return out[:b]

    @property
    def max_batch(self) -> int:
        return self.batch_sizes[-1]

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Same contract as ``model(input_ids, positions, meta, kv_cache)`` for a decode step."""
        b = input_ids.shape[0]
        n = self.bucket(b)
        w = meta.block_tables.shape[1]
        self._check_width(w)
        self.ids[:b].copy_(input_ids)
        self.fed_rows[:n].fill_(-1)  # every token from input_ids
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


ROW_FIELDS = 5  # ids, positions, context lens, slots, fed rows: one value per row each


def input_views(inputs: torch.Tensor, n: int, max_blocks: int) -> tuple[torch.Tensor, ...]:
    """The flat input buffer as (ids, positions, context lens, slots, fed rows) [n] and block tables
    [n, max_blocks]."""
    fields = inputs[: ROW_FIELDS * n].view(ROW_FIELDS, n).unbind(0)
    return (*fields, inputs[ROW_FIELDS * n :].view(n, max_blocks))


def fed_token_ids(host_ids: torch.Tensor, fed_rows: torch.Tensor, feed: torch.Tensor) -> torch.Tensor:
    """Each row's input token: ``feed[fed_rows[i]]`` where ``fed_rows[i] >= 0``, else ``host_ids[i]``."""
    return torch.where(fed_rows >= 0, feed[fed_rows.clamp(min=0)], host_ids)


def pack_decode_inputs(
    fields: np.ndarray,
    n: int,
    max_blocks: int,
    token_ids: Sequence[int],
    context_lens: Sequence[int],
    tables: Sequence[Sequence[int]],
    slots: Sequence[int],
    rows: int,
    feed_rows: Sequence[int] | None = None,
) -> int:
    """Fill the flat input layout of :class:`CUDAGraphDecoder` (``n`` rows): ids, positions (context - 1),
    context lengths, slots, fed rows (-1: the host's id), then the zero-padded block tables of the first
    ``rows`` (the batch bucket). Rows past the batch are padding: token 0 at position 0, context 0, slot 0
    (the scratch block). Returns how many leading elements were written (all that a graph of ``rows`` rows
    reads)."""
    b = len(token_ids)
    used = ROW_FIELDS * n + rows * max_blocks
    fields[:used] = 0
    fields[4 * n : 5 * n] = -1
    ctx = np.asarray(context_lens, dtype=np.int64)
    fields[:b], fields[n : n + b], fields[2 * n : 2 * n + b], fields[3 * n : 3 * n + b] = token_ids, ctx - 1, ctx, slots
    if feed_rows is not None:
        fields[4 * n : 4 * n + b] = feed_rows
    table_rows = fields[ROW_FIELDS * n : used].reshape(rows, max_blocks)
    for i, t in enumerate(tables):
        table_rows[i, : len(t)] = t
    return used
