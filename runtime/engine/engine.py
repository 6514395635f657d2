"""Continuous-batching engine: one scheduler thread owns the model, the KV pool and every sequence.

Why a single thread: the model and the paged cache are not thread-safe, and one owner means no locks
on the hot path. Other threads (the asyncio server, tests, the benchmark) only touch the inbox under
``_lock``: :meth:`submit`, :meth:`abort`, :meth:`score`. Each iteration (``step``) applies aborts, runs
queued scoring jobs, prefills new or partially prefilled sequences under a token budget, then decodes
every running sequence by one token, so new requests join between decode steps (iteration-level
batching) and finished ones leave at once, returning their KV blocks to the pool.

The KV pool is allocated once here; nothing grows while serving. On CUDA the decode step is replayed
from captured graphs (:class:`~runtime.cuda_graph.CUDAGraphDecoder`, batch buckets); on CPU the same
step runs eagerly. The scheduling code path is identical on both.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from runtime.cuda_graph import fed_token_ids
from runtime.engine.scheduler import PrefillChunk, group_by_length, padded_slots, plan_prefill
from runtime.engine.sequence import (
    QueueFullError,
    RequestTooLargeError,
    Sequence,
    ShuttingDownError,
    TokenEvent,
)
from runtime.kv_cache import (
    BlockAllocator,
    PagedKVCache,
    SequenceBlocks,
    decode_metadata,
    prefill_metadata,
)
from runtime.loader import Tokenizer
from runtime.model import DeepseekForCausalLM
from runtime.sampling import logprobs, make_generator, sample

log = logging.getLogger(__name__)

Emit = Callable[[list[tuple[Sequence, TokenEvent]]], None]


@dataclass
class EngineConfig:
    max_num_seqs: int = 64  # running batch cap (largest decode batch)
    max_queue: int = 256  # waiting sequences + scoring jobs; beyond this, QueueFullError (429)
    max_prefill_tokens: int = 512  # prompt tokens per step: keeps decodes flowing under long prompts
    block_size: int = 16
    kv_blocks: int | None = None  # pool size; None: from memory (CUDA) or enough for a full batch (CPU)
    kv_memory_fraction: float = 0.5  # of free device memory, when kv_blocks is None on CUDA
    max_model_len: int | None = None  # prompt + max_tokens per request; default: the model's positions
    cuda_graphs: bool = True
    # launch decode step k+1 (its input tokens fed on the device) before reading step k's tokens, so the GPU
    # does not wait for the host's part of a step; a distributed leader always runs without it
    overlap: bool = True
    compile: bool = True  # CUDA only: compiled layer regions (model.set_compile) before graph capture
    imbalance_interval_s: float = 5.0  # window of the expert-load imbalance gauge

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_queue", "max_prefill_tokens", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.kv_blocks is not None and self.kv_blocks < 2:
            raise ValueError(f"kv_blocks must be >= 2, got {self.kv_blocks}")
        if not 0 < self.kv_memory_fraction <= 0.95:
            raise ValueError(f"kv_memory_fraction must be in (0, 0.95], got {self.kv_memory_fraction}")


class Engine:
    def __init__(
        self,
        model: DeepseekForCausalLM,
        tokenizer: Tokenizer | None,
        config: EngineConfig | None = None,
        metrics=None,  # runtime.metrics.ServiceMetrics or None
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.cfg = cfg = config or EngineConfig()
        self.metrics = metrics
        self.device = model.device
        mc = model.config
        limit = mc.max_position_embeddings
        if cfg.max_model_len is not None and cfg.max_model_len > limit:
            raise ValueError(f"max_model_len {cfg.max_model_len} > the model's max_position_embeddings {limit}")
        self.max_model_len = cfg.max_model_len or limit
        self.block_size = cfg.block_size
        self.max_blocks_per_seq = math.ceil(self.max_model_len / cfg.block_size)
        self.cache = self._allocate_pool()
        self.allocator = BlockAllocator(self.cache.num_blocks)
        self.eos = set(mc.eos_token_id)
        # a distributed leader's followers take their tokens from its host lists: no device-fed tokens there
        self.overlap = cfg.overlap and not hasattr(model, "make_graph_decoder")
        self._inflight: _InFlight | None = None
        pinned = self.device.type == "cuda"
        self._host_tokens = [torch.zeros(cfg.max_num_seqs, dtype=torch.int64, pin_memory=pinned) for _ in range(2)]
        self.graphs = None
        if self.device.type == "cuda" and cfg.compile:
            model.set_compile(True)  # compile first, capture second (docs/runtime.md)
        if self.device.type == "cuda" and cfg.cuda_graphs:
            from runtime.cuda_graph import CUDAGraphDecoder

            sizes = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b < cfg.max_num_seqs]
            # a distributed leader captures on every rank at once (runtime.parallel.lockstep)
            make = getattr(model, "make_graph_decoder", None) or (lambda *a: CUDAGraphDecoder(model, *a))
            try:
                self.graphs = make(self.cache, self.max_blocks_per_seq, [*sizes, cfg.max_num_seqs])
            except RuntimeError as exc:  # e.g. an eager fp32 MoE loop syncs with the host: not capturable
                log.warning("CUDA-graph capture failed, decoding eagerly: %s", str(exc).splitlines()[0])
                torch.cuda.synchronize()
                self.graphs = None

        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._jobs: list[tuple[list[list[int]], list[int], Future]] = []
        self._aborts: set[str] = set()
        self._closed = False  # no admission (draining or stopped)
        self._stop = False
        self.running: list[Sequence] = []
        self._by_id: dict[str, Sequence] = {}
        self._pad_window: collections.deque[tuple[int, int]] = collections.deque(maxlen=64)
        self._imbalance_at = time.monotonic()
        self.steps = 0
        self._generated = 0  # tokens accepted this step (one counter update per step, not per token)
        self.emit: Emit = _emit_direct
        self._thread: threading.Thread | None = None
        if metrics is not None:
            metrics.kv_blocks.set(self.allocator.capacity)

    # ---- set-up -----------------------------------------------------------------------------
    def _allocate_pool(self) -> PagedKVCache:
        cfg, mc = self.cfg, self.model.config
        if cfg.kv_blocks is not None:
            n = cfg.kv_blocks
        elif self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            per = PagedKVCache.bytes_per_block(mc, cfg.block_size, self.model.dtype)
            n = int(free * cfg.kv_memory_fraction) // per
        else:  # CPU: room for a full batch of full-length sequences
            n = 1 + cfg.max_num_seqs * self.max_blocks_per_seq
        return PagedKVCache(mc, n, cfg.block_size, dtype=self.model.dtype, device=self.device)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="moe-engine", daemon=True)
            self._thread.start()

    def warm_up(self, prompt_len: int = 8, new_tokens: int = 4) -> None:
        """One generation and one scoring pass through the real step code, then clear the statistics
        they left (expert load). The readiness probe turns true only after this."""
        from runtime.sampling import SamplingParams

        done = threading.Event()
        seq = Sequence("warmup", [0] * prompt_len, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
        seq.on_event = lambda ev: done.set() if ev.finish_reason else None
        self.submit([seq])
        self.score([[0] * prompt_len, [0] * (prompt_len // 2)], [0]).result(timeout=600)
        if not done.wait(timeout=600):
            raise RuntimeError("warm-up generation did not finish")
        with self._lock:
            self.model.reset_expert_load()

    # ---- API for other threads --------------------------------------------------------------
    def check_request(self, prompt_len: int, max_new_tokens: int) -> None:
        """Raise RequestTooLargeError when the request can never run (message names the limit)."""
        if prompt_len < 1:
            raise RequestTooLargeError("the prompt is empty")
        if prompt_len + max_new_tokens > self.max_model_len:
            raise RequestTooLargeError(
                f"this model's maximum context length is {self.max_model_len} tokens; the request has "
                f"{prompt_len} prompt tokens + max_tokens {max_new_tokens} = {prompt_len + max_new_tokens}"
            )
        need = math.ceil((prompt_len + max_new_tokens) / self.block_size)
        if need > self.allocator.capacity:
            raise RequestTooLargeError(
                f"the request needs {need} KV blocks; the pool has {self.allocator.capacity} (kv_blocks)"
            )

    def submit(self, seqs: Seq[Sequence]) -> None:
        """Queue sequences atomically (all or none). Raises ShuttingDownError, QueueFullError or
        RequestTooLargeError."""
        for s in seqs:
            self.check_request(s.prompt_len, s.params.max_new_tokens)
        with self._lock:
            if self._closed:
                raise ShuttingDownError("the server is shutting down")
            if len(self._waiting) + len(self._jobs) + len(seqs) > self.cfg.max_queue:
                raise QueueFullError(f"the admission queue is full (max_queue={self.cfg.max_queue})")
            for s in seqs:
                s.generator = make_generator(s.params, self.device)
                self._waiting.append(s)
                self._by_id[s.id] = s
            self._wake.notify()

    def score(self, prompts: list[list[int]], label_ids: list[int]) -> Future:
        """Next-token log-probabilities of ``label_ids`` after each prompt, as one batched forward
        without the KV cache. Resolves to ``list[list[float]]`` ([prompt][label])."""
        fut: Future = Future()
        with self._lock:
            if self._closed:
                raise ShuttingDownError("the server is shutting down")
            if len(self._waiting) + len(self._jobs) + 1 > self.cfg.max_queue:
                raise QueueFullError(f"the admission queue is full (max_queue={self.cfg.max_queue})")
            self._jobs.append((prompts, label_ids, fut))
            self._wake.notify()
        return fut

    def abort(self, seq_id: str) -> None:
        """Cancel a sequence (client went away): it leaves the batch and frees its blocks next step."""
        with self._lock:
            if seq_id in self._by_id:
                self._aborts.add(seq_id)
                self._wake.notify()

    def close_admission(self) -> None:
        with self._lock:
            self._closed = True

    @property
    def accepting(self) -> bool:
        return not self._closed

    def num_inflight(self) -> int:
        with self._lock:
            return len(self._by_id) + len(self._jobs)

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._closed = self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- the loop ---------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not (self._stop or self._waiting or self._jobs or self._aborts or self.running):
                        self._wake.wait()
                    if self._stop:
                        break
                try:
                    self.step()
                except Exception as exc:  # a bug or device error: fail the batch, keep serving
                    log.exception("engine step failed")
                    self._fail_all(f"{type(exc).__name__}: {exc}")
        self._fail_all("the engine stopped", reason="abort")

    def step(self) -> None:
        with self._lock:
            aborts, self._aborts = self._aborts, set()
            jobs, self._jobs = self._jobs, []
        events: list[tuple[Sequence, TokenEvent]] = []
        if aborts:
            self._apply_aborts(aborts, events)
        for prompts, labels, fut in jobs:
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(self._score(prompts, labels))
                except Exception as exc:
                    fut.set_exception(exc)
        decode = [s for s in self.running if s.prefilled]
        self._prefill(events)
        if decode or self._inflight is not None:
            self._decode(decode, events)
        self.steps += 1
        if self.metrics is not None and self._generated:
            self.metrics.generation_tokens.inc(self._generated)
        self._generated = 0
        if events:
            self.emit(events)
        self._update_gauges()

    # ---- pieces of a step -------------------------------------------------------------------
    def _apply_aborts(self, ids: set[str], events: list) -> None:
        with self._lock:
            gone = [s for s in self._waiting if s.id in ids]
            for s in gone:
                self._waiting.remove(s)
        gone += [s for s in self.running if s.id in ids]
        for s in gone:
            self._finish(s, "abort", events)

    def _reserved_blocks(self) -> int:
        return sum(s.outstanding_blocks(self.block_size) for s in self.running)

    def _prefill(self, events: list) -> None:
        partial = [s for s in self.running if not s.prefilled]
        with self._lock:
            chunks, admitted = plan_prefill(
                partial,
                self._waiting,
                budget=self.cfg.max_prefill_tokens,
                free_seq_slots=self.cfg.max_num_seqs - len(self.running),
                free_blocks=self.allocator.num_free - self._reserved_blocks(),
                block_size=self.block_size,
            )
            for _ in range(admitted):
                s = self._waiting.popleft()
                s.blocks = SequenceBlocks(self.allocator, self.block_size)
                self.running.append(s)
        for group in group_by_length(chunks):
            self._prefill_group(group, events)

    def _prefill_group(self, group: list[PrefillChunk], events: list) -> None:
        dev = self.device
        qlens = [c.length for c in group]
        ctx = [c.start + c.length for c in group]
        slots = [slot for c in group for slot in c.seq.blocks.append(c.length)]
        ids = torch.tensor([t for c in group for t in c.seq.prompt_ids[c.start : c.start + c.length]], device=dev)
        pos = torch.cat([torch.arange(c.start, c.start + c.length) for c in group]).to(dev)
        last = torch.tensor(qlens, device=dev).cumsum(0) - 1
        meta = prefill_metadata(qlens, ctx, [c.seq.blocks.blocks for c in group], slots, device=dev)
        logits = self.model(ids, pos, meta, self.cache, logits_indices=last)
        pad = padded_slots(qlens, ctx)
        self._pad_window.append((pad, sum(qlens) + pad))
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(sum(qlens))
        done = []
        for i, c in enumerate(group):
            c.seq.num_computed += c.length
            if c.seq.prefilled:
                done.append(i)
        if done:
            rows = logits[done] if len(done) < len(group) else logits
            seqs = [group[i].seq for i in done]
            toks = self._sample(rows, seqs, events)
            now = time.monotonic()
            for s, t in zip(seqs, toks, strict=True):
                if t is not None:
                    s.first_token_at = now
                    self._accept(s, t, events)

    def _decode(self, seqs: list[Sequence], events: list) -> None:
        """Launch one decode step for ``seqs``, then accept the tokens of the step launched before it (with
        ``overlap``; without it, this step's own). Sequences whose previous step is still unread take its
        token on the device; one whose unread token is its last (``max_new_tokens``) is not decoded again.
        A sequence that the unread token ends (a stop token or string) was decoded once more for nothing:
        that row is dropped, and its blocks were released only after the step was queued behind it."""
        pending, self._inflight = self._inflight, None
        rows = {id(s): i for i, s in enumerate(pending.seqs)} if pending is not None else {}
        seqs = [s for s in seqs if id(s) not in rows or len(s.output_ids) + 1 < s.params.max_new_tokens]
        launched = self._launch(seqs, pending, rows, events) if seqs else None
        if pending is not None and not pending.resolved:
            self._resolve(pending, events)
        if launched is not None and not self.overlap:
            self._resolve(launched, events)
            launched = None
        self._inflight = launched

    def _launch(self, seqs: list[Sequence], pending: _InFlight | None, rows: dict, events: list) -> _InFlight | None:
        dev = self.device
        feed_rows = [rows.get(id(s), -1) for s in seqs]
        fed = max(feed_rows) >= 0
        toks = [0 if r >= 0 else s.output_ids[-1] for s, r in zip(seqs, feed_rows, strict=True)]
        slots = [s.blocks.append(1)[0] for s in seqs]
        ctx = [s.blocks.num_tokens for s in seqs]
        tables = [s.blocks.blocks for s in seqs]
        feed = pending.tokens if fed else None
        if self.graphs is not None and len(seqs) <= self.graphs.batch_sizes[-1]:
            # one staged copy, one replay (a distributed leader's graphs take host tokens only: no feed)
            fed_args = {"feed": feed, "feed_rows": feed_rows} if fed else {}
            logits = self.graphs.run_host(toks, ctx, tables, slots, **fed_args)
            bucket = self.graphs.bucket(len(seqs))
            self._pad_window.append((bucket - len(seqs), bucket))
        else:
            meta = decode_metadata(ctx, tables, slots, device=dev)
            ids = torch.tensor(toks, device=dev)
            if feed is not None:
                ids = fed_token_ids(ids, torch.tensor(feed_rows, device=dev), feed)
            logits = self.model(ids, meta.context_lens - 1, meta, self.cache)
            self._pad_window.append((0, len(seqs)))
        if self.metrics is not None:
            self.metrics.batch_size.set(len(seqs))
        try:
            tokens = sample(logits, [s.params for s in seqs], [s.generator for s in seqs])
        except RuntimeError:  # a row's sampling failed: settle this step now, row by row
            if pending is not None:
                self._resolve(pending, events)
            for s, t in zip(seqs, self._sample(logits, seqs, events), strict=True):
                if t is not None and s.finish_reason is None:
                    self._accept(s, t, events)
            return None
        host = self._host_tokens[self.steps % 2][: len(seqs)]  # the other buffer may hold the unread step's
        host.copy_(tokens, non_blocking=True)
        ready = None
        if tokens.is_cuda:
            ready = torch.cuda.Event()
            ready.record()
        return _InFlight(seqs, tokens, host, ready)

    def _resolve(self, step: _InFlight, events: list) -> None:
        """Read a launched step's tokens and accept them for the sequences still running."""
        if step.ready is not None:
            step.ready.synchronize()
        step.resolved = True
        for s, t in zip(step.seqs, step.host.tolist(), strict=True):
            if s.finish_reason is None:
                self._accept(s, t, events)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], events: list) -> list[int | None]:
        """Batched sampling; if it fails, retry row by row so only the offending sequence fails
        (None) and the rest of the batch is unaffected."""
        try:
            return sample(logits, [s.params for s in seqs], [s.generator for s in seqs]).tolist()
        except RuntimeError:
            out: list[int | None] = []
            for i, s in enumerate(seqs):
                try:
                    out.append(int(sample(logits[i : i + 1], [s.params], [s.generator])[0]))
                except RuntimeError as exc:
                    log.warning("sampling failed for %s: %s", s.id, exc)
                    self._finish(s, "error", events, error=f"sampling failed: {exc}")
                    out.append(None)
            return out

    def _accept(self, s: Sequence, tok: int, events: list) -> None:
        """Append ``tok`` or finish ``s`` (same rules as the offline Generator)."""
        p = s.params
        if tok in p.stop_token_ids or (tok in self.eos and not p.ignore_eos):
            self._finish(s, "stop", events)
            return
        s.output_ids.append(tok)
        self._generated += 1
        if p.stop and self.tokenizer is not None:
            text = self.tokenizer.decode(s.output_ids)
            hits = [text.find(x) for x in p.stop if x and x in text]
            if hits:
                self._finish(s, "stop", events, new=[tok], text=text[: min(hits)])
                return
        if len(s.output_ids) >= p.max_new_tokens:
            self._finish(s, "length", events, new=[tok])
            return
        events.append((s, TokenEvent([tok])))

    def _finish(self, s: Sequence, reason: str, events: list, new=(), text=None, error=None) -> None:
        if s.finish_reason is not None:  # finished already (e.g. its sampling failed, then its unread token)
            return
        s.finish_reason = reason
        if s.blocks is not None:
            s.blocks.release()
        if s in self.running:
            self.running.remove(s)
        with self._lock:
            self._by_id.pop(s.id, None)
        events.append((s, TokenEvent(list(new), reason, text, error)))
        m = self.metrics
        if m is not None and s.id != "warmup":
            now = time.monotonic()
            if reason == "error":
                m.errors.labels("engine").inc()
            else:
                m.success.labels(reason).inc()
            if reason != "abort":
                m.e2e_latency.observe(now - s.arrival)
                if s.first_token_at is not None:
                    m.ttft.observe(s.first_token_at - s.arrival)
                    if len(s.output_ids) > 1:
                        m.tpot.observe((now - s.first_token_at) / (len(s.output_ids) - 1))

    def _fail_all(self, message: str, reason: str = "error") -> None:
        events: list = []
        self._inflight = None  # its tokens are dropped with the sequences
        with self._lock:
            waiting, self._waiting = list(self._waiting), collections.deque()
            jobs, self._jobs = self._jobs, []
        for s in [*self.running, *waiting]:
            self._finish(s, reason, events, error=message)
        for _, _, fut in jobs:
            if not fut.done():
                fut.set_exception(RuntimeError(message))
        if events:
            self.emit(events)

    def _score(self, prompts: list[list[int]], label_ids: list[int]) -> list[list[float]]:
        dev = self.device
        lens = [len(p) for p in prompts]
        ids = torch.tensor([t for p in prompts for t in p], device=dev)
        pos = torch.cat([torch.arange(n) for n in lens]).to(dev)
        last = torch.tensor(lens, device=dev).cumsum(0) - 1
        meta = prefill_metadata(lens, lens, None, None, device=dev)
        logits = self.model(ids, pos, meta, None, logits_indices=last)
        lp = logprobs(logits)[:, torch.tensor(label_ids, device=dev)]
        return lp.cpu().tolist()

    def _update_gauges(self) -> None:
        m = self.metrics
        if m is None:
            return
        m.running.set(len(self.running))
        m.waiting.set(len(self._waiting))
        m.kv_usage.set(self.allocator.usage())
        pad = sum(p for p, _ in self._pad_window)
        total = sum(t for _, t in self._pad_window)
        m.padding_ratio.set(pad / total if total else 0.0)
        now = time.monotonic()
        if now - self._imbalance_at >= self.cfg.imbalance_interval_s:
            self._imbalance_at = now
            for layer, ratio in self.model.expert_load_imbalance().items():
                if ratio > 0:
                    m.expert_imbalance.labels(str(layer)).set(ratio)
            self.model.reset_expert_load()

    def kv_usage(self) -> float:
        return self.allocator.usage()


@dataclass(eq=False)
class _InFlight:
    """A launched decode step whose tokens the host has not read yet."""

    seqs: list[Sequence]
    tokens: torch.Tensor  # [b] sampled ids on the device: the next step's fed input tokens
    host: torch.Tensor  # [b] their copy on the host (pinned on CUDA), complete once ``ready``
    ready: object | None  # torch.cuda.Event on CUDA
    resolved: bool = False


def _emit_direct(events: list[tuple[Sequence, TokenEvent]]) -> None:
    for s, ev in events:
        s.on_event(ev)
