"""Runs the model for the engine: a step's inputs, the forward, sampling.

The runner owns the KV pool (allocated once here; nothing grows while serving) and, on CUDA, the decode
step's captured graphs (:class:`~runtime.cuda_graph.CUDAGraphDecoder`, one per batch bucket); on CPU the
same step runs eagerly.

Decode steps overlap with the host (``overlap``): the runner launches step k+1 before it reads step k's
tokens, the rows of sequences whose token is still unread taking it from the device
(:meth:`~runtime.cuda_graph.CUDAGraphDecoder.run_host`'s ``feed``), so the GPU never waits for the host's
part of a step. The tokens a call returns are then the previous step's.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from runtime.cuda_graph import CUDAGraphDecoder, fed_token_ids
from runtime.engine.config import BATCH_BUCKETS, EngineConfig
from runtime.engine.scheduler import PrefillChunk, padded_slots
from runtime.engine.sequence import Sequence
from runtime.engine.stats import EngineStats
from runtime.interfaces import CausalLM, GraphCapture, GraphDecoder
from runtime.kv_cache import PagedKVCache, decode_metadata, prefill_metadata
from runtime.sampling import logprobs, sample, token_logprobs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingFailed:
    """A row whose sampling raised (e.g. a temperature that turns its logits into NaN): only its sequence fails."""

    message: str


Sampled = int | SamplingFailed


@dataclass(eq=False)
class InFlight:
    """A launched decode step whose tokens the host has not read yet."""

    seqs: list[Sequence]
    tokens: torch.Tensor  # [b] sampled ids on the device: the next step's fed input tokens
    host: torch.Tensor  # [b] their copy on the host (pinned on CUDA), complete once ``ready``
    ready: torch.cuda.Event | None  # None off CUDA


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        cfg: EngineConfig,
        max_blocks_per_seq: int,
        stats: EngineStats,
        graph_capture: GraphCapture | None = None,
    ) -> None:
        """``graph_capture``: captures the decode graphs instead of a :class:`CUDAGraphDecoder` over ``model``; a
        distributed leader's (:meth:`runtime.parallel.lockstep.Leader.make_graph_decoder`) captures on every
        rank, and its graphs take host inputs only, so the runner then runs without ``overlap``."""
        self.model, self.device, self.stats = model, model.device, stats
        self.cache = self._allocate_pool(cfg, max_blocks_per_seq)
        self.overlap = cfg.overlap and graph_capture is None
        self.inflight: InFlight | None = None
        self._launches = 0
        pinned = self.device.type == "cuda"
        self._host_tokens = [torch.zeros(cfg.max_num_seqs, dtype=torch.int64, pin_memory=pinned) for _ in range(2)]
        self.graphs: GraphDecoder | None = None
        if self.device.type == "cuda" and cfg.compile:  # compile first, capture second (docs/runtime.md)
            model.configure(dataclasses.replace(model.options, compile=True))
        if self.device.type == "cuda" and cfg.cuda_graphs:
            capture = graph_capture or (lambda *a: CUDAGraphDecoder(model, *a))
            sizes = [b for b in BATCH_BUCKETS if b < cfg.max_num_seqs]
            try:
                self.graphs = capture(self.cache, max_blocks_per_seq, [*sizes, cfg.max_num_seqs])
            except RuntimeError as exc:  # e.g. an eager fp32 MoE loop syncs with the host: not capturable
                log.warning("CUDA-graph capture failed, decoding eagerly: %s", str(exc).splitlines()[0])
                torch.cuda.synchronize()

    def _allocate_pool(self, cfg: EngineConfig, max_blocks_per_seq: int) -> PagedKVCache:
        mc, dtype = self.model.config, self.model.dtype
        if cfg.kv_blocks is not None:
            n = cfg.kv_blocks
        elif self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            n = int(free * cfg.kv_memory_fraction) // PagedKVCache.bytes_per_block(mc, cfg.block_size, dtype)
        else:  # CPU: room for a full batch of full-length sequences
            n = 1 + cfg.max_num_seqs * max_blocks_per_seq
        return PagedKVCache(mc, n, cfg.block_size, dtype=dtype, device=self.device)

    # ---- prefill ----------------------------------------------------------------------------
    def prefill(self, groups: list[list[PrefillChunk]]) -> list[tuple[Sequence, Sampled]]:
        """One packed forward over a step's chunks (fresh prompts, continued chunked ones, prompts after a
        cached prefix), in the scheduler's groups, which attention treats apart → the next token of each
        sequence whose prefill this chunk completes. The scheduler already holds the blocks; chunks after
        the first attend to the earlier ones through the cache. One forward, not one per group: a prefill
        forward's launches cost about as much as its compute at a step's budget, whatever its tokens."""
        dev = self.device
        group = [c for g in groups for c in g]
        qlens = [c.length for c in group]
        ctx = [c.start + c.length for c in group]
        slots = [slot for c in group for slot in c.seq.blocks.append(c.length)]
        ids = torch.tensor([t for c in group for t in c.seq.token_ids[c.start : c.start + c.length]], device=dev)
        pos = torch.cat([torch.arange(c.start, c.start + c.length) for c in group]).to(dev)
        last = torch.tensor(qlens, device=dev).cumsum(0) - 1
        tables = [c.seq.blocks.blocks for c in group]
        meta = prefill_metadata(qlens, ctx, tables, slots, device=dev, prompt_groups=[len(g) for g in groups])
        logits = self.model(ids, pos, meta, self.cache, logits_indices=last)
        self.stats.prefill(sum(qlens), _padding(groups))
        done = [i for i, c in enumerate(group) if c.seq.prefilled]
        if not done:
            return []
        rows = logits[done] if len(done) < len(group) else logits
        seqs = [group[i].seq for i in done]
        return list(zip(seqs, self.sample_rows(rows, seqs), strict=True))

    # ---- a step of both ---------------------------------------------------------------------
    def mixed(
        self, groups: list[list[PrefillChunk]], seqs: list[Sequence]
    ) -> tuple[list[tuple[Sequence, Sampled]], list[tuple[Sequence, Sampled]]]:
        """One forward for a step's decodes and its prompt chunks → (the prompts' first tokens, as
        :meth:`prefill` returns them; the decoded tokens, as :meth:`decode` returns them).

        Run apart, a decode step and a prefill forward each read every weight: a mixed step then costs about
        two decode steps, and with bursts of prompts that is most steps. In one forward the decode rows
        share the prompt rows' weight reads, and only attention tells them apart (decode rows attend in the
        absorbed form, :attr:`~runtime.kv_cache.AttentionMetadata.num_decode`). The decode rows run outside
        the captured graphs; their input tokens may still come from the device, as in :meth:`decode`."""
        pending, rows, seqs = self._take_pending(seqs)
        if not seqs:  # every decode row was the unread token's last: a plain prefill
            self.inflight = pending
            return self.prefill(groups), self.decode([])
        dev, n = self.device, len(seqs)
        group = [c for g in groups for c in g]
        feed_rows, toks, dec_slots, dec_ctx, dec_tables = self._decode_inputs(seqs, rows)
        qlens = [c.length for c in group]
        ctx = [c.start + c.length for c in group]
        slots = dec_slots + [slot for c in group for slot in c.seq.blocks.append(c.length)]
        prompt_ids = [t for c in group for t in c.seq.token_ids[c.start : c.start + c.length]]
        ids = torch.tensor(toks + prompt_ids, device=dev)
        if pending is not None and max(feed_rows) >= 0:
            head = fed_token_ids(ids[:n], torch.tensor(feed_rows, device=dev), pending.tokens)
            ids = torch.cat([head, ids[n:]])
        pos = torch.cat([torch.tensor(dec_ctx) - 1, *(torch.arange(c.start, c.start + c.length) for c in group)])
        tables = dec_tables + [c.seq.blocks.blocks for c in group]
        sizes = [len(g) for g in groups]
        meta = prefill_metadata([1] * n + qlens, dec_ctx + ctx, tables, slots, dev, num_decode=n, prompt_groups=sizes)
        last = torch.cat([torch.arange(n), n + torch.tensor(qlens).cumsum(0) - 1]).to(dev)
        logits = self.model(ids, pos.to(dev), meta, self.cache, logits_indices=last)
        self.stats.prefill(sum(qlens), _padding(groups))
        self.stats.decode(n, n)
        read = self._launch(logits[:n], seqs, pending)
        done = [i for i, c in enumerate(group) if c.seq.prefilled]
        if not done:
            return [], read
        firsts = [group[i].seq for i in done]
        return list(zip(firsts, self.sample_rows(logits[n:][done], firsts), strict=True)), read

    # ---- decode -----------------------------------------------------------------------------
    def decode(self, seqs: list[Sequence]) -> list[tuple[Sequence, Sampled]]:
        """Launch one decode step for ``seqs``, then read the tokens of the step launched before it (with
        ``overlap``; without it, this step's own). Sequences whose previous step is still unread take its
        token on the device; one whose unread token is its last (``max_new_tokens``) is not decoded again.
        A sequence that the unread token ends (a stop token or string) was decoded once more for nothing:
        that row is dropped by the caller, which releases its blocks only after this step was queued."""
        pending, rows, seqs = self._take_pending(seqs)
        if not seqs:
            return self._read(pending) if pending is not None else []
        return self._launch(self._decode_forward(seqs, pending, rows), seqs, pending)

    def _take_pending(self, seqs: list[Sequence]) -> tuple[InFlight | None, dict[int, int], list[Sequence]]:
        """The launched step not read yet (taken off ``inflight``), its row of each sequence, and the ``seqs``
        to decode now: one whose unread token is its last (``max_new_tokens``) is not decoded again."""
        pending, self.inflight = self.inflight, None
        rows = {id(s): i for i, s in enumerate(pending.seqs)} if pending is not None else {}
        return pending, rows, [s for s in seqs if id(s) not in rows or len(s.output_ids) + 1 < s.params.max_new_tokens]

    def _decode_inputs(self, seqs: list[Sequence], rows: dict[int, int]) -> tuple[list[int], ...]:
        """Each decoding sequence's row of the unread step (-1: its token is on the host), input token (0 where
        fed from the device), new slot, context length with that token, and block table."""
        feed_rows = [rows.get(id(s), -1) for s in seqs]
        toks = [0 if r >= 0 else s.output_ids[-1] for s, r in zip(seqs, feed_rows, strict=True)]
        slots = [s.blocks.append(1)[0] for s in seqs]
        return feed_rows, toks, slots, [s.blocks.num_tokens for s in seqs], [s.blocks.blocks for s in seqs]

    def _launch(
        self, logits: torch.Tensor, seqs: list[Sequence], pending: InFlight | None
    ) -> list[tuple[Sequence, Sampled]]:
        """Sample ``seqs``' next tokens on the device and start their copy to the host (the next call's unread
        step), then read ``pending``'s tokens (and, without ``overlap``, these). A failed sampling settles the
        step now, row by row, so only the offending sequence fails."""
        read: list[tuple[Sequence, Sampled]] = []
        launched = None
        try:
            launched = self._sample_unread(logits, seqs)
        except RuntimeError:
            if pending is not None:
                read += self._read(pending)
                pending = None
            read += zip(seqs, self.sample_rows(logits, seqs), strict=True)
        if pending is not None:
            read += self._read(pending)
        if launched is not None and not self.overlap:
            read += self._read(launched)
            launched = None
        self.inflight = launched
        return read

    def _decode_forward(self, seqs: list[Sequence], pending: InFlight | None, rows: dict[int, int]) -> torch.Tensor:
        """Stage the step (each sequence's next slot, its context, its block table) and run it → logits."""
        feed_rows, toks, slots, ctx, tables = self._decode_inputs(seqs, rows)
        fed = max(feed_rows) >= 0
        feed = pending.tokens if fed else None
        if self.graphs is not None and len(seqs) <= self.graphs.batch_sizes[-1]:
            # one staged copy, one replay (a distributed leader's graphs take host tokens only: no feed)
            fed_args = {"feed": feed, "feed_rows": feed_rows} if fed else {}
            logits = self.graphs.run_host(toks, ctx, tables, slots, **fed_args)
            self.stats.decode(len(seqs), self.graphs.bucket(len(seqs)))
        else:
            dev = self.device
            meta = decode_metadata(ctx, tables, slots, device=dev)
            ids = torch.tensor(toks, device=dev)
            if feed is not None:
                ids = fed_token_ids(ids, torch.tensor(feed_rows, device=dev), feed)
            logits = self.model(ids, meta.context_lens - 1, meta, self.cache)
            self.stats.decode(len(seqs), len(seqs))
        return logits

    def _sample_unread(self, logits: torch.Tensor, seqs: list[Sequence]) -> InFlight:
        """Sample on the device and start the tokens' copy to the host, without waiting for it."""
        tokens = self._sample(logits, seqs)
        # two host buffers in turn: the other one may still hold the unread tokens of the step before
        host = self._host_tokens[self._launches % 2][: len(seqs)]
        self._launches += 1
        host.copy_(tokens, non_blocking=True)
        ready = None
        if tokens.is_cuda:
            ready = torch.cuda.Event()
            ready.record()
        return InFlight(seqs, tokens, host, ready)

    def _read(self, step: InFlight) -> list[tuple[Sequence, Sampled]]:
        if step.ready is not None:
            step.ready.synchronize()
        return list(zip(step.seqs, step.host.tolist(), strict=True))

    def drop_inflight(self) -> None:
        """Forget the launched step (its sequences are being failed): its tokens are never read."""
        self.inflight = None

    # ---- sampling and scoring ---------------------------------------------------------------
    def sample_rows(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[Sampled]:
        """Batched sampling; if it fails, retry row by row so only the offending sequence fails and the rest
        of the batch is unaffected."""
        try:
            return self._sample(logits, seqs).tolist()
        except RuntimeError:
            out: list[Sampled] = []
            for i, s in enumerate(seqs):
                try:
                    out.append(int(self._sample(logits[i : i + 1], [s])[0]))
                except RuntimeError as exc:
                    log.warning("sampling failed for %s: %s", s.id, exc)
                    out.append(SamplingFailed(f"sampling failed: {exc}"))
            return out

    @staticmethod
    def _sample(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Sample, and queue on each sequence that asks for them its token's log-probabilities. On CUDA they are
        copied to pinned host memory ahead of the tokens' own copy, so once the tokens are read they are there
        too (no synchronisation of their own). Costs nothing when no sequence asks."""
        tokens = sample(logits, [s.params for s in seqs], [s.generator for s in seqs])
        rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        if rows:
            k = max(seqs[i].params.logprobs for i in rows)
            idx = torch.tensor(rows, device=logits.device)
            packed = token_logprobs(logits[idx], tokens[idx], k)
            if packed.is_cuda:
                host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
                packed = host.copy_(packed, non_blocking=True)
            for j, i in enumerate(rows):
                seqs[i].pending_logprobs.append((packed[j], k))
        return tokens

    def score(self, prompts: Seq[Seq[int]], token_ids: Seq[int]) -> list[list[float]]:
        """Next-token log-probabilities of ``token_ids`` after each prompt: one batched forward, no KV cache."""
        dev = self.device
        lens = [len(p) for p in prompts]
        ids = torch.tensor([t for p in prompts for t in p], device=dev)
        pos = torch.cat([torch.arange(n) for n in lens]).to(dev)
        last = torch.tensor(lens, device=dev).cumsum(0) - 1
        meta = prefill_metadata(lens, lens, None, None, device=dev)
        logits = self.model(ids, pos, meta, None, logits_indices=last)
        lp = logprobs(logits)[:, torch.tensor(list(token_ids), device=dev)]
        return lp.cpu().tolist()


def _padding(groups: list[list[PrefillChunk]]) -> int:
    """Padding slots the forward's attention adds, group by group."""
    return sum(padded_slots([c.length for c in g], [c.start + c.length for c in g]) for g in groups)
