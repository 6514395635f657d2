"""Small, documented corrections to moto 5.2 so a real `terraform apply` → `plan` round-trips cleanly.

Each patch names the moto behaviour, why it matters to Terraform, and what we do. They change what the
emulator *reports*, never what our stacks ask for.

1. EKS add-ons / access entries / Pod Identity associations are missing in moto → `eks_extras`.
2. DescribeCluster has no `accessConfig` → Terraform sees `access_config` missing and plans a cluster
   replacement. We remember the request's `accessConfig` and report its `authenticationMode`.
3. Node groups always carry `remoteAccess {ec2SshKey = "eksKeypair"}` → with a launch template (where AWS
   forbids remote access) Terraform plans a replacement. We drop it for launch-template node groups.
4. Node groups come back without `updateConfig` → a permanent in-place diff. We report the request's.
5. Clusters have no `clusterSecurityGroupId` (EKS creates one per cluster, and managed nodes join it) →
   launch templates get a null security group. We create that group in moto's EC2 backend, in the
   cluster's VPC, report its id, and delete it with the cluster.
6. EC2 placement groups are missing → `ec2_extras`.
8. AMP workspaces come back without `kmsKeyArn` → Terraform plans a workspace replacement. We report
   the request's key.
10. S3 lifecycle configurations come back without the `x-amz-transition-default-minimum-object-size`
   header → the provider polls for about a minute per bucket waiting for its setting to show. We
   echo the value the PUT carried (S3's default otherwise).
9. FSx file-system gaps and data repository associations → `fsx_extras`; the AMP alert manager
   definition → `amp_extras`.
7. CreateLaunchTemplate copies the template's own tags (ResourceType `launch-template`) into the template
   *data*'s TagSpecifications → a permanent in-place diff. We keep them off the data.
12. Managed node groups report an Auto Scaling group name but moto creates no such group, so tagging it
   (`aws_autoscaling_group_tag`, how the node autoscaler's scale-from-zero templates reach the group)
   fails. Tags on a node group's group are kept beside moto's own, with the tags EKS itself puts there
   (`eks:cluster-name`, `eks:nodegroup-name` and the autoscaler's discovery tags); see
   `_node_group_auto_scaling_tags`.
11. Bucket policies: moto treats a `Bool` condition on `aws:SecureTransport` as matched, so our
   deny-non-TLS statement denies every object request. Statements that apply only to insecure transport
   are skipped (the emulator plays AWS's TLS endpoint); see `_secure_transport_for_bucket_policies`.
"""

from __future__ import annotations

import json
import re
import threading
from typing import Any

_lock = threading.Lock()
_access_configs: dict[tuple[str, str], dict[str, Any]] = {}
_cluster_groups: dict[tuple[str, str], str] = {}
_update_configs: dict[tuple[str, str, str], dict[str, Any]] = {}
_workspace_keys: dict[tuple[str, str], str] = {}
_pending_workspace_key: dict[str, str] = {}
_WORKSPACE = re.compile(r"^/workspaces(/(?P<id>[^/]+))?$")
ACCOUNT_ID = "123456789012"

_CLUSTERS = re.compile(r"^/clusters(/(?P<name>[^/]+))?$")
_NODEGROUP = re.compile(r"^/clusters/(?P<cluster>[^/]+)/node-groups(/(?P<name>[^/]+)(/update-config)?)?$")

_patched = False


def apply_model_patches() -> None:
    """Patch 7 (in-process, once)."""
    global _patched
    if _patched:
        return
    from moto.ec2.models.launch_templates import LaunchTemplateBackend

    original = LaunchTemplateBackend.create_launch_template

    def create_launch_template(self, name, description, template_data, tag_spec):  # type: ignore[no-untyped-def]
        specs = template_data.get("TagSpecifications") or []
        template_data["TagSpecifications"] = [s for s in specs if s.get("ResourceType") != "launch-template"]
        return original(self, name, description, template_data, tag_spec)

    LaunchTemplateBackend.create_launch_template = create_launch_template
    _secure_transport_for_bucket_policies()
    _node_group_auto_scaling_tags()
    _patched = True


def _insecure_transport_only(statement: dict[str, Any]) -> bool:
    condition = statement.get("Condition") or {}
    values = (condition.get("Bool") or {}).get("aws:SecureTransport")
    return set(condition) == {"Bool"} and str(values).strip("[]'\" ").lower() == "false"


