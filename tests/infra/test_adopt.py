"""`moefleet adopt`: after an interrupted `cdktf deploy`, import the objects AWS holds but the state does not.

Real terraform (the local environment's own provider block, on a one-VPC configuration with a tag of its own)
against the shared emulator: a VPC created outside terraform with the stack's tags stands for the object an
interrupt left behind. `--check` lists it and imports nothing; `adopt` imports it (the state then holds it,
and a plan creates nothing); a second copy is reported with exit 4 and left in place."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from infra.catalog.exit_codes import ExitCode
from infra.terraform.runner import Terraform
from tests.infra.lifecycle import aws

REPO = Path(__file__).resolve().parents[2]


def one_vpc_stack(stacks: dict[str, dict], tag: str) -> dict[str, Any]:
    provider = json.loads(json.dumps(stacks["local"]["provider"]))
    provider["aws"][0]["default_tags"] = [{"tags": {"environment": tag, "project": "moe-fleet"}}]
    return {
        "terraform": {"required_providers": stacks["local"]["terraform"]["required_providers"]},
        "provider": provider,
        "resource": {"aws_vpc": {"net": {"cidr_block": "10.198.0.0/16", "tags": {"Name": f"{tag}-net"}}}},
    }


def moefleet(*args: str, environments: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "infra.cli", *args, "--environments", str(environments)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_adopt_imports_what_an_interrupt_left_and_reports_copies(
    emulator: str, stacks: dict[str, dict], environments_file: Path, tmp_path: Path
) -> None:
    tag = f"adopt-{uuid.uuid4().hex[:8]}"
    workdir = tmp_path / "stack"
    workdir.mkdir()
    (workdir / "cdk.tf.json").write_text(json.dumps(one_vpc_stack(stacks, tag)))
    tf = Terraform(workdir)
    tf.init()
    ec2 = aws("ec2", emulator)
    stack_tags = {"Name": f"{tag}-net", "environment": tag, "project": "moe-fleet"}
    tags = [{"ResourceType": "vpc", "Tags": [{"Key": k, "Value": v} for k, v in stack_tags.items()]}]
    left = ec2.create_vpc(CidrBlock="10.198.0.0/16", TagSpecifications=tags)["Vpc"]["VpcId"]
    copy = None
    try:
        check = moefleet("adopt", "local", "--stack-dir", str(workdir), "--check", environments=environments_file)
        assert check.returncode == ExitCode.OK, check.stdout + check.stderr
        assert "aws_vpc.net" in check.stdout and left in check.stdout and "would import" in check.stdout
        assert tf.run("state", "list", check=False).stdout.strip() == ""  # --check imported nothing

        done = moefleet("adopt", "local", "--stack-dir", str(workdir), environments=environments_file)
        assert done.returncode == ExitCode.OK, done.stdout + done.stderr
        assert "imported 1 object" in done.stdout
        assert tf.run("state", "list").stdout.split() == ["aws_vpc.net"]
        state = json.loads(tf.run("state", "pull").stdout)  # `state show` would start the provider
        assert [i["attributes"]["id"] for r in state["resources"] for i in r["instances"]] == [left]
        assert tf.plan() == 0, "the adopted VPC should need no change and nothing new"
        again = moefleet("adopt", "local", "--stack-dir", str(workdir), environments=environments_file)
        assert again.returncode == ExitCode.OK and "holds every object" in again.stdout

        copy = ec2.create_vpc(CidrBlock="10.198.0.0/16", TagSpecifications=tags)["Vpc"]["VpcId"]
        refused = moefleet("adopt", "local", "--stack-dir", str(workdir), environments=environments_file)
        assert refused.returncode == ExitCode.CHECK_FAILED, refused.stdout + refused.stderr
        assert copy in refused.stdout and "left as is" in refused.stdout
        live = {v["VpcId"] for v in ec2.describe_vpcs(Filters=[{"Name": "tag:environment", "Values": [tag]}])["Vpcs"]}
        assert live == {left, copy}, "adopt must never delete"
    finally:
        for vpc in filter(None, (left, copy)):
            ec2.delete_vpc(VpcId=vpc)


def test_adopt_needs_a_deployed_stack(environments_file: Path, tmp_path: Path) -> None:
    missing = moefleet("adopt", "local", "--stack-dir", str(tmp_path), environments=environments_file)
    assert missing.returncode == ExitCode.BAD_INPUT
    assert "holds no synthesized stack" in missing.stderr + missing.stdout
