"""Continuous-batching engine: one thread owns the model, the KV pool and every sequence.

Why a single thread: the model and the paged cache are not thread-safe, and one owner means no locks on
the hot path. Other threads (the asyncio server, tests, the benchmark) only touch the inbox under
``_lock``: :meth:`Engine.submit`, :meth:`Engine.abort`, :meth:`Engine.score`. Each iteration
(:meth:`Engine.step`) applies aborts and runs queued scoring jobs, then

1. schedules (:class:`~runtime.engine.scheduler.Scheduler`): one decode token for every running sequence,
   prefill chunks of new, partially prefilled or preempted sequences in the rest of the step's token
   budget, as much of it as the decodes' latency bound allows (:class:`~runtime.engine.pacing.PrefillPacer`,
   fed each step's wall time), KV blocks taken as sequences grow (the newest preempted when the pool runs dry), cached
   prompt prefixes reused;
2. runs the model (:class:`~runtime.engine.model_runner.ModelRunner`): the forwards and the sampling;
3. post-processes the tokens (:class:`~runtime.engine.postprocess.PostProcessor`): stop rules, events, and
   finished sequences leaving the batch, their KV blocks back in the pool;

so new requests join between decode steps (iteration-level batching). The scheduling code path is the
same on CPU and GPU; only the runner's forward differs (CUDA graphs on GPU).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from runtime.engine.config import EngineConfig
from runtime.engine.model_runner import ModelRunner
from runtime.engine.pacing import PrefillPacer
from runtime.engine.postprocess import Events, PostProcessor
from runtime.engine.scheduler import Scheduler
from runtime.engine.sequence import QueueFullError, RequestTooLargeError, Sequence, ShuttingDownError, TokenEvent
from runtime.engine.stats import EngineStats
from runtime.interfaces import CausalLM, GraphCapture
from runtime.kv_cache import BlockAllocator
from runtime.loader import Tokenizer
from runtime.sampling import SamplingParams, make_generator

if TYPE_CHECKING:  # importing runtime.metrics configures prometheus-client process-wide
    from runtime.metrics import ServiceMetrics

log = logging.getLogger(__name__)

Emit = Callable[[list[tuple[Sequence, TokenEvent]]], None]


@dataclass(eq=False)
class ScoreJob:
    """Next-token log-probabilities of ``token_ids`` after each prompt, resolved into ``result``."""

    prompts: list[list[int]]
    token_ids: list[int]
    result: Future


class Engine:
    def __init__(
        self,
        model: CausalLM,
        tokenizer: Tokenizer | None,
        config: EngineConfig | None = None,
        metrics: ServiceMetrics | None = None,
        graph_capture: GraphCapture | None = None,
    ) -> None:
        """``graph_capture``: a distributed leader's decode-graph capture (see :class:`ModelRunner`)."""
        self.model, self.tokenizer = model, tokenizer
        self.cfg = cfg = config or EngineConfig()
        self.device = model.device
        limit = model.config.max_position_embeddings
        if cfg.max_model_len is not None and cfg.max_model_len > limit:
            raise ValueError(f"max_model_len {cfg.max_model_len} > the model's max_position_embeddings {limit}")
        self.max_model_len = cfg.max_model_len or limit
        self.block_size = cfg.block_size
        self.stats = EngineStats(metrics, model, cfg.imbalance_interval_s)
        max_blocks = math.ceil(self.max_model_len / cfg.block_size)
        self.runner = ModelRunner(model, cfg, max_blocks, self.stats, graph_capture)
        self.allocator = BlockAllocator(self.runner.cache.num_blocks, caching=cfg.prefix_caching)
        self.stats.kv_pool(self.allocator.capacity)
        self.max_num_batched_tokens = cfg.batched_tokens(self.device.type)
        self.scheduler = Scheduler(self.allocator, cfg.block_size, cfg.max_num_seqs, self.max_num_batched_tokens)
        self.pacer = self._new_pacer()
        self.post = PostProcessor(model.config.eos_token_id, tokenizer, self.stats, self._release)

        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._jobs: list[ScoreJob] = []
        self._aborts: set[str] = set()
        self._by_id: dict[str, Sequence] = {}  # submitted and not finished
        self._closed = False  # no admission (draining or stopped)
        self._stop = False
        self.steps = 0
        self._warming_up = False  # its steps are not traffic: left out of the step metrics
        self.emit: Emit = _emit_direct
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="moe-engine", daemon=True)
            self._thread.start()

    def warm_up(self, prompt_len: int = 8, new_tokens: int = 4) -> None:
        """Generations and a scoring pass through the real step code, then clear what they left (expert load,
        cached prefixes). The readiness probe turns true only after this.

        Besides a short prompt, one prompt spans a full step's token budget and then a chunk more, submitted
        together: compiled prefill regions see a long step (and its MoE dispatch), and a chunk attending to
        cached context while the short one decodes (a mixed step) here, not on the first requests that
        bring them."""
        long_len = min(
            self.max_num_batched_tokens + self.block_size + 1,
            self.max_model_len - new_tokens,
            self.allocator.capacity * self.block_size - new_tokens,
        )
        finished = threading.Semaphore(0)
        seqs = [
            Sequence(f"warm-up-{i}", [0] * n, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True), warmup=True)
            for i, n in enumerate((prompt_len, long_len))
        ]
        for seq in seqs:
            seq.on_event = lambda ev: finished.release() if ev.finish_reason else None
        self._warming_up = True
        try:
            self.submit(seqs)
            self.score([[0] * prompt_len, [0] * (prompt_len // 2)], [0]).result(timeout=600)
            for _ in seqs:
                if not finished.acquire(timeout=600):
                    raise RuntimeError("warm-up generation did not finish")
        finally:
            self._warming_up = False
        with self._lock:
            self.model.reset_expert_load()
            self.allocator.reset_cache()
            self.pacer = self._new_pacer()  # warm-up's step times include first-call costs

    def _new_pacer(self) -> PrefillPacer | None:
        stall = self.cfg.max_decode_stall
        return PrefillPacer(stall) if stall is not None else None

    # ---- API for other threads --------------------------------------------------------------
    def check_request(self, prompt_len: int, max_new_tokens: int) -> None:
        """Raise RequestTooLargeError when the request can never run (message names the limit)."""
        check_request(prompt_len, max_new_tokens, self.max_model_len, self.block_size, self.allocator.capacity)

    @property
    def kv_blocks(self) -> int:
        return self.allocator.capacity

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    def submit(self, seqs: Seq[Sequence], bound_queue: bool = True) -> None:
        """Queue sequences atomically (all or none). Raises ShuttingDownError, QueueFullError or
        RequestTooLargeError. ``bound_queue`` False: the caller already holds the queue to ``max_queue``
        (an engine process's parent does, for requests it has accepted)."""
        for s in seqs:
            self.check_request(s.prompt_len, s.params.max_new_tokens)
        with self._lock:
            self._admissible(len(seqs) if bound_queue else 0)
            for s in seqs:
                s.generator = make_generator(s.params, self.device)
                self.scheduler.waiting.append(s)
                self._by_id[s.id] = s
            self._wake.notify()

    def score(self, prompts: list[list[int]], token_ids: list[int], bound_queue: bool = True) -> Future:
        """Next-token log-probabilities of ``token_ids`` after each prompt, as one batched forward
        without the KV cache. Resolves to ``list[list[float]]`` ([prompt][token])."""
        job = ScoreJob(prompts, token_ids, Future())
        with self._lock:
            self._admissible(1 if bound_queue else 0)
            self._jobs.append(job)
            self._wake.notify()
        return job.result

    def _admissible(self, n: int) -> None:
        if self._closed:
            raise ShuttingDownError("the server is shutting down")
        if n and len(self.scheduler.waiting) + len(self._jobs) + n > self.cfg.max_queue:
            raise QueueFullError(f"the admission queue is full (max_queue={self.cfg.max_queue})")

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

    def kv_usage(self) -> float:
        return self.allocator.usage()

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
                    sched = self.scheduler
                    while not (self._stop or sched.waiting or self._jobs or self._aborts or sched.running):
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
        """One iteration: inbox, then schedule → run the model → post-process, then emit the events."""
        with self._lock:
            aborts, self._aborts = self._aborts, set()
            jobs, self._jobs = self._jobs, []
        events: Events = []
        self._abort(aborts, events)
        self._run_jobs(jobs)
        started = time.perf_counter()
        with self._lock:
            batch = self.scheduler.schedule(self.pacer)
        self.stats.scheduled(len(batch.preempted), batch.cache_queries, batch.cache_hits, batch.paced)
        groups, decoded = batch.prefill_groups, None
        if self.cfg.mixed_steps and groups and batch.decode:  # the decodes ride along with the prompt chunks
            sampled, decoded = self.runner.mixed(groups, batch.decode)
            self._prefilled(sampled, events)
        elif groups:
            self._prefilled(self.runner.prefill(groups), events)
        if decoded is not None:
            self.post.accept(decoded, events)
        elif batch.decode or self.runner.inflight is not None:
            self.post.accept(self.runner.decode(batch.decode), events)
        if self.pacer is not None:
            self.pacer.observe(time.perf_counter() - started, len(batch.decode), batch.num_tokens - len(batch.decode))
        self.steps += 1
        if not self._warming_up:
            self.stats.step(batch.num_tokens)
        self.stats.count_tokens()
        # gauges before the events: a client that reads /metrics after its last token sees this step's
        # (an engine process sends both in one message)
        self.stats.update_gauges(len(self.scheduler.running), len(self.scheduler.waiting), self.allocator.usage())
        if events:
            self.emit(events)

    # ---- pieces of a step -------------------------------------------------------------------
    def _prefilled(self, sampled: list, events: Events) -> None:
        """Tokens sampled at the end of prompts: first tokens, or the next of a sequence preempted earlier."""
        resumed = [(s, t) for s, t in sampled if s.first_token_at is not None]
        self.post.first_tokens([(s, t) for s, t in sampled if s.first_token_at is None], events)
        self.post.accept(resumed, events)

    def _abort(self, ids: set[str], events: Events) -> None:
        if not ids:
            return
        with self._lock:
            gone = self.scheduler.remove_waiting(ids)
        gone += [s for s in self.scheduler.running if s.id in ids]
        for s in gone:
            self.post.finish(s, "abort", events)

    def _run_jobs(self, jobs: list[ScoreJob]) -> None:
        for job in jobs:
            if job.result.set_running_or_notify_cancel():
                try:
                    job.result.set_result(self.runner.score(job.prompts, job.token_ids))
                except Exception as exc:
                    job.result.set_exception(exc)

    def _release(self, s: Sequence) -> None:
        """A finished sequence leaves the batch (or the queue, when preempted) and the inbox."""
        with self._lock:
            self.scheduler.finish(s)
            self._by_id.pop(s.id, None)

    def _fail_all(self, message: str, reason: str = "error") -> None:
        events: Events = []
        self.runner.drop_inflight()  # its tokens are dropped with the sequences
        with self._lock:
            waiting = list(self.scheduler.waiting)
            self.scheduler.waiting.clear()
            jobs, self._jobs = self._jobs, []
        for s in [*self.scheduler.running, *waiting]:
            self.post.finish(s, reason, events, error=message)
        self.allocator.reset_cache()  # a failed step may have registered blocks it never wrote
        for job in jobs:
            if not job.result.done():
                job.result.set_exception(RuntimeError(message))
        if events:
            self.emit(events)


def check_request(prompt_len: int, max_new_tokens: int, max_model_len: int, block_size: int, kv_blocks: int) -> None:
    """Raise RequestTooLargeError when a request can never run: empty, longer than the context, or more KV
    blocks than the whole pool (blocks are taken as a sequence grows, but it must be able to finish alone)."""
    if prompt_len < 1:
        raise RequestTooLargeError("the prompt is empty")
    if prompt_len + max_new_tokens > max_model_len:
        raise RequestTooLargeError(
            f"this model's maximum context length is {max_model_len} tokens; the request has "
            f"{prompt_len} prompt tokens + max_tokens {max_new_tokens} = {prompt_len + max_new_tokens}"
        )
    need = math.ceil((prompt_len + max_new_tokens) / block_size)
    if need > kv_blocks:
        raise RequestTooLargeError(f"the request needs {need} KV blocks; the pool has {kv_blocks} (kv_blocks)")


def _emit_direct(events: list[tuple[Sequence, TokenEvent]]) -> None:
    for s, ev in events:
        s.on_event(ev)
