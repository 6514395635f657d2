"""The engine under KV pressure, on the tiny fp32 checkpoint: blocks taken on demand, preemption by
recompute, chunked prefill mixed with decode steps, automatic prefix caching, and their counters.

Each check compares against the same sequences run without the mechanism (a large pool, one sequence
alone, caching off): the mechanisms may change when tokens are computed, never which."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest

from runtime import contract as c
from runtime.kv_cache import BlockAllocator, SequenceBlocks, block_hash


@pytest.fixture(scope="module")
def tiny(v2_path: Path):
    import torch

    from runtime.loader import load_model, load_tokenizer

    torch.set_num_threads(1)
    return load_model(v2_path), load_tokenizer(v2_path)


def prompt(seed: int, n: int) -> list[int]:
    return [(seed * 31 + 7 * i) % 400 + 3 for i in range(n)]


def make_engine(model, tok, metrics=None, **cfg):
    from runtime.engine import Engine, EngineConfig

    return Engine(model, tok, EngineConfig(**cfg), metrics=metrics)


def run(engine, prompts, max_new, step_log=None):
    """Submit all at once, step the engine by hand until all finish → (tokens per prompt, reasons)."""
    from runtime.engine import Sequence
    from runtime.sampling import SamplingParams

    toks = [[] for _ in prompts]
    reasons = [None] * len(prompts)

    def on(i):
        def f(ev):
            toks[i].extend(ev.token_ids)
            if ev.finish_reason:
                reasons[i] = ev.finish_reason

        return f

    news = max_new if isinstance(max_new, list) else [max_new] * len(prompts)
    seqs = [
        Sequence(f"s{i}", p, SamplingParams(max_new_tokens=n, ignore_eos=True), on_event=on(i))
        for i, (p, n) in enumerate(zip(prompts, news, strict=True))
    ]
    engine.submit(seqs)
    for _ in range(5000):
        if all(reasons):
            break
        if step_log is not None:
            step_log.append(_peek(engine))
        engine.step()
    assert all(r == "length" for r in reasons), reasons
    assert engine.allocator.usage() == 0.0, "blocks leaked"
    return toks


#: block size of the pools the tests below build by hand; sequence i owns blocks 1 + 8i onwards
BS = 16


def block_table(i: int, tokens: int) -> list[int]:
    """Sequence ``i``'s blocks in a hand-built pool, enough for ``tokens``."""
    return list(range(1 + 8 * i, 1 + 8 * i - (-tokens // BS)))


def token_slots(table: list[int], start: int, n: int) -> list[int]:
    """Flat cache slots of positions ``start`` .. ``start + n - 1`` under ``table``."""
    return [table[p // BS] * BS + p % BS for p in range(start, start + n)]


def _peek(engine):
    return [(s.id, s.prefilled) for s in engine.scheduler.running]


# ---- allocator ------------------------------------------------------------------------------------
def test_allocator_shares_cached_blocks_and_evicts_lru():
    a = BlockAllocator(5, caching=True)  # 4 usable
    s = SequenceBlocks(a, 2)
    s.append(4)
    s.seal([1, 2, 3, 4], 4)
    h1 = block_hash(None, [1, 2])
    h2 = block_hash(h1, [3, 4])
    assert a.cached(h1) == s.blocks[0] and a.cached(h2) == s.blocks[1]
    t = SequenceBlocks(a, 2)
    t.adopt_cached([s.blocks[0]], [h1])  # shared: two holders
    first = s.blocks[0]
    s.release()
    assert a.usage() == 0.25 and a.num_free == 3  # the shared block is still held; the other is cached-free
    t.release()
    assert a.num_free == 4 and a.cached(h1) == first
    got = a.allocate(3)  # two never-cached blocks first, then the LRU cached one: the tail block (h2) goes first
    assert a.cached(h2) is None and a.cached(h1) == first and first not in got
    a.free(got)
    with pytest.raises(ValueError):
        a.free([got[0]])
    off = BlockAllocator(5)
    assert off.cached(h1) is None


# ---- preemption -----------------------------------------------------------------------------------
@pytest.mark.parametrize("caching", [True, False])
def test_preempted_sequences_give_their_uninterrupted_greedy_output(tiny, caching):
    """A pool of 24 blocks of 4 tokens for 4 sequences that need 13 each: the newest are preempted (their
    blocks freed, later re-prefilled from prompt + generated tokens) over and over; every output equals
    the output of a pool where nobody is preempted."""
    model, tok = tiny
    prompts = [prompt(i, 18 + 3 * i) for i in range(4)]
    ref = run(make_engine(model, tok, block_size=4, max_num_seqs=4), prompts, 30)
    from runtime.metrics import ServiceMetrics

    m = ServiceMetrics()
    engine = make_engine(model, tok, m, block_size=4, kv_blocks=25, max_num_seqs=4, prefix_caching=caching)
    assert engine.allocator.capacity == 24
    got = run(engine, prompts, 30)
    assert got == ref
    assert engine.scheduler.num_preemptions > 0
    assert m.preemptions._value.get() == engine.scheduler.num_preemptions
    assert not engine.scheduler.waiting and not engine.scheduler.running


def test_queue_and_prefill_times_split_each_time_to_first_token(tiny):
    """Two places in the batch for four requests: the last two wait for a place (their queue time covers the
    first two's whole run); a sequence preempted and readmitted keeps the time of its first step; and the
    exposed queue and prefill times add up to the time to first token, request by request."""
    from runtime.engine import Sequence
    from runtime.metrics import ServiceMetrics
    from runtime.sampling import SamplingParams

    model, tok = tiny
    m = ServiceMetrics()
    engine = make_engine(model, tok, m, block_size=4, kv_blocks=25, max_num_seqs=2)
    seqs = [
        Sequence(f"s{i}", prompt(i, 18 + 3 * i), SamplingParams(max_new_tokens=30, ignore_eos=True)) for i in range(4)
    ]
    engine.submit(seqs)
    engine.step()
    first_steps = [s.scheduled_at for s in seqs[:2]]
    for _ in range(5000):
        if all(s.finish_reason for s in seqs):
            break
        engine.step()
    assert engine.scheduler.num_preemptions > 0  # 12 + 13 blocks of 4 tokens for the first two: one is preempted
    assert [s.scheduled_at for s in seqs[:2]] == first_steps
    assert min(s.scheduled_at for s in seqs[2:]) > seqs[0].first_token_at  # no place at the first steps
    for s in seqs:
        assert s.arrival <= s.scheduled_at <= s.first_token_at

    def total(name: str) -> float:
        return m.registry.get_sample_value(name, {c.LABEL_MODEL_NAME: ""})

    assert total("moe_request_queue_time_seconds_count") == total("moe_request_prefill_time_seconds_count") == 4
    assert total("moe_request_queue_time_seconds_sum") == pytest.approx(sum(s.scheduled_at - s.arrival for s in seqs))
    prefill = sum(s.first_token_at - s.scheduled_at for s in seqs)
    assert total("moe_request_prefill_time_seconds_sum") == pytest.approx(prefill)


def test_max_tokens_reserves_nothing_up_front(tiny):
    """Blocks follow the tokens really in the cache: a request allowed 400 new tokens holds one block
    after a 3-token prompt, so many such requests run together in a pool far smaller than their sum."""
    model, tok = tiny
    engine = make_engine(model, tok, block_size=16, kv_blocks=33, max_num_seqs=8)
    from runtime.engine import Sequence
    from runtime.sampling import SamplingParams

    seqs = [Sequence(f"m{i}", prompt(i, 3), SamplingParams(max_new_tokens=400, ignore_eos=True)) for i in range(8)]
    engine.submit(seqs)
    engine.step()
    assert len(engine.scheduler.running) == 8  # 8 × 403 tokens would need 208 blocks up front
    assert all(len(s.blocks.blocks) == 1 for s in seqs)
    for s in seqs:
        engine.abort(s.id)
    engine.step()
    assert engine.allocator.usage() == 0.0


# ---- chunked prefill ------------------------------------------------------------------------------
@pytest.mark.parametrize("mixed_steps", [True, False], ids=["one-forward", "two-forwards"])
def test_chunked_prefill_mixed_with_decode_gives_each_sequence_its_alone_tokens(tiny, mixed_steps):
    """Budget 16 tokens per step: a 100-token prompt arriving while three sequences decode is prefilled
    over several steps, each of which still decodes the three; everyone's tokens equal their alone run.
    By default such a step is one forward (decode rows and the prompt chunk together), else two."""
    model, tok = tiny
    short = [prompt(i, 5 + i) for i in range(3)]
    long = prompt(9, 100)
    alone = [run(make_engine(model, tok), [p], n)[0] for p, n in ((short[0], 40), (short[1], 40), (short[2], 40))]
    long_alone = run(make_engine(model, tok), [long], 8)[0]

    engine = make_engine(model, tok, max_num_batched_tokens=16, max_num_seqs=8, mixed_steps=mixed_steps)
    from runtime.engine import Sequence
    from runtime.sampling import SamplingParams

    out: dict[str, list[int]] = {}
    finished: set[str] = set()

    def seq(name, p, n):
        def on(ev):
            out[name].extend(ev.token_ids)
            if ev.finish_reason:
                finished.add(name)

        out[name] = []
        return Sequence(name, p, SamplingParams(max_new_tokens=n, ignore_eos=True), on)

    engine.submit([seq(f"s{i}", p, 40) for i, p in enumerate(short)])
    for _ in range(3):
        engine.step()
    long_seq = seq("long", long, 8)
    engine.submit([long_seq])
    mixed, forwards = 0, []
    hook = model.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        while len(finished) < 4:
            decoding = sum(s.prefilled for s in engine.scheduler.running if s is not long_seq)
            computed, was_prefilled = long_seq.num_computed, long_seq.prefilled
            forwards.clear()
            engine.step()
            grew = long_seq.num_computed - computed
            if grew and not was_prefilled and decoding == 3:
                mixed += 1
                assert grew <= 16 - 3  # the decodes take their share of the budget first
                assert len(forwards) == (1 if mixed_steps else 2)
    finally:
        hook.remove()
    assert mixed >= 100 // 13  # the prompt went in chunks, each step alongside the three decodes
    assert [out[f"s{i}"] for i in range(3)] == alone
    assert out["long"] == long_alone


def test_a_mixed_forward_equals_a_decode_step_and_a_prefill_apart(tiny):
    """One forward whose first rows decode (cached context) and whose rest is a fresh prompt and a prompt's
    second chunk: the same logits (fp32, 1e-5) and the same cache contents as the decode step and the
    prefill forward run apart."""
    import torch

    from runtime.kv_cache import PagedKVCache, decode_metadata, prefill_metadata

    model, _ = tiny
    cache = PagedKVCache(model.config, 64, BS)

    ctx = [20, 33, 7, 18]  # three decoding sequences; the fourth's first 18 prompt tokens are cached
    tabs = [block_table(i, n + 30) for i, n in enumerate(ctx)]
    with torch.inference_mode():
        ids = torch.tensor([t for i, n in enumerate(ctx) for t in prompt(i, n)])
        meta = prefill_metadata(ctx, ctx, tabs, [x for i, n in enumerate(ctx) for x in token_slots(tabs[i], 0, n)])
        model(ids, torch.cat([torch.arange(n) for n in ctx]), meta, cache)
        before = cache.tensor.clone()
        fresh, rest = prompt(8, 25), prompt(3, 40)[18:30]  # a new prompt; the 4th's next 12 tokens
        tab5 = block_table(5, 25)
        dec_slots = [token_slots(tabs[i], n, 1)[0] for i, n in enumerate(ctx[:3])]
        pre_slots = token_slots(tab5, 0, 25) + token_slots(tabs[3], 18, 12)

        dmeta = decode_metadata([n + 1 for n in ctx[:3]], tabs[:3], dec_slots)
        apart = [model(torch.tensor([5, 6, 7]), dmeta.context_lens - 1, dmeta, cache)]
        pmeta = prefill_metadata([25, 12], [25, 30], [tab5, tabs[3]], pre_slots)
        pos = torch.cat([torch.arange(25), torch.arange(18, 30)])
        apart.append(model(torch.tensor(fresh + rest), pos, pmeta, cache, logits_indices=torch.tensor([24, 36])))
        after_apart = cache.tensor.clone()

        cache.tensor.copy_(before)
        mmeta = prefill_metadata(
            [1, 1, 1, 25, 12], [21, 34, 8, 25, 30], [*tabs[:3], tab5, tabs[3]], dec_slots + pre_slots, num_decode=3
        )
        pos = torch.cat([torch.tensor(ctx[:3]), torch.arange(25), torch.arange(18, 30)])
        ids = torch.tensor([5, 6, 7, *fresh, *rest])
        together = model(ids, pos, mmeta, cache, logits_indices=torch.tensor([0, 1, 2, 27, 39]))
    want = torch.cat(apart)
    assert (together - want).abs().max() <= 1e-5 * want.abs().max()
    torch.testing.assert_close(cache.tensor, after_apart, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="decode rows must have query length 1"):
        prefill_metadata([2, 5], [9, 5], [[1], [2]], list(range(7)), num_decode=1)


def test_a_steps_prompt_groups_run_in_one_forward_with_the_logits_of_each_group_apart(tiny):
    """Chunks that attention treats apart (two fresh prompts of close length: one padded call; a much longer
    fresh one; a chunk after a cached prefix: read back from the pool) in one forward give each group's
    logits run apart (fp32, 1e-5); and the engine runs such a step as one forward, tokens as alone."""
    import torch

    from runtime.kv_cache import PagedKVCache, prefill_metadata

    model, tok = tiny
    cache = PagedKVCache(model.config, 64, BS)

    groups = [[(0, 20, 0), (1, 18, 0)], [(2, 60, 0)], [(3, 30, 18)]]  # (sequence, context after, cached)
    tabs = {i: block_table(i, n) for g in groups for i, n, _ in g}
    with torch.inference_mode():
        cached = prefill_metadata([18], [18], [tabs[3]], token_slots(tabs[3], 0, 18))
        model(torch.tensor(prompt(3, 18)), torch.arange(18), cached, cache)
        before = cache.tensor.clone()

        def forward(gs: list, sizes: list[int] | None) -> torch.Tensor:
            chunks = [c for g in gs for c in g]
            qlens = [n - k for _, n, k in chunks]
            ids = torch.tensor([t for i, n, k in chunks for t in prompt(i, n)[k:]])
            pos = torch.cat([torch.arange(k, n) for _, n, k in chunks])
            sl = [x for i, n, k in chunks for x in token_slots(tabs[i], k, n - k)]
            meta = prefill_metadata(qlens, [n for _, n, _ in chunks], [tabs[i] for i, _, _ in chunks], sl)
            meta = dataclasses.replace(meta, prompt_groups=None if sizes is None else tuple(sizes))
            return model(ids, pos, meta, cache, logits_indices=torch.tensor(qlens).cumsum(0) - 1)

        apart = torch.cat([forward([g], None) for g in groups])
        cache.tensor.copy_(before)
        together = forward(groups, [len(g) for g in groups])
        cache.tensor.copy_(before)
        looped = forward(groups, None)  # one ragged group: attention loops over the sequences
    for got in (together, looped):
        assert (got - apart).abs().max() <= 1e-5 * apart.abs().max()
    with pytest.raises(ValueError, match="do not cover"):
        prefill_metadata([3, 4], [3, 4], None, None, prompt_groups=[1]).prompt_parts()

    lengths = (20, 18, 40)
    alone = [run(make_engine(model, tok), [prompt(i, n)], 6)[0] for i, n in enumerate(lengths)]
    engine = make_engine(model, tok, max_num_batched_tokens=64)
    forwards: list = []
    hook = model.register_forward_pre_hook(lambda _, args: forwards.append(args[2]))
    try:
        together_tokens = run(engine, [prompt(i, n) for i, n in enumerate(lengths)], 6)
    finally:
        hook.remove()
    first = forwards[0]  # 20 + 18 fresh, then the 40-token prompt's first 26: two groups, one forward
    assert first.query_lens == [20, 18, 26] and first.prompt_groups == (2, 1)
    assert together_tokens == alone


def test_chunks_over_cached_context_attend_as_one_batch_with_the_logits_of_the_loop(tiny, monkeypatch):
    """Three prompts whose first 18-20 tokens are cached (a shared system prompt, say) continue with chunks of
    close length: one batched attention call over their contexts gathered from the pool gives the logits of
    attending one sequence at a time (fp32, 1e-5); past the context-row cap, the loop runs instead."""
    import torch

    import runtime.kv_cache
    import runtime.model as model_module
    from runtime.kv_cache import PagedKVCache, prefill_metadata

    model, _ = tiny
    cache = PagedKVCache(model.config, 64, BS)
    chunks = [(0, 18, 12), (1, 20, 10), (2, 18, 11)]  # (sequence, cached, new)
    tabs = {i: block_table(i, k + n) for i, k, n in chunks}

    def slots(i: int, start: int, n: int) -> list[int]:
        return token_slots(tabs[i], start, n)

    batched: list[int] = []
    real = model_module.MLAttention._prefill_cached_padded

    def spy(self, *args, **kwargs):
        batched.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(model_module.MLAttention, "_prefill_cached_padded", spy)
    with torch.inference_mode():
        for i, k, _ in chunks:
            meta = prefill_metadata([k], [k], [tabs[i]], slots(i, 0, k))
            model(torch.tensor(prompt(i, k)), torch.arange(k), meta, cache)
        before = cache.tensor.clone()

        def forward() -> torch.Tensor:
            ids = torch.tensor([t for i, k, n in chunks for t in prompt(i, k + n)[k:]])
            pos = torch.cat([torch.arange(k, k + n) for _, k, n in chunks])
            sl = [x for i, k, n in chunks for x in slots(i, k, n)]
            qlens = [n for _, _, n in chunks]
            meta = prefill_metadata(qlens, [k + n for _, k, n in chunks], [tabs[i] for i, _, _ in chunks], sl)
            return model(ids, pos, meta, cache, logits_indices=torch.tensor(qlens).cumsum(0) - 1)

        together = forward()
        assert batched, "the chunks should have attended as one batch"
        batched.clear()
        cache.tensor.copy_(before)
        monkeypatch.setattr(runtime.kv_cache, "CACHED_BATCH_MAX_CONTEXT_ROWS", 3 * 30 - 1)
        looped = forward()
        assert not batched
    assert (together - looped).abs().max() <= 1e-5 * looped.abs().max()


def test_warm_up_runs_a_long_step_a_cached_chunk_and_a_mixed_step(tiny):
    """What serving will run is run once before readiness: a full-budget prefill, a chunk attending to
    cached context, and a mixed forward (decode rows beside a prompt chunk); nothing is left behind, in the
    cache or in the metrics (its steps and requests are not traffic; the first request after it is)."""
    from runtime.metrics import ServiceMetrics

    model, tok = tiny
    m = ServiceMetrics()
    engine = make_engine(model, tok, m, max_num_batched_tokens=64)
    seen = []
    hook = model.register_forward_pre_hook(lambda _, args: seen.append(args[2]))
    engine.start()
    try:
        engine.warm_up()
    finally:
        hook.remove()
        engine.stop()
    prompt_rows = [sum(m.query_lens) for m in seen if not m.is_decode]
    assert max(prompt_rows) >= 64 - 8  # the long prompt's first chunk: the budget less the short prompt
    assert any(m.num_decode and m.context_lens_cpu[-1] > m.query_lens[-1] for m in seen)  # mixed, cached chunk
    assert engine.allocator.usage() == 0.0 and engine.num_inflight() == 0

    def total(name: str) -> float:
        return m.registry.get_sample_value(name, {c.LABEL_MODEL_NAME: ""})

    assert len(seen) > 3
    assert total("moe_iteration_tokens_count") == total("moe_time_to_first_token_seconds_count") == 0
    engine._closed = engine._stop = False  # the same engine, stepped by hand from here
    run(engine, [prompt(1, 10)], 3)
    # the prompt's step, then one row per decode step (two, and one more overlapped step that the length ends)
    steps = total("moe_iteration_tokens_count")
    assert steps in (3, 4) and total("moe_iteration_tokens_sum") == 10 + steps - 1


def test_the_engine_paces_prompts_from_its_own_step_times(tiny):
    """The default engine feeds every step's wall time to its pacer, which learns a decode-only time and a
    prompt cost from the real model; a long prompt beside decodes still yields everyone's alone tokens.
    Without a bound there is no pacer."""
    model, tok = tiny
    short, long = [prompt(i, 6) for i in range(3)], prompt(9, 120)
    alone = run(make_engine(model, tok, max_decode_stall=None), [*short, long], [30, 30, 30, 6])
    assert make_engine(model, tok, max_decode_stall=None).pacer is None
    engine = make_engine(model, tok, max_num_batched_tokens=48)  # the long prompt goes in beside the decodes
    assert run(engine, [*short, long], [30, 30, 30, 6]) == alone
    pacer = engine.pacer
    assert pacer.steps == engine.steps
    assert pacer.decode_s and all(t > 0 for t in pacer.decode_s.values())
    assert pacer.token_s is not None and pacer.token_s > 0


def test_steps_the_pacer_cuts_short_are_counted(tiny):
    """A pacer that allows 8 prompt tokens beside decodes: the long prompt's chunks shrink to 8, each such
    step counts in moe_paced_steps_total, and the tokens are still everyone's alone tokens."""
    from runtime.engine.pacing import PrefillPacer
    from runtime.metrics import ServiceMetrics

    class EightTokens(PrefillPacer):
        def prompt_budget(self, decoding: int, starting: int = 0) -> int | None:
            return 8 if decoding else None

    model, tok = tiny
    short, long = [prompt(i, 6) for i in range(2)], prompt(9, 50)
    alone = run(make_engine(model, tok, max_decode_stall=None), [*short, long], [12, 12, 3])
    m = ServiceMetrics()
    engine = make_engine(model, tok, m)
    engine.pacer = EightTokens(max_stall=2.0)
    from runtime.engine import Sequence
    from runtime.sampling import SamplingParams

    out: list[list[int]] = [[], [], []]
    got = [
        Sequence(
            f"p{i}", p, SamplingParams(max_new_tokens=n, ignore_eos=True), lambda ev, i=i: out[i].extend(ev.token_ids)
        )
        for i, (p, n) in enumerate(zip([*short, long], [12, 12, 3], strict=True))
    ]
    engine.submit(got[:2])
    engine.step()  # the two short prompts, nothing decoding yet: no cap
    engine.submit(got[2:])
    grew = []
    while any(s.finish_reason is None for s in got):
        before = got[2].num_computed
        engine.step()
        grew.append(got[2].num_computed - before)
    assert max(grew) == 8 and sum(grew) == 50
    assert m.paced_steps._value.get() == 50 // 8  # the last chunk of 2 fits: not held back
    assert out == alone


# ---- prefix caching -------------------------------------------------------------------------------
def _first_logits(engine, p):
    """Logits of the prefill that completes prompt ``p`` (recorded at the sampler)."""
    from runtime.engine import Sequence
    from runtime.sampling import SamplingParams

    seen = []
    sample_rows = engine.runner.sample_rows

    def record(logits, seqs):
        seen.append(logits.clone())
        return sample_rows(logits, seqs)

    engine.runner.sample_rows = record
    s = Sequence("probe", p, SamplingParams(max_new_tokens=1, ignore_eos=True))
    engine.submit([s])
    while s.finish_reason is None:
        engine.step()
    engine.runner.sample_rows = sample_rows
    return seen[0][0]


def test_prefix_cache_hit_gives_the_cold_prefill_logits(tiny):
    import torch

    from runtime.metrics import ServiceMetrics

    model, tok = tiny
    system = prompt(3, 70)  # 4 full blocks of 16 + 6 tokens
    first, second = system + prompt(4, 9), system + prompt(5, 12)
    m = ServiceMetrics()
    warm = make_engine(model, tok, m)
    run(warm, [first], 3)
    queries, hits = m.prefix_cache_queries._value.get(), m.prefix_cache_hits._value.get()
    assert (queries, hits) == (len(first), 0)
    hot = _first_logits(warm, second)
    assert m.prefix_cache_hits._value.get() == 64  # the shared full blocks were not prefilled again
    assert m.prefix_cache_queries._value.get() == len(first) + len(second)
    cold = _first_logits(make_engine(model, tok, prefix_caching=False), second)
    assert torch.allclose(hot, cold, atol=1e-5, rtol=0), (hot - cold).abs().max()
    # whole generations agree too, with the prefix cached and the prompt chunked after it
    chunked = make_engine(model, tok, max_num_batched_tokens=8)
    run(chunked, [first], 2)
    assert run(chunked, [second], 12) == run(make_engine(model, tok, prefix_caching=False), [second], 12)


def test_repeated_system_prompt_is_prefilled_once(tiny):
    model, tok = tiny
    system = prompt(6, 64)
    users = [system + prompt(10 + i, 5) for i in range(6)]
    engine = make_engine(model, tok, max_num_seqs=8)
    out_seq = run(engine, users[:1], 4) + run(engine, users[1:], 4)
    prefilled = []
    real = engine.stats.prefill
    engine.stats.prefill = lambda n, pad: (prefilled.append(n), real(n, pad))
    again = run(engine, users, 4)
    assert sum(prefilled) == 6 * 5  # only the user parts: the 64-token system prompt hits the cache
    assert again == out_seq
    assert out_seq == run(make_engine(model, tok, prefix_caching=False, max_num_seqs=8), users, 4)


def test_prefix_caching_survives_eviction_pressure(tiny):
    """A pool too small to keep every prefix: cached blocks are evicted LRU and reused; outputs unchanged."""
    model, tok = tiny
    prompts = [prompt(20 + i % 3, 40) for i in range(9)]  # three prefixes, each repeated three times
    ref = run(make_engine(model, tok, prefix_caching=False, block_size=4), prompts, 6)
    engine = make_engine(model, tok, block_size=4, kv_blocks=30, max_num_seqs=2)
    assert run(engine, prompts, 6) == ref


def test_engine_thread_completes_every_request_under_a_tiny_pool(tiny):
    """The threaded engine (overlapped decode) with a pool that forces preemptions: all finish, nothing leaks."""
    model, tok = tiny
    from runtime.engine import Sequence
    from runtime.sampling import SamplingParams

    engine = make_engine(model, tok, block_size=4, kv_blocks=30, max_num_seqs=6)
    done = threading.Semaphore(0)
    outs = {}

    def on(name):
        def f(ev):
            outs.setdefault(name, []).extend(ev.token_ids)
            if ev.finish_reason:
                done.release()

        return f

    prompts = [prompt(i, 10 + i) for i in range(12)]
    engine.start()
    try:
        engine.submit(
            [
                Sequence(f"t{i}", p, SamplingParams(max_new_tokens=40, ignore_eos=True), on(f"t{i}"))
                for i, p in enumerate(prompts)
            ]
        )
        for _ in prompts:
            assert done.acquire(timeout=120)
    finally:
        engine.stop()
    assert engine.scheduler.num_preemptions > 0
    assert engine.allocator.usage() == 0.0
    ref = run(make_engine(model, tok, max_num_seqs=12), prompts, 40)
    assert [outs[f"t{i}"] for i in range(12)] == ref


def test_a_follow_up_turn_hits_the_blocks_its_answer_filled(tiny):
    """Blocks filled by decode steps are cached too: a prompt repeating an earlier prompt and its answer
    (the next turn of a conversation) skips both; its output equals a cold engine's."""
    from runtime.metrics import ServiceMetrics

    model, tok = tiny
    first = prompt(30, 20)
    m = ServiceMetrics()
    engine = make_engine(model, tok, m)
    answer = run(engine, [first], 40)[0]
    turn = first + answer + prompt(31, 5)
    hits_before = m.prefix_cache_hits._value.get()
    again = run(engine, [turn], 6)
    assert m.prefix_cache_hits._value.get() - hits_before == 48  # 3 full blocks of the 60 earlier tokens
    assert again == run(make_engine(model, tok, prefix_caching=False), [turn], 6)
