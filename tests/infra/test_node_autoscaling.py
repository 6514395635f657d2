"""The node autoscaler's AWS side, on the synthesized stacks: scale-from-zero tags on every node group's
Auto Scaling group and a least-privilege IAM role, evaluated by moto's IAM policy engine."""

from __future__ import annotations

import json

import pytest
from moto.iam.access_control import IAMPolicy, PermissionResult

from infra.catalog import node_autoscaling as na
from infra.catalog.environments import SUPPORTED_KUBERNETES_VERSIONS, load_environments
from infra.catalog.names import (
    CLUSTER_AUTOSCALER_SERVICE_ACCOUNT,
    GPU_MODEL_LABEL,
    GPU_TAINT,
    NODE_POOL_LABEL,
    SIZE_LABEL,
)
from tests.conftest import STANDARD_ENVIRONMENTS
from tests.infra.helpers import resources

ENVS = load_environments()
ACCOUNT, REGION = "123456789012", "us-east-1"


def asg_tags(stack: dict, pool: str) -> dict[str, str]:
    """Tags the stack puts on one pool's Auto Scaling group, checked to point at that pool's node group."""
    tags = {}
    for body in resources(stack, "aws_autoscaling_group_tag").values():
        if f"/{pool}-pool/" not in body["//"]["metadata"]["path"]:
            continue
        assert (
            "aws_eks_node_group" in body["autoscaling_group_name"]
            and "autoscaling_groups" in (body["autoscaling_group_name"])
        )
        assert body["tag"]["propagate_at_launch"] is False
        tags[body["tag"]["key"]] = body["tag"]["value"]
    return tags


@pytest.mark.parametrize("env_name", ["staging", "prod"])
def test_gpu_group_carries_the_scale_from_zero_template(stacks: dict[str, dict], env_name: str) -> None:
    env = ENVS[env_name]
    instance = env.gpu_instance_spec
    tags = asg_tags(stacks[env_name], "gpu")
    prefix = f"{na.TAG_PREFIX}/node-template"
    assert tags[f"{prefix}/resources/{na.GPU_RESOURCE}"] == str(instance.gpus)
    assert tags[f"{prefix}/taint/{GPU_TAINT.key}"] == f"{GPU_TAINT.value}:{GPU_TAINT.effect}"
    assert tags[f"{prefix}/label/{NODE_POOL_LABEL}"] == "gpu"
    assert tags[f"{prefix}/label/{SIZE_LABEL}"] == env.size.value
    assert tags[f"{prefix}/label/{GPU_MODEL_LABEL}"] == instance.gpu_model
    efa = tags.get(f"{prefix}/resources/{na.EFA_RESOURCE}")
    if env.size_spec.uses_efa:
        assert efa == str(instance.efa_interfaces)
    else:
        assert efa is None


@pytest.mark.parametrize("env_name", STANDARD_ENVIRONMENTS)
def test_every_pool_is_tagged_with_its_own_labels(stacks: dict[str, dict], env_name: str) -> None:
    system = asg_tags(stacks[env_name], "system")
    assert system[f"{na.TAG_PREFIX}/node-template/label/{NODE_POOL_LABEL}"] == "system"
    assert not any("/taint/" in key or "/resources/" in key for key in system)
    assert asg_tags(stacks[env_name], "gpu")


def group_context(group_tags: dict[str, str], cluster: str) -> dict[str, str]:
    """The request context AWS evaluates for a scaling call on a group with these tags.

    AWS fails a StringEquals on a tag the group does not carry; moto's engine passes a condition whose key
    is missing from the context, so the key our policy asks about is always given: the tag's value, or
    "" when the group lacks the tag."""
    key = na.owner_tag(cluster)
    return {f"aws:ResourceTag/{k}": v for k, v in group_tags.items()} | {
        f"aws:ResourceTag/{key}": group_tags.get(key, "")
    }


