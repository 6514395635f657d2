"""Process-wide service state: the engine and its asyncio bridge, tokenizer, metrics, the risk task and its
prediction records.

Loading happens in a background thread so ``/healthz`` answers at once while ``/readyz`` stays false
until the model is loaded and warmed up (Kubernetes then neither kills a slow load nor routes traffic
to it). The risk task is optional: without one, or with one this tokenizer cannot express, the service
starts anyway, says why once in the log, and its risk routes answer 503 with that reason; chat and
completions never depend on it. ``begin_drain`` is the first half of SIGTERM handling: admission closes
(503) and readiness drops; in-flight requests carry on.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from runtime import contract as c
from runtime.engine.config import EngineConfig
from runtime.metrics import ServiceMetrics
from runtime.server.risk import RollingAccuracy

log = logging.getLogger(__name__)


@dataclass
class Settings:
    model_path: str
    served_model_name: str | None = None
    tokenizer_path: str | None = None  # default: the model's folder
    chat_template: str | None = None  # overrides tokenizer_config.json's
    device: str = "cpu"
    dtype: str = "float32"
    kv_blocks: int | None = None
    kv_memory_fraction: float = 0.5
    max_num_seqs: int = 64
    max_queue: int = 256
    max_num_batched_tokens: int | None = None  # None: the engine's default for the device
    prefix_caching: bool = True
    mixed_steps: bool = True
    max_decode_stall: float | None = EngineConfig.max_decode_stall  # None: prompts fill the step's budget
    max_model_len: int | None = None
    block_size: int = 16
    cuda_graphs: bool = True
    overlap: bool = True
    compile: bool = True
    grace_period_s: float = 30.0
    accuracy_baseline: float | None = None
    accuracy_window: int = 500
    #: The risk task: inline JSON or a .toml/.json file (runtime.risk_task); None: risk routes off.
    risk_task: str | None = None
    model_revision: str = "unknown"
    #: Prediction records: a DynamoDB table (with region, endpoint override), else a SQLite file.
    risk_store_table: str | None = None
    risk_store_region: str | None = None
    risk_store_endpoint: str | None = None
    risk_store_path: str | None = None
    warmup: bool = True
    retry_after_s: int = 1
    parallel: object | None = None  # runtime.parallel.dist.ParallelState of the leader (multi-GPU)
    api_keys: tuple[str, ...] = ()  # bearer keys the API accepts; empty: open (a warning is logged)
    max_request_bytes: int = c.DEFAULT_MAX_REQUEST_BYTES  # request bodies above this get 413
    #: How long a thread may hold the interpreter lock while another waits for it (CPython's default: 5 ms).
    #: An engine thread driving a GPU gives the lock up at every CUDA wait and needs it back to launch the
    #: next step; under load the event loop is always runnable, so each hand-back can cost the whole
    #: interval, several times per step. None: c.DEFAULT_GIL_SWITCH_INTERVAL_S when such a thread runs in
    #: this process (CUDA, engine in-process), else CPython's own (on a CPU the engine thread is busy
    #: computing, and shorter turns only add switches).
    gil_switch_interval_s: float | None = None
    #: Run the engine in a child process (runtime.server.engine_process): the event loop and the engine
    #: stop competing for one interpreter lock. One device only (a multi-GPU leader runs it in-process).
    engine_process: bool = False
    threads: int | None = None  # torch intra-op threads of the process that runs the model (CPU)

    def switch_interval_s(self) -> float | None:
        """The interval ``serve`` sets, or None to leave CPython's."""
        if self.gil_switch_interval_s is not None:
            return self.gil_switch_interval_s
        if self.device.startswith("cuda") and not self.engine_process:
            return c.DEFAULT_GIL_SWITCH_INTERVAL_S
        return None

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model_path).resolve().name

    def engine_config(self) -> EngineConfig:
        """The engine's share of the settings; constructing it validates them (the CLI calls this early)."""
        return EngineConfig(
            max_num_seqs=self.max_num_seqs,
            max_queue=self.max_queue,
            max_num_batched_tokens=self.max_num_batched_tokens,
            prefix_caching=self.prefix_caching,
            mixed_steps=self.mixed_steps,
            max_decode_stall=self.max_decode_stall,
            block_size=self.block_size,
            kv_blocks=self.kv_blocks,
            kv_memory_fraction=self.kv_memory_fraction,
            max_model_len=self.max_model_len,
            cuda_graphs=self.cuda_graphs,
            overlap=self.overlap,
            compile=self.compile,
        )


