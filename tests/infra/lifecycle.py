"""Apply → live checks → replan → destroy of the test environments, run in the background from the start
of the session (tests/conftest.py): terraform mostly waits on the provider's own polling, so the four
environments and the rest of the suite overlap instead of queueing."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import boto3

from infra.catalog.names import MODELS_PREFIX
from infra.terraform.runner import Terraform
from runtime import contract
from tests.infra.helpers import resource_types


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


# ---- live checks, run between apply and destroy -------------------------------------------------------


def run_readme_path(emulator: str, workdir: Path) -> list[str]:
    """README's `moefleet` commands, in order, with `local` (applied in `workdir`) in place of `staging`:
    against the embedded AWS for AWS, and the fake Kubernetes API for the cluster. Each must exit 0
    (preflight may also report a failed check, exit 4: the emulator's quotas are not the account's)."""
    import os
    import subprocess

    from infra.catalog.names import EMULATOR_ENDPOINT_VAR, STACKS_DIR_VAR
    from infra.catalog.prerequisites import PREREQUISITES
    from tests.infra.kube.fake_api import FakeKubeAPI
    from tests.infra.readme_path import ENVIRONMENT, ROOT, readme_commands

    home = workdir.parent / "readme-path"
    (home / "stacks").mkdir(parents=True, exist_ok=True)
    (home / "stacks" / "local").symlink_to(workdir)
    subprocess.run([str(ROOT / ".venv/bin/moe-runtime"), "make-tiny", str(home / "checkpoint")], check=True)
    ran = []
    with FakeKubeAPI() as api:
        api.crds |= {crd for p in PREREQUISITES for crd in p.crds}
        kubeconfig = api.kubeconfig(home)
        env = {
            **os.environ,
            STACKS_DIR_VAR: str(home / "stacks"),
            EMULATOR_ENDPOINT_VAR: emulator,
            "KUBECONFIG": str(kubeconfig),
            "AWS_ACCESS_KEY_ID": "emulated",
            "AWS_SECRET_ACCESS_KEY": "emulated",
            "COLUMNS": "200",
        }
        for argv in readme_commands():
            if argv[0] != ".venv/bin/moefleet":
                continue
            args = ["local" if word == ENVIRONMENT else word for word in argv[1:]]
            if args[0] == "install":
                args += ["--poll", "0.2"]
            done = subprocess.run(
                [str(ROOT / argv[0]), *args], cwd=home, env=env, capture_output=True, text=True, timeout=300
            )
            allowed = (0, 4) if args[0] == "preflight" else (0,)
            assert done.returncode in allowed, f"moefleet {' '.join(args)} exited {done.returncode}:\n{done.stderr}"
            ran.append(" ".join(args))
        applied = {path.rsplit("/", 1)[-1] for path, _, _ in api.applies(dry_run=False)}
    assert {"cluster-autoscaler", "moe-runtime"} <= applied
    return ran


def check_local(emulator: str, outputs: dict, workdir: Path) -> None:
    eks = aws("eks", emulator)
    cluster = eks.describe_cluster(name=outputs["cluster_name"])["cluster"]
    assert cluster["status"] == "ACTIVE" and cluster["accessConfig"]["authenticationMode"] == "API"
    assert set(eks.list_addons(clusterName=outputs["cluster_name"])["addons"]) >= {"coredns", "vpc-cni"}
    group = eks.describe_nodegroup(clusterName=outputs["cluster_name"], nodegroupName=outputs["gpu_node_group"])
    assert group["nodegroup"]["taints"][0]["key"] == "nvidia.com/gpu"
    assert group["nodegroup"]["scalingConfig"]["minSize"] == 0
    check_autoscaler_template(emulator, outputs, group["nodegroup"], gpus=1)
    check_cold_tier_and_runtime_role(emulator, outputs)
    ran = run_readme_path(emulator, workdir)
    assert any(command.startswith("weights upload local") for command in ran)


def check_autoscaler_template(emulator: str, outputs: dict, node_group: dict, gpus: int) -> None:
    """The node group's Auto Scaling group carries the node template (read back through the Auto Scaling
    API, as the autoscaler reads it), besides the discovery tags EKS puts there itself."""
    group_name = node_group["resources"]["autoScalingGroups"][0]["name"]
    tags = aws("autoscaling", emulator).describe_tags(Filters=[{"Name": "auto-scaling-group", "Values": [group_name]}])
    by_key = {t["Key"]: t["Value"] for t in tags["Tags"]}
    assert by_key[f"k8s.io/cluster-autoscaler/{outputs['cluster_name']}"] == "owned"
    assert by_key["k8s.io/cluster-autoscaler/node-template/resources/nvidia.com/gpu"] == str(gpus)
    assert by_key["k8s.io/cluster-autoscaler/node-template/taint/nvidia.com/gpu"] == "true:NoSchedule"
    assert by_key["k8s.io/cluster-autoscaler/node-template/label/moefleet.io/node-pool"] == "gpu"


def check_large(emulator: str, outputs: dict, _workdir: Path) -> None:
    ec2 = aws("ec2", emulator)
    groups = ec2.describe_placement_groups(GroupNames=[f"{outputs['cluster_name']}-gpu"])["PlacementGroups"]
    assert groups[0]["Strategy"] == "cluster"
    node_group = aws("eks", emulator).describe_nodegroup(
        clusterName=outputs["cluster_name"], nodegroupName=outputs["gpu_node_group"]
    )["nodegroup"]
    check_autoscaler_template(emulator, outputs, node_group, gpus=8)
    tags = aws("autoscaling", emulator).describe_tags(
        Filters=[
            {"Name": "auto-scaling-group", "Values": [node_group["resources"]["autoScalingGroups"][0]["name"]]},
            {"Name": "key", "Values": ["k8s.io/cluster-autoscaler/node-template/resources/vpc.amazonaws.com/efa"]},
        ]
    )["Tags"]
    assert [t["Value"] for t in tags] == ["32"]


def check_capacity_block(emulator: str, outputs: dict, _workdir: Path) -> None:
    """prod on a Capacity Block for ML: the node group is CAPACITY_BLOCK, its launch template targets the block
    with the capacity-block market type, and there is no placement group."""
    eks, ec2 = aws("eks", emulator), aws("ec2", emulator)
    group = eks.describe_nodegroup(clusterName=outputs["cluster_name"], nodegroupName=outputs["gpu_node_group"])
    assert group["nodegroup"]["capacityType"] == "CAPACITY_BLOCK"
    assert len(group["nodegroup"]["subnets"]) == 1, "a capacity block lives in one AZ"
    template = group["nodegroup"]["launchTemplate"]
    data = ec2.describe_launch_template_versions(LaunchTemplateId=template["id"], Versions=["$Latest"])[
        "LaunchTemplateVersions"
    ][0]["LaunchTemplateData"]
    target = data["CapacityReservationSpecification"]["CapacityReservationTarget"]
    assert target["CapacityReservationId"] == "cr-0fedcba9876543210"
    assert data["InstanceMarketOptions"]["MarketType"] == "capacity-block"
    assert "Placement" not in data or not data["Placement"].get("GroupName")
    groups = ec2.describe_placement_groups()["PlacementGroups"]
    assert not [g for g in groups if g["GroupName"] == f"{outputs['cluster_name']}-gpu"]


def check_medium(emulator: str, outputs: dict, _workdir: Path) -> None:
    """FSx hot tier, its link to the cold tier, and the FSx CSI add-on, live in the emulator."""
    fsx = aws("fsx", emulator)
    fs = fsx.describe_file_systems(FileSystemIds=[outputs["fsx_file_system_id"]])["FileSystems"][0]
    assert fs["Lifecycle"] == "AVAILABLE" and fs["LustreConfiguration"]["DeploymentType"] == "PERSISTENT_2"
    assert fs["LustreConfiguration"]["MountName"] == outputs["fsx_mount_name"]
    associations = fsx.describe_data_repository_associations()["Associations"]
    ours = [a for a in associations if a["FileSystemId"] == outputs["fsx_file_system_id"]]
    assert ours[0]["DataRepositoryPath"] == f"s3://{outputs['models_bucket']}/{MODELS_PREFIX}"
    addons = aws("eks", emulator).list_addons(clusterName=outputs["cluster_name"])["addons"]
    assert "aws-fsx-csi-driver" in addons
    check_cold_tier_and_runtime_role(emulator, outputs)
    check_prediction_store(emulator, outputs)


def check_prediction_store(emulator: str, outputs: dict) -> None:
    """The prediction table as applied: its key, PITR and TTL read back from DynamoDB, and the runtime role's
    policy, evaluated by moto's IAM policy engine, allowing item reads and writes on this table only."""
    from moto.iam.access_control import IAMPolicy, PermissionResult

    ddb = aws("dynamodb", emulator)
    table = ddb.describe_table(TableName=outputs["prediction_table"])["Table"]
    assert table["KeySchema"] == [{"AttributeName": contract.RISK_RECORD_KEY, "KeyType": "HASH"}]
    sse = table["SSEDescription"]
    assert sse["Status"] == "ENABLED" and sse["SSEType"] == "KMS"
    key_alias = f"alias/{outputs['prediction_table']}"
    key_id = aws("kms", emulator).describe_key(KeyId=key_alias)["KeyMetadata"]["Arn"]
    assert sse["KMSMasterKeyArn"] == key_id
    backups = ddb.describe_continuous_backups(TableName=outputs["prediction_table"])["ContinuousBackupsDescription"]
    assert backups["PointInTimeRecoveryDescription"]["PointInTimeRecoveryStatus"] == "ENABLED"
    ttl = ddb.describe_time_to_live(TableName=outputs["prediction_table"])["TimeToLiveDescription"]
    assert ttl == {"TimeToLiveStatus": "ENABLED", "AttributeName": contract.RISK_RECORD_TTL_ATTRIBUTE}

    iam = aws("iam", emulator)
    role_name = outputs["runtime_role_arn"].rsplit("/", 1)[-1]
    name = iam.list_role_policies(RoleName=role_name)["PolicyNames"][0]
    document = iam.get_role_policy(RoleName=role_name, PolicyName=name)["PolicyDocument"]
    policy = IAMPolicy(document if isinstance(document, str) else json.dumps(document))
    other = table["TableArn"].rsplit("/", 1)[0] + "/another-table"
    for action in contract.RISK_STORE_ACTIONS:
        assert policy.is_action_permitted(action, table["TableArn"]) == PermissionResult.PERMITTED, action
        assert policy.is_action_permitted(action, other) != PermissionResult.PERMITTED, action
    for action in ("dynamodb:DeleteItem", "dynamodb:Scan", "dynamodb:DeleteTable"):
        assert policy.is_action_permitted(action, table["TableArn"]) != PermissionResult.PERMITTED, action


