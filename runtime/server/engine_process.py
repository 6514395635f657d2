"""The engine in a process of its own, so the HTTP event loop and the engine loop each get an interpreter.

In one process the engine thread and the asyncio loop share one interpreter lock. At a few hundred streams
the loop's work per token (detokenizing, JSON, one socket write per stream per step) and the engine's
Python per step (scheduling, staging inputs, launching kernels) take turns on one core, and the GPU waits
for both. vLLM's engine core and SGLang's scheduler run in their own processes for this reason, and so does
``serve`` on one GPU (``--engine-process``):

- the child loads the model, builds the :class:`~runtime.engine.Engine`, warms it up, and answers ``ready``
  with the limits (context length, KV pool) that the parent checks requests against; the parent loads its
  own tokenizer and the risk task meanwhile;
- requests go down one pipe as (id, prompt, sampling parameters, arrival time). Each step's token events come back up
  the other pipe as one message, which the event loop reads itself when the pipe turns readable, with no
  thread in between;
- the parent admits requests. It holds the queue to ``max_queue`` (counting requests that have no token
  yet) and applies the same request checks as the engine, so an accepted request is never refused later;
- the engine's metrics are recorded in the child and replayed on the service's registry (with each step's
  events, or within :data:`METRICS_FLUSH_S` when idle), so ``/metrics`` stays one exposition;
- the child ignores SIGINT and SIGTERM, because the parent drains and then stops it. It exits when the
  parent's end of the pipe closes. If the child dies, every in-flight request ends with an error and
  the service exits 1.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import multiprocessing
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from multiprocessing.connection import Connection

from runtime.engine.engine import check_request
from runtime.engine.sequence import QueueFullError, Sequence, ShuttingDownError, TokenEvent

log = logging.getLogger(__name__)

#: how long metrics recorded in the child wait for a step's events to carry them (idle engine)
METRICS_FLUSH_S = 0.1
#: how long ``stop`` waits for the child to finish its loop before it is terminated
STOP_TIMEOUT_S = 15.0

Record = tuple[str, tuple[str, ...] | None, str, float]  # (attribute, labels, method, value)


# ---- metrics across the process boundary ------------------------------------------------------------
class MetricsRecorder:
    """Stands in for :class:`~runtime.metrics.ServiceMetrics` in the child: every ``attr[.labels(...)]
    .inc/.set/.observe(v)`` the engine makes is kept as a record for :func:`replay` in the parent."""

    def __init__(self) -> None:
        self._records: list[Record] = []
        self._lock = threading.Lock()

    def __getattr__(self, attr: str) -> _RecordedMetric:
        if attr.startswith("_"):
            raise AttributeError(attr)
        return _RecordedMetric(self, attr, None)

    def add(self, record: Record) -> None:
        with self._lock:
            self._records.append(record)

    def take(self) -> list[Record]:
        with self._lock:
            out, self._records = self._records, []
        return out


class _RecordedMetric:
    __slots__ = ("_attr", "_labels", "_to")

    def __init__(self, to: MetricsRecorder, attr: str, labels: tuple[str, ...] | None) -> None:
        self._to, self._attr, self._labels = to, attr, labels

    def labels(self, *values: str) -> _RecordedMetric:
        return _RecordedMetric(self._to, self._attr, tuple(values))

    def inc(self, amount: float = 1.0) -> None:
        self._to.add((self._attr, self._labels, "inc", amount))

    def set(self, value: float) -> None:
        self._to.add((self._attr, self._labels, "set", value))

    def observe(self, value: float) -> None:
        self._to.add((self._attr, self._labels, "observe", value))


def replay(metrics, records: list[Record]) -> None:
    """Apply the child's records to the service's metrics (same attribute names, same bound labels)."""
    for attr, labels, method, value in records:
        target = getattr(metrics, attr)
        if labels is not None:
            target = target.labels(*labels)
        getattr(target, method)(value)


# ---- the parent's side ------------------------------------------------------------------------------
class EngineClient:
    """What the HTTP layer uses of an :class:`~runtime.engine.Engine`, served by an engine process.

    ``spawn`` starts the child; ``wait_ready`` blocks (in the loading thread) until the child has loaded and
    warmed up; ``attach`` hands the event pipe to the asyncio loop. ``on_exit(message)`` is called once if
    the child dies while serving."""

    def __init__(self, process, commands: Connection, events: Connection, settings, metrics, on_exit) -> None:
        self._process, self._commands, self._events = process, commands, events
        self.settings, self.metrics = settings, metrics
        self._on_exit: Callable[[str], None] = on_exit
        self._send_lock = threading.Lock()
        self._seqs: dict[str, Sequence] = {}  # submitted and not finished
        self._unstarted: set[str] = set()  # submitted, no event yet: what the queue bound counts
        self._jobs: dict[int, Future] = {}
        self._job_ids = itertools.count()
        self._closed = False
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.max_model_len = self.block_size = self.kv_blocks = self.vocab_size = 0

    @classmethod
    def spawn(cls, settings, metrics, on_exit: Callable[[str], None], log_level: int | None = None) -> EngineClient:
        ctx = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
        child_commands, commands = ctx.Pipe(duplex=False)
        events, child_events = ctx.Pipe(duplex=False)
        level = log_level if log_level is not None else logging.getLogger().getEffectiveLevel()
        process = ctx.Process(
            target=engine_main, args=(settings, child_commands, child_events, level), name="moe-engine-process"
        )
        process.start()
        child_commands.close()  # the child's ends: a dead child now reads as end-of-file here
        child_events.close()
        return cls(process, commands, events, settings, metrics, on_exit)

    def wait_ready(self, timeout: float = 3600.0) -> None:
        """Block until the child is serving; raises RuntimeError with its reason if it is not."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self._events.poll(0.5):
                    msg = self._events.recv()
                    if msg[0] == "metrics":
                        replay(self.metrics, msg[1])
                        continue
                    if msg[0] == "ready":
                        self.__dict__.update(msg[1])
                        return
                    raise RuntimeError(msg[1])  # "failed"
            except (EOFError, OSError):
                pass
            else:
                if self._process.is_alive() and time.monotonic() < deadline:
                    continue
            self._terminate()
            raise RuntimeError(
                f"the engine process exited with code {self._process.exitcode} before it was ready"
                if time.monotonic() < deadline
                else f"the engine process was not ready in {timeout:.0f} s"
            )

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """From now on the loop reads the events (call from any thread)."""
        self._loop = loop
        loop.call_soon_threadsafe(loop.add_reader, self._events.fileno(), self._on_readable)

    # ---- what the HTTP layer calls (the event loop's thread) --------------------------------------
    def submit(self, seqs: list[Sequence]) -> None:
        if self._closed:
            raise ShuttingDownError("the server is shutting down")
        for s in seqs:
            check_request(s.prompt_len, s.params.max_new_tokens, self.max_model_len, self.block_size, self.kv_blocks)
        max_queue = self.settings.max_queue
        if len(self._unstarted) + len(self._jobs) + len(seqs) > max_queue:
            raise QueueFullError(f"the admission queue is full (max_queue={max_queue})")
        for s in seqs:
            self._seqs[s.id] = s
            self._unstarted.add(s.id)
        self._send(("submit", [(s.id, s.prompt_ids, s.params, s.arrival) for s in seqs]))

    def score(self, prompts: list[list[int]], token_ids: list[int]) -> Future:
        if self._closed:
            raise ShuttingDownError("the server is shutting down")
        if len(self._unstarted) + len(self._jobs) + 1 > self.settings.max_queue:
            raise QueueFullError(f"the admission queue is full (max_queue={self.settings.max_queue})")
        job_id, fut = next(self._job_ids), Future()
        self._jobs[job_id] = fut
        self._send(("score", job_id, prompts, token_ids))
        return fut

    def abort(self, seq_id: str) -> None:
        if seq_id in self._seqs:
            self._send(("abort", seq_id))

    def close_admission(self) -> None:
        self._closed = True
        self._send(("close",))

    @property
    def accepting(self) -> bool:
        return not self._closed

    def num_inflight(self) -> int:
        return len(self._seqs) + len(self._jobs)

    def start(self) -> None:
        """The child started its engine itself (part of ``ready``)."""

    def warm_up(self) -> None:
        """The child warmed its engine up before answering ``ready``."""

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Ask the child to stop (its unfinished sequences end as aborted), then wait for it to exit."""
        if self._stopping:
            return
        self._stopping = self._closed = True
        self._send(("stop",))
        # the child's last events (its unfinished sequences, aborted) are read while it exits: a full pipe
        # would otherwise hold it until it is terminated
        deadline = time.monotonic() + timeout
        while self._process.is_alive() and time.monotonic() < deadline:
            try:
                if self._events.poll(0.05):
                    self._handle(self._events.recv())
            except (EOFError, OSError):
                break
        self._process.join(max(0.0, deadline - time.monotonic()))
        self._terminate()
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._detach)

    # ---- the pipes ---------------------------------------------------------------------------------
    def _send(self, msg: tuple) -> None:
        try:
            with self._send_lock:
                self._commands.send(msg)
        except (OSError, ValueError):  # the child is gone: its end-of-file is handled by the reader
            if not self._stopping:
                log.warning("the engine process is gone; %s not delivered", msg[0])

    def _on_readable(self) -> None:
        try:
            while self._events.poll():
                self._handle(self._events.recv())
        except (EOFError, OSError):
            self._detach()
            self._child_gone()

    def _handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "events":
            _, events, records = msg
            replay(self.metrics, records)
            for sid, token_ids, reason, text, error, logprobs in events:
                self._unstarted.discard(sid)
                seq = self._seqs.pop(sid, None) if reason else self._seqs.get(sid)
                if seq is not None:
                    seq.on_event(TokenEvent(token_ids, reason, text, error, logprobs))
        elif kind == "metrics":
            replay(self.metrics, msg[1])
        elif kind == "score":
            _, job_id, ok, value = msg
            fut = self._jobs.pop(job_id, None)
            if fut is not None:
                fut.set_result(value) if ok else fut.set_exception(RuntimeError(value))

    def _detach(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._events.fileno())

    def _child_gone(self) -> None:
        self._process.join(5)
        code = self._process.exitcode
        message = f"the engine process exited with code {code}"
        if self._stopping:
            return
        log.error("%s; failing %d in-flight sequences", message, len(self._seqs))
        self._closed = True
        seqs, self._seqs = self._seqs, {}
        jobs, self._jobs = self._jobs, {}
        for seq in seqs.values():
            seq.on_event(TokenEvent([], "error", error=message))
        for fut in jobs.values():
            fut.set_exception(RuntimeError(message))
        self._on_exit(message)

    def _terminate(self) -> None:
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(5)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()


# ---- the child's side ----------------------------------------------------------------------------
class _Outbox:
    """The child's end of the event pipe: sends come from the engine thread, the command loop (score
    results) and the metrics flusher."""

    def __init__(self, conn: Connection) -> None:
        self.conn, self.lock = conn, threading.Lock()

    def send(self, msg: tuple) -> None:
        try:
            with self.lock:
                self.conn.send(msg)
        except (OSError, ValueError):
            pass  # the parent is gone: the command loop reads end-of-file and exits


def engine_main(settings, commands: Connection, events: Connection, log_level: int) -> None:
    """The engine process: load, warm up, answer ``ready``, then serve commands until ``stop`` or the
    parent's end-of-file."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent drains on a signal, then stops this process
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = _Outbox(events)
    recorder = MetricsRecorder()
    try:
        engine = _load(settings, recorder)
    except Exception as exc:  # the parent logs the reason and exits 1; the traceback only at debug level
        log.debug("engine process: load failed", exc_info=True)
        out.send(("failed", f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from None

    def emit(evs: list[tuple[Sequence, TokenEvent]]) -> None:
        rows = [(s.id, e.token_ids, e.finish_reason, e.text, e.error, e.logprobs) for s, e in evs]
        out.send(("events", rows, recorder.take()))

    engine.emit = emit
    info = {
        "max_model_len": engine.max_model_len,
        "block_size": engine.block_size,
        "kv_blocks": engine.kv_blocks,
        "vocab_size": engine.vocab_size,
    }
    gc.collect()
    gc.freeze()  # as in one process: start-up objects live for good, out of the collector's scans
    out.send(("ready", info))
    stopped = threading.Event()
    threading.Thread(target=_flush_metrics, args=(recorder, out, stopped), name="moe-metrics", daemon=True).start()
    try:
        _serve_commands(engine, commands, out)
    finally:
        stopped.set()
        engine.stop()  # unfinished sequences end as aborted; their events still go up the pipe
        out.send(("metrics", recorder.take()))
        gc.unfreeze()  # frozen cycles outliving teardown make Triton's bindings print pages of "leaked" objects


def _load(settings, recorder: MetricsRecorder):
    import torch

    from runtime.engine import Engine
    from runtime.loader import load_model, load_tokenizer

    if settings.threads:
        torch.set_num_threads(settings.threads)
    model = load_model(settings.model_path, dtype=settings.dtype, device=settings.device)
    tok = load_tokenizer(settings.tokenizer_path or settings.model_path)  # stop strings are matched here
    engine = Engine(model, tok, settings.engine_config(), metrics=recorder)
    engine.start()
    if settings.warmup:
        engine.warm_up()
    return engine


def _serve_commands(engine, commands: Connection, out: _Outbox) -> None:
    while True:
        try:
            msg = commands.recv()
        except (EOFError, OSError):
            log.warning("engine process: the server process is gone; stopping")
            return
        kind = msg[0]
        if kind == "submit":
            # arrival: the HTTP request's (CLOCK_MONOTONIC is one clock for both processes), for TTFT and latency
            seqs = [Sequence(sid, prompt, params, arrival=t) for sid, prompt, params, t in msg[1]]
            try:
                engine.submit(seqs, bound_queue=False)  # the parent admitted them
            except Exception as exc:  # closed meanwhile: they end now, as they would have in the queue
                reason = "abort" if isinstance(exc, ShuttingDownError) else "error"
                out.send(("events", [(s.id, [], reason, None, str(exc), None) for s in seqs], []))
        elif kind == "abort":
            engine.abort(msg[1])
        elif kind == "score":
            _, job_id, prompts, token_ids = msg
            try:
                fut = engine.score(prompts, token_ids, bound_queue=False)
            except Exception as exc:
                out.send(("score", job_id, False, str(exc)))
                continue
            fut.add_done_callback(lambda f, j=job_id: out.send(_score_reply(j, f)))
        elif kind == "close":
            engine.close_admission()
        elif kind == "stop":
            return


def _score_reply(job_id: int, fut: Future) -> tuple:
    exc = fut.exception()
    return ("score", job_id, False, f"{type(exc).__name__}: {exc}") if exc else ("score", job_id, True, fut.result())


def _flush_metrics(recorder: MetricsRecorder, out: _Outbox, stopped: threading.Event) -> None:
    """Records made after a step's events left (its gauges) or while idle reach the parent within a tick."""
    while not stopped.wait(METRICS_FLUSH_S):
        records = recorder.take()
        if records:
            out.send(("metrics", records))
