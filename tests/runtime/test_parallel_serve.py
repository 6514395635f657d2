"""``moe-runtime serve --tp/--ep`` as a real multi-process service on loopback (gloo, CPU).

One server runs under torchrun with the command LeaderWorkerSet's pods use (``--nnodes --node-rank
--master-addr --master-port``); the failure tests start the ranks directly with torchrun's environment,
so that no torchrun agent tears the group down for us: the ranks must notice the loss themselves.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from infra.embedded.emulator.process import free_port
from runtime import contract as c

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 6  # --dist-timeout of these servers
REQUEST = {"prompt": "The order was placed at night", "max_tokens": 12, "temperature": 0, "ignore_eos": True}


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MOE_SHM_MIN_BYTES": "1", **extra}


def _serve_args(model: Path, http_port: int) -> list[str]:
    return ["serve", "--model", str(model), "--host", "127.0.0.1", "--port", str(http_port), "--threads", "1"]


def wait_ready(url: str, procs: list[subprocess.Popen], logs: list[Path], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            break
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + c.READY_PATH, timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise AssertionError("not ready:\n" + "\n".join(log.read_text(errors="replace") for log in logs))


@contextlib.contextmanager
def started(cmds: list[tuple[list[str], dict]], tmp: Path) -> Iterator[list[subprocess.Popen]]:
    procs, logs = [], []
    for i, (cmd, env) in enumerate(cmds):
        logs.append(tmp / f"proc{i}.log")
        with logs[-1].open("w") as fh:
            procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT))
    try:
        yield procs, logs
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def rank_cmds(model: Path, http_port: int, world: int, tp: int, ep: int) -> list[tuple[list[str], dict]]:
    """Each rank as torchrun would start it (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)."""
    mp = str(free_port())
    args = [*_serve_args(model, http_port), "--tp", str(tp), "--ep", str(ep), "--dist-timeout", str(TIMEOUT_S)]
    return [
        (
            [sys.executable, "-m", "runtime.cli", *args],
            _env(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=mp),
        )
        for r in range(world)
    ]


def completion(url: str) -> str:
    r = httpx.post(url + c.COMPLETIONS_PATH, json=REQUEST, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


@pytest.mark.slow
def test_served_text_under_torchrun_equals_single_process(v2_path: Path, tmp_path: Path) -> None:
    port = free_port()
    with started([([sys.executable, "-m", "runtime.cli", *_serve_args(v2_path, port)], _env())], tmp_path) as (
        procs,
        logs,
    ):
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, procs, logs)
        want = completion(url)
    port = free_port()
    torchrun = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2", "--node-rank=0",
        "--master-addr=127.0.0.1", f"--master-port={free_port()}",
        "-m", "runtime.cli", *_serve_args(v2_path, port), "--tp", "2", "--ep", "2",
    ]  # fmt: skip
    (tmp_path / "torchrun").mkdir()
    with started([(torchrun, _env())], tmp_path / "torchrun") as (procs, logs):
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, procs, logs)
        assert completion(url) == want
        assert [completion(url) for _ in range(2)] == [want, want]  # steps stay in lockstep
        # SIGTERM to the leader (rank 0): it drains, then tells the worker to stop; torchrun sees two 0s
        leader = next(ch for ch in psutil.Process(procs[0].pid).children() if "RANK=0" in _environ(ch))
        leader.send_signal(signal.SIGTERM)
        assert procs[0].wait(60) == 0, logs[0].read_text()
    assert "lost" not in logs[0].read_text()


def _environ(p: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error):
        return " ".join(f"{k}={v}" for k, v in p.environ().items())
    return ""


def _exits_within(p: subprocess.Popen, seconds: float) -> int:
    try:
        return p.wait(seconds)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running {seconds} s after its peer died") from None


def test_killing_a_worker_makes_the_leader_unready_and_exit_nonzero(v2_path: Path, tmp_path: Path) -> None:
    port = free_port()
    with started(rank_cmds(v2_path, port, 2, 2, 2), tmp_path) as (procs, logs):
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, procs, logs)
        completion(url)
        procs[1].kill()
        t0 = time.monotonic()
        code = _exits_within(procs[0], TIMEOUT_S * 2)
        assert code != 0
        assert time.monotonic() - t0 < TIMEOUT_S * 2
        log = logs[0].read_text()
        assert "lost contact with the other ranks" in log or "failed" in log, log


def test_killing_the_leader_makes_the_worker_exit_nonzero(v2_path: Path, tmp_path: Path) -> None:
    port = free_port()
    with started(rank_cmds(v2_path, port, 2, 1, 2), tmp_path) as (procs, logs):
        wait_ready(f"http://127.0.0.1:{port}", procs, logs)
        procs[0].kill()
        assert _exits_within(procs[1], TIMEOUT_S * 2) == 1
        assert "lost the leader" in logs[1].read_text()


def test_a_hung_worker_makes_the_leader_exit_instead_of_hanging(v2_path: Path, tmp_path: Path) -> None:
    """SIGSTOP keeps the worker's sockets open, so nothing fails fast: the leader's heartbeat (or the
    watchdog) must give up after the timeout and take the service down."""
    port = free_port()
    with started(rank_cmds(v2_path, port, 2, 2, 2), tmp_path) as (procs, logs):
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, procs, logs)
        procs[1].send_signal(signal.SIGSTOP)
        try:
            assert _exits_within(procs[0], TIMEOUT_S * 3) == 1, logs[0].read_text()
        finally:
            procs[1].kill()
        assert "Timed out" in logs[0].read_text() or "did not finish" in logs[0].read_text()