@dataclass
class ServiceState:
    settings: Settings
    metrics: ServiceMetrics | None = None  # default: labelled with the served model's name
    engine: object | None = None  # runtime.engine.Engine
    tokenizer: object | None = None
    label_ids: tuple[int, int] | None = None
    risk_task: object | None = None  # runtime.risk_task.RiskTask
    risk_off: str | None = "the model is still loading"  # why the risk routes answer 503 (None: they serve)
    records: object | None = None  # runtime.server.prediction_store.RecordWriter
    accuracy: RollingAccuracy | None = None
    ready: bool = False
    draining: bool = False
    fatal: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    loop: asyncio.AbstractEventLoop | None = None
    on_fatal: object | None = None  # callable() asking the server to exit
    leader: object | None = None  # runtime.parallel.lockstep.Leader (multi-GPU)
    engine_client: object | None = None  # runtime.server.engine_process.EngineClient, from its spawn on

    def __post_init__(self) -> None:
        s = self.settings
        if self.metrics is None:
            self.metrics = ServiceMetrics(s.model_name)
        self.accuracy = RollingAccuracy(window=s.accuracy_window)
        self.metrics.queue_capacity.set(s.max_queue)
        if s.accuracy_baseline is not None:
            self.metrics.accuracy_baseline.set(s.accuracy_baseline)

    # ---- start-up ---------------------------------------------------------------------------
    def start_loading(self, loop: asyncio.AbstractEventLoop) -> threading.Thread:
        self.loop = loop
        if self.settings.engine_process:
            # spawned from this (the main) thread: the child is tied to a thread that lives as long as the
            # process (a child's parent-death signal follows the thread that spawned it)
            from runtime.server.engine_process import EngineClient

            self.engine_client = EngineClient.spawn(self.settings, self.metrics, on_exit=self.fail)
        t = threading.Thread(target=self._load, name="moe-load", daemon=True)
        t.start()
        return t

    def _load(self) -> None:
        try:
            import torch

            s = self.settings
            t0 = time.perf_counter()
            if s.engine_process:
                engine, tok = self._start_engine_process()
            else:
                engine, tok = self._start_engine_thread()
            self.engine, self.tokenizer = engine, tok
            # Everything allocated so far (torch, the model, the app) lives for the whole process:
            # freezing it keeps the cyclic GC from rescanning it, which otherwise shows as pauses in the
            # latency tail.
            gc.collect()
            gc.freeze()
            self.ready = not self.draining
            self.metrics.ready.set(1 if self.ready else 0)
            log.info(
                "model %s ready in %.1f s on %s%s (%d KV blocks of %d tokens, torch %s)",
                s.model_name,
                time.perf_counter() - t0,
                s.device,
                ", engine in its own process" if s.engine_process else "",
                engine.kv_blocks,
                engine.block_size,
                torch.__version__,
            )
        except Exception as exc:
            self.fatal = f"{type(exc).__name__}: {exc}"
            log.error("model load failed: %s", self.fatal)
            if self.on_fatal is not None:
                self.on_fatal()

    def _load_tokenizer(self):
        from runtime.loader import load_tokenizer

        s = self.settings
        tok = load_tokenizer(s.tokenizer_path or s.model_path)
        if s.chat_template is not None:
            tok.chat_template = s.chat_template
        return tok

    def _start_engine_thread(self):
        """The model and the engine's thread in this process; events reach the loop one wake-up per step."""
        from runtime.engine import Engine
        from runtime.loader import load_model

        s = self.settings
        model = load_model(s.model_path, dtype=s.dtype, device=s.device, parallel=s.parallel)
        if s.parallel is not None:  # every forward now runs on all ranks at once
            from runtime.parallel.lockstep import Leader, startup_barrier

            startup_barrier(s.parallel)
            model = self.leader = Leader(model, s.parallel, on_failure=self.fail, on_unready=self.mark_unready)
        tok = self._load_tokenizer()
        # a leader's graphs are captured on every rank at once, and replayed from host inputs only
        capture = self.leader.make_graph_decoder if self.leader is not None else None
        engine = Engine(model, tok, s.engine_config(), metrics=self.metrics, graph_capture=capture)
        self._setup_risk(tok)
        engine.start()
        if s.warmup:
            engine.warm_up()
        engine.emit = self._emit  # from now on, events go to the asyncio loop
        return engine, tok

    def _start_engine_process(self):
        """The engine in a child process; the tokenizer and the risk task load here while it loads there."""
        engine = self.engine_client
        try:
            tok = self._load_tokenizer()
            self._setup_risk(tok)
            engine.wait_ready()
        except BaseException:
            engine.stop(timeout=1.0)
            raise
        engine.attach(self.loop)
        return engine, tok

    def _setup_risk(self, tok) -> None:
        """Task, label tokens and record store; any problem turns the risk routes off, never the service."""
        from runtime.risk_task import RiskTaskError, load_task
        from runtime.server.prediction_store import RecordWriter, StoreUnavailable, open_store
        from runtime.server.risk import RiskConfigError, label_token_ids

        s = self.settings
        if not s.risk_task:
            self.risk_off = f"no risk task is configured (serve --risk-task or ${c.ENV_RISK_TASK})"
            log.warning("risk routes off: %s", self.risk_off)
            return
        try:
            task = load_task(s.risk_task)
            self.label_ids = label_token_ids(task, tok)
            store = open_store(s.risk_store_table, s.risk_store_region, s.risk_store_endpoint, s.risk_store_path)
        except (RiskTaskError, RiskConfigError, StoreUnavailable, OSError) as exc:
            self.risk_off = f"the risk task is unusable: {exc}"
            log.error("risk routes off: %s", self.risk_off)
            return
        self.risk_task, self.records, self.risk_off = task, RecordWriter(store, self.metrics), None
        if not (s.risk_store_table or s.risk_store_path):
            log.warning("prediction records are kept in memory only; give --risk-store-path or --risk-store-table")
        where = s.risk_store_table or s.risk_store_path or ":memory:"
        log.info("risk task %r on; prediction records in %s %s", task.name, store.kind, where)

    def mark_unready(self) -> None:
        """Readiness off and admission closed at once (the failure's diagnosis may take a moment more)."""
        self.ready = False
        self.metrics.ready.set(0)
        if self.engine is not None:
            self.engine.close_admission()

    def fail(self, message: str) -> None:
        """The service can no longer serve (a rank of a multi-GPU replica is gone): unready, then exit 1."""
        self.fatal = self.fatal or message
        self.mark_unready()
        if self.on_fatal is not None:
            self.on_fatal()

    def _emit(self, events) -> None:
        """Engine thread → event loop: one wake-up per step carrying every sequence's events."""
        loop = self.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(_fan_out, events)

    # ---- shutdown ---------------------------------------------------------------------------
    def begin_drain(self) -> None:
        self.draining = True
        self.ready = False
        self.metrics.ready.set(0)
        if self.engine is not None:
            self.engine.close_admission()

    def stop_engine(self) -> None:
        """At exit: the engine's thread, or its process (still loading, or serving)."""
        engine = self.engine if self.engine is not None else self.engine_client
        if engine is not None:
            engine.stop()

    def inflight(self) -> int:
        return 0 if self.engine is None else self.engine.num_inflight()

    @staticmethod
    def new_id(prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _fan_out(events) -> None:
    for seq, ev in events:
        seq.on_event(ev)