def _secure_transport_for_bucket_policies() -> None:
    """Patch 11 (in-process): moto evaluates bucket policies without request context and treats a
    condition it cannot evaluate (`Bool` on `aws:SecureTransport`) as matched, so the deny-non-TLS
    statement every bucket of ours carries denied every object request (403). The emulator stands in for
    AWS's TLS endpoint (it only listens on loopback), so a statement that applies only to insecure
    transport never matches here; every other statement is evaluated as before."""
    from moto.iam.access_control import IAMPolicy, PermissionResult
    from moto.s3.models import FakeBucket

    def get_permission(self, action: str, resource: str) -> Any:  # type: ignore[no-untyped-def]
        if self.policy is None:
            return PermissionResult.NEUTRAL
        document = json.loads(self.policy.decode())
        statements = document.get("Statement") or []
        statements = statements if isinstance(statements, list) else [statements]
        kept = [st for st in statements if not _insecure_transport_only(st)]
        return IAMPolicy(json.dumps({**document, "Statement": kept})).is_action_permitted(action, resource)

    FakeBucket.get_permission = get_permission


#: (account, region, group name) → tag key → tag, for the Auto Scaling groups of managed node groups.
_node_group_tags: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = {}


def _node_group_auto_scaling_groups(account: str, region: str) -> dict[str, tuple[str, str]]:
    """Group name → (cluster, node group) for every node group moto's EKS backend holds."""
    from moto.eks.models import eks_backends

    groups = {}
    for cluster in eks_backends[account][region].clusters.values():
        for node_group in cluster.nodegroups.values():
            for group in node_group.resources.get("autoScalingGroups", []):
                groups[group["name"]] = (cluster.name, node_group.nodegroup_name)
    return groups


def _tag(group: str, key: str, value: str, propagate: bool) -> dict[str, Any]:
    return {
        "ResourceId": group,
        "ResourceType": "auto-scaling-group",
        "Key": key,
        "Value": value,
        "PropagateAtLaunch": propagate,
    }


def _node_group_auto_scaling_tags() -> None:
    """Patch 12 (in-process): tags on node groups' Auto Scaling groups, which moto never creates."""
    from moto.autoscaling.models import AutoScalingBackend

    original_create = AutoScalingBackend.create_or_update_tags
    original_delete = AutoScalingBackend.delete_tags
    original_describe = AutoScalingBackend.describe_tags

    def split(self, tags: list[dict[str, Any]]) -> tuple[dict[str, tuple[str, str]], list, list]:  # type: ignore[no-untyped-def]
        groups = _node_group_auto_scaling_groups(self.account_id, self.region_name)
        ours = [t for t in tags if t.get("ResourceId") in groups]
        return groups, ours, [t for t in tags if t.get("ResourceId") not in groups]

    def create_or_update_tags(self, tags):  # type: ignore[no-untyped-def]
        _, ours, others = split(self, tags)
        with _lock:
            for t in ours:
                store = _node_group_tags.setdefault((self.account_id, self.region_name, t["ResourceId"]), {})
                propagate = str(t.get("PropagateAtLaunch", False)).lower() == "true"
                store[t["Key"]] = _tag(t["ResourceId"], t["Key"], t.get("Value", ""), propagate)
        if others:
            original_create(self, others)

    def delete_tags(self, tags):  # type: ignore[no-untyped-def]
        _, ours, others = split(self, tags)
        with _lock:
            for t in ours:
                _node_group_tags.get((self.account_id, self.region_name, t["ResourceId"]), {}).pop(t["Key"], None)
        if others:
            original_delete(self, others)

    def describe_tags(self, filters):  # type: ignore[no-untyped-def]
        tags = list(original_describe(self, filters))
        extra: list[dict[str, Any]] = []
        for group, (cluster, node_group) in _node_group_auto_scaling_groups(self.account_id, self.region_name).items():
            # What EKS puts on the group of every managed node group.
            extra += [
                _tag(group, "eks:cluster-name", cluster, True),
                _tag(group, "eks:nodegroup-name", node_group, True),
                _tag(group, "k8s.io/cluster-autoscaler/enabled", "true", True),
                _tag(group, f"k8s.io/cluster-autoscaler/{cluster}", "owned", True),
            ]
            with _lock:
                extra += list(_node_group_tags.get((self.account_id, self.region_name, group), {}).values())
        for f in filters:
            values = [str(v) for v in f.get("Values", [])]
            field = {"auto-scaling-group": "ResourceId", "key": "Key", "value": "Value"}.get(f["Name"])
            if field:
                extra = [t for t in extra if t[field] in values]
            elif f["Name"] == "propagate-at-launch":
                extra = [t for t in extra if str(t["PropagateAtLaunch"]).lower() in [v.lower() for v in values]]
        return tags + extra

    AutoScalingBackend.create_or_update_tags = create_or_update_tags
    AutoScalingBackend.delete_tags = delete_tags
    AutoScalingBackend.describe_tags = describe_tags


def reset() -> None:
    with _lock:
        _node_group_tags.clear()
        _access_configs.clear()
        _cluster_groups.clear()
        _update_configs.clear()
        _workspace_keys.clear()


def _ec2(region: str):  # type: ignore[no-untyped-def]
    from moto.ec2.models import ec2_backends

    return ec2_backends[ACCOUNT_ID][region]