def check_cold_tier_and_runtime_role(emulator: str, outputs: dict) -> None:
    """The acceptance check: the bucket is versioned, KMS-encrypted and private, and the runtime role's
    policy, read back from IAM and evaluated by moto's IAM policy engine, denies writes."""
    from moto.iam.access_control import IAMPolicy, PermissionResult

    s3 = aws("s3", emulator)
    bucket = outputs["models_bucket"]
    assert s3.get_bucket_versioning(Bucket=bucket)["Status"] == "Enabled"
    rule = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"][0]
    assert rule["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "aws:kms"
    assert rule["ApplyServerSideEncryptionByDefault"]["KMSMasterKeyID"] == outputs["models_kms_key_arn"]
    block = s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"]
    assert all(block.values()) and len(block) == 4
    assert s3.get_bucket_logging(Bucket=bucket)["LoggingEnabled"]["TargetBucket"] == outputs["access_log_bucket"]
    # An object written with no encryption settings lands encrypted with the environment's key.
    key = f"{MODELS_PREFIX}probe/rev/config.json"
    s3.put_object(Bucket=bucket, Key=key, Body=b"{}")
    head = s3.head_object(Bucket=bucket, Key=key)
    assert head["ServerSideEncryption"] == "aws:kms" and head["SSEKMSKeyId"] == outputs["models_kms_key_arn"]

    iam = aws("iam", emulator)
    role_name = outputs["runtime_role_arn"].rsplit("/", 1)[-1]
    names = iam.list_role_policies(RoleName=role_name)["PolicyNames"]
    assert len(names) == 1 and not iam.list_attached_role_policies(RoleName=role_name)["AttachedPolicies"]
    document = iam.get_role_policy(RoleName=role_name, PolicyName=names[0])["PolicyDocument"]
    policy = IAMPolicy(document if isinstance(document, str) else json.dumps(document))
    model_object = f"arn:aws:s3:::{bucket}/{MODELS_PREFIX}deepseek/rev1/model.safetensors"
    assert policy.is_action_permitted("s3:GetObject", model_object) == PermissionResult.PERMITTED
    for action, resource in (
        ("s3:PutObject", model_object),
        ("s3:DeleteObject", model_object),
        ("s3:GetObject", f"arn:aws:s3:::{bucket}/other/secret"),
        ("s3:GetObject", f"arn:aws:s3:::{outputs['access_log_bucket']}/models/log"),
    ):
        assert policy.is_action_permitted(action, resource) != PermissionResult.PERMITTED, (action, resource)
    # moto's engine ignores the StringLike condition on s3:prefix, so the listing restriction is asserted
    # on the policy document instead (tests/infra/test_storage.py).


#: Each applied environment and what is checked live between its apply and destroy. They run at once:
#: terraform mostly waits on the provider's own polling, so overlapping them keeps CI time flat.
LIVE_CHECKS: dict[str, Callable[[str, dict, Path], None]] = {
    "local": check_local,
    "large-emu": check_large,
    "medium-emu": check_medium,
    "prod-cb": check_capacity_block,
}
