"""The runner's search for objects an interrupted apply left in AWS but not in the state
(infra/terraform/untracked.py), against the embedded AWS: real EC2 objects, real tag filters, real named
objects and their tags."""

from __future__ import annotations

import uuid

import pytest

from infra.terraform.untracked import find_untracked
from tests.infra.lifecycle import aws


@pytest.fixture()
def ec2(emulator: str):  # type: ignore[no-untyped-def]
    return aws("ec2", emulator)


def _tags(**tags: str) -> list[dict]:
    return [{"ResourceType": "subnet", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}]


def emulated_provider(emulator: str, default_tags: dict[str, str]) -> dict:
    """A stack's provider block as the search reads it: the emulator's EC2, its dummy keys, default tags."""
    provider = {"region": "us-east-1", "access_key": "emulated", "secret_key": "emulated"}
    endpoints = {service: emulator for service in ("ec2", "logs", "kms", "iam", "dynamodb", "ecr", "eks")}
    return {"aws": [{**provider, "endpoints": [endpoints], "default_tags": [{"tags": default_tags}]}]}


def test_adopts_one_untracked_copy_and_reports_the_ambiguous(emulator: str, ec2) -> None:  # type: ignore[no-untyped-def]
    env = f"untracked-{uuid.uuid4().hex[:8]}"
    ours = {"environment": env, "project": "moe-fleet"}
    vpc = ec2.create_vpc(CidrBlock="10.199.0.0/16")["Vpc"]["VpcId"]
    made: list[str] = []

    def subnet(cidr: str, **tags: str) -> str:
        made.append(ec2.create_subnet(VpcId=vpc, CidrBlock=cidr, TagSpecifications=_tags(**tags))["Subnet"]["SubnetId"])
        return made[-1]

    try:
        lone = subnet("10.199.0.0/24", Name=f"{env}-a", **ours)  # created, never recorded: adopt
        subnet("10.199.1.0/24", Name=f"{env}-a", environment="someone-else")  # not the stack's: ignored
        held = subnet("10.199.2.0/24", Name=f"{env}-b", **ours)  # in the state
        copy = subnet("10.199.3.0/24", Name=f"{env}-b", **ours)  # a second one beside it: report
        twins = [subnet(f"10.199.{i}.0/24", Name=f"{env}-c", **ours) for i in (4, 5)]  # which one? report
        config = {
            "provider": emulated_provider(emulator, ours),
            "resource": {"aws_subnet": {x: {"tags": {"Name": f"{env}-{x}"}} for x in "abcd"}},
        }
        state = {
            "resources": [
                {"mode": "managed", "type": "aws_subnet", "name": "b", "instances": [{"attributes": {"id": held}}]},
                # an interrupted create can leave its address in the state with no instance: still untracked
                {"mode": "managed", "type": "aws_subnet", "name": "a", "instances": []},
            ]
        }
        found = find_untracked(config, state)
        assert found.imports == {"aws_subnet.a": lone}
        assert found.import_blocks() == {"import": [{"to": "aws_subnet.a", "id": lone}]}
        assert len(found.conflicts) == 2, found.conflicts
        second, several = sorted(found.conflicts, key=lambda line: twins[0] in line)
        assert copy in second and "aws_subnet.b" in second and "already holds" in second
        assert all(t in several for t in twins) and "terraform import aws_subnet.c" in several
        assert find_untracked({**config, "provider": {"aws": [{"region": "us-east-1"}]}}, state).imports == {}
    finally:
        for sid in made:
            ec2.delete_subnet(SubnetId=sid)
        ec2.delete_vpc(VpcId=vpc)


