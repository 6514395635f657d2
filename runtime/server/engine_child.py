"""The engine process's own side: what runs in the child that :mod:`runtime.server.engine_process` spawns.

This module imports nothing heavy at the top, and neither does what is pickled to start it (a plain dict,
:class:`EngineSpec`): the child's first act is to tie its life to the parent's (Linux), before importing torch
and loading the model, which take seconds to minutes. It also holds the metrics recorder, which the parent
replays (:func:`replay`).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import signal
import sys
import threading
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import TypedDict

log = logging.getLogger(__name__)

#: how long metrics recorded in the child wait for a step's events to carry them (idle engine)
METRICS_FLUSH_S = 0.1

Record = tuple[str, tuple[str, ...] | None, str, float]  # (attribute, labels, method, value)


class EngineSpec(TypedDict):
    """What the child needs of the service's settings: plain values, so unpickling them imports nothing."""

    model_path: str
    tokenizer_path: str
    device: str
    dtype: str
    threads: int | None
    warmup: bool
    engine: dict  # runtime.engine.config.EngineConfig's fields


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


# ---- the engine process -----------------------------------------------------------------------------
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


def engine_main(spec: EngineSpec, commands: Connection, events: Connection, log_level: int) -> None:
    """The engine process: load, warm up, answer ``ready``, then serve commands until ``stop`` or the
    parent's end-of-file."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent drains on a signal, then stops this process
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = _Outbox(events)
    recorder = MetricsRecorder()
    try:
        engine = _load(spec, recorder)
    except Exception as exc:  # the parent logs the reason and exits 1; the traceback only at debug level
        log.debug("engine process: load failed", exc_info=True)
        out.send(("failed", f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from None

    def emit(evs: list) -> None:  # [(Sequence, TokenEvent)]
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


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the parent dies, even mid-load (when it reads no pipe). Elsewhere
    the pipe's end-of-file, read once serving, is the only signal."""
    import ctypes

    if not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def _load(spec: EngineSpec, recorder: MetricsRecorder):
    import torch

    from runtime.engine import Engine
    from runtime.engine.config import EngineConfig
    from runtime.loader import load_model, load_tokenizer

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    model = load_model(spec["model_path"], dtype=spec["dtype"], device=spec["device"])
    tok = load_tokenizer(spec["tokenizer_path"])  # stop strings are matched here
    engine = Engine(model, tok, EngineConfig(**spec["engine"]), metrics=recorder)
    engine.start()
    if spec["warmup"]:
        engine.warm_up()
    return engine


def _serve_commands(engine, commands: Connection, out: _Outbox) -> None:
    from runtime.engine.sequence import Sequence, ShuttingDownError

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
