"""A rank of a tensor/expert-parallel replica killed with SIGKILL in the middle of a request: the leader
turns unready, ends the request, names the lost rank and exits non-zero well within 30 s; nothing hangs.

The ranks are started directly with torchrun's environment (no torchrun agent to tear the group down
for us), as in tests/runtime/test_parallel_serve.py, whose helpers this reuses.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx

from infra.embedded.emulator.process import free_port
from runtime import contract as c
from tests.runtime.test_parallel_serve import rank_cmds, started, wait_ready

DEADLINE_S = 30.0


def test_worker_killed_mid_request_fails_readiness_names_the_rank_and_exits(v2_path: Path, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with started(rank_cmds(v2_path, port, 2, 2, 2), tmp_path) as (procs, logs):
        wait_ready(url, procs, logs)
        streaming = threading.Event()
        ended: list[str] = []

        def long_request() -> None:
            body = {"prompt": "Hello", "max_tokens": 400, "temperature": 0, "ignore_eos": True, "stream": True}
            try:
                with httpx.stream("POST", url + c.COMPLETIONS_PATH, json=body, timeout=DEADLINE_S * 2) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: {"):
                            streaming.set()
                ended.append("closed")
            except httpx.HTTPError as exc:
                ended.append(type(exc).__name__)

        client = threading.Thread(target=long_request, daemon=True)
        client.start()
        assert streaming.wait(60), logs[0].read_text()
        procs[1].kill()  # SIGKILL: no handler runs, no goodbye on the wire
        t0 = time.monotonic()
        statuses = []
        while procs[0].poll() is None and time.monotonic() - t0 < DEADLINE_S:
            try:
                statuses.append(httpx.get(url + c.READY_PATH, timeout=1).status_code)
            except httpx.HTTPError:
                statuses.append(None)  # listener closed: exiting
            time.sleep(0.05)
        took = time.monotonic() - t0
        assert procs[0].poll() is not None, f"leader still running {DEADLINE_S} s after rank 1 was killed"
        assert procs[0].returncode != 0
        # once unready it never turns ready again, and it was unready (503 or gone) before exiting
        first_down = next((i for i, s in enumerate(statuses) if s != 200), None)
        assert first_down is not None and 200 not in statuses[first_down:], statuses
        client.join(10)
        assert ended, "the in-flight request is still hanging after the leader exited"
        log = logs[0].read_text()
        assert "rank 1 stopped responding" in log, log
        print(f"leader exited {took:.1f} s after the kill; readiness answers {statuses[:3]}...{statuses[-3:]}")
