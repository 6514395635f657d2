"""The engine's token log-probabilities, in-process: with and without overlapped decode, greedy and sampled,
mixed in one batch with sequences that do not ask, equal to the log-softmax of a plain forward over
prompt + output (no KV cache, no engine). Where a GPU is present the same check runs on CUDA, with the
decode graphs and the pinned-memory copy of the values."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from runtime.engine import Engine, EngineConfig, Sequence
from runtime.kv_cache import prefill_metadata
from runtime.sampling import SamplingParams, token_logprobs, unpack_logprobs

TOL = 1e-4


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU cases always run)")
CASES = [("cpu", True), ("cpu", False), pytest.param("cuda", True, marks=CUDA)]


@pytest.fixture(scope="module")
def tiny(v2_path: Path):
    from runtime.loader import load_model, load_tokenizer

    torch.set_num_threads(1)
    return load_model(v2_path), load_tokenizer(v2_path)


@torch.inference_mode()
def reference(model, prompt: list[int], output: list[int]) -> torch.Tensor:
    ids = [*prompt, *output]
    dev = model.device
    meta = prefill_metadata([len(ids)], [len(ids)], None, None, device=dev)
    rows = torch.arange(len(prompt) - 1, len(ids) - 1, device=dev)
    pos = torch.arange(len(ids), device=dev)
    logits = model(torch.tensor(ids, device=dev), pos, meta, None, logits_indices=rows)
    return torch.log_softmax(logits.float(), -1).cpu()


def run(engine: Engine, prompts: list[list[int]], params: list[SamplingParams]):
    done = threading.Semaphore(0)
    events: list[list] = [[] for _ in prompts]

    def on(i):
        def f(ev):
            events[i].append(ev)
            if ev.finish_reason:
                done.release()

        return f

    seqs = [Sequence(f"s{i}", p, prm, on_event=on(i)) for i, (p, prm) in enumerate(zip(prompts, params, strict=True))]
    engine.submit(seqs)
    for _ in seqs:
        assert done.acquire(timeout=60)
    return events


@pytest.mark.parametrize(("device", "overlap"), CASES, ids=["cpu-overlap", "cpu-no-overlap", "cuda-graphs"])
def test_engine_logprobs_equal_the_reference(tiny, v2_path, device, overlap):
    model, tok = tiny
    if device == "cuda":
        from runtime.loader import load_model

        model = load_model(v2_path, device="cuda")  # fp32; the engine compiles and captures its decode graphs
    prompts = [tok.encode(t) for t in ("The order", "Hello world, this is a tiny language model.", "A", "Risk")]
    params = [
        SamplingParams(max_new_tokens=9, ignore_eos=True, logprobs=3),
        SamplingParams(max_new_tokens=7, ignore_eos=True, temperature=1.5, top_k=20, seed=3, logprobs=0),
        SamplingParams(max_new_tokens=6, ignore_eos=True),  # does not ask
        SamplingParams(max_new_tokens=12, ignore_eos=True, temperature=0.8, seed=9, logprobs=20),
    ]
    engine = Engine(model, tok, EngineConfig(max_num_batched_tokens=16, max_num_seqs=4, overlap=overlap))
    assert device == "cpu" or engine.runner.graphs is not None
    engine.start()
    try:
        events = run(engine, prompts, params)
    finally:
        engine.stop()
    for prompt, prm, evs in zip(prompts, params, events, strict=True):
        out = [t for ev in evs for t in ev.token_ids]
        assert len(out) == prm.max_new_tokens
        if prm.logprobs is None:
            assert all(ev.logprobs is None for ev in evs)
            continue
        lps = [e for ev in evs for e in (ev.logprobs or [])]
        assert [e.token for e in lps] == out
        want = reference(model, prompt, out)
        tol = TOL * (10 if device == "cuda" else 1)  # fused GPU kernels round differently
        for j, e in enumerate(lps):
            assert abs(e.logprob - want[j, out[j]].item()) < tol
            assert len(e.top) == prm.logprobs
            top = want[j].topk(prm.logprobs)
            assert [lp for _, lp in e.top] == pytest.approx(top.values.tolist(), abs=tol)
            assert all(abs(want[j, t].item() - lp) < tol for t, lp in e.top)


def test_packed_rows_round_trip():
    logits = torch.randn(3, 50)
    tokens = torch.tensor([4, 0, 49])
    packed = token_logprobs(logits, tokens, 5)
    lp = torch.log_softmax(logits, -1)
    for i in range(3):
        chosen, top = unpack_logprobs(packed[i].tolist(), 2, 5)
        assert chosen == pytest.approx(lp[i, tokens[i]].item())
        ids = lp[i].topk(2).indices.tolist()
        assert [t for t, _ in top] == ids and [v for _, v in top] == pytest.approx(lp[i, ids].tolist())
