"""Where a model or tokenizer named on the command line lives: a local folder, or a Hugging Face repo id
already in the local Hugging Face cache (looked up offline: serving never downloads).

Every failure says what is wrong - the path does not exist, the folder is not a checkpoint (no config.json,
no safetensors weights), the repo is not in the cache - and, for a repo, the command that downloads it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json")


class ModelSourceError(ValueError):
    """The named model or tokenizer cannot be used; the message says why and what to run."""


@dataclass(frozen=True)
class Source:
    path: Path
    repo_id: str | None = None  # set when found in the Hugging Face cache


def download_hint(repo_id: str) -> str:
    return (
        f"download it with `hf download {repo_id}` (or `huggingface-cli download {repo_id}`) into the "
        f"Hugging Face cache and pass the repo id again, or add `--local-dir DIR` and pass DIR"
    )


def find(spec: str, flag: str) -> Source:
    """A folder for ``spec``: the path itself when it exists, else the cached snapshot of the repo it names."""
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelSourceError(f"{flag} {spec}: is a file; expected a model folder")
        return Source(path)
    if not REPO_ID.match(spec):
        raise ModelSourceError(f"{flag} {spec}: no such folder")
    cached = _cached_snapshot(spec)
    if cached is None:
        raise ModelSourceError(
            f"{flag} {spec}: no such folder, and no Hugging Face repo {spec} in the local cache "
            f"({_cache_dir()}); {download_hint(spec)}"
        )
    return Source(cached, spec)


def checkpoint(spec: str, flag: str = "--model") -> Source:
    """A checkpoint folder: ``config.json`` and safetensors weights."""
    src = find(spec, flag)
    where = f"{flag} {spec}" + (f" (cached at {src.path})" if src.repo_id else "")
    fix = f"; {download_hint(src.repo_id)}" if src.repo_id else ""
    if not (src.path / "config.json").is_file():
        raise ModelSourceError(f"{where}: not a Hugging Face checkpoint folder (no config.json){fix}")
    if not any((src.path / w).is_file() for w in WEIGHTS):
        pickled = [p for p in PICKLED if (src.path / p).is_file()]
        why = (
            f"only PyTorch pickles ({', '.join(pickled)}); convert them to safetensors"
            if pickled
            else f"no weights ({' or '.join(WEIGHTS)})"
        )
        raise ModelSourceError(f"{where}: not a loadable checkpoint: {why}{fix}")
    return src


def tokenizer(spec: str, flag: str = "--tokenizer") -> Source:
    """A tokenizer folder: ``tokenizer.json`` (``tokenizer_config.json`` optional)."""
    src = find(spec, flag)
    if not (src.path / "tokenizer.json").is_file():
        where = f"{flag} {spec}" + (f" (cached at {src.path})" if src.repo_id else "")
        raise ModelSourceError(f"{where}: no tokenizer.json there")
    return src


def _cached_snapshot(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # the hub client is a runtime dependency; without it nothing is cached for us
        return None
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError):
        return None


def _cache_dir() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:
        return "the Hugging Face cache"
