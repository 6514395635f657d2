"""The tiny checkpoint's tokenizer reads the same in transformers as in the server: same ids for plain text
(BOS included, from the tokenizer's post-processor) and for chat prompts, same text back."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.loader import load_tokenizer

transformers = pytest.importorskip("transformers")  # a dev dependency: always installed in CI

TEXTS = ["The order was placed", "Hello world, this is a tiny language model.", "héllo € 😀", " leading space", ""]
CHATS = [
    [{"role": "user", "content": "Is the order risky?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Risk?"},
    ],
]


@pytest.fixture(scope="module")
def both(v2_path: Path):
    return transformers.AutoTokenizer.from_pretrained(v2_path), load_tokenizer(v2_path)


@pytest.mark.parametrize("text", TEXTS)
def test_text_ids_equal_transformers(both, text):
    hf, ours = both
    ids = ours.encode(text)
    assert ids[0] == ours.bos_token_id == hf.bos_token_id
    assert hf(text).input_ids == ids
    assert hf.decode(ids, skip_special_tokens=True) == ours.decode(ids) == text


@pytest.mark.parametrize("messages", CHATS, ids=["user", "multi-turn"])
def test_chat_ids_equal_transformers(both, messages):
    hf, ours = both
    got = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    got = got["input_ids"] if not isinstance(got, list) else got
    assert got == ours.encode_chat(messages)
    assert got.count(ours.bos_token_id) == 1  # the template's BOS, not a second one
