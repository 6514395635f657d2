"""The `moefleet` operations commands as a user runs them (the real entry point in .venv/bin, output into a
pipe): envs, cost, weights upload/verify/pull (bucket from --bucket or from an applied stack's terraform
outputs), status. Plus the cost arithmetic at function level."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from infra.catalog.environments import DEFAULT_ENVIRONMENTS_FILE, load_environments
from infra.catalog.outputs import OutputsError, representative_outputs
from infra.catalog.sizes import INSTANCE_TYPES, SIZES
from infra.ops import cost
from infra.ops.aws import make_client
from infra.terraform.outputs import OutputsUnavailable, read_stack_outputs
from infra.terraform.runner import Terraform

ROOT = Path(__file__).resolve().parents[2]
MOEFLEET = ROOT / ".venv" / "bin" / "moefleet"
STANDARD = ("local", "dev", "staging", "prod")


def moefleet(*args: str, endpoint: str | None = None, environments: Path | None = None, check: int | None = 0):
    env = dict(os.environ)
    env.pop("MOEFLEET_ENVIRONMENTS", None)
    if endpoint:
        env["MOEFLEET_EMULATOR_ENDPOINT"] = endpoint
    if environments:
        env["MOEFLEET_ENVIRONMENTS"] = str(environments)
    proc = subprocess.run([str(MOEFLEET), *args], capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    if check is not None:
        assert proc.returncode == check, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "\x1b[" not in proc.stdout + proc.stderr, "no terminal control codes into a pipe"
    assert "Traceback" not in proc.stderr
    return proc


def _env_file(tmp_path: Path, name: str, size: str = "devtest") -> Path:
    path = tmp_path / "environments.toml"
    path.write_text(
        f"""
