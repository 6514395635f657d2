"""Least privilege checked both ways: every IAM role of every synthesized stack is allowed what its job
needs and denied what it must never do (tests/infra/privileges.py), evaluated by moto's IAM policy
engine over the role's policies exactly as synthesized: inline documents with the stack's references
resolved to ARNs, plus the AWS managed policies it attaches (moto ships their documents)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import pytest
from moto.iam.access_control import IAMPolicy, PermissionResult
from moto.iam.aws_managed_policies import aws_managed_policies_data

from tests.infra.privileges import ROLES

ACCOUNT, REGION = "123456789012", "us-east-1"
MANAGED = json.loads(aws_managed_policies_data)
_REF = re.compile(r"\$\{(data\.)?([a-z0-9_]+)\.([A-Za-z0-9_-]+)\.([a-z_]+)\}")


def _arn(stack: dict, rtype: str, rid: str) -> str:
    """A concrete ARN for a resource of the stack (what terraform would know after apply)."""
    attrs = stack["resource"][rtype][rid]
    if rtype == "aws_s3_bucket":
        return f"arn:aws:s3:::{attrs.get('bucket') or attrs['bucket_prefix'] + 'abc123'}"
    if rtype == "aws_kms_key":
        return f"arn:aws:kms:{REGION}:{ACCOUNT}:key/{rid}"
    if rtype == "aws_cloudwatch_log_group":
        return f"arn:aws:logs:{REGION}:{ACCOUNT}:log-group:{attrs['name']}"
    if rtype == "aws_fsx_lustre_file_system":
        return f"arn:aws:fsx:{REGION}:{ACCOUNT}:file-system/fs-{rid[-8:].lower()}"
    if rtype == "aws_iam_role":
        return f"arn:aws:iam::{ACCOUNT}:role/{attrs['name']}"
    return f"arn:aws:{rtype.split('_')[1]}:{REGION}:{ACCOUNT}:{rid}"


def resolve(stack: dict, text: str) -> str:
    def sub(m: re.Match) -> str:
        data, rtype, rid, attr = m.groups()
        if data:
            return {"partition": "aws", "account_id": ACCOUNT}.get(attr, m.group(0))
        if attr == "arn":
            return _arn(stack, rtype, rid)
        return stack["resource"][rtype][rid].get(attr, rid)

    return _REF.sub(sub, text)


def _find(stack: dict, rtype: str, pred: Callable[[dict], bool]) -> str | None:
    for rid, attrs in stack["resource"].get(rtype, {}).items():
        if pred(attrs):
            return _arn(stack, rtype, rid)
    return None


#: `{name}` in privileges.py → the resource of the stack it stands for.
PLACEHOLDERS: dict[str, Callable[[dict], str | None]] = {
    "models_bucket": lambda s: _find(s, "aws_s3_bucket", lambda a: "-models-" in a.get("bucket_prefix", "")),
    "logs_bucket": lambda s: _find(s, "aws_s3_bucket", lambda a: "-access-logs-" in a.get("bucket_prefix", "")),
    "models_key": lambda s: _find(s, "aws_kms_key", lambda a: a["description"].startswith("Model artifacts")),
    "volume_key": lambda s: _find(s, "aws_kms_key", lambda a: a["description"].startswith("EBS volumes")),
    "flow_log_group": lambda s: _find(s, "aws_cloudwatch_log_group", lambda a: a["name"].endswith("/vpc-flow-logs")),
    "cluster_log_group": lambda s: _find(s, "aws_cloudwatch_log_group", lambda a: a["name"].endswith("/cluster")),
    "file_system": lambda s: _find(s, "aws_fsx_lustre_file_system", lambda a: True),
    "prediction_table": lambda s: _find(s, "aws_dynamodb_table", lambda a: True),
    "own_node_group": lambda s: f"arn:aws:eks:{_region(s)}:{ACCOUNT}:nodegroup/{_cluster(s)}/{_cluster(s)}-gpu/uuid-1",
    "own_auto_scaling_group": lambda s: (
        f"arn:aws:autoscaling:{_region(s)}:{ACCOUNT}:autoScalingGroup:uuid-2:autoScalingGroupName/eks-gpu-uuid-2"
    ),
}


def _cluster(stack: dict) -> str:
    (cluster,) = stack["resource"]["aws_eks_cluster"].values()
    return cluster["name"]


def _region(stack: dict) -> str:
    (provider,) = stack["provider"]["aws"]
    return provider["region"]


def _refers_to(value: str, rtype: str, rid: str) -> bool:
    return re.search(rf"\$\{{{rtype}\.{re.escape(rid)}\.(id|name)\}}", value) is not None


def role_policies(stack: dict, rid: str) -> list[dict[str, Any]]:
    """Every identity policy document of one role: inline ones, then attached AWS managed ones."""
    docs = []
    for attrs in stack["resource"].get("aws_iam_role_policy", {}).values():
        if _refers_to(attrs["role"], "aws_iam_role", rid):
            docs.append(json.loads(resolve(stack, attrs["policy"])))
    for attrs in stack["resource"].get("aws_iam_role_policy_attachment", {}).values():
        if _refers_to(attrs["role"], "aws_iam_role", rid):
            name = attrs["policy_arn"].rsplit("/", 1)[-1]
            assert ":iam::aws:policy/" in attrs["policy_arn"], f"customer managed policy: {attrs['policy_arn']}"
            assert name in MANAGED, f"moto has no document for AWS managed policy {name}"
            docs.append(MANAGED[name]["Document"])
    return docs


def allowed(docs: list[dict], action: str, resource: str) -> bool:
    """IAM's rule over one principal's identity policies: an explicit Deny wins, else any Allow."""
    results = [IAMPolicy(json.dumps(d)).is_action_permitted(action, resource) for d in docs]
    return PermissionResult.DENIED not in results and PermissionResult.PERMITTED in results


def _roles(stacks: dict[str, dict]) -> list[tuple[str, str, str]]:
    """(stack, role resource id, table key) for every role; the key is the name after `moefleet-<env>-`."""
    out = []
    for env, stack in stacks.items():
        for rid, attrs in stack["resource"].get("aws_iam_role", {}).items():
            out.append((env, rid, attrs["name"].removeprefix(f"moefleet-{env}-")))
    return out


def _fill(stack: dict, resource: str) -> str:
    def sub(m: re.Match) -> str:
        arn = PLACEHOLDERS[m.group(1)](stack)
        assert arn is not None, f"placeholder {{{m.group(1)}}} names no resource of this stack"
        return arn

    return re.sub(r"\{([a-z_]+)\}", sub, resource)


def test_every_role_has_rows(stacks: dict[str, dict]) -> None:
    missing = sorted({key for _, _, key in _roles(stacks)} - set(ROLES))
    assert not missing, f"add the allow/deny rows of these roles to tests/infra/privileges.py: {missing}"
    assert all(role.allow and role.deny for role in ROLES.values())


@pytest.mark.parametrize("env", ["local", "dev", "staging", "prod", "medium-emu", "large-emu", "prod-cb"])
def test_each_role_is_allowed_its_job_and_denied_the_rest(stacks: dict[str, dict], env: str) -> None:
    stack, problems, checked = stacks[env], [], 0
    for _, rid, key in (r for r in _roles({env: stack})):
        role = ROLES[key]
        trust = json.loads(stack["resource"]["aws_iam_role"][rid]["assume_role_policy"])
        services = {
            s
            for st in trust["Statement"]
            for s in _as_list(st.get("Principal", {}).get("Service", []))
            if st["Effect"] == "Allow"
        }
        if services != set(role.assumed_by):
            problems.append(f"{key}: assumed by {sorted(services)}, want {sorted(role.assumed_by)}")
        docs = role_policies(stack, rid)
        for want, rows in ((True, role.allow), (False, role.deny)):
            for action, resource in rows:
                if "{file_system}" in resource and PLACEHOLDERS["file_system"](stack) is None:
                    continue
                checked += 1
                if allowed(docs, action, _fill(stack, resource)) is not want:
                    problems.append(f"{key}: {action} on {resource} is {'denied' if want else 'ALLOWED'}")
    assert checked, f"no role rows evaluated for {env}"
    assert not problems, f"{env}:\n  " + "\n  ".join(problems)


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]
