"""Engine and building blocks in-process: scheduling policy, fairness, batching invariance, isolation,
the contract's independence, metrics built from it, and the /dev/shm check."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from runtime import contract as c
from runtime.engine.scheduler import PrefillChunk, group_by_length, padded_slots
from runtime.server.lifecycle import ShmError, check_shm


# ---- contract and metrics -----------------------------------------------------------------------
def test_contract_imports_nothing_heavy():
    code = (
        "import sys, runtime.contract as c; heavy = {'torch', 'fastapi', 'prometheus_client', 'pydantic'};"
        "bad = heavy & set(sys.modules); assert not bad, bad; print(len(c.METRICS))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) == len(c.METRICS)


def test_contract_names_are_consistent():
    names = [m.name for m in c.METRICS]
    assert len(names) == len(set(names))
    for m in c.METRICS:
        assert m.name.startswith("moe_")
        assert m.name.endswith("_total") == (m.type == "counter"), m.name
        assert (m.buckets is not None) == (m.type == "histogram"), m.name
    for h in (c.E2E_LATENCY, c.TIME_TO_FIRST_TOKEN):
        assert 0.5 in h.buckets and any(0.4 <= b < 0.5 for b in h.buckets)  # resolves the 500 ms P99
    assert c.LIVENESS_PROBE_PATH in c.ALL_PATHS and c.READINESS_PROBE_PATH in c.ALL_PATHS


def test_metrics_module_exports_every_contract_metric():
    from runtime.metrics import ServiceMetrics

    m = ServiceMetrics()
    m.expert_imbalance.labels("1").set(1.5)
    m.gpu_util.labels("0").set(3)
    m.gpu_mem.labels("0").set(3)
    text = m.render().decode()
    for d in c.METRICS:
        sample = d.name + ("_bucket" if d.type == "histogram" else "")
        assert any(line.startswith((sample + " ", sample + "{")) for line in text.splitlines()), d.name
    assert 'le="0.5"' in text
    assert m.rss._value.get() > 0


# ---- scheduling policy --------------------------------------------------------------------------
class FakeSeq:
    def __init__(self, n: int) -> None:
        self.prompt_len = self.prefill_len = n


def test_group_by_length_keeps_padding_low():
    chunks = [PrefillChunk(FakeSeq(n), 0, n) for n in (100, 10, 96, 12, 90, 50)]
    groups = group_by_length(chunks)
    assert [[ch.length for ch in g] for g in groups] == [[100, 96, 90, 50], [12, 10]]
    for g in groups:
        lens = [ch.length for ch in g]
        if len(g) > 1:
            assert sum(lens) >= 0.75 * len(lens) * max(lens)
    all_in_one = [100, 10, 96, 12, 90, 50]
    assert padded_slots(all_in_one, all_in_one) == 0  # too ragged: the model loops, unpadded
    # over cached context: grouped apart from fresh prompts, and cut where chunk or context lengths spread
    cached = [PrefillChunk(FakeSeq(s + n + 5), s, n) for s, n in ((64, 20), (64, 18), (64, 30), (640, 20), (48, 19))]
    groups = group_by_length([*chunks[:2], *cached])
    shapes = [[(ch.start, ch.length) for ch in g] for g in groups]
    assert shapes == [[(0, 100)], [(0, 10)], [(640, 20)], [(64, 30), (64, 20), (64, 18)], [(48, 19)]]
    for g in groups:
        for lens in ([ch.length for ch in g], [ch.start + ch.length for ch in g]):
            assert sum(lens) >= 0.75 * len(lens) * max(lens)
    assert padded_slots([100, 96, 90], [100, 96, 90]) == 14
    assert padded_slots([10, 9], [30, 9]) == 0  # contexts too far apart: the model loops
    assert padded_slots([10, 8], [30, 28]) == 2  # close chunks over close cached contexts: one padded batch


# ---- the engine on the tiny checkpoint ----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(v2_path: Path):
    import torch

    from runtime.loader import load_model, load_tokenizer

    torch.set_num_threads(1)
    return load_model(v2_path), load_tokenizer(v2_path)


def run_engine(engine, prompts, params):
    """Submit all, wait for all; returns ([tokens], [finish_reason], [[step of each event]])."""
    from runtime.engine import Sequence

    done = threading.Semaphore(0)
    toks = [[] for _ in prompts]
    reasons = [None] * len(prompts)
    steps = [[] for _ in prompts]

    def on(i):
        def f(ev):
            toks[i].extend(ev.token_ids)
            steps[i].append(engine.steps)
            if ev.finish_reason:
                reasons[i] = ev.finish_reason
                done.release()

        return f

    seqs = [Sequence(f"s{i}", p, prm, on_event=on(i)) for i, (p, prm) in enumerate(zip(prompts, params, strict=True))]
    engine.submit(seqs)
    for _ in seqs:
        assert done.acquire(timeout=60)
    return toks, reasons, steps


def test_engine_matches_the_reference_generator_with_chunked_prefill(tiny):
    from runtime.engine import Engine, EngineConfig
    from runtime.generate import Generator
    from runtime.sampling import SamplingParams

    model, tok = tiny
    prompts = [tok.encode(t) for t in ("The order", "Hello world, this is a tiny language model." * 3, "A")]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (12, 9, 20)]
    ref = [Generator(model, tok).generate([p], prm)[0].token_ids for p, prm in zip(prompts, params, strict=True)]
    engine = Engine(model, tok, EngineConfig(max_num_batched_tokens=16, max_num_seqs=4))  # forces chunking
    engine.start()
    try:
        toks, reasons, _ = run_engine(engine, prompts, params)
    finally:
        engine.stop()
    assert toks == ref
    assert reasons == ["length"] * 3
    assert engine.allocator.usage() == 0.0


def test_overlapped_decode_gives_the_same_tokens_and_stops(tiny):
    """With ``overlap`` the engine launches decode step k+1 (its tokens fed on the device) before reading step
    k's: the tokens, the finish reasons and the blocks' return must equal the step-by-step engine's, also for a
    sequence that a stop token ends while its next step is already launched."""
    from runtime.engine import Engine, EngineConfig, Sequence
    from runtime.sampling import SamplingParams

    model, tok = tiny
    prompts = [tok.encode(t) for t in ("The order", "Hello world, this is a tiny language model.", "A")]
    free = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (10, 7, 12)]

    def run(overlap: bool, params):
        engine = Engine(model, tok, EngineConfig(overlap=overlap, max_num_seqs=4))
        engine.start()
        try:
            toks, reasons, _ = run_engine(engine, prompts, params)
        finally:
            engine.stop()
        assert engine.allocator.usage() == 0.0
        return toks, reasons

    ref, _ = run(False, free)
    i = next(i for i in range(2, 10) if ref[0][i] not in ref[0][:i])  # a token first produced at step i
    stopping = [SamplingParams(max_new_tokens=10, ignore_eos=True, stop_token_ids=[ref[0][i]]), *free[1:]]
    assert run(True, free) == (ref, ["length"] * 3)
    expected = run(False, stopping)
    assert expected[0][0] == ref[0][:i] and expected[1][0] == "stop"
    assert run(True, stopping) == expected

    # stepped by hand: after the first decode step its token is still unread, the next step is launched
    engine = Engine(model, tok, EngineConfig(max_num_seqs=4))
    seq = Sequence("s", prompts[0], free[0])
    engine.submit([seq])
    engine.step()  # prefill: its token is read at once
    assert len(seq.output_ids) == 1 and engine.runner.inflight is None
    engine.step()  # the first decode step, launched and not read
    assert len(seq.output_ids) == 1 and engine.runner.inflight is not None
    engine.step()  # the second launched, the first read
    assert seq.output_ids == ref[0][:2] and engine.runner.inflight is not None


def test_stop_strings_end_the_text_where_they_start_decoding_a_window_per_token(tiny):
    """A stop string ends the sequence with the text cut where it starts (the offline Generator's rule), and
    the engine finds it from a window of recent tokens: no decode call grows with the output's length."""
    from runtime.engine import Engine, EngineConfig, Sequence
    from runtime.sampling import SamplingParams

    model, tok = tiny

    class Counting:
        def __init__(self) -> None:
            self.sizes: list[int] = []

        def decode(self, ids, skip_special_tokens: bool = True) -> str:
            self.sizes.append(len(ids))
            return tok.decode(ids, skip_special_tokens=skip_special_tokens)

        def __getattr__(self, name):
            return getattr(tok, name)

    prompt = tok.encode("Hello world, this is a tiny language model.")
    free = SamplingParams(max_new_tokens=96, ignore_eos=True)
    engine = Engine(model, tok, EngineConfig(max_num_seqs=2))
    engine.start()
    try:
        (ref,), _, _ = run_engine(engine, [prompt], [free])
    finally:
        engine.stop()
    text = tok.decode(ref)
    stop = text[len(text) * 3 // 4 :][:3]  # three characters from late in the output
    assert stop and stop in text
    counting = Counting()
    engine = Engine(model, counting, EngineConfig(max_num_seqs=2))
    events = []
    seq = Sequence("s", prompt, SamplingParams(max_new_tokens=96, ignore_eos=True, stop=[stop]), events.append)
    engine.start()
    try:
        engine.submit([seq])
        deadline = time.monotonic() + 60
        while not (events and events[-1].finish_reason) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        engine.stop()
    assert events[-1].finish_reason == "stop"
    assert events[-1].text == text[: text.find(stop)]
    assert len(seq.output_ids) > 24 and max(counting.sizes) <= 12, (len(seq.output_ids), max(counting.sizes))


def test_a_distributed_leader_decodes_step_by_step_through_its_host_list_entry(tiny):
    """A TP/EP leader's graph decoder takes host tokens only (its followers read the leader's host lists): an
    engine given the leader's graph capture turns ``overlap`` off and calls ``run_host`` with the four host
    lists, never a device feed. A stand-in decoder with exactly that signature runs the eager model."""
    import torch

    from runtime.engine import Engine, EngineConfig
    from runtime.kv_cache import decode_metadata
    from runtime.sampling import SamplingParams

    model, tok = tiny

    class LeaderGraphs:  # the signature of runtime.parallel.lockstep's leader graphs
        batch_sizes = (4,)
        calls = 0

        def bucket(self, b: int) -> int:
            return 4

        def run_host(self, token_ids, context_lens, tables, slots):
            LeaderGraphs.calls += 1
            meta = decode_metadata(context_lens, tables, slots)
            return model(torch.tensor(token_ids), meta.context_lens - 1, meta, engine.runner.cache)

    prompts = [tok.encode(t) for t in ("The order", "A")]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (6, 4)]
    reference = Engine(model, tok, EngineConfig(max_num_seqs=4))
    reference.start()
    try:
        expected = run_engine(reference, prompts, params)[:2]
    finally:
        reference.stop()
    captured = []  # off CUDA the engine captures no graphs: install the stand-in by hand below
    engine = Engine(model, tok, EngineConfig(max_num_seqs=4), graph_capture=lambda *a: captured.append(a))
    assert not engine.runner.overlap and not captured
    engine.runner.graphs = LeaderGraphs()
    engine.start()
    try:
        assert run_engine(engine, prompts, params)[:2] == expected
    finally:
        engine.stop()
    assert LeaderGraphs.calls >= 5


def test_long_prompt_does_not_starve_running_decodes(tiny):
    from runtime.engine import Engine, EngineConfig, Sequence
    from runtime.sampling import SamplingParams

    model, tok = tiny
    engine = Engine(model, tok, EngineConfig(max_num_batched_tokens=16))
    engine.start()
    try:
        short_steps: list[int] = []
        started = threading.Event()

        def on_short(ev):
            short_steps.append(engine.steps)
            started.set()

        short = Sequence("short", tok.encode("Hi"), SamplingParams(max_new_tokens=60, ignore_eos=True), on_short)
        engine.submit([short])
        assert started.wait(30)
        long_prompt = list(range(3, 3 + 320))  # 20 chunks of 16
        _, _, long_steps = run_engine(engine, [long_prompt], [SamplingParams(max_new_tokens=2, ignore_eos=True)])
    finally:
        engine.stop()
    first_long = long_steps[0][0]
    during = [s for s in short_steps if s <= first_long]
    # the short sequence got a token on (nearly) every step while the long prompt was prefilled in chunks
    assert first_long >= 20 and len(during) >= 19


def test_a_failing_sequence_does_not_take_the_batch_down(tiny):
    from runtime.engine import Engine, EngineConfig
    from runtime.sampling import SamplingParams

    model, tok = tiny
    engine = Engine(model, tok, EngineConfig())
    engine.start()
    try:
        p = tok.encode("The order")
        good = SamplingParams(max_new_tokens=5, ignore_eos=True)
        bad = SamplingParams(max_new_tokens=5, temperature=1e-300, ignore_eos=True)  # logits / T = inf → NaN
        toks, reasons, _ = run_engine(engine, [p, p, p], [good, bad, good])
    finally:
        engine.stop()
    assert reasons == ["length", "error", "length"]
    assert toks[0] == toks[2] and len(toks[0]) == 5
    assert engine.allocator.usage() == 0.0


def test_requests_that_can_never_run_are_refused(tiny):
    from runtime.engine import Engine, EngineConfig, QueueFullError, RequestTooLargeError, Sequence
    from runtime.sampling import SamplingParams

    model, tok = tiny
    engine = Engine(model, tok, EngineConfig(max_queue=2, kv_blocks=5))  # not started: nothing drains
    with pytest.raises(RequestTooLargeError, match="maximum context length is 512"):
        engine.check_request(500, 100)
    with pytest.raises(RequestTooLargeError, match="pool has 4"):
        engine.check_request(100, 10)
    seqs = [Sequence(str(i), [5, 6], SamplingParams(max_new_tokens=2)) for i in range(3)]
    engine.submit(seqs[:2])
    with pytest.raises(QueueFullError):
        engine.submit(seqs[2:])


# ---- /dev/shm check (the source document's model-load failure) ------------------------------------
def test_shm_check_passes_on_a_writable_large_enough_dir(tmp_path):
    assert check_shm(tmp_path, min_bytes=1) > 0


def test_shm_check_names_the_size_and_the_fix(tmp_path):
    with pytest.raises(ShmError, match=r"needs at least .*emptyDir with medium: Memory"):
        check_shm(tmp_path, min_bytes=1 << 60)
    with pytest.raises(ShmError, match="does not exist"):
        check_shm(tmp_path / "missing")
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(ShmError, match="not a directory"):
        check_shm(f)


def test_serve_refuses_multi_gpu_without_shm(v2_path, tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "runtime.cli",
            "serve",
            "--model",
            str(v2_path),
            "--world-size",
            "2",
            "--shm-min-bytes",
            str(1 << 60),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "world size 2" in out.stderr and "/dev/shm" in out.stderr


def test_serve_fails_clearly_on_a_bad_checkpoint(v2_path, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "runtime.cli", "serve", "--model", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "no such folder" in out.stderr
    broken = tmp_path / "broken"
    shutil.copytree(v2_path, broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["moe_intermediate_size"] *= 2  # the config of another model size: the weights do not fit
    (broken / "config.json").write_text(json.dumps(cfg))
    out = subprocess.run(
        [sys.executable, "-m", "runtime.cli", "serve", "--model", str(broken), "--host", "127.0.0.1", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1, out.stderr[-2000:]
    assert "model load failed" in out.stderr and "CheckpointError" in out.stderr
    assert out.stderr.count("mis-shaped tensor(s)") == 1, out.stderr  # the summary is printed once
    assert "more" in out.stderr and "leaked" not in out.stderr
