"""``serve --model REPO_ID`` from the local Hugging Face cache (offline), with ``--tokenizer`` and
``--chat-template`` overrides, over real HTTP with the ``openai`` client."""

from __future__ import annotations

import shutil
from pathlib import Path

import openai

from runtime.loader import load_tokenizer
from tests.runtime.service.conftest import run_server
from tests.runtime.test_model_source import REPO, fake_hf_cache

TEMPLATE = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant]"


def test_serve_a_cached_repo_with_tokenizer_and_template_overrides(v2_path: Path, tmp_path: Path):
    cache = tmp_path / "hub"
    fake_hf_cache(cache, REPO, v2_path)
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(v2_path / f, tok_dir / f)
    template = tmp_path / "chat.jinja"
    template.write_text(TEMPLATE)
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    args = ("--tokenizer", str(tok_dir), "--chat-template", str(template))
    with run_server(Path(REPO), *args, log_dir=tmp_path, env=env) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == [REPO]  # the repo id, not the snapshot hash
        msgs = [{"role": "user", "content": "Is the order risky?"}]
        r = client.chat.completions.create(model=REPO, messages=msgs, max_tokens=2, temperature=0)
    tok = load_tokenizer(tok_dir)
    tok.chat_template = TEMPLATE
    assert tok.apply_chat_template(msgs).endswith("[user] Is the order risky?\n[assistant]")
    assert r.usage.prompt_tokens == len(tok.encode_chat(msgs))
    assert r.usage.prompt_tokens != len(load_tokenizer(v2_path).encode_chat(msgs))  # the override was used
