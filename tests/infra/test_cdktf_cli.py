"""The pinned cdktf CLI drives our app: `cdktf synth` and `cdktf diff local` (offline, --skip-provider-lock)."""

from __future__ import annotations

import os
import subprocess
from concurrent.futures import Future
from pathlib import Path

import pytest

from infra.terraform.runner import PROJECT_ROOT, terraform_env

CDKTF = PROJECT_ROOT / "node_modules" / ".bin" / "cdktf"


def cdktf(args: list[str], emulator: str) -> subprocess.CompletedProcess[str]:
    assert CDKTF.exists(), "`make setup` installs the pinned cdktf CLI into node_modules"
    # `cdktf diff` runs its own `terraform init`, outside infra.terraform.runner's turn-taking on the shared plugin
    # cache: with several inits running at the start of the session, it gets a cache of its own
    own_cache = str(PROJECT_ROOT / ".cache" / "terraform" / "plugins-cdktf")
    env = terraform_env(
        {**os.environ, "MOEFLEET_EMULATOR_ENDPOINT": emulator, "CI": "1", "DISABLE_VERSION_CHECK": "1",
         "TF_PLUGIN_CACHE_DIR": own_cache}
    )  # fmt: skip
    env["JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION"] = "20"
    return subprocess.run([str(CDKTF), *args], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)


def synth_then_diff(emulator: str, out: Path) -> tuple[subprocess.CompletedProcess[str], ...]:
    """Both CLI runs (a few minutes of node + python + terraform), started in the background at the
    beginning of the session by tests/conftest.py; the test below checks what they printed."""
    synth = cdktf(["synth", "--output", str(out)], emulator)
    if synth.returncode != 0:
        return (synth,)
    return synth, cdktf(["diff", "local", "--skip-provider-lock", "--output", str(out)], emulator)


@pytest.mark.slow
@pytest.mark.terraform
def test_cdktf_synth_and_diff_local(cdktf_cli_run: Future[tuple[subprocess.CompletedProcess[str], ...]]) -> None:
    runs = cdktf_cli_run.result()
    synth = runs[0]
    assert synth.returncode == 0, synth.stdout[-2000:] + synth.stderr[-2000:]
    out = Path(synth.args[synth.args.index("--output") + 1])
    for env_name in ("local", "dev", "staging", "prod"):
        assert (out / "stacks" / env_name / "cdk.tf.json").exists()
    diff = runs[1]
    text = diff.stdout + diff.stderr
    assert diff.returncode == 0, text[-3000:]
    assert "Plan:" in text and "to add" in text, text[-2000:]
