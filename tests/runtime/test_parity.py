"""Parity with transformers (the reference implementation) on tiny random checkpoints, fp32.

Tolerance: relative error ‖ours − theirs‖ / ‖theirs‖ < 1e-4 on the logits of every prefill position and
every decode step; greedy tokens must be identical.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from runtime.execution import ExecutionOptions, MoEImpl
from runtime.generate import Generator
from runtime.kv_cache import BlockAllocator, PagedKVCache, SequenceBlocks, decode_metadata, prefill_metadata
from runtime.loader import Tokenizer, load_model
from runtime.sampling import SamplingParams
from tests.runtime.decoding import rel

transformers = pytest.importorskip("transformers")  # a dev dependency: always installed in CI

NAMES = ["v2_greedy", "v2_group", "v3_noaux"]
PROMPT = "The order was placed at night from a new device. Is this a fraud risk? Answer yes or no."
TOL = 1e-4


@pytest.fixture(scope="module")
def models(ckpts: dict[str, Path]):
    out = {}
    for name in NAMES:
        hf, info = transformers.AutoModelForCausalLM.from_pretrained(
            ckpts[name], dtype=torch.float32, output_loading_info=True
        )
        # transformers must read our tiny checkpoint completely: nothing missing, nothing left over
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
        out[name] = (hf.eval(), load_model(ckpts[name]), Tokenizer(ckpts[name]))
    return out


def test_configs_exercise_the_variants(models) -> None:
    v2g, v2r, v3 = (models[n][1].config for n in NAMES)
    assert (v2g.topk_method, v2g.scoring_func, v2g.q_lora_rank) == ("greedy", "softmax", None)
    assert (v2r.topk_method, v2r.rope.rope_type) == ("group_limited_greedy", "yarn")
    assert (v3.topk_method, v3.scoring_func, v3.rope.rope_type) == ("noaux_tc", "sigmoid", "yarn")
    assert v3.q_lora_rank is not None and v3.rope.mscale != v3.rope.mscale_all_dim
    for c in (v2g, v2r, v3):
        assert c.first_k_dense_replace >= 1
    hf_v3 = models["v3_noaux"][0]
    bias = hf_v3.model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.abs().sum() > 0  # the correction bias was loaded, so it steers routing in the test


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("absorb", [True, False], ids=["absorbed", "expanded"])
def test_prefill_and_decode_logits(models, name: str, absorb: bool) -> None:
    hf, ours, tok = models[name]
    ours.configure(ExecutionOptions(absorb=absorb))
    ids = tok.encode(PROMPT)
    n = len(ids)
    cache = PagedKVCache(ours.config, num_blocks=32, block_size=4)
    seq = SequenceBlocks(BlockAllocator(cache.num_blocks), cache.block_size)
    with torch.inference_mode():
        ref = hf(torch.tensor([ids]), use_cache=True)
        # transformers renamed past_key_values → cache in 5.2x; the GPU lab runs 5.17
        cache_kw = "cache" if "cache" in ref else "past_key_values"
        hf_cache = ref[cache_kw]
        slots = seq.append(n)
        out = ours(torch.tensor(ids), torch.arange(n), prefill_metadata([n], [n], [seq.blocks], slots), cache)
        assert out.shape == ref.logits[0].shape
        assert rel(out, ref.logits[0]) < TOL
        token = int(out[-1].argmax())
        for step in range(8):
            ref = hf(torch.tensor([[token]]), use_cache=True, **{cache_kw: hf_cache})
            hf_cache = ref[cache_kw]
            slots = seq.append(1)
            meta = decode_metadata([seq.num_tokens], [seq.blocks], slots, max_blocks=16)
            out = ours(torch.tensor([token]), torch.tensor([seq.num_tokens - 1]), meta, cache)
            err = rel(out, ref.logits[0])
            assert err < TOL, f"decode step {step}: rel err {err}"
            token = int(out[0].argmax())
    ours.configure(ExecutionOptions())


@pytest.mark.parametrize("name", NAMES)
def test_32_greedy_tokens_identical(models, name: str) -> None:
    hf, ours, tok = models[name]
    ids = tok.encode(PROMPT)
    with torch.inference_mode():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None)
    ref_new = ref[0, len(ids) :].tolist()
    assert len(ref_new) == 32
    res = Generator(ours, tok, max_batch=1, max_model_len=128).generate(
        [ids], SamplingParams(max_new_tokens=32, ignore_eos=True)
    )[0]
    assert res.token_ids == ref_new
    assert res.finish_reason == "length"


@pytest.mark.parametrize("name", NAMES)
def test_batched_generation_equals_one_at_a_time(models, name: str) -> None:
    _, ours, tok = models[name]
    prompts = [
        "Risk score:",
        PROMPT,
        "User: Is the order risky?\n\nAssistant:",
        "Amount 1250.00 USD, shipping address differs from billing address, email domain is new.",
    ]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    gen = Generator(ours, tok, max_batch=4, max_model_len=96)
    batched = gen.generate(prompts, params)
    single = [gen.generate([p], params)[0] for p in prompts]
    assert [r.token_ids for r in batched] == [r.token_ids for r in single]
    assert len({len(r.prompt_ids) for r in batched}) == len(prompts)  # really different lengths
    assert gen.allocator.usage() == 0.0  # every block returned


def test_chunked_prefill_over_cached_prefix_matches_full(models) -> None:
    """A prefill whose context starts with cached tokens (the engine's chunked prefill) equals a
    one-shot prefill of the whole prompt."""
    _, ours, tok = models["v3_noaux"]
    ids = tok.encode(PROMPT)
    n, cut = len(ids), 11
    cache = PagedKVCache(ours.config, num_blocks=32, block_size=4)
    seq = SequenceBlocks(BlockAllocator(cache.num_blocks), 4)
    with torch.inference_mode():
        full = ours(torch.tensor(ids), torch.arange(n), prefill_metadata([n], [n], None, None))
        slots = seq.append(cut)
        ours(
            torch.tensor(ids[:cut]),
            torch.arange(cut),
            prefill_metadata([cut], [cut], [seq.blocks], slots),
            cache,
        )
        slots = seq.append(n - cut)
        meta = prefill_metadata([n - cut], [n], [seq.blocks], slots)
        rest = ours(torch.tensor(ids[cut:]), torch.arange(cut, n), meta, cache)
    assert rel(rest, full[cut:]) < TOL


def test_grouped_mm_dispatch_equals_loop(models) -> None:
    """The grouped-GEMM path (used on Hopper) and the per-expert loop agree; torch._grouped_mm also
    runs on CPU in recent torch, so both paths are checked here."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.fail("torch._grouped_mm missing: torch too old for the grouped MoE path")
    _, ours, tok = models["v2_group"]
    ids = tok.encode(PROMPT + " " + PROMPT)
    meta = prefill_metadata([len(ids)], [len(ids)], None, None)
    with torch.inference_mode():
        ours.configure(ExecutionOptions(moe_impl=MoEImpl.LOOP))
        a = ours(torch.tensor(ids), torch.arange(len(ids)), meta)
        ours.configure(ExecutionOptions(moe_impl=MoEImpl.GROUPED))
        b = ours(torch.tensor(ids), torch.arange(len(ids)), meta)
    ours.configure(ExecutionOptions())
    assert rel(b, a) < 1e-5


def test_expert_load_counts(models) -> None:
    _, ours, tok = models["v2_greedy"]
    ours.reset_expert_load()
    ids = tok.encode(PROMPT)
    with torch.inference_mode():
        ours(torch.tensor(ids), torch.arange(len(ids)), prefill_metadata([len(ids)], [len(ids)], None, None))
    loads = ours.expert_load()
    cfg = ours.config
    assert sorted(loads) == [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    for counts in loads.values():
        assert counts.shape == (cfg.n_routed_experts,)
        assert int(counts.sum()) == len(ids) * cfg.num_experts_per_tok
    imb = ours.expert_load_imbalance()
    assert all(1.0 <= v <= cfg.n_routed_experts for v in imb.values())
    ours.reset_expert_load()
    assert all(v == 0.0 for v in ours.expert_load_imbalance().values())


def test_padded_batched_prefill_equals_per_sequence(models) -> None:
    """Fresh sequences of close lengths take the one-SDPA padded path; it equals running each alone."""
    _, ours, _ = models["v2_group"]
    lens = [20, 18, 17]
    seqs = [list(range(5 + i, 5 + i + n)) for i, n in enumerate(lens)]
    meta = prefill_metadata(lens, lens, None, None)
    assert meta.padded_index() is not None
    with torch.inference_mode():
        packed = ours(torch.tensor([t for s in seqs for t in s]), torch.cat([torch.arange(n) for n in lens]), meta)
        alone = torch.cat(
            [
                ours(torch.tensor(s), torch.arange(len(s)), prefill_metadata([len(s)], [len(s)], None, None))
                for s in seqs
            ]
        )
    assert rel(packed, alone) < 1e-5
    assert prefill_metadata([20, 4], [20, 4], None, None).padded_index() is None  # too much padding


def test_v3_rope_interleave_false(tmp_path: Path) -> None:
    """DeepSeek-V3's optional rotate-half rope layout (``rope_interleave: false``)."""
    from runtime.tiny import make_tiny

    path = make_tiny(tmp_path / "v3_half", arch="v3", seed=4, rope_interleave=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = load_model(path)
    assert not ours.config.rope_interleave
    ids = list(range(7, 40))
    with torch.inference_mode():
        ref = hf(torch.tensor([ids])).logits[0]
        out = ours(torch.tensor(ids), torch.arange(len(ids)), prefill_metadata([len(ids)], [len(ids)], None, None))
    assert rel(out, ref) < TOL