[environments.{name}]
size = "{size}"
region = "us-east-1"
azs = ["us-east-1a", "us-east-1b"]
vpc_cidr = "10.93.0.0/16"
kubernetes_version = "1.33"
aws_endpoint = "http://127.0.0.1:4566"
tags = {{ owner = "tests" }}
state = {{ kind = "local" }}
"""
    )
    return path


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "deepseek_v2"}))
    (folder / "model.safetensors").write_bytes(os.urandom(400_000))
    return folder


# ---- envs and cost ----------------------------------------------------------------------------------


def test_envs_lists_every_environment_with_its_instance_types() -> None:
    out = moefleet("envs").stdout
    for env in load_environments(DEFAULT_ENVIRONMENTS_FILE).values():
        assert env.name in out and env.gpu_instance_type in out and env.size_spec.system_instance_type in out
    assert "p5.48xlarge (8× H100 80 GB)" in out and "0/0/2" in out and "16" in out
    for env in load_environments(DEFAULT_ENVIRONMENTS_FILE).values():
        assert f"{env.model.name}@{env.model.revision}" in out


def test_cost_estimate_adds_up_from_the_sizes_catalog() -> None:
    envs = load_environments(DEFAULT_ENVIRONMENTS_FILE)
    prod = cost.estimate(envs["prod"])
    gpu = prod.lines[0]
    assert gpu.usd_per_hour == pytest.approx(2 * INSTANCE_TYPES["p5.48xlarge"].usd_per_hour)
    assert prod.hourly == pytest.approx(sum(line.usd_per_hour for line in prod.lines))
    assert prod.monthly == pytest.approx(prod.hourly * cost.HOURS_PER_MONTH)
    assert prod.idle_monthly == pytest.approx(
        prod.monthly - sum(x.usd_per_month for x in prod.lines if x.scales_to_zero)
    )
    assert prod.source_capex_cny == SIZES[envs["prod"].size].source_capex_cny == 8_000_000
    assert prod.break_even_months == pytest.approx(8_000_000 / cost.CNY_PER_USD / prod.monthly)
    items = {line.item.split(" (")[0] for line in prod.lines}
    assert {
        "GPU nodes",
        "system nodes",
        "EKS control plane",
        "NAT gateways",
        "FSx for Lustre",
        "S3",
        "AMP samples",
    } <= {i.removesuffix(" ingested") for i in items}
    nat = next(x for x in prod.lines if x.item == "NAT gateways")
    assert nat.usd_per_hour == pytest.approx(3 * cost.SERVICE_PRICES["nat_gateway_hour"]), "prod: one NAT per AZ"
    dev = cost.estimate(envs["dev"])
    assert not any("FSx" in line.item for line in dev.lines), "devtest has no FSx"
    assert dev.monthly < cost.estimate(envs["staging"]).monthly < prod.monthly


def test_cost_command_prints_every_environment_with_list_price_date_and_break_even() -> None:
    out = moefleet("cost").stdout
    for name in STANDARD:
        assert f"{name} (" in out
    assert "List prices" in out and "2025-07" in out and "us-east-1" in out
    assert "¥8,000,000" in out and "break-even" in out and "months" in out
    single = moefleet("cost", "staging").stdout
    assert "staging (medium)" in single and "prod (large)" not in single


def test_unknown_environment_names_the_allowed_ones() -> None:
    for args in (("cost", "nope"), ("status", "nope"), ("weights", "pull", "nope", "--model", "m", "--revision",
                                                         "r", "--dest", "/tmp/x")):  # fmt: skip
        err = moefleet(*args, check=2).stderr
        assert "unknown environment 'nope'" in err and "allowed: local, dev, staging, prod" in err


# ---- weights ----------------------------------------------------------------------------------------


def test_weights_upload_verify_pull_through_the_cli(emulator: str, tmp_path: Path, checkpoint: Path) -> None:
    s3 = make_client("s3", "us-east-1", emulator)
    bucket = f"ops-cli-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    common = ("--model", "org/CLI-MoE", "--revision", "r1", "--bucket", bucket)
    up = moefleet("weights", "upload", "local", str(checkpoint), *common, endpoint=emulator)
    assert "2 uploaded, 0 already there" in up.stdout and "manifest written" in up.stdout
    assert "uploading: 100%" in up.stderr and "uploaded: model.safetensors" in up.stderr
    again = moefleet("weights", "upload", "local", str(checkpoint), *common, endpoint=emulator)
    assert "already complete" in again.stdout

    assert "2 file(s) match" in moefleet("weights", "verify", "local", *common, endpoint=emulator).stdout
    dest = tmp_path / "hot" / "CLI-MoE"
    pulled = moefleet("weights", "pull", "local", *common, "--dest", str(dest), endpoint=emulator)
    assert "2 downloaded, 0 reused" in pulled.stdout
    assert (dest / "model.safetensors").read_bytes() == (checkpoint / "model.safetensors").read_bytes()
    assert (
        "nothing to do" in moefleet("weights", "pull", "local", *common, "--dest", str(dest), endpoint=emulator).stdout
    )

    key = "models/org/CLI-MoE/r1/model.safetensors"
    meta = s3.head_object(Bucket=bucket, Key=key)["Metadata"]
    s3.put_object(Bucket=bucket, Key=key, Body=os.urandom(400_000), Metadata=meta)
    bad = moefleet("weights", "verify", "local", *common, endpoint=emulator, check=4)
    assert "model.safetensors: stored bytes hash to" in bad.stderr
    assert "1 of 2 file(s) bad" in bad.stderr
    assert moefleet("weights", "verify", "local", *common, "--quick", endpoint=emulator).returncode == 0


def test_weights_default_to_the_environments_model(emulator: str, tmp_path: Path, checkpoint: Path) -> None:
    s3 = make_client("s3", "us-east-1", emulator)
    bucket = f"ops-env-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    environments = _env_file(tmp_path, "modeled")
    environments.write_text(environments.read_text() + 'model = { name = "org/Env-MoE", revision = "r7" }\n')
    common = ("--bucket", bucket)
    up = moefleet(
        "weights", "upload", "modeled", str(checkpoint), *common, endpoint=emulator, environments=environments
    )
    assert f"s3://{bucket}/models/org/Env-MoE/r7/: 2 uploaded" in up.stdout
    verified = moefleet("weights", "verify", "modeled", *common, endpoint=emulator, environments=environments)
    assert f"s3://{bucket}/models/org/Env-MoE/r7/: 2 file(s) match" in verified.stdout
    other = moefleet("weights", "verify", "modeled", *common, "--revision", "r8", endpoint=emulator,
                     environments=environments, check=4)  # fmt: skip
    assert f"s3://{bucket}/models/org/Env-MoE/r8/" in other.stderr and "never uploaded" in other.stderr


def test_weights_bad_input(emulator: str, tmp_path: Path, checkpoint: Path) -> None:
    common = ("--model", "m", "--revision", "r1", "--bucket", "no-such-bucket-ops")
    missing = moefleet("weights", "upload", "local", str(tmp_path / "absent"), *common, endpoint=emulator, check=2)
    assert "not found or not a directory" in missing.stderr
    name = moefleet("weights", "upload", "local", str(checkpoint), "--model", "../x", "--revision", "r1", "--bucket",
                    "b-ops", endpoint=emulator, check=2)  # fmt: skip
    assert "--model '../x'" in name.stderr
    no_bucket = moefleet("weights", "upload", "local", str(checkpoint), *common, endpoint=emulator, check=1)
    assert "AWS error" in no_bucket.stderr and "NoSuchBucket" in no_bucket.stderr
    no_outputs = moefleet("weights", "verify", "local", "--model", "m", "--revision", "r1", "--stack-dir",
                          str(tmp_path / "never-applied"), endpoint=emulator, check=2)  # fmt: skip
    assert "no cold-tier bucket for 'local'" in no_outputs.stderr and "pass --bucket" in no_outputs.stderr


@pytest.fixture
def applied_outputs(tmp_path: Path) -> callable:
    """A real `terraform apply` of a stack that has only outputs (no provider: ~2 s), standing in for an
    applied environment stack's outputs."""

    def apply(**outputs: object) -> Path:
        workdir = tmp_path / f"stack-{uuid.uuid4().hex[:6]}"
        workdir.mkdir()
        doc = {"output": {key: {"value": value} for key, value in outputs.items()}}
        (workdir / "cdk.tf.json").write_text(json.dumps(doc))
        tf = Terraform(workdir)
        tf.init()
        tf.apply()
        return workdir

    return apply


