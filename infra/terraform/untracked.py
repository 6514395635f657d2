"""Find the objects an interrupted apply created in AWS but never recorded in the state.

Terraform's first interrupt (Ctrl-C, SIGINT) stops gracefully at the graph level, but it also tells the
providers to stop, and the AWS provider then cancels every API call in flight. A create call that AWS had
already received still creates its object; the provider, whose call was cancelled, never learns the ID, so
the object is in AWS and not in the state. Applying again would create a second one: a duplicate route
table, or a subnet whose CIDR is taken (`InvalidSubnet.Conflict`), until someone imports or deletes it.

EC2 creates are not idempotent by name, so before each apply the runner looks for such objects: live
objects of the stack's EC2 types that carry the stack's default tags and the `Name` tag of one of its
resources, and that no resource of the state holds. An object that matches exactly one resource that is
not in the state yet is adopted with an `import` block (the apply then owns it instead of creating a
second one); anything else (two candidates for one resource, or a copy of a resource already in the state)
is reported, never deleted.

Named types (a log group, a KMS alias, an IAM role, a table, a repository, the cluster) cannot be
duplicated: the second create fails with "already exists" and stops every later apply. For each of the
stack's named resources that the state lacks, the runner asks whether an object of that name is live; one
that carries the stack's default tags (for an alias: its key does) is adopted the same way, and one that
does not is reported (it may be someone else's: never imported, never deleted).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

#: Terraform type -> (EC2 describe call, its filter parameter, result key, ID field). Every one of these
#: carries a unique `Name` tag in our stacks (infra/constructs/network.py).
EC2_TYPES: dict[str, tuple[str, str, str, str]] = {
    "aws_vpc": ("describe_vpcs", "Filters", "Vpcs", "VpcId"),
    "aws_subnet": ("describe_subnets", "Filters", "Subnets", "SubnetId"),
    "aws_route_table": ("describe_route_tables", "Filters", "RouteTables", "RouteTableId"),
    "aws_internet_gateway": ("describe_internet_gateways", "Filters", "InternetGateways", "InternetGatewayId"),
    "aws_nat_gateway": ("describe_nat_gateways", "Filter", "NatGateways", "NatGatewayId"),
    "aws_eip": ("describe_addresses", "Filters", "Addresses", "AllocationId"),
    "aws_vpc_endpoint": ("describe_vpc_endpoints", "Filters", "VpcEndpoints", "VpcEndpointId"),
}

#: States in which an object is gone or going: never a candidate.
_GONE = {"deleted", "deleting", "failed"}


@dataclass
class Untracked:
    """What the live account holds beyond the state: `imports` (address -> ID) to adopt, `conflicts` to
    report (one line each, naming the object and what to do)."""

    imports: dict[str, str] = field(default_factory=dict)
    conflicts: list[str] = field(default_factory=list)

    def import_blocks(self) -> dict[str, Any]:
        """A `*.tf.json` document with one `import` block per object to adopt."""
        return {"import": [{"to": address, "id": oid} for address, oid in sorted(self.imports.items())]}


def state_ids(state: dict[str, Any]) -> dict[str, set[str]]:
    """IDs per managed resource address of a raw state (`terraform state pull`). An address whose create
    failed or was interrupted can stay in the state with no instance: it holds no object, so it is left out."""
    out: dict[str, set[str]] = {}
    for res in state.get("resources", []):
        if res.get("mode") == "managed" and not res.get("module"):
            ids = {str(i["attributes"]["id"]) for i in res.get("instances", []) if i.get("attributes", {}).get("id")}
            if ids:
                out[f"{res['type']}.{res['name']}"] = ids
    return out


def _client(config: dict[str, Any], service: str) -> Any:
    """A service the way the stack's AWS provider reaches it: its region, endpoint and static keys (the
    emulator's dummy ones), otherwise the caller's default credentials."""
    provider = (config.get("provider", {}).get("aws") or [{}])[0]
    endpoint = (provider.get("endpoints") or [{}])[0].get(service)
    keys = {}
    if provider.get("access_key") and provider.get("secret_key"):
        keys = {"aws_access_key_id": provider["access_key"], "aws_secret_access_key": provider["secret_key"]}
    session = boto3.session.Session(region_name=provider.get("region"), **keys)
    retries = {"max_attempts": 2 if endpoint else 8, "mode": "standard"}
    return session.client(service, endpoint_url=endpoint, config=Config(retries=retries, read_timeout=60))


# ---- named types: one live object per name, found by the name and checked by its tags ----------------
#: A lookup's answer: None when no object has the name, else the object's tags.
Lookup = Callable[[Any, str], "dict[str, str] | None"]


def _pairs(tags: list[dict[str, str]], key: str = "Key", value: str = "Value") -> dict[str, str]:
    return {t[key]: t[value] for t in tags}


def _absent(err: ClientError, *codes: str) -> None:
    """Re-raise unless the error says the object does not exist."""
    if err.response.get("Error", {}).get("Code") not in codes:
        raise err


def _log_group(logs: Any, name: str) -> dict[str, str] | None:
    groups = logs.describe_log_groups(logGroupNamePrefix=name)["logGroups"]
    if not any(g["logGroupName"] == name for g in groups):
        return None
    return logs.list_tags_log_group(logGroupName=name).get("tags", {})


def _kms_alias(kms: Any, name: str) -> dict[str, str] | None:
    aliases = kms.get_paginator("list_aliases").paginate()
    alias = next((a for page in aliases for a in page["Aliases"] if a["AliasName"] == name), None)
    if alias is None:
        return None
    key = alias.get("TargetKeyId")  # an alias has no tags: its key's stand for it
    return _pairs(kms.list_resource_tags(KeyId=key)["Tags"], "TagKey", "TagValue") if key else {}


def _iam_role(iam: Any, name: str) -> dict[str, str] | None:
    try:
        return _pairs(iam.list_role_tags(RoleName=name)["Tags"])
    except ClientError as err:
        _absent(err, "NoSuchEntity")
        return None


def _dynamodb_table(dynamodb: Any, name: str) -> dict[str, str] | None:
    try:
        arn = dynamodb.describe_table(TableName=name)["Table"]["TableArn"]
    except ClientError as err:
        _absent(err, "ResourceNotFoundException")
        return None
    return _pairs(dynamodb.list_tags_of_resource(ResourceArn=arn).get("Tags", []))


def _ecr_repository(ecr: Any, name: str) -> dict[str, str] | None:
    try:
        arn = ecr.describe_repositories(repositoryNames=[name])["repositories"][0]["repositoryArn"]
    except ClientError as err:
        _absent(err, "RepositoryNotFoundException")
        return None
    return _pairs(ecr.list_tags_for_resource(resourceArn=arn).get("tags", []))


def _eks_cluster(eks: Any, name: str) -> dict[str, str] | None:
    try:
        cluster = eks.describe_cluster(name=name)["cluster"]
    except ClientError as err:
        _absent(err, "ResourceNotFoundException")
        return None
    return None if cluster.get("status") == "DELETING" else cluster.get("tags", {})


#: Terraform type -> (service, lookup by name). The import ID of each is its name.
NAMED_TYPES: dict[str, tuple[str, Lookup]] = {
    "aws_cloudwatch_log_group": ("logs", _log_group),
    "aws_kms_alias": ("kms", _kms_alias),
    "aws_iam_role": ("iam", _iam_role),
    "aws_dynamodb_table": ("dynamodb", _dynamodb_table),
    "aws_ecr_repository": ("ecr", _ecr_repository),
    "aws_eks_cluster": ("eks", _eks_cluster),
}


def _default_tags(config: dict[str, Any]) -> dict[str, str]:
    provider = (config.get("provider", {}).get("aws") or [{}])[0]
    return dict(((provider.get("default_tags") or [{}])[0]).get("tags") or {})


def find_untracked(config: dict[str, Any], state: dict[str, Any], ec2: Any | None = None) -> Untracked:
    """Compare the stack's objects, found live by the stack's default tags and each resource's `Name` tag
    (EC2) or name (named types), with the state. `config` is the stack's cdk.tf.json, `state` the raw state
    (empty before a first apply)."""
    found = Untracked()
    default_tags = _default_tags(config)
    if not default_tags:  # nothing identifies the stack's objects: never guess
        return found
    tracked = state_ids(state)
    _find_named(config, tracked, default_tags, found)
    ec2 = ec2 or _client(config, "ec2")
    for rtype, (call, param, key, id_field) in EC2_TYPES.items():
        by_name = {
            body["tags"]["Name"]: f"{rtype}.{name}"
            for name, body in config.get("resource", {}).get(rtype, {}).items()
            if isinstance(body.get("tags"), dict) and "${" not in str(body["tags"].get("Name", "${"))
        }
        if not by_name:
            continue
        held = set().union(*(ids for address, ids in tracked.items() if address.startswith(rtype + ".")))
        filters = [{"Name": f"tag:{k}", "Values": [v]} for k, v in default_tags.items()]
        filters.append({"Name": "tag:Name", "Values": sorted(by_name)})
        live = getattr(ec2, call)(**{param: filters})[key]
        candidates: dict[str, list[str]] = {}
        for obj in live:
            tags = {t["Key"]: t["Value"] for t in obj.get("Tags", [])}
            # the filters again, here: not every describe call of every endpoint applies tag filters
            # (the emulator's NAT gateways return other stacks' too)
            ours = tags.get("Name") in by_name and all(tags.get(k) == v for k, v in default_tags.items())
            if not ours or obj.get("State") in _GONE or obj[id_field] in held:
                continue
            candidates.setdefault(by_name[tags["Name"]], []).append(obj[id_field])
        for address, ids in sorted(candidates.items()):
            if address not in tracked and len(ids) == 1:
                found.imports[address] = ids[0]
            elif address in tracked:
                found.conflicts.append(
                    f"{', '.join(sorted(ids))}: a second {rtype} tagged like {address}, which the state already "
                    "holds; delete it once you have checked it is unused"
                )
            else:
                found.conflicts.append(
                    f"{', '.join(sorted(ids))}: several {rtype} tagged like {address}, none in the state; "
                    f"import the one to keep (terraform import {address} ID) and delete the others"
                )
    return found


def _find_named(
    config: dict[str, Any], tracked: dict[str, set[str]], default_tags: dict[str, str], found: Untracked
) -> None:
    """Named resources the state lacks whose name is taken live: adopted when tagged as the stack's,
    reported otherwise. Resources the state holds are not looked up (a name cannot have a copy)."""
    clients: dict[str, Any] = {}
    for rtype, (service, lookup) in NAMED_TYPES.items():
        for name, body in sorted(config.get("resource", {}).get(rtype, {}).items()):
            address, live_name = f"{rtype}.{name}", body.get("name")
            if address in tracked or not isinstance(live_name, str) or "${" in live_name:
                continue
            client = clients.get(service) or clients.setdefault(service, _client(config, service))
            tags = lookup(client, live_name)
            if tags is None:
                continue
            if all(tags.get(k) == v for k, v in default_tags.items()):
                found.imports[address] = live_name
            else:
                found.conflicts.append(
                    f"{live_name}: a {rtype} of the name {address} creates exists without the stack's tags; "
                    f"if it is this stack's, import it (terraform import {address} {live_name}), else rename "
                    "or delete it"
                )


def raw_state(text: str) -> dict[str, Any]:
    """`terraform state pull`'s output as a dict (empty when there is no state yet)."""
    return json.loads(text) if text.strip() else {}
