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


def adopt_scenario(emulator: str, stacks: dict[str, dict], environments_file: Path, workdir: Path) -> dict[str, Any]:
    """Run in the background from the start of the session (tests/conftest.py `adopt_job`): terraform and the
    CLI mostly wait. Records each step's exit code and output; the test asserts on the record."""
    tag = f"adopt-{uuid.uuid4().hex[:8]}"
    workdir.mkdir(parents=True)
    (workdir / "cdk.tf.json").write_text(json.dumps(one_vpc_stack(stacks, tag)))
    tf = Terraform(workdir)
    tf.init()
    ec2 = aws("ec2", emulator)
    stack_tags = {"Name": f"{tag}-net", "environment": tag, "project": "moe-fleet"}
    tags = [{"ResourceType": "vpc", "Tags": [{"Key": k, "Value": v} for k, v in stack_tags.items()]}]
    out: dict[str, Any] = {"left": ec2.create_vpc(CidrBlock="10.198.0.0/16", TagSpecifications=tags)["Vpc"]["VpcId"]}
    made = [out["left"]]

    def adopt(*args: str) -> tuple[int, str]:
        proc = moefleet("adopt", "local", "--stack-dir", str(workdir), *args, environments=environments_file)
        return proc.returncode, proc.stdout + proc.stderr

    try:
        out["check"] = adopt("--check")
        out["state_after_check"] = tf.run("state", "list", check=False).stdout.strip()
        out["done"] = adopt()
        out["state_after"] = tf.run("state", "list").stdout.split()
        state = json.loads(tf.run("state", "pull").stdout)  # `state show` would start the provider
        out["state_ids"] = [i["attributes"]["id"] for r in state["resources"] for i in r["instances"]]
        out["replan"] = tf.plan()
        out["again"] = adopt()
        made.append(ec2.create_vpc(CidrBlock="10.198.0.0/16", TagSpecifications=tags)["Vpc"]["VpcId"])
        out["copy"] = made[-1]
        out["refused"] = adopt()
        filters = [{"Name": "tag:environment", "Values": [tag]}]
        out["live"] = {v["VpcId"] for v in ec2.describe_vpcs(Filters=filters)["Vpcs"]}
    finally:
        for vpc in made:
            ec2.delete_vpc(VpcId=vpc)
    return out


def test_adopt_imports_what_an_interrupt_left_and_reports_copies(adopt_job) -> None:  # type: ignore[no-untyped-def]
    got = adopt_job.result()
    left, copy = got["left"], got["copy"]
    code, text = got["check"]
    assert code == ExitCode.OK, text
    assert "aws_vpc.net" in text and left in text and "would import" in text
    assert got["state_after_check"] == ""  # --check imported nothing

    code, text = got["done"]
    assert code == ExitCode.OK, text
    assert "imported 1 object" in text
    assert got["state_after"] == ["aws_vpc.net"] and got["state_ids"] == [left]
    assert got["replan"] == 0, "the adopted VPC should need no change and nothing new"
    code, text = got["again"]
    assert code == ExitCode.OK and "holds every object" in text, text

    code, text = got["refused"]
    assert code == ExitCode.CHECK_FAILED, text
    assert copy in text and "left as is" in text
    assert got["live"] == {left, copy}, "adopt must never delete"


def test_adopt_needs_a_deployed_stack(environments_file: Path, tmp_path: Path) -> None:
    missing = moefleet("adopt", "local", "--stack-dir", str(tmp_path), environments=environments_file)
    assert missing.returncode == ExitCode.BAD_INPUT
    assert "holds no synthesized stack" in missing.stderr + missing.stdout
