"""The engine in a process of its own (``serve --engine-process on``): the same answers and metrics as the
engine in the server's process, and a dead engine process fails its requests and the service at once.

The shared server runs this way, so every module using it covers the routes; here are the parts only this
mode has."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from runtime import contract as c
from runtime.engine.stats import EngineStats
from runtime.metrics import ServiceMetrics
from runtime.server.engine_child import MetricsRecorder, replay


def _engine_child(srv) -> psutil.Process:
    kids = psutil.Process(srv.proc.pid).children()
    engines = [k for k in kids if "spawn_main" in " ".join(k.cmdline())]
    assert len(engines) == 1, [k.cmdline() for k in kids]
    return engines[0]


def test_greedy_answers_equal_the_in_process_engine(shared_server, keyed_server):
    """shared_server: engine process; keyed_server: engine thread. Same checkpoint, same answers."""
    body = {"prompt": "The order was placed", "max_tokens": 24, "temperature": 0, "ignore_eos": True, "n": 2}
    answers = []
    for srv in (shared_server, keyed_server):
        r = httpx.post(srv.url + c.COMPLETIONS_PATH, json=body, headers=srv.auth, timeout=60)
        assert r.status_code == 200, r.text
        answers.append([ch["text"] for ch in r.json()["choices"]])
    assert answers[0] == answers[1]
    assert answers[0][0]  # something was generated


def test_engine_metrics_reach_the_service_exposition(shared_server):
    before = shared_server.metrics()
    body = {"prompt": "Risk score", "max_tokens": 7, "temperature": 0, "ignore_eos": True, "stream": True}
    body["stream_options"] = {"include_usage": True}
    with httpx.stream("POST", shared_server.url + c.COMPLETIONS_PATH, json=body, timeout=60) as r:
        assert r.status_code == 200
        chunks = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {")]
    assert chunks[-1]["usage"]["completion_tokens"] == 7
    gen = "moe_generation_tokens_total"
    after = shared_server.wait_metric(gen, lambda v: v >= before.get(gen, 0) + 7)
    assert after == before.get(gen, 0) + 7
    shared_server.wait_metric("moe_num_requests_running", lambda v: v == 0)  # the idle step's gauges arrive too
    m = shared_server.metrics()
    assert m["moe_kv_cache_blocks"] > 0
    ok = 'moe_request_success_total{finish_reason="length"}'
    assert m[ok] >= before.get(ok, 0) + 1
    # resident memory counts the engine process too (the model lives there)
    child = _engine_child(shared_server).memory_info().rss
    parent = psutil.Process(shared_server.proc.pid).memory_info().rss
    assert m["moe_process_resident_memory_bytes"] >= child + 0.5 * parent


def test_recorded_metrics_replay_to_the_same_exposition():
    """What the child records and the parent replays renders as if the engine had updated the registry."""
    direct, replayed = ServiceMetrics("m"), ServiceMetrics("m")
    recorder = MetricsRecorder()

    class NoExperts:
        def expert_load_imbalance(self):
            return {3: 1.5}

        def reset_expert_load(self):
            pass

    for target in (direct, recorder):
        stats = EngineStats(target, NoExperts(), imbalance_interval_s=0.0)
        stats.kv_pool(100)
        stats.prefill(12, 4)
        stats.scheduled(preempted=2, cache_queries=32, cache_hits=16, paced=True)
        stats.decode(3, 4)
        for _ in range(5):
            stats.token()
        stats.count_tokens()
        stats.update_gauges(running=3, waiting=1, kv_usage=0.25)
    replay(replayed, recorder.take())
    assert recorder.take() == []

    def text(m: ServiceMetrics) -> list[str]:
        skip = (c.PROCESS_RESIDENT_MEMORY.name, c.GPU_UTILIZATION.name, c.GPU_MEMORY_USED.name)
        return [ln for ln in m.render().decode().splitlines() if not ln.startswith(skip)]

    assert text(replayed) == text(direct)
    assert 'moe_num_preemptions_total{model_name="m"} 2.0' in text(replayed)


def test_a_dead_engine_process_fails_its_requests_and_the_service(server_factory):
    with server_factory("--engine-process", "on") as srv:
        body = {"prompt": "The order", "max_tokens": 400, "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", srv.url + c.COMPLETIONS_PATH, json=body, timeout=60) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            first = next(ln for ln in lines if ln.startswith("data: {"))
            assert json.loads(first[6:])["choices"][0]["text"]
            os.kill(_engine_child(srv).pid, signal.SIGKILL)
            rest = [ln for ln in lines if ln.startswith("data: ")]
        error = json.loads(rest[-1][6:])
        assert "engine process exited with code -9" in error["error"]["message"], rest[-3:]
        try:
            code = srv.proc.wait(30)
        except subprocess.TimeoutExpired:
            raise AssertionError("the service did not exit after its engine died:\n" + srv.logs()) from None
        assert code == 1, srv.logs()
        assert "engine process exited with code -9" in srv.logs()


def test_a_load_failure_in_the_engine_process_names_the_file(v2_path: Path, tmp_path: Path):
    """The child's load error comes back as the reason (``serve`` then exits 1 with it, as for a load in
    its own process: test_engine.py); the child is gone afterwards."""
    from runtime.server.engine_process import EngineClient
    from runtime.server.state import Settings

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in v2_path.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    shard = next(broken.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a truncated download
    exits: list[str] = []
    client = EngineClient.spawn(Settings(str(broken), device="cpu", threads=1), ServiceMetrics("m"), exits.append)
    with pytest.raises(RuntimeError, match=shard.name):
        client.wait_ready(timeout=120)
    client._process.join(10)
    assert not client._process.is_alive() and client._process.exitcode == 1
    assert exits == []  # on_exit is for a child that dies while serving


def test_engine_process_is_refused_for_a_multi_gpu_replica(v2_path: Path, capsys):
    from runtime.cli import main

    argv = ["serve", "--model", str(v2_path), "--engine-process", "on", "--world-size", "2", "--shm-min-bytes", "1"]
    assert main(argv) == 2
    assert "--engine-process on: multi-GPU replicas run the engine in the leader's process" in capsys.readouterr().err


def test_the_engine_process_dies_with_its_parent_even_mid_load(v2_path: Path, tmp_path: Path):
    """A server killed outright (OOM killer, SIGKILL) leaves no engine process behind, even one still
    loading, which reads no pipe yet; a shutdown during the load stops it at once."""
    script = f"""
import os, signal, sys, time
from runtime.metrics import ServiceMetrics
from runtime.server.engine_process import EngineClient
from runtime.server.state import Settings
client = EngineClient.spawn(Settings({str(v2_path)!r}, device="cpu", threads=1), ServiceMetrics("m"), print)
print(client._process.pid, flush=True)
time.sleep(1.5)  # the child is past its start-up, importing torch or loading
if sys.argv[1] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
client.stop()
print("stopped", client._process.exitcode, flush=True)
"""
    repo = Path(__file__).resolve().parents[3]
    for how in ("kill", "stop"):
        out = tmp_path / f"{how}.out"
        with out.open("w") as fh:  # a file, not a pipe: the child inherits it, and a pipe would wait for it
            subprocess.run([sys.executable, "-c", script, how], stdout=fh, stderr=fh, timeout=60, cwd=repo)
        words = out.read_text().split()
        child = int(words[0])
        deadline = time.monotonic() + 1.0  # a load alone takes longer: torch's import
        while psutil.pid_exists(child) and psutil.Process(child).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, f"{how}: the engine process {child} outlived its parent"
            time.sleep(0.05)
        if how == "stop":
            assert words[1:3] == ["stopped", "-9"], out.read_text()
