"""``serve`` finds models as users have them - a folder, or a Hugging Face repo id in the local cache - and
says exactly what is wrong otherwise, with the command that fixes it; ``--dtype``, ``--tokenizer`` and
``--chat-template`` are checked before anything loads. (Serving a cached repo over HTTP:
tests/runtime/service/test_model_source_serving.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from runtime import contract as c
from runtime import hub
from runtime.cli import main

REPO = "acme/tiny-moe"


def fake_hf_cache(root: Path, repo_id: str, src: Path) -> Path:
    """A Hugging Face hub cache holding one snapshot of ``src`` as ``repo_id`` (refs/main → snapshot)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(src, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


@pytest.fixture
def hf_cache(tmp_path: Path, v2_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "hub"
    snapshot = fake_hf_cache(root, REPO, v2_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(root))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    return snapshot


def serve_error(capsys, *args: str) -> str:
    assert main(["serve", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err  # one line
    return err


def test_a_cached_repo_id_resolves_to_its_snapshot(hf_cache: Path):
    assert hub.checkpoint(REPO) == hub.Source(hf_cache, REPO)
    assert hub.tokenizer(REPO).path == hf_cache


def test_a_missing_repo_names_the_download_command(hf_cache, capsys):
    err = serve_error(capsys, "--model", "acme/absent")
    assert "no Hugging Face repo acme/absent in the local cache" in err
    assert "hf download acme/absent" in err and "huggingface-cli download acme/absent" in err


def test_path_problems_are_told_apart(tmp_path: Path, v2_path: Path, capsys):
    assert "no such folder" in serve_error(capsys, "--model", str(tmp_path / "nope"))
    assert "is a file" in serve_error(capsys, "--model", str(v2_path / "config.json"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "not a Hugging Face checkpoint folder (no config.json)" in serve_error(capsys, "--model", str(empty))
    (empty / "config.json").write_text((v2_path / "config.json").read_text())
    err = serve_error(capsys, "--model", str(empty))
    assert "no weights (model.safetensors or model.safetensors.index.json)" in err
    (empty / "pytorch_model.bin").write_bytes(b"\0")
    assert "only PyTorch pickles (pytorch_model.bin); convert them" in serve_error(capsys, "--model", str(empty))


def test_dtype_is_checked_when_arguments_are_parsed(v2_path: Path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--model", str(v2_path), "--dtype", "float8"])
    assert exc.value.code == 2
    assert "invalid choice: 'float8'" in capsys.readouterr().err
    monkeypatch.setenv(c.ENV_DTYPE, "half-ish")
    err = serve_error(capsys, "--model", str(v2_path))
    assert f"{c.ENV_DTYPE}='half-ish'" in err and "bfloat16" in err


def test_the_dtype_names_are_the_loaders():
    from runtime.loader import DTYPES

    assert set(c.DTYPES) == set(DTYPES)


def test_tokenizer_and_chat_template_overrides_are_checked(tmp_path: Path, v2_path: Path, capsys):
    m = str(v2_path)
    assert "no tokenizer.json there" in serve_error(capsys, "--model", m, "--tokenizer", str(tmp_path))
    assert "no such folder" in serve_error(capsys, "--model", m, "--tokenizer", str(tmp_path / "x"))
    assert "no such file" in serve_error(capsys, "--model", m, "--chat-template", str(tmp_path / "t.jinja"))
    bad = tmp_path / "bad.jinja"
    bad.write_text("{{ bos_token }}\n{% for m in messages %}{{ m['content'] }}")
    err = serve_error(capsys, "--model", m, "--chat-template", str(bad))
    assert str(bad) in err and "line 2" in err


def test_a_config_of_another_size_is_summarised(tmp_path: Path, v2_path: Path):
    """Hundreds of mis-shaped tensors: the first few and a count, with the likely cause."""
    from runtime.loader import SHOWN_TENSORS, CheckpointError, load_model

    ckpt = tmp_path / "ckpt"
    shutil.copytree(v2_path, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["moe_intermediate_size"] *= 2
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as exc:
        load_model(ckpt)
    msg = str(exc.value)
    total = int(msg.split("mis-shaped")[0].split()[-1])
    assert total > SHOWN_TENSORS
    assert msg.count(": checkpoint [") == SHOWN_TENSORS
    assert f"... and {total - SHOWN_TENSORS} more" in msg and "config.json does not describe these weights" in msg
