"""Lockstep execution: rank 0 (the leader) schedules, every rank computes.

The leader runs the HTTP server and the engine unchanged, except that its model is a :class:`Leader`:
each forward first broadcasts a small header (what to run: a forward, a KV-pool allocation, a CUDA-graph
capture, the execution options) on the gloo control group, then the step's int64 inputs (token ids, positions,
context lengths, slot mapping, block tables, logits rows) as one packed tensor on the compute group,
then runs its own shard. The other ranks sit in :func:`worker_loop`, receive the same header and inputs
and run the same call on their shard, so the collectives inside the model line up. Only the leader
samples; the other ranks drop their logits.

Failure handling, so a lost rank never leaves the group hanging:
  * every collective has the process group's timeout; a dead peer's closed socket fails gloo at once;
  * the leader sends a heartbeat when idle, so workers can tell "no traffic" from "leader gone";
  * a :class:`Watchdog` ends a process whose operation outlives its limit (a collective that neither
    completes nor errors), after telling the leader's service to turn unready.
The leader reports a failure through ``on_failure`` (the service marks itself failed and exits 1);
workers return 1 (torchrun then tears the whole group down, and LeaderWorkerSet restarts it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from runtime.cuda_graph import CUDAGraphDecoder
from runtime.execution import ExecutionOptions
from runtime.interfaces import PiecewiseCausalLM
from runtime.kv_cache import AttentionMetadata, PagedKVCache, decode_metadata
from runtime.parallel import liveness
from runtime.parallel.dist import ParallelState

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 1800.0  # loading a 671 GB checkpoint on 16 ranks takes minutes, not seconds
CAPTURE_FACTOR = 10  # compiling + capturing CUDA graphs may take this many collective timeouts
_FIELDS = ("input_ids", "positions", "context_lens", "slot_mapping", "block_tables", "logits_indices")


class RankLostError(RuntimeError):
    """A collective with the other ranks failed or timed out: the replica cannot serve any more."""


class Watchdog:
    """Calls ``on_trip(what)`` when a guarded operation runs past its limit (checked twice a second)."""

    def __init__(self, on_trip: Callable[[str], None]) -> None:
        self.on_trip = on_trip
        self._deadline: float | None = None
        self._what = ""
        threading.Thread(target=self._watch, name="moe-watchdog", daemon=True).start()

    @contextlib.contextmanager
    def guard(self, what: str, limit_s: float) -> Iterator[None]:
        self._what, self._deadline = what, time.monotonic() + limit_s
        try:
            yield
        finally:
            self._deadline = None

    def _watch(self) -> None:
        while True:
            time.sleep(0.5)
            d = self._deadline
            if d is not None and time.monotonic() > d:
                self._deadline = None
                self.on_trip(self._what)


def _hard_exit(what: str) -> None:
    log.critical("watchdog: %s did not finish in time; exiting", what)
    logging.shutdown()
    os._exit(1)


# ---- step inputs ------------------------------------------------------------------------------------


def _pack(ids, pos, meta: AttentionMetadata, logits_indices) -> tuple[dict[str, Any], torch.Tensor]:
    """(header fields, one flat int64 tensor) for a forward call."""
    parts = {
        "input_ids": ids,
        "positions": pos,
        "context_lens": meta.context_lens,
        "slot_mapping": meta.slot_mapping,
        "block_tables": meta.block_tables,
        "logits_indices": logits_indices,
    }
    shapes = {k: None if t is None else tuple(t.shape) for k, t in parts.items()}
    flat = torch.cat([t.reshape(-1).to(torch.int64) for t in parts.values() if t is not None])
    spec = {
        "shapes": shapes,
        "query_lens": meta.query_lens,
        "context_lens_cpu": meta.context_lens_cpu,
        "num_decode": meta.num_decode,
        "prompt_groups": meta.prompt_groups,
    }
    return spec, flat


def _unpack(spec: dict[str, Any], flat: torch.Tensor):
    out, start = {}, 0
    for k in _FIELDS:
        shape = spec["shapes"][k]
        if shape is None:
            out[k] = None
            continue
        n = int(torch.Size(shape).numel())
        out[k] = flat[start : start + n].view(shape)
        start += n
    meta = AttentionMetadata(
        context_lens=out["context_lens"],
        block_tables=out["block_tables"],
        slot_mapping=out["slot_mapping"],
        query_lens=spec["query_lens"],
        context_lens_cpu=spec["context_lens_cpu"],
        num_decode=spec["num_decode"],
        prompt_groups=None if spec["prompt_groups"] is None else tuple(spec["prompt_groups"]),
    )
    return out["input_ids"], out["positions"], meta, out["logits_indices"]


def _flat_size(spec: dict[str, Any]) -> int:
    return sum(int(torch.Size(s).numel()) for s in spec["shapes"].values() if s is not None)


def startup_barrier(ps: ParallelState) -> None:
    """Every rank has loaded its shard (a rank that died while loading fails this at once)."""
    import datetime

    dist.monitored_barrier(group=ps.ctrl_group, timeout=datetime.timedelta(seconds=STARTUP_TIMEOUT_S))


# ---- the leader -------------------------------------------------------------------------------------


class Leader:
    """Rank 0's stand-in for the model: a :class:`runtime.interfaces.CausalLM` for the whole replica."""

    def __init__(
        self,
        model: PiecewiseCausalLM,
        ps: ParallelState,
        on_failure: Callable[[str], None] | None = None,
        on_unready: Callable[[], None] | None = None,
    ) -> None:
        self.model, self.ps = model, ps
        self.on_failure = on_failure
        self.on_unready = on_unready  # called first on a failure: stop taking traffic before the diagnosis
        self.failed: str | None = None
        self._lock = threading.RLock()
        self._last_sent = time.monotonic()
        self._cache: PagedKVCache | None = None
        self._closed = False
        self.watchdog = Watchdog(self._trip)
        self.heartbeat_s = max(0.5, min(10.0, ps.timeout_s / 4))
        threading.Thread(target=self._heartbeat, name="moe-heartbeat", daemon=True).start()

    # what the engine and the service read; the expert-load statistics are complete on every rank
    config = property(lambda self: self.model.config)
    device = property(lambda self: self.model.device)
    dtype = property(lambda self: self.model.dtype)
    options = property(lambda self: self.model.options)

    def moe_layers(self) -> list[tuple[int, torch.nn.Module]]:
        return self.model.moe_layers()

    def expert_load(self) -> dict[int, torch.Tensor]:
        return self.model.expert_load()

    def expert_load_imbalance(self) -> dict[int, float]:
        return self.model.expert_load_imbalance()

    def reset_expert_load(self) -> None:
        self.model.reset_expert_load()

    # ---- sending ----------------------------------------------------------------------------
    def _send(self, header: tuple, flat: torch.Tensor | None = None) -> None:
        if self.failed:
            raise RankLostError(self.failed)
        try:
            dist.broadcast_object_list([header], src=0, group=self.ps.ctrl_group)
            if flat is not None:
                dist.broadcast(flat, src=0)
        except Exception as exc:
            self._fail(f"lost contact with the other ranks ({type(exc).__name__}: {exc})")
            raise RankLostError(self.failed) from exc
        self._last_sent = time.monotonic()

    @contextlib.contextmanager
    def _op(self, what: str, factor: float = 1.5) -> Iterator[None]:
        """One lockstep call. Any error once it has started is fatal: the other ranks are inside the
        same call, and their collectives no longer have a partner."""
        with self._lock, self.watchdog.guard(what, self.ps.timeout_s * factor):
            try:
                yield
            except RankLostError:
                raise
            except Exception as exc:
                self._fail(f"{what} failed ({type(exc).__name__}: {exc})")
                raise RankLostError(self.failed) from exc

    def _fail(self, message: str) -> None:
        if self.failed is None:
            self.failed = message  # first: no further lockstep call starts
            if self.on_unready is not None:
                self.on_unready()
            silent = self._silent_ranks()
            if silent:
                who = ", ".join(str(r) for r in silent)
                message = f"rank {who} stopped responding; {message}"
                self.failed = message
            log.error("distributed replica failed: %s", message)
            if self.on_failure is not None:
                self.on_failure(message)

    def _silent_ranks(self) -> list[int]:
        """The ranks whose beat stopped (runtime.parallel.liveness); [] when the store is unreachable."""
        store = liveness.default_store()
        if store is None:
            return []
        return liveness.silent_ranks(store, list(range(1, self.ps.world_size)))

    def _trip(self, what: str) -> None:
        self._fail(f"{what} did not finish within the timeout")
        time.sleep(5)  # let the service turn unready and answer; then make sure the process ends
        _hard_exit(what)

    def _heartbeat(self) -> None:
        while not self._closed and self.failed is None:
            time.sleep(self.heartbeat_s / 2)
            if time.monotonic() - self._last_sent < self.heartbeat_s or not self._lock.acquire(blocking=False):
                continue
            try:
                if not self._closed:
                    with self.watchdog.guard("heartbeat", self.ps.timeout_s * 1.5):
                        self._send(("ping",))
            except RankLostError:
                return
            finally:
                self._lock.release()

    # ---- the model's interface --------------------------------------------------------------
    def _ensure_cache(self, kv_cache: PagedKVCache | None) -> None:
        if kv_cache is not None and kv_cache is not self._cache:
            self._send(("cache", kv_cache.num_blocks, kv_cache.block_size))
            self._cache = kv_cache

    def __call__(self, input_ids, positions, attn_metadata, kv_cache=None, logits_indices=None):
        with self._op("forward"):
            self._ensure_cache(kv_cache)
            spec, flat = _pack(input_ids, positions, attn_metadata, logits_indices)
            self._send(("forward", spec, kv_cache is not None), flat)
            return self.model(input_ids, positions, attn_metadata, kv_cache, logits_indices)

    def configure(self, options: ExecutionOptions) -> None:
        """Every rank runs with the same options (the collectives inside the model must line up)."""
        with self._op("configure"):
            self._send(("configure", options))
            self.model.configure(options)

    def make_graph_decoder(self, kv_cache: PagedKVCache, max_blocks: int, batch_sizes):
        """CUDA graphs captured on every rank at once (the NCCL collectives are part of each graph); the engine
        takes this as its ``graph_capture``."""
        with self._op("CUDA-graph capture", factor=CAPTURE_FACTOR):
            self._ensure_cache(kv_cache)
            self._send(("graphs", max_blocks, list(batch_sizes)))
            return _LeaderGraphs(self, CUDAGraphDecoder(self.model, kv_cache, max_blocks, batch_sizes))

    def close(self) -> None:
        """Tell the workers to exit 0 (normal shutdown after the drain)."""
        with self._lock:
            if self._closed or self.failed:
                return
            self._closed = True
            with contextlib.suppress(RankLostError):
                self._send(("stop",))