def test_objects_of_other_stacks_are_ignored_where_the_endpoint_ignores_tag_filters(emulator: str, ec2) -> None:  # type: ignore[no-untyped-def]
    """The emulator's DescribeNatGateways returns every NAT gateway whatever the tag filters: the search checks
    the tags itself, so another stack's gateway is neither adopted nor an error."""
    env = f"untracked-{uuid.uuid4().hex[:8]}"
    ours = {"environment": env, "project": "moe-fleet"}
    vpc = ec2.create_vpc(CidrBlock="10.197.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.197.0.0/24")["Subnet"]["SubnetId"]
    eip = ec2.allocate_address(Domain="vpc")["AllocationId"]
    foreign = [{"ResourceType": "natgateway", "Tags": [{"Key": "Name", "Value": "another-stack-nat"}]}]
    nat = ec2.create_nat_gateway(SubnetId=subnet, AllocationId=eip, TagSpecifications=foreign)["NatGateway"]
    try:
        config = {
            "provider": emulated_provider(emulator, ours),
            "resource": {"aws_nat_gateway": {"a": {"tags": {"Name": f"{env}-nat"}}}},
        }
        found = find_untracked(config, {})
        assert found.imports == {} and found.conflicts == []
    finally:
        ec2.delete_nat_gateway(NatGatewayId=nat["NatGatewayId"])
        ec2.release_address(AllocationId=eip)
        ec2.delete_subnet(SubnetId=subnet)
        ec2.delete_vpc(VpcId=vpc)


def test_named_objects_an_interrupt_left_are_adopted_when_tagged_as_the_stacks(emulator: str) -> None:
    """A log group, a KMS alias (its key carries the tags) and a repository that the state lacks and AWS holds
    with the stack's tags are adopted by name; a role of the stack's name without its tags is reported; a
    name nobody holds, and a resource the state holds, are neither."""
    env = f"untracked-{uuid.uuid4().hex[:8]}"
    ours = {"environment": env, "project": "moe-fleet"}
    logs, kms, iam, ecr = (aws(service, emulator) for service in ("logs", "kms", "iam", "ecr"))
    logs.create_log_group(logGroupName=f"/{env}/flow", tags=ours)
    key = kms.create_key(Tags=[{"TagKey": k, "TagValue": v} for k, v in ours.items()])["KeyMetadata"]["KeyId"]
    kms.create_alias(AliasName=f"alias/{env}-logs", TargetKeyId=key)
    ecr.create_repository(repositoryName=f"{env}/runtime", tags=[{"Key": k, "Value": v} for k, v in ours.items()])
    trust = '{"Version": "2012-10-17", "Statement": []}'
    iam.create_role(RoleName=f"{env}-node", AssumeRolePolicyDocument=trust, Tags=[{"Key": "owner", "Value": "x"}])
    iam.create_role(RoleName=f"{env}-held", AssumeRolePolicyDocument=trust)
    try:
        config = {
            "provider": emulated_provider(emulator, ours),
            "resource": {
                "aws_cloudwatch_log_group": {"flow": {"name": f"/{env}/flow"}, "gone": {"name": f"/{env}/gone"}},
                "aws_kms_alias": {"logs": {"name": f"alias/{env}-logs"}},
                "aws_ecr_repository": {"runtime": {"name": f"{env}/runtime"}},
                "aws_iam_role": {
                    "node": {"name": f"{env}-node"},
                    "held": {"name": f"{env}-held"},
                    "later": {"name": "${aws_eks_cluster.c.name}-x"},  # known after apply: not looked up
                },
                "aws_eks_cluster": {"cluster": {"name": env}},
            },
        }
        state = {
            "resources": [
                {"mode": "managed", "type": "aws_iam_role", "name": "held", "instances": [{"attributes": {"id": "x"}}]}
            ]
        }
        found = find_untracked(config, state)
        assert found.imports == {
            "aws_cloudwatch_log_group.flow": f"/{env}/flow",
            "aws_kms_alias.logs": f"alias/{env}-logs",
            "aws_ecr_repository.runtime": f"{env}/runtime",
        }
        assert len(found.conflicts) == 1, found.conflicts
        assert f"{env}-node" in found.conflicts[0] and "aws_iam_role.node" in found.conflicts[0]
        assert "without the stack's tags" in found.conflicts[0]
    finally:
        logs.delete_log_group(logGroupName=f"/{env}/flow")
        kms.delete_alias(AliasName=f"alias/{env}-logs")
        kms.schedule_key_deletion(KeyId=key, PendingWindowInDays=7)
        ecr.delete_repository(repositoryName=f"{env}/runtime")
        for role in (f"{env}-node", f"{env}-held"):
            iam.delete_role(RoleName=role)
