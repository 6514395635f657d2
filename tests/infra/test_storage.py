"""Storage tiers, registry, identities and the monitoring workspace, read from the synthesized JSON of every
environment: which tier exists where, encryption everywhere, nothing public, least-privilege policies."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from infra.catalog import node_autoscaling
from infra.catalog.environments import load_environments
from infra.catalog.names import MODELS_PREFIX, RUNTIME_NAMESPACE, RUNTIME_SERVICE_ACCOUNT
from infra.catalog.sizes import SIZES, HotTierKind
from infra.constructs.storage import FSX_MODELS_PATH, LUSTRE_PORTS
from runtime import contract
from tests.conftest import STANDARD_ENVIRONMENTS
from tests.infra.helpers import one, resources

ENVS = load_environments()
TESTED = (*STANDARD_ENVIRONMENTS, "medium-emu", "large-emu")


@pytest.fixture(scope="module")
def all_envs(environments_file) -> dict:  # type: ignore[no-untyped-def]
    return load_environments(environments_file)


def statements(policy: str) -> list[dict[str, Any]]:
    doc = json.loads(policy)
    return doc["Statement"] if isinstance(doc["Statement"], list) else [doc["Statement"]]


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def key_ref(value: str) -> bool:
    """A reference to one of our own KMS keys (never an AWS-managed alias)."""
    return value.startswith("${aws_kms_key.") and value.endswith(".arn}")


@pytest.mark.parametrize("env_name", TESTED)
def test_cold_tier_is_versioned_encrypted_private_and_expires_old_versions(
    stacks: dict[str, dict], env_name: str
) -> None:
    stack = stacks[env_name]
    buckets = resources(stack, "aws_s3_bucket")
    assert {"models" in n for n in buckets} == {True, False}, "a models bucket and an access-log bucket"
    for name in buckets:
        ref = f"${{aws_s3_bucket.{name}.id}}"
        block = [b for b in resources(stack, "aws_s3_bucket_public_access_block").values() if b["bucket"] == ref]
        assert block and all(
            block[0][k]
            for k in ("block_public_acls", "block_public_policy", "ignore_public_acls", "restrict_public_buckets")
        )
        versioning = [v for v in resources(stack, "aws_s3_bucket_versioning").values() if v["bucket"] == ref]
        assert versioning[0]["versioning_configuration"]["status"] == "Enabled"
        policy = next(p for p in resources(stack, "aws_s3_bucket_policy").values() if p["bucket"] == ref)
        deny = [s for s in statements(policy["policy"]) if s["Effect"] == "Deny"]
        assert deny and deny[0]["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
        lifecycle = [
            lc for lc in resources(stack, "aws_s3_bucket_lifecycle_configuration").values() if lc["bucket"] == ref
        ]
        rules = lifecycle[0]["rule"]
        assert all(rule["status"] == "Enabled" for rule in rules)
        assert any(r.get("abort_incomplete_multipart_upload", [{}])[0].get("days_after_initiation") for r in rules)
        assert any(r.get("noncurrent_version_expiration", [{}])[0].get("noncurrent_days") for r in rules)
        sse = [
            e
            for e in resources(stack, "aws_s3_bucket_server_side_encryption_configuration").values()
            if e["bucket"] == ref
        ]
        assert sse, f"{name} has no default encryption"

    models = one(stack, "aws_s3_bucket", "models")
    assert models["force_destroy"] is (env_name in ("local", "medium-emu", "large-emu"))
    sse = one(stack, "aws_s3_bucket_server_side_encryption_configuration", "models")["rule"][0]
    assert sse["apply_server_side_encryption_by_default"]["sse_algorithm"] == "aws:kms"
    assert key_ref(sse["apply_server_side_encryption_by_default"]["kms_master_key_id"])
    rules = {r["id"]: r for r in one(stack, "aws_s3_bucket_lifecycle_configuration", "models")["rule"]}
    assert rules["abort-incomplete-uploads"]["filter"][0]["prefix"] == "", "aborts uploads anywhere in the bucket"
    rule = rules["old-revisions-to-glacier-ir"]
    assert rule["filter"][0]["prefix"] == MODELS_PREFIX
    transition = rule["noncurrent_version_transition"][0]
    assert transition["storage_class"] == "GLACIER_IR" and transition["noncurrent_days"] >= 30
    logging = one(stack, "aws_s3_bucket_logging", "models")
    assert "access-logs" in logging["target_bucket"] and logging["depends_on"], "log-bucket policy first"


@pytest.mark.parametrize("env_name", TESTED)
def test_hot_tier_per_size(stacks: dict[str, dict], all_envs: dict, env_name: str) -> None:
    stack = stacks[env_name]
    tiers = all_envs[env_name].size_spec.storage
    file_systems = resources(stack, "aws_fsx_lustre_file_system")
    if tiers.hot_kind is HotTierKind.EBS_GP3:
        assert not file_systems and not resources(stack, "aws_fsx_data_repository_association")
        assert "aws-fsx-csi-driver" not in {a["addon_name"] for a in resources(stack, "aws_eks_addon").values()}
        return
    fs = one(stack, "aws_fsx_lustre_file_system")
    assert fs["deployment_type"] == "PERSISTENT_2"
    assert fs["storage_capacity"] == tiers.hot_capacity_gib
    assert fs["per_unit_storage_throughput"] == tiers.fsx_throughput_per_tib
    assert key_ref(fs["kms_key_id"])
    assert len(fs["subnet_ids"]) == 1 and "private" in fs["subnet_ids"][0]
    dra = one(stack, "aws_fsx_data_repository_association")
    assert dra["data_repository_path"].endswith(f"/{MODELS_PREFIX}") and dra["file_system_path"] == FSX_MODELS_PATH
    assert set(dra["s3"]["auto_import_policy"]["events"]) >= {"NEW", "CHANGED"}
    assert dra["delete_data_in_filesystem"] is False
    assert "aws-fsx-csi-driver" in {a["addon_name"] for a in resources(stack, "aws_eks_addon").values()}

    sg = one(stack, "aws_security_group", "hot-tier")
    ports = {(rule["from_port"], rule["to_port"]) for rule in sg["ingress"]}
    assert ports == set(LUSTRE_PORTS)
    for rule in sg["ingress"]:
        assert not rule.get("cidr_blocks") and not rule.get("ipv6_cidr_blocks"), "Lustre only from security groups"
        (source,) = rule["security_groups"]
        assert source.startswith("${aws_eks_cluster.") and source.endswith(".cluster_security_group_id}")


@pytest.mark.parametrize("env_name", TESTED)
def test_runtime_role_reads_models_only(stacks: dict[str, dict], env_name: str) -> None:
    stack = stacks[env_name]
    association = [
        a
        for a in resources(stack, "aws_eks_pod_identity_association").values()
        if a["service_account"] == RUNTIME_SERVICE_ACCOUNT
    ]
    assert len(association) == 1 and association[0]["namespace"] == RUNTIME_NAMESPACE
    policy = one(stack, "aws_iam_role_policy", "runtime")
    actions = {a for s in statements(policy["policy"]) for a in as_list(s["Action"])}
    models = {"s3:GetObject", "s3:ListBucket", "kms:Decrypt", "kms:DescribeKey"}
    # plus the prediction records' table and its key (tests/infra/test_prediction_store.py)
    records = {*contract.RISK_STORE_ACTIONS, "kms:Encrypt", "kms:GenerateDataKey*"}
    assert actions == models | records
    for statement in statements(policy["policy"]):
        assert statement["Effect"] == "Allow"
        for resource in as_list(statement["Resource"]):
            assert resource != "*"
        if statement["Action"] == "s3:GetObject":
            assert statement["Resource"].endswith(f"/{MODELS_PREFIX}*")
        if statement["Action"] == "s3:ListBucket":
            assert statement["Condition"] == {"StringLike": {"s3:prefix": [f"{MODELS_PREFIX}*"]}}
    # Nothing else is attached to the runtime's role.
    runtime_role_refs = {f"${{aws_iam_role.{n}.id}}" for n in resources(stack, "aws_iam_role") if "runtime" in n}
    attached = [
        a for a in resources(stack, "aws_iam_role_policy_attachment").values() if a["role"] in runtime_role_refs
    ]
    assert not attached


@pytest.mark.parametrize("env_name", TESTED)
def test_policies_use_wildcards_only_where_the_api_requires(stacks: dict[str, dict], env_name: str) -> None:
    """`*` actions never; `*` resources only for the calls documented as not supporting resource ARNs."""
    # the FSx CSI driver's describe call, and the node autoscaler's Describe/Get calls (none take a resource ARN)
    allowed_star_resource = {"fsx:DescribeFileSystems", *node_autoscaling.DESCRIBE_ACTIONS}
    for rtype in ("aws_iam_role_policy", "aws_iam_policy"):
        for name, body in resources(stacks[env_name], rtype).items():
            for statement in statements(body["policy"]):
                actions = as_list(statement["Action"])
                assert all(not a.endswith(":*") and a != "*" for a in actions), f"{name}: wildcard action {actions}"
                if "*" in as_list(statement.get("Resource", [])):
                    assert set(actions) <= allowed_star_resource, f"{name}: '*' resource for {actions}"


@pytest.mark.parametrize("env_name", TESTED)
def test_registry_scans_pins_and_expires_images(stacks: dict[str, dict], env_name: str) -> None:
    stack = stacks[env_name]
    repo = one(stack, "aws_ecr_repository")
    assert repo["image_tag_mutability"] == "IMMUTABLE"
    assert repo["image_scanning_configuration"]["scan_on_push"] is True
    assert repo["encryption_configuration"][0]["encryption_type"] == "KMS"
    assert key_ref(repo["encryption_configuration"][0]["kms_key"])
    rules = json.loads(one(stack, "aws_ecr_lifecycle_policy")["policy"])["rules"]
    selections = {r["selection"]["tagStatus"]: r["selection"] for r in rules}
    assert selections["untagged"]["countType"] == "sinceImagePushed"
    assert selections["any"]["countType"] == "imageCountMoreThan", "keep the last N images, expire older"


@pytest.mark.parametrize("env_name", TESTED)
def test_monitoring_workspace_rules_and_encrypted_alerts(
    stacks: dict[str, dict], all_envs: dict, env_name: str
) -> None:
    stack = stacks[env_name]
    workspace = one(stack, "aws_prometheus_workspace")
    assert workspace["logging_configuration"]["log_group_arn"].startswith("${aws_cloudwatch_log_group.")
    namespaces = {ns["name"]: ns for ns in resources(stack, "aws_prometheus_rule_group_namespace").values()}
    assert set(namespaces) == {"moe-fleet", "moe-fleet-recording"}
    namespace = namespaces["moe-fleet"]
    alerts = {rule["alert"] for group in yaml.safe_load(namespace["data"])["groups"] for rule in group["rules"]}
    recorded = yaml.safe_load(namespaces["moe-fleet-recording"]["data"])["groups"][0]["rules"]
    assert recorded and all("record" in rule for rule in recorded)
    assert {"MoeGpuUtilizationHigh", "MoeP99LatencyHigh", "MoeAccuracyDrift", "MoeMemoryLeak"} <= alerts
    assert any("MetricsMissing" in a for a in alerts)
    topic = one(stack, "aws_sns_topic")
    assert key_ref(topic["kms_master_key_id"])
    manager = one(stack, "aws_prometheus_alert_manager_definition")
    assert "sns_configs" in manager["definition"] and "${aws_sns_topic." in manager["definition"]
    subscriptions = list(resources(stack, "aws_sns_topic_subscription").values())
    email = all_envs[env_name].alarm_email
    assert [s["endpoint"] for s in subscriptions] == ([email] if email else [])


@pytest.mark.parametrize("env_name", TESTED)
def test_outputs_name_every_tier(stacks: dict[str, dict], all_envs: dict, env_name: str) -> None:
    outputs = set(stacks[env_name]["output"])
    common = {
        "models_bucket",
        "models_prefix",
        "models_kms_key_arn",
        "ecr_repository_url",
        "amp_workspace_id",
        "amp_remote_write_url",
        "amp_query_url",
        "alerts_topic_arn",
        "runtime_role_arn",
        "volume_kms_key_arn",
    }
    fsx = {"fsx_file_system_id", "fsx_dns_name", "fsx_mount_name"}
    assert common <= outputs
    has_fsx = all_envs[env_name].size_spec.storage.hot_kind is HotTierKind.FSX_LUSTRE
    assert (fsx <= outputs) is has_fsx


def test_size_catalog_states_each_tier() -> None:
    for size in SIZES.values():
        tiers = size.storage
        assert tiers.hot_capacity_gib > 0 and tiers.hot_read_mb_s > 0
        if tiers.hot_kind is HotTierKind.FSX_LUSTRE:
            assert tiers.fsx_throughput_per_tib in (125, 250, 500, 1000)
            # PERSISTENT_2 capacity comes in 1.2 TiB then 2.4 TiB steps.
            assert tiers.hot_capacity_gib == 1200 or tiers.hot_capacity_gib % 2400 == 0
    assert SIZES["large"].storage.nvme_read_mb_s, "the large size documents its NVMe tier"
