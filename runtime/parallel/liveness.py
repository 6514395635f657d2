"""Which rank went silent: a beat counter per rank in the job's key-value store.

A collective that fails says only that *a* peer is gone (gloo names a socket, NCCL a communicator). Every
rank but the leader bumps ``moe/beat/<rank>`` in the c10d store (the TCPStore the ranks rendezvoused
through, hosted on the leader's node) every :data:`BEAT_S` seconds from a daemon thread; when a
collective fails, the leader reads the counters twice, a few beats apart, and names the ranks whose
counter stood still. Counters, not timestamps: the nodes' clocks need not agree. A rank that exits on
its own (it saw the same failure) first leaves a note under ``moe/left/<rank>``, so only the ranks that
vanished without one (killed, crashed, out of memory) are named.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

BEAT_S = 0.5
KEY = "moe/beat/{rank}"
LEFT = "moe/left/{rank}"


def default_store() -> Any | None:
    """The default process group's store, or None (outside torch.distributed)."""
    try:
        from torch.distributed import distributed_c10d

        return distributed_c10d._get_default_store()
    except Exception:
        return None


def start_beating(store: Any, rank: int, beat_s: float = BEAT_S) -> threading.Thread:
    """Bump this rank's counter forever (daemon thread; it ends with the process, which is the point)."""

    def beat() -> None:
        while True:
            try:
                store.add(KEY.format(rank=rank), 1)
            except Exception:  # the store's host is gone: the leader is, too; the worker loop notices
                return
            time.sleep(beat_s)

    t = threading.Thread(target=beat, name="moe-beat", daemon=True)
    t.start()
    return t


def leave_note(store: Any, rank: int, why: str) -> None:
    """Record that this rank is exiting on purpose (best effort: the store may be gone too)."""
    with contextlib.suppress(Exception):
        store.set(LEFT.format(rank=rank), why)


def silent_ranks(store: Any, ranks: list[int], beat_s: float = BEAT_S, beats: int = 4) -> list[int]:
    """The ranks among ``ranks`` whose counter did not move over ``beats`` beats and that left no note;
    [] when the store cannot be read (nothing is known, so nobody is blamed)."""
    try:
        before = {r: store.add(KEY.format(rank=r), 0) for r in ranks}
        time.sleep(beat_s * beats)
        after = {r: store.add(KEY.format(rank=r), 0) for r in ranks}
        left = {r for r in ranks if store.check([LEFT.format(rank=r)])}
    except Exception as exc:
        log.warning("cannot read the ranks' beats (%s: %s)", type(exc).__name__, exc)
        return []
    return [r for r in ranks if after[r] == before[r] and r not in left]
