"""Shared fixtures: tiny real checkpoints (safetensors shards on disk) built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.tiny import make_tiny

# name → (arch, seed, config overrides). One parity config per DeepSeek routing variant (greedy,
# group_limited_greedy, noaux_tc).
CHECKPOINTS = {
    "v2_greedy": ("v2", 1, {}),
    "v2_group": (
        "v2",
        2,
        {
            "topk_method": "group_limited_greedy",
            # DeepSeek-V2-Lite style YaRN (mscale == mscale_all_dim), scaled down to the tiny model
            "rope_scaling": {
                "type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 128,
                "beta_fast": 32,
                "beta_slow": 1,
                "mscale": 0.707,
                "mscale_all_dim": 0.707,
            },
        },
    ),
    "v3_noaux": ("v3", 3, {}),
}


@pytest.fixture(scope="session")
def ckpt_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ckpts")


@pytest.fixture(scope="session")
def ckpts(ckpt_root: Path, tiny_v2: Path) -> dict[str, Path]:
    shared = {"v2_greedy": tiny_v2}  # tests/conftest.py writes it (same folder name: it is the served model name)
    return {
        name: shared.get(name) or make_tiny(ckpt_root / name, arch=arch, seed=seed, **over)
        for name, (arch, seed, over) in CHECKPOINTS.items()
    }


@pytest.fixture(scope="session")
def v2_path(ckpts: dict[str, Path]) -> Path:
    return ckpts["v2_greedy"]
