"""The real terraform binary: validate every stack offline; apply → replan → destroy against the emulator."""

from __future__ import annotations

import time
from pathlib import Path

import boto3
import pytest

from infra.terraform import Terraform
from tests.infra.helpers import resource_types


@pytest.mark.terraform
def test_validate_every_stack(synth_dir: Path, tmp_path: Path) -> None:
    for stack_dir in sorted(synth_dir.iterdir()):
        tf = Terraform.from_stack(stack_dir, tmp_path / stack_dir.name)
        # S3 backends would need credentials to initialise; validation does not need the backend.
        tf.run("init", "-backend=false", "-input=false")
        tf.validate()


def apply_replan_destroy(stack_dir: Path, workdir: Path, stack: dict, emulator: str, check_live) -> dict[str, float]:  # type: ignore[no-untyped-def]
    tf = Terraform.from_stack(stack_dir, workdir)
    tf.init()
    timings = {}
    start = time.monotonic()
    tf.apply()
    timings["apply"] = time.monotonic() - start
    try:
        applied = {r["type"] for r in tf.state_resources() if r["mode"] == "managed"}
        assert applied == resource_types(stack), "every emitted resource type must be applied"
        check_live(tf.outputs())
        assert tf.plan() == 0, "replan after apply must show no changes (see docs/emulator.md for patched drift)"
    finally:
        start = time.monotonic()
        tf.destroy()
        timings["destroy"] = time.monotonic() - start
    assert not [r for r in tf.state_resources() if r["mode"] == "managed"]
    return timings


def aws(service: str, emulator: str):  # type: ignore[no-untyped-def]
    return boto3.client(
        service,
        endpoint_url=emulator,
        region_name="us-east-1",
        aws_access_key_id="emulated",
        aws_secret_access_key="emulated",
    )


@pytest.mark.terraform
@pytest.mark.slow
def test_local_apply_replan_destroy(synth_dir: Path, stacks: dict[str, dict], emulator: str, tmp_path: Path) -> None:
    def check_live(outputs: dict) -> None:
        eks = aws("eks", emulator)
        cluster = eks.describe_cluster(name=outputs["cluster_name"])["cluster"]
        assert cluster["status"] == "ACTIVE" and cluster["accessConfig"]["authenticationMode"] == "API"
        assert set(eks.list_addons(clusterName=outputs["cluster_name"])["addons"]) >= {"coredns", "vpc-cni"}
        group = eks.describe_nodegroup(clusterName=outputs["cluster_name"], nodegroupName=outputs["gpu_node_group"])
        assert group["nodegroup"]["taints"][0]["key"] == "nvidia.com/gpu"
        assert group["nodegroup"]["scalingConfig"]["minSize"] == 0

    timings = apply_replan_destroy(synth_dir / "local", tmp_path / "local", stacks["local"], emulator, check_live)
    print(f"\nlocal: apply {timings['apply']:.1f} s, destroy {timings['destroy']:.1f} s")


@pytest.mark.terraform
@pytest.mark.slow
def test_large_apply_replan_destroy(synth_dir: Path, stacks: dict[str, dict], emulator: str, tmp_path: Path) -> None:
    """The multi-node GPU layout (placement group, EFA security group, 32 EFA interfaces, capacity
    reservation) applied for real against the emulator."""

    def check_live(outputs: dict) -> None:
        ec2 = aws("ec2", emulator)
        groups = ec2.describe_placement_groups(GroupNames=[f"{outputs['cluster_name']}-gpu"])["PlacementGroups"]
        assert groups[0]["Strategy"] == "cluster"

    timings = apply_replan_destroy(
        synth_dir / "large-emu", tmp_path / "large", stacks["large-emu"], emulator, check_live
    )
    print(f"\nlarge-emu: apply {timings['apply']:.1f} s, destroy {timings['destroy']:.1f} s")