def autoscaler_policy(stack: dict) -> tuple[IAMPolicy, dict, dict]:
    roles = {body["name"]: body for body in resources(stack, "aws_iam_role").values()}
    role = next(body for name, body in roles.items() if name.endswith("-cluster-autoscaler"))
    policies = [p for p in resources(stack, "aws_iam_role_policy").values() if "cluster-autoscaler" in p["role"]]
    assert len(policies) == 1
    assert not [a for a in resources(stack, "aws_iam_role_policy_attachment").values() if "autoscaler" in a["role"]]
    # Terraform references (account, region, partition) become the values the tests evaluate against.
    document = (
        policies[0]["policy"]
        .replace("${data.aws_caller_identity.account.account_id}", ACCOUNT)
        .replace("${data.aws_partition.partition.partition}", "aws")
    )
    return IAMPolicy(document), role, json.loads(document)


@pytest.mark.parametrize("env_name", ["staging", "prod"])
def test_autoscaler_role_allows_exactly_the_documented_actions(stacks: dict[str, dict], env_name: str) -> None:
    env = ENVS[env_name]
    cluster = env.cluster_name
    policy, role, document = autoscaler_policy(stacks[env_name])
    assert "pods.eks.amazonaws.com" in role["assume_role_policy"]
    associations = [
        a
        for a in resources(stacks[env_name], "aws_eks_pod_identity_association").values()
        if a["service_account"] == CLUSTER_AUTOSCALER_SERVICE_ACCOUNT[1]
    ]
    assert len(associations) == 1 and associations[0]["namespace"] == CLUSTER_AUTOSCALER_SERVICE_ACCOUNT[0]

    region = env.region
    own_group = f"arn:aws:autoscaling:{region}:{ACCOUNT}:autoScalingGroup:uuid-1:autoScalingGroupName/eks-gpu-1"
    own_tag = group_context({na.owner_tag(cluster): "owned"}, cluster)
    other_tag = group_context({na.owner_tag("moefleet-other"): "owned"}, cluster)
    untagged = group_context({}, cluster)
    own_nodegroup = f"arn:aws:eks:{region}:{ACCOUNT}:nodegroup/{cluster}/{cluster}-gpu/uuid-2"
    other_nodegroup = f"arn:aws:eks:{region}:{ACCOUNT}:nodegroup/moefleet-other/moefleet-other-gpu/uuid-3"

    def allowed(action: str, resource: str = "*", context: dict | None = None) -> bool:
        return policy.is_action_permitted(action, resource, incoming_condition_values=context) is (
            PermissionResult.PERMITTED
        )

    for action in na.DESCRIBE_ACTIONS:
        assert allowed(action), action
    assert allowed("eks:DescribeNodegroup", own_nodegroup)
    for action in na.SCALING_ACTIONS:
        assert allowed(action, own_group, own_tag), action
        # Groups of another cluster, or untagged ones, are off limits.
        assert not allowed(action, own_group, other_tag), action
        assert not allowed(action, own_group, untagged), action
        assert not allowed(action, f"arn:aws:autoscaling:eu-west-1:{ACCOUNT}:autoScalingGroup:x", own_tag), action
    for action, resource in (
        ("eks:DescribeNodegroup", other_nodegroup),
        ("eks:UpdateNodegroupConfig", own_nodegroup),
        ("autoscaling:UpdateAutoScalingGroup", own_group),
        ("autoscaling:CreateOrUpdateTags", own_group),
        ("autoscaling:DeleteAutoScalingGroup", own_group),
        ("ec2:TerminateInstances", "*"),
        ("ec2:RunInstances", "*"),
        ("iam:PassRole", "*"),
        ("s3:GetObject", "*"),
    ):
        assert not allowed(action, resource, own_tag), (action, resource)
    granted = {a for st in document["Statement"] for a in st["Action"]}
    assert granted == set(na.DESCRIBE_ACTIONS) | set(na.NODEGROUP_ACTIONS) | set(na.SCALING_ACTIONS)


def test_an_autoscaler_release_is_pinned_for_every_supported_kubernetes_version() -> None:
    assert set(na.VERSIONS) == set(SUPPORTED_KUBERNETES_VERSIONS)
    for minor in SUPPORTED_KUBERNETES_VERSIONS:
        assert na.image(minor).endswith(f":v{minor}." + na.VERSIONS[minor].split(".")[2])
    with pytest.raises(ValueError, match=r"'1\.20'.*pinned for: 1\.31"):
        na.image("1.20")
