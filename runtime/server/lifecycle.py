"""Process lifecycle: pre-flight checks, uvicorn, and graceful drain on SIGTERM.

SIGTERM (Kubernetes' pod stop) does not stop uvicorn at once: admission closes, so new API requests get
503 and ``/readyz`` drops while the listener stays open; in-flight requests run to completion; when
none is left (or the grace period ends, then the rest are aborted) uvicorn shuts down and the process
exits 0. A second SIGTERM/SIGINT exits at once. The other ranks of a multi-GPU replica run
:func:`serve_worker` instead: no HTTP, they follow the leader (runtime.parallel.lockstep).
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from runtime import contract as c

log = logging.getLogger("runtime.server")


class ShmError(RuntimeError):
    """/dev/shm cannot carry multi-process (NCCL) traffic: the source document's "model load fails" symptom."""


def check_shm(path: str | Path = c.SHM_PATH, min_bytes: int = c.DEFAULT_SHM_MIN_BYTES) -> int:
    """Raise ShmError unless ``path`` is a writable directory of at least ``min_bytes``; returns its size.

    Container runtimes default /dev/shm to 64 MiB, and NCCL/torch.distributed then fail with an
    obscure bus error mid-load. The fix is a memory-backed volume (``emptyDir: {medium: Memory}``)."""
    p = Path(path)
    fix = (
        f"mount a memory-backed volume at {p} (Kubernetes: emptyDir with medium: Memory, sizeLimit >= {_h(min_bytes)})"
    )
    if not p.is_dir():
        raise ShmError(f"{p} does not exist or is not a directory; {fix}")
    try:
        with tempfile.NamedTemporaryFile(dir=p, prefix="moe-shm-check-"):
            pass
    except OSError as exc:
        raise ShmError(f"{p} is not writable ({exc.strerror}); {fix}") from exc
    st = os.statvfs(p)
    size = st.f_blocks * st.f_frsize
    if size < min_bytes:
        raise ShmError(f"{p} is {_h(size)}, multi-GPU serving needs at least {_h(min_bytes)}; {fix}")
    return size


def _h(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def serve(settings, host: str, port: int, log_level: str = "info") -> int:
    """Run the service until SIGTERM/SIGINT; returns the exit code."""
    import uvicorn

    from runtime.server.app import create_app
    from runtime.server.state import ServiceState

    state = ServiceState(settings)
    interval = settings.switch_interval_s()
    if interval is not None:  # a GPU engine thread shares this interpreter (Settings.gil_switch_interval_s)
        sys.setswitchinterval(interval)

    class DrainingServer(uvicorn.Server):
        """uvicorn, but SIGTERM drains first (and is not re-raised at exit, so the code stays 0)."""

        _draining = False

        def handle_exit(self, sig: int, frame) -> None:
            if self._draining or state.engine is None:
                self.should_exit = True
                if self._draining:
                    self.force_exit = sig == signal.SIGINT
                return
            self._draining = True
            log.info("signal %s: draining (grace %.0f s)", signal.Signals(sig).name, settings.grace_period_s)
            state.begin_drain()
            threading.Thread(target=self._drain, name="moe-drain", daemon=True).start()

        def _drain(self) -> None:
            deadline = time.monotonic() + settings.grace_period_s
            while state.inflight() and time.monotonic() < deadline:
                time.sleep(0.05)
            if state.inflight():
                log.warning("grace period over: aborting %d in-flight sequences", state.inflight())
            time.sleep(0.2)  # let the loop flush the last responses
            self.should_exit = True

    app = create_app(state)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=max(1, int(settings.grace_period_s)),
        timeout_keep_alive=30,
    )
    server = DrainingServer(config)

    def fatal() -> None:
        server.should_exit = True

    state.on_fatal = fatal
    server.run()
    # Start-up objects were frozen out of the collector (ServiceState._load). Left frozen, the cycles among
    # them outlive interpreter teardown, and Triton's nanobind bindings report every object still alive
    # then as a leak (pages of "nanobind: leaked ..." after a clean exit).
    gc.unfreeze()
    if state.leader is not None and not state.fatal:
        if state.engine is not None:
            state.engine.stop()  # no step may be in flight when the workers are told to stop
        state.leader.close()
    if state.fatal:
        log.error("exiting: %s", state.fatal.splitlines()[0])  # the whole message was logged when it happened
        return 1
    return 0


def serve_worker(settings, ps) -> int:  # ps: runtime.parallel.dist.ParallelState
    """A non-leader rank of ``moe-runtime serve``: load this rank's shard, then follow the leader. SIGTERM
    is only logged: the leader drains its requests (which needs every rank) and then sends stop."""
    from runtime.loader import load_model
    from runtime.parallel.lockstep import startup_barrier, worker_loop

    signal.signal(signal.SIGTERM, lambda *_: log.info("rank %d: SIGTERM; waiting for the leader's stop", ps.rank))
    t0 = time.perf_counter()
    model = load_model(settings.model_path, dtype=settings.dtype, device=settings.device, parallel=ps)
    log.info("rank %d: shard loaded in %.1f s; waiting for the other ranks", ps.rank, time.perf_counter() - t0)
    startup_barrier(ps)
    return worker_loop(model, ps)
