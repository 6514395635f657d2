"""The real terraform binary: validate every stack offline; apply → replan → destroy against the emulator."""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from infra.terraform.runner import Terraform
from tests.infra.lifecycle import LIVE_CHECKS


def _init_and_validate(stack_dir: Path, workdir: Path) -> None:
    tf = Terraform.from_stack(stack_dir, workdir)
    # S3 backends would need credentials to initialise; validation does not need the backend.
    tf.run("init", "-backend=false", "-input=false")
    tf.validate()


@pytest.mark.terraform
def test_validate_every_stack(synth_dir: Path, tmp_path: Path) -> None:
    # Stacks are independent; inits take turns on the plugin cache (runner), validations run side by side.
    with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        jobs = [pool.submit(_init_and_validate, d, tmp_path / d.name) for d in sorted(synth_dir.iterdir())]
        for job in jobs:
            job.result()


@pytest.mark.terraform
@pytest.mark.slow
@pytest.mark.parametrize("env_name", list(LIVE_CHECKS))
def test_apply_replan_destroy(lifecycles: dict[str, Future[dict[str, float]]], env_name: str) -> None:
    """Every resource type applied for real, live checks, an empty replan, a clean destroy: local (devtest),
    large-emu (placement group, EFA, capacity reservation), medium-emu (FSx + data repository association
    + FSx CSI add-on) and prod-cb (prod on a Capacity Block for ML: CAPACITY_BLOCK node group, no placement
    group). Started at the beginning of the session; this test collects the result."""
    timings = lifecycles[env_name].result()
    print(f"\n{env_name}: apply {timings['apply']:.1f} s, destroy {timings['destroy']:.1f} s")