class _LeaderGraphs:
    """The leader's :class:`~runtime.interfaces.GraphDecoder`: each replay first sends the step's inputs to the
    other ranks, which replay their own graphs; host inputs only (no device-fed tokens)."""

    def __init__(self, leader: Leader, graphs: CUDAGraphDecoder) -> None:
        self.leader, self.graphs = leader, graphs
        self.batch_sizes = graphs.batch_sizes
        self.bucket = graphs.bucket

    def run_host(self, token_ids, context_lens, tables, slots):
        """The engine's host-list entry: the followers need tensors, so build them (see CUDAGraphDecoder)."""
        dev = self.graphs.inputs.device
        meta = decode_metadata(context_lens, tables, slots, self.graphs.max_blocks, dev)
        return self(torch.tensor(list(token_ids), device=dev), meta.context_lens - 1, meta)

    def __call__(self, input_ids, positions, meta):
        with self.leader._op("graph decode"):
            spec, flat = _pack(input_ids, positions, meta, None)
            self.leader._send(("graph_forward", spec), flat)
            return self.graphs(input_ids, positions, meta)


# ---- the other ranks ---------------------------------------------------------------------------------


def worker_loop(model: PiecewiseCausalLM, ps: ParallelState) -> int:
    """Run the leader's calls until it says stop (0) or is lost (1)."""
    watchdog = Watchdog(_hard_exit)
    store = liveness.default_store()
    if store is not None:
        liveness.start_beating(store, ps.rank)
    cache, graphs, dev = None, None, model.device
    limit = ps.timeout_s * 1.5
    with torch.inference_mode():
        while True:
            try:
                with watchdog.guard("waiting for the leader", limit):
                    box: list[Any] = [None]
                    dist.broadcast_object_list(box, src=0, group=ps.ctrl_group)
                header = box[0]
                op = header[0]
                if op == "stop":
                    return 0
                if op == "ping":
                    continue
                with watchdog.guard(op, limit * (CAPTURE_FACTOR if op == "graphs" else 1)):
                    if op == "cache":
                        cache = None  # free the old pool first
                        cache = PagedKVCache(model.config, header[1], header[2], dtype=model.dtype, device=dev)
                    elif op == "configure":
                        model.configure(header[1])
                    elif op == "graphs":
                        graphs = CUDAGraphDecoder(model, cache, header[1], header[2])
                    elif op in ("forward", "graph_forward"):
                        spec = header[1]
                        flat = torch.empty(_flat_size(spec), dtype=torch.int64, device=dev)
                        dist.broadcast(flat, src=0)
                        ids, pos, meta, rows = _unpack(spec, flat)
                        if op == "graph_forward":
                            graphs(ids, pos, meta)
                        else:
                            model(ids, pos, meta, cache if header[2] else None, rows)
                    else:
                        raise ValueError(f"unknown lockstep op {op!r}")
            except Exception as exc:
                log.error(
                    "rank %d: lost the leader or failed a step (%s: %s); exiting", ps.rank, type(exc).__name__, exc
                )
                if store is not None:
                    liveness.leave_note(store, ps.rank, f"{type(exc).__name__}: {exc}")
                return 1
