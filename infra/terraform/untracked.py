"""Find the network objects an interrupted apply created in AWS but never recorded in the state.

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
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import boto3
from botocore.config import Config

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


def _ec2_client(config: dict[str, Any]) -> Any:
    """EC2 the way the stack's AWS provider reaches it: its region, endpoint and static keys (the emulator's
    dummy ones), otherwise the caller's default credentials."""
    provider = (config.get("provider", {}).get("aws") or [{}])[0]
    endpoint = (provider.get("endpoints") or [{}])[0].get("ec2")
    keys = {}
    if provider.get("access_key") and provider.get("secret_key"):
        keys = {"aws_access_key_id": provider["access_key"], "aws_secret_access_key": provider["secret_key"]}
    session = boto3.session.Session(region_name=provider.get("region"), **keys)
    retries = {"max_attempts": 2 if endpoint else 8, "mode": "standard"}
    return session.client("ec2", endpoint_url=endpoint, config=Config(retries=retries, read_timeout=60))


def _default_tags(config: dict[str, Any]) -> dict[str, str]:
    provider = (config.get("provider", {}).get("aws") or [{}])[0]
    return dict(((provider.get("default_tags") or [{}])[0]).get("tags") or {})


def find_untracked(config: dict[str, Any], state: dict[str, Any], ec2: Any | None = None) -> Untracked:
    """Compare the stack's EC2 objects, found live by the stack's default tags and each resource's `Name`,
    with the state. `config` is the stack's cdk.tf.json, `state` the raw state (empty before a first apply)."""
    found = Untracked()
    default_tags = _default_tags(config)
    if not default_tags:  # nothing identifies the stack's objects: never guess
        return found
    tracked = state_ids(state)
    ec2 = ec2 or _ec2_client(config)
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


def raw_state(text: str) -> dict[str, Any]:
    """`terraform state pull`'s output as a dict (empty when there is no state yet)."""
    return json.loads(text) if text.strip() else {}
