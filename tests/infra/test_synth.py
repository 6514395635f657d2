"""Assertions on the synthesized JSON of every environment (one synthesis per session)."""

from __future__ import annotations

import base64

import pytest

from infra.catalog.environments import load_environments
from infra.catalog.names import GPU_MODEL_LABEL, GPU_TAINT, NODE_POOL_LABEL, SIZE_LABEL
from infra.catalog.sizes import SIZES
from infra.constructs.node_pools import IMDS_HOP_LIMIT
from tests.conftest import STANDARD_ENVIRONMENTS
from tests.infra.helpers import gpu_node_group, one, resources

ENVS = load_environments()


def test_every_environment_synthesized(stacks: dict[str, dict]) -> None:
    assert set(STANDARD_ENVIRONMENTS) <= set(stacks)


@pytest.mark.parametrize("env_name", STANDARD_ENVIRONMENTS)
def test_gpu_pool_matches_size(stacks: dict[str, dict], env_name: str) -> None:
    env = ENVS[env_name]
    group = gpu_node_group(stacks[env_name])
    assert group["instance_types"] == [env.gpu_instance_type]
    assert group["ami_type"] == "AL2023_x86_64_NVIDIA"
    assert group["taint"] == [{"key": GPU_TAINT.key, "value": GPU_TAINT.value, "effect": "NO_SCHEDULE"}]
    assert group["labels"][NODE_POOL_LABEL] == "gpu"
    assert group["labels"][SIZE_LABEL] == env.size.value
    assert group["labels"][GPU_MODEL_LABEL] == env.gpu_instance_spec.gpu_model
    scaling = group["scaling_config"]
    assert scaling["min_size"] == 0, "GPU pools must be allowed to scale to zero"
    assert scaling["max_size"] >= SIZES[env.size].gpu_nodes(env.gpu_instance_type)
    assert "scaling_config[0].desired_size" in group["lifecycle"]["ignore_changes"]


@pytest.mark.parametrize("env_name", STANDARD_ENVIRONMENTS)
def test_launch_templates_harden_nodes(stacks: dict[str, dict], env_name: str) -> None:
    templates = resources(stacks[env_name], "aws_launch_template")
    assert len(templates) == 2  # system + gpu
    for template in templates.values():
        meta = template["metadata_options"]
        assert meta["http_tokens"] == "required" and meta["http_put_response_hop_limit"] == IMDS_HOP_LIMIT
        ebs = template["block_device_mappings"][0]["ebs"]
        assert ebs["encrypted"] == "true" and ebs["volume_type"] == "gp3" and "aws_kms_key" in ebs["kms_key_id"]
        kinds = {spec["resource_type"] for spec in template["tag_specifications"]}
        assert kinds == {"instance", "volume", "network-interface"}
        for spec in template["tag_specifications"]:
            assert spec["tags"]["environment"] == env_name and spec["tags"]["project"] == "moe-fleet"
    gpu_root = one(stacks[env_name], "aws_launch_template", "gpu-pool")["block_device_mappings"][0]["ebs"]
    assert gpu_root["volume_size"] >= 200, "CUDA images need a large root volume"


@pytest.mark.parametrize("env_name", STANDARD_ENVIRONMENTS)
def test_cluster_security_baseline(stacks: dict[str, dict], env_name: str) -> None:
    env = ENVS[env_name]
    cluster = one(stacks[env_name], "aws_eks_cluster")
    assert cluster["version"] == env.kubernetes_version
    assert cluster["encryption_config"]["resources"] == ["secrets"]
    assert set(cluster["enabled_cluster_log_types"]) == {
        "api",
        "audit",
        "authenticator",
        "controllerManager",
        "scheduler",
    }
    assert cluster["access_config"]["authentication_mode"] == "API"
    vpc = cluster["vpc_config"]
    assert vpc["endpoint_private_access"] is True
    assert vpc["endpoint_public_access"] is env.public_api_endpoint
    if env.public_api_endpoint:
        assert vpc["public_access_cidrs"] == env.api_access_cidrs
    addons = {a["addon_name"] for a in resources(stacks[env_name], "aws_eks_addon").values()}
    assert {"vpc-cni", "coredns", "kube-proxy", "eks-pod-identity-agent", "aws-ebs-csi-driver"} <= addons
    for key in resources(stacks[env_name], "aws_kms_key").values():
        assert key["enable_key_rotation"] is True
    for group in resources(stacks[env_name], "aws_cloudwatch_log_group").values():
        assert group["kms_key_id"] and group["retention_in_days"] >= 365


@pytest.mark.parametrize("env_name", STANDARD_ENVIRONMENTS)
def test_tags_on_every_taggable_resource(stacks: dict[str, dict], env_name: str) -> None:
    """Provider default_tags reach every taggable resource the provider manages; check they are set
    and carry the environment's own tags too."""
    provider = stacks[env_name]["provider"]["aws"][0]
    tags = provider["default_tags"][0]["tags"]
    assert tags["environment"] == env_name and tags["deployment-size"] == ENVS[env_name].size.value
    for key, value in ENVS[env_name].tags.items():
        assert tags[key] == value