def wants_eks_rewrite(path: str) -> bool:
    return bool(_CLUSTERS.match(path) or _NODEGROUP.match(path))


_lifecycle_sizes: dict[str, str] = {}


def lifecycle_header(environ: dict[str, Any], start_response):  # type: ignore[no-untyped-def]
    """Patch 10, as a start_response wrapper."""
    bucket = environ.get("PATH_INFO", "/").strip("/").split("/")[0]
    sent = environ.get("HTTP_X_AMZ_TRANSITION_DEFAULT_MINIMUM_OBJECT_SIZE")
    with _lock:
        if environ.get("REQUEST_METHOD") == "PUT":
            _lifecycle_sizes[bucket] = sent or "all_storage_classes_128K"
        value = _lifecycle_sizes.get(bucket, "all_storage_classes_128K")

    def wrapped(status: str, headers: list, exc_info: Any = None):  # type: ignore[no-untyped-def]
        if status.startswith("2"):
            headers = [*headers, ("x-amz-transition-default-minimum-object-size", value)]
        return start_response(status, headers, exc_info)

    return wrapped


def wants_amp_rewrite(path: str) -> bool:
    return bool(_WORKSPACE.match(path))


def rewrite_amp_body(path: str, method: str, region: str, request: bytes, body: bytes) -> bytes:
    """Patch 8: remember a workspace's key on create, report it on describe."""
    try:
        payload = json.loads(body)
    except ValueError:
        return body
    if method == "POST" and path == "/workspaces":
        key = (json.loads(request or b"{}")).get("kmsKeyArn")
        if key and "workspaceId" in payload:
            with _lock:
                _workspace_keys[(region, payload["workspaceId"])] = key
        return body
    workspace = payload.get("workspace")
    if isinstance(workspace, dict):
        with _lock:
            key = _workspace_keys.get((region, workspace.get("workspaceId", "")))
        if key:
            workspace["kmsKeyArn"] = key
    return json.dumps(payload).encode()


def remember_request(path: str, method: str, region: str, body: dict[str, Any]) -> None:
    if method == "POST" and path == "/clusters" and "name" in body:
        name = body["name"]
        with _lock:
            _access_configs[(region, name)] = body.get("accessConfig") or {"authenticationMode": "CONFIG_MAP"}
        subnets = (body.get("resourcesVpcConfig") or {}).get("subnetIds") or []
        if subnets and (region, name) not in _cluster_groups:
            vpc_id = _ec2(region).get_subnet(subnets[0]).vpc_id
            group = _ec2(region).create_security_group(
                f"eks-cluster-sg-{name}", "EKS created security group (emulated)", vpc_id,
                tags={f"kubernetes.io/cluster/{name}": "owned"},
            )  # fmt: skip
            with _lock:
                _cluster_groups[(region, name)] = group.id
    m = _NODEGROUP.match(path)
    if m and method == "POST" and not m["name"] and "nodegroupName" in body and body.get("updateConfig"):
        with _lock:
            _update_configs[(region, m["cluster"], body["nodegroupName"])] = body["updateConfig"]
    if m and method == "POST" and m["name"] and body.get("updateConfig"):  # UpdateNodegroupConfig
        with _lock:
            _update_configs[(region, m["cluster"], m["name"])] = body["updateConfig"]


def forget_cluster(region: str, name: str) -> None:
    with _lock:
        _access_configs.pop((region, name), None)
        group_id = _cluster_groups.pop((region, name), None)
    if group_id:
        _ec2(region).delete_security_group(group_id=group_id)


def rewrite_eks_response(path: str, region: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Patches 2 and 3 on a moto JSON response."""
    cluster = payload.get("cluster")
    if isinstance(cluster, dict) and "name" in cluster:
        with _lock:
            config = _access_configs.get((region, cluster["name"]))
            group_id = _cluster_groups.get((region, cluster["name"]))
        if config is not None:
            cluster["accessConfig"] = {"authenticationMode": config.get("authenticationMode", "CONFIG_MAP")}
        if group_id:
            cluster.setdefault("resourcesVpcConfig", {})["clusterSecurityGroupId"] = group_id
        if path.startswith("/clusters/") and cluster.get("status") == "DELETING":
            forget_cluster(region, cluster["name"])
    nodegroup = payload.get("nodegroup")
    if isinstance(nodegroup, dict):
        if nodegroup.get("launchTemplate"):
            nodegroup.pop("remoteAccess", None)
        with _lock:
            update_config = _update_configs.get((region, nodegroup.get("clusterName"), nodegroup.get("nodegroupName")))
        if update_config:
            nodegroup["updateConfig"] = update_config
    return payload


def rewrite_body(path: str, region: str, body: bytes) -> bytes:
    try:
        payload = json.loads(body)
    except ValueError:
        return body
    if not isinstance(payload, dict):
        return body
    return json.dumps(rewrite_eks_response(path, region, payload)).encode()