@pytest.mark.terraform
def test_bucket_comes_from_the_applied_stacks_outputs(
    emulator: str, tmp_path: Path, checkpoint: Path, applied_outputs
) -> None:
    s3 = make_client("s3", "us-east-1", emulator)
    bucket = f"ops-out-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    local = load_environments(DEFAULT_ENVIRONMENTS_FILE)["local"]
    stack = applied_outputs(**(representative_outputs(local) | {"models_bucket": bucket}))
    outputs = read_stack_outputs(stack)
    assert (outputs.models_bucket, outputs.models_prefix) == (bucket, "models/")
    with pytest.raises(OutputsUnavailable, match="no such folder"):
        read_stack_outputs(tmp_path / "absent")
    partial = applied_outputs(models_bucket=bucket, models_prefix="models/")
    with pytest.raises(OutputsError, match="cluster_name: missing"):
        read_stack_outputs(partial)
    refused = moefleet("weights", "upload", "local", str(checkpoint), "--model", "m", "--revision", "r1",
                       "--stack-dir", str(partial), endpoint=emulator, check=2)  # fmt: skip
    assert "no cold-tier bucket for 'local'" in refused.stderr and "cluster_name: missing" in refused.stderr
    up = moefleet("weights", "upload", "local", str(checkpoint), "--model", "m", "--revision", "r1", "--stack-dir",
                  str(stack), endpoint=emulator)  # fmt: skip
    assert f"s3://{bucket}/models/m/r1/" in up.stdout
    assert s3.head_object(Bucket=bucket, Key="models/m/r1/moefleet-manifest.json")["ContentLength"] > 0


# ---- status -----------------------------------------------------------------------------------------


def _cluster(emulator: str, name: str, env_name: str) -> str:
    """A cluster and a GPU node group as the stack would tag them (moto needs real subnets)."""
    ec2 = make_client("ec2", "us-east-1", emulator)
    vpc = ec2.create_vpc(CidrBlock="10.93.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.93.1.0/24", AvailabilityZone="us-east-1a")["Subnet"]["SubnetId"]
    eks = make_client("eks", "us-east-1", emulator)
    eks.create_cluster(
        name=name,
        roleArn="arn:aws:iam::123456789012:role/eks",
        resourcesVpcConfig={"subnetIds": [subnet]},
        tags={"project": "moe-fleet", "environment": env_name},
    )
    eks.create_nodegroup(
        clusterName=name,
        nodegroupName=f"{name}-gpu-pool",
        scalingConfig={"minSize": 0, "desiredSize": 0, "maxSize": 1},
        subnets=[subnet],
        nodeRole="arn:aws:iam::123456789012:role/node",
        instanceTypes=["g6e.4xlarge"],
    )
    return subnet


def test_status_shows_cluster_node_groups_and_latest_model(emulator: str, tmp_path: Path, checkpoint: Path) -> None:
    name = f"st{uuid.uuid4().hex[:6]}"
    environments = _env_file(tmp_path, name)
    _cluster(emulator, f"moefleet-{name}", name)
    s3 = make_client("s3", "us-east-1", emulator)
    bucket = f"ops-status-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    empty = moefleet("status", name, "--bucket", bucket, endpoint=emulator, environments=environments).stdout
    assert "no complete upload yet" in empty
    from infra.ops.weights import upload

    upload(s3, bucket, "models/", "org/Old", "r0", checkpoint)
    upload(s3, bucket, "models/", "org/New", "r1", checkpoint)
    out = moefleet("status", name, "--bucket", bucket, endpoint=emulator, environments=environments).stdout
    assert f"moefleet-{name}" in out and "ACTIVE" in out
    assert f"moefleet-{name}-gpu-pool" in out and "desired 0 / ready 0" in out and "max 1" in out
    assert "org/New @ r1" in out and "2 files" in out
    assert "FSx" not in out, "devtest has no FSx hot tier"


