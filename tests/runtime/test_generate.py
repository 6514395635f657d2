"""Generation controls, sampling, tokenizer and CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from runtime.cli import main
from runtime.generate import Generator
from runtime.loader import Tokenizer, load_model
from runtime.sampling import SamplingParams, filter_logits, sample


@pytest.fixture(scope="module")
def gen(v2_path: Path) -> Generator:
    return Generator(load_model(v2_path), Tokenizer(v2_path), max_batch=4, max_model_len=128)


PROMPTS = ["Risk score:", "User: Is the order risky?\n\nAssistant:"]


def test_seeded_sampling_is_reproducible_and_batch_independent(gen: Generator) -> None:
    p = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    a = gen.generate(PROMPTS, p)
    b = gen.generate(PROMPTS[::-1], p)[::-1]
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    other = gen.generate(PROMPTS, SamplingParams(max_new_tokens=10, temperature=1.0, seed=99, ignore_eos=True))
    greedy = gen.generate(PROMPTS, SamplingParams(max_new_tokens=10, ignore_eos=True))
    assert [r.token_ids for r in other] != [r.token_ids for r in a]
    assert [r.token_ids for r in a] != [r.token_ids for r in greedy]


def test_top_k_1_and_tiny_top_p_are_greedy(gen: Generator) -> None:
    greedy = gen.generate(PROMPTS, SamplingParams(max_new_tokens=8, ignore_eos=True))
    k1 = gen.generate(PROMPTS, SamplingParams(max_new_tokens=8, temperature=1.5, top_k=1, seed=3, ignore_eos=True))
    p0 = gen.generate(PROMPTS, SamplingParams(max_new_tokens=8, temperature=1.5, top_p=1e-6, seed=3, ignore_eos=True))
    assert [r.token_ids for r in k1] == [r.token_ids for r in greedy] == [r.token_ids for r in p0]


def test_filter_logits() -> None:
    x = torch.tensor([3.0, 1.0, 2.0, 0.0])
    assert torch.isinf(filter_logits(x, 1.0, 2, 1.0)).tolist() == [False, True, False, True]
    # softmax([3,2,1,0]) ≈ [.64,.24,.09,.03]: top_p 0.8 keeps the first two
    assert torch.isinf(filter_logits(x, 1.0, 0, 0.8)).tolist() == [False, True, False, True]
    torch.manual_seed(0)
    draws = sample(x.repeat(2000, 1), [SamplingParams(temperature=1.0)] * 2000, [None] * 2000)
    freq = torch.bincount(draws, minlength=4).float() / 2000
    assert torch.allclose(freq, x.softmax(-1), atol=0.04)


def test_stop_token_ids_and_max_tokens(gen: Generator) -> None:
    free = gen.generate(PROMPTS[:1], SamplingParams(max_new_tokens=6, ignore_eos=True))[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 6
    stop_at = free.token_ids[3]
    first = free.token_ids.index(stop_at)
    r = gen.generate(PROMPTS[:1], SamplingParams(max_new_tokens=6, stop_token_ids=[stop_at], ignore_eos=True))[0]
    assert r.finish_reason == "stop" and r.token_ids == free.token_ids[:first]


def test_stop_strings(gen: Generator) -> None:
    free = gen.generate(PROMPTS[:1], SamplingParams(max_new_tokens=12, ignore_eos=True))[0]
    assert len(free.text) > 4
    stop = free.text[2:4]
    r = gen.generate(PROMPTS[:1], SamplingParams(max_new_tokens=12, stop=[stop], ignore_eos=True))[0]
    assert r.finish_reason == "stop"
    assert r.text == free.text[: free.text.find(stop)]
    assert stop not in r.text


def test_eos_stops_unless_ignored(gen: Generator) -> None:
    free = gen.generate(PROMPTS[:1], SamplingParams(max_new_tokens=6, ignore_eos=True))[0]
    eos_list = gen.config.eos_token_id
    eos_list.append(free.token_ids[2])  # pretend the checkpoint lists this token as an EOS id
    try:
        r = gen.generate(PROMPTS[:1], SamplingParams(max_new_tokens=6))[0]
        ignored = gen.generate(PROMPTS[:1], SamplingParams(max_new_tokens=6, ignore_eos=True))[0]
    finally:
        eos_list.pop()
    first = free.token_ids.index(free.token_ids[2])
    assert r.finish_reason == "stop" and r.token_ids == free.token_ids[:first]
    assert ignored.token_ids == free.token_ids


def test_too_long_prompt_rejected(gen: Generator) -> None:
    with pytest.raises(ValueError, match="exceeds max_model_len=128"):
        gen.generate([list(range(3, 120))], SamplingParams(max_new_tokens=20))


def test_sampling_params_validation() -> None:
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)


def test_tokenizer_and_chat_template(v2_path: Path) -> None:
    tok = Tokenizer(v2_path)
    ids = tok.encode("Risk score: low. Answer yes or no.")
    assert ids[0] == tok.bos_token_id == 0 and tok.eos_token_id == 1
    assert tok.decode(ids) == "Risk score: low. Answer yes or no."
    for word in (" yes", " no", " low", " high"):
        assert len(tok.encode(word, add_bos=False)) == 1, word  # label words are single tokens
    text = tok.apply_chat_template([{"role": "user", "content": "Is it risky?"}])
    assert text == "<｜begin▁of▁sentence｜>User: Is it risky?\n\nAssistant:"
    assert tok.encode_chat([{"role": "user", "content": "hi"}])[0] == tok.bos_token_id


def test_cli_make_tiny(tmp_path: Path, capsys) -> None:
    assert main(["make-tiny", str(tmp_path / "t"), "--arch", "v3", "--seed", "5"]) == 0
    files = {p.name for p in (tmp_path / "t").iterdir()}
    assert {
        "config.json",
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    } <= files
    assert "wrote tiny v3 checkpoint" in capsys.readouterr().out
    assert load_model(tmp_path / "t").config.q_lora_rank == 24
    with pytest.raises(SystemExit):
        main(["make-tiny", str(tmp_path / "u"), "--arch", "v4"])
