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
  events, or within :data:`~runtime.server.engine_child.METRICS_FLUSH_S` when idle), so ``/metrics`` stays
  one exposition;
- the child ignores SIGINT and SIGTERM, because the parent drains and then stops it. It exits when the
  parent's end of the pipe closes, and on Linux it is killed with the parent even mid-load. A shutdown
  during the load kills it at once. If the child dies, every in-flight request ends with an error and
  the service exits 1.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import multiprocessing
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from multiprocessing.connection import Connection

from runtime.engine.engine import check_request
from runtime.engine.sequence import QueueFullError, Sequence, ShuttingDownError, TokenEvent
from runtime.server.engine_child import EngineSpec, engine_main, replay

log = logging.getLogger(__name__)

#: how long ``stop`` waits for the child to finish its loop before it is terminated
STOP_TIMEOUT_S = 15.0


def engine_spec(settings) -> EngineSpec:
    """The child's share of ``settings`` (runtime.server.state.Settings)."""
    return EngineSpec(
        model_path=settings.model_path,
        tokenizer_path=settings.tokenizer_path or settings.model_path,
        device=settings.device,
        dtype=settings.dtype,
        threads=settings.threads,
        warmup=settings.warmup,
        engine=dataclasses.asdict(settings.engine_config()),
    )


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
        self._ready = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.max_model_len = self.block_size = self.kv_blocks = self.vocab_size = 0

    @classmethod
    def spawn(cls, settings, metrics, on_exit: Callable[[str], None], log_level: int | None = None) -> EngineClient:
        ctx = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
        child_commands, commands = ctx.Pipe(duplex=False)
        events, child_events = ctx.Pipe(duplex=False)
        level = log_level if log_level is not None else logging.getLogger().getEffectiveLevel()
        process = ctx.Process(
            target=engine_main,
            args=(engine_spec(settings), child_commands, child_events, level),
            name="moe-engine-process",
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
                    if msg[0] == "ready":
                        self.__dict__.update(msg[1])
                        self._ready = True
                        return
                    if msg[0] == "failed":
                        raise RuntimeError(msg[1])
                    self._handle(msg)  # the warm-up's metrics
                    continue
            except (EOFError, OSError):
                pass
            else:
                if self._process.is_alive() and time.monotonic() < deadline:
                    continue
            self._terminate()
            if self._stopping:
                raise RuntimeError("the server shut down while the engine process was loading")
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
        if not self._ready:  # still loading: nothing to drain, and it reads no commands yet
            self._terminate(grace_s=0.0)
            return
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

    def _terminate(self, grace_s: float = 5.0) -> None:
        """SIGTERM, which the child ignores while serving, then SIGKILL after ``grace_s``."""
        if self._process.is_alive() and grace_s > 0:
            self._process.terminate()
            self._process.join(grace_s)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