def test_status_of_a_medium_environment_reports_fsx_lifecycle(emulator: str, tmp_path: Path) -> None:
    name = f"sm{uuid.uuid4().hex[:6]}"
    environments = _env_file(tmp_path, name, size="medium")
    subnet = _cluster(emulator, f"moefleet-{name}", name)
    out = moefleet("status", name, endpoint=emulator, environments=environments).stdout
    assert "FSx for Lustre" in out and "NOT FOUND" in out
    assert "no stack outputs; pass --bucket" in out
    fsx = make_client("fsx", "us-east-1", emulator)
    fs_id = fsx.create_file_system(
        FileSystemType="LUSTRE",
        StorageCapacity=4800,
        SubnetIds=[subnet],
        LustreConfiguration={"DeploymentType": "PERSISTENT_2", "PerUnitStorageThroughput": 500},
        Tags=[{"Key": "project", "Value": "moe-fleet"}, {"Key": "environment", "Value": name}],
    )["FileSystem"]["FileSystemId"]
    out = moefleet("status", name, endpoint=emulator, environments=environments).stdout
    assert fs_id in out and "AVAILABLE" in out


def test_ctrl_c_mid_upload_leaves_no_manifest_and_the_rerun_resumes(emulator: str, tmp_path: Path) -> None:
    s3 = make_client("s3", "us-east-1", emulator)
    bucket = f"ops-int-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    folder = tmp_path / "big"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    for i in range(3):  # multipart shards: seconds of upload, long enough to interrupt
        (folder / f"model-{i}.safetensors").write_bytes(os.urandom(30_000_000))
    env = {**os.environ, "MOEFLEET_EMULATOR_ENDPOINT": emulator}
    env.pop("MOEFLEET_ENVIRONMENTS", None)
    args = [str(MOEFLEET), "weights", "upload", "local", str(folder), "--model", "big", "--revision", "r1"]
    args += ["--bucket", bucket]
    # SIGINT as a terminal's Ctrl-C delivers it: a suite started in the background (`make test &`) passes SIGINT
    # down ignored, and an ignored signal interrupts nothing, so the CLI is exec'd with the default disposition
    default_sigint = (
        "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", default_sigint, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    for line in proc.stderr:
        if "uploaded: config.json" in line:
            proc.send_signal(signal.SIGINT)
            break
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "resume" in err
    prefix = "models/big/r1/"
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    assert prefix + "moefleet-manifest.json" not in keys
    # the shards upload in parallel with config.json: on a fast box some (or all) land before the signal
    # does, and what counts is that no manifest claims the revision and that the rerun uploads the rest
    assert prefix + "config.json" in keys
    resumed = moefleet(*args[1:], endpoint=emulator)
    assert f"{4 - len(keys)} uploaded, {len(keys)} already there (resumed)" in resumed.stdout
    moefleet("weights", "verify", "local", "--model", "big", "--revision", "r1", "--bucket", bucket, endpoint=emulator)


def test_progress_bars_on_a_terminal(emulator: str, tmp_path: Path, checkpoint: Path) -> None:
    """On a terminal the same upload draws rich bars (stderr) and still ends with the summary line."""
    import pty

    s3 = make_client("s3", "us-east-1", emulator)
    bucket = f"ops-tty-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    primary, secondary = pty.openpty()
    env = {**os.environ, "MOEFLEET_EMULATOR_ENDPOINT": emulator, "COLUMNS": "120", "TERM": "xterm"}
    env.pop("MOEFLEET_ENVIRONMENTS", None)
    args = [str(MOEFLEET), "weights", "upload", "local", str(checkpoint), "--model", "tty", "--revision", "r1"]
    proc = subprocess.Popen([*args, "--bucket", bucket], stdout=secondary, stderr=secondary, env=env, cwd=ROOT)
    os.close(secondary)
    chunks = []
    while True:
        try:
            data = os.read(primary, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(primary)
    assert proc.wait(timeout=60) == 0
    out = b"".join(chunks).decode(errors="replace")
    assert "uploading" in out and "2 uploaded" in out and "manifest written" in out
    assert "\x1b[" in out and "━" in out, "rich draws a live bar on a terminal"