def test_network_layout(stacks: dict[str, dict]) -> None:
    for env_name in STANDARD_ENVIRONMENTS:
        env = ENVS[env_name]
        subnets = resources(stacks[env_name], "aws_subnet").values()
        assert len(subnets) == 2 * len(env.azs)
        public = [s for s in subnets if "kubernetes.io/role/elb" in s["tags"]]
        private = [s for s in subnets if "kubernetes.io/role/internal-elb" in s["tags"]]
        assert len(public) == len(private) == len(env.azs)
        nats = resources(stacks[env_name], "aws_nat_gateway")
        assert len(nats) == (1 if env.single_nat_gateway else len(env.azs))
        endpoint = one(stacks[env_name], "aws_vpc_endpoint")
        assert endpoint["vpc_endpoint_type"] == "Gateway" and endpoint["service_name"].endswith(".s3")
        assert one(stacks[env_name], "aws_flow_log")["traffic_type"] == "ALL"


def test_large_is_multi_node_ready(stacks: dict[str, dict]) -> None:
    for env_name in ("prod", "large-emu"):
        stack = stacks[env_name]
        assert one(stack, "aws_placement_group")["strategy"] == "cluster"
        template = one(stack, "aws_launch_template", "gpu-pool")
        interfaces = template["network_interfaces"]
        assert len(interfaces) == 32 and all(i["interface_type"] == "efa" for i in interfaces)
        assert "vpc_security_group_ids" not in template  # moved onto the interfaces
        assert "RAID0" in base64.b64decode(template["user_data"]).decode()
        assert len(gpu_node_group(stack)["subnet_ids"]) == 1, "a cluster placement group lives in one AZ"
        efa_sg = one(stack, "aws_security_group", "efa")
        assert efa_sg["ingress"][0]["self"] is True and efa_sg["ingress"][0]["protocol"] == "-1"
    reservation = one(stacks["large-emu"], "aws_launch_template", "gpu-pool")["capacity_reservation_specification"]
    assert reservation["capacity_reservation_target"]["capacity_reservation_id"] == "cr-0123456789abcdef0"


def test_prod_on_a_capacity_block(stacks: dict[str, dict]) -> None:
    """prod-cb (tests/conftest.py) is prod with overrides.capacity_block_id: CAPACITY_BLOCK node group, a launch
    template targeting the block with the capacity-block market, EFA kept, no placement group, one AZ."""
    stack = stacks["prod-cb"]
    group = gpu_node_group(stack)
    assert group["capacity_type"] == "CAPACITY_BLOCK"
    assert len(group["subnet_ids"]) == 1, "a capacity block lives in one AZ"
    template = one(stack, "aws_launch_template", "gpu-pool")
    target = template["capacity_reservation_specification"]["capacity_reservation_target"]
    assert target == {"capacity_reservation_id": "cr-0fedcba9876543210"}
    assert template["instance_market_options"] == {"market_type": "capacity-block"}
    assert "placement" not in template
    assert not resources(stack, "aws_placement_group")
    assert len(template["network_interfaces"]) == 32
    for env_name in ("prod", "large-emu", "local"):
        assert gpu_node_group(stacks[env_name])["capacity_type"] == "ON_DEMAND"
        assert "instance_market_options" not in one(stacks[env_name], "aws_launch_template", "gpu-pool")


def test_devtest_has_no_multi_node_parts(stacks: dict[str, dict]) -> None:
    for env_name in ("local", "dev"):
        assert not resources(stacks[env_name], "aws_placement_group")
        assert "network_interfaces" not in one(stacks[env_name], "aws_launch_template", "gpu-pool")


def test_state_backends(stacks: dict[str, dict]) -> None:
    assert "local" in stacks["local"]["terraform"]["backend"]
    for env_name in ("dev", "staging", "prod"):
        s3 = stacks[env_name]["terraform"]["backend"]["s3"]
        assert s3["encrypt"] is True and s3["use_lockfile"] is True
        assert s3["key"] == f"{env_name}/terraform.tfstate"


def test_emulated_provider_points_at_loopback_only(stacks: dict[str, dict], emulator: str) -> None:
    local = stacks["local"]["provider"]["aws"][0]
    assert all(url == emulator for url in local["endpoints"][0].values())
    for env_name in ("dev", "staging", "prod"):
        assert "endpoints" not in stacks[env_name]["provider"]["aws"][0]
        assert "access_key" not in stacks[env_name]["provider"]["aws"][0]


def test_outputs(stacks: dict[str, dict]) -> None:
    for env_name in STANDARD_ENVIRONMENTS:
        outputs = set(stacks[env_name]["output"])
        assert {
            "cluster_name", "cluster_endpoint", "cluster_oidc_issuer", "gpu_node_group", "system_node_group",
            "vpc_id", "private_subnet_ids", "public_subnet_ids",
        } <= outputs  # fmt: skip
