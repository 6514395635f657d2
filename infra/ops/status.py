"""What is deployed for an environment right now: cluster, node groups, FSx, the cold tier's latest model.

Names come from the stack's outputs (`infra.catalog.outputs.StackOutputs`) when they can be read;
otherwise the cluster and the file system are found by the tags every resource carries
(`project = moe-fleet`, `environment = <name>`, infra/constructs/provider.py), so `status` also works from
a machine that never ran terraform.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from infra.catalog.environments import Environment
from infra.catalog.names import MODELS_PREFIX
from infra.catalog.outputs import StackOutputs
from infra.catalog.sizes import HotTierKind
from infra.ops.aws import error_code, make_client
from infra.ops.weights import MANIFEST_NAME, Manifest


@dataclass(frozen=True)
class Row:
    component: str
    name: str
    state: str
    detail: str = ""


def _tagged(tags: dict[str, str] | None, env: Environment) -> bool:
    tags = tags or {}
    return tags.get("project") == "moe-fleet" and tags.get("environment") == env.name


def gather(
    env: Environment, outputs: StackOutputs | None, endpoint: str | None = None, *, bucket: str | None = None
) -> list[Row]:
    """One row per component. `outputs` None: find the cluster and file system by their tags; `bucket`
    names the cold tier when the outputs cannot (or overrides theirs)."""
    endpoint = (endpoint or env.aws_endpoint) if env.emulated else None
    rows: list[Row] = []
    eks = make_client("eks", env.region, endpoint)
    cluster = (outputs.cluster_name if outputs else None) or _find_cluster(eks, env)
    if not cluster:
        rows.append(Row("cluster", "-", "NOT FOUND", f"no EKS cluster tagged environment={env.name} in {env.region}"))
    else:
        rows += _cluster_rows(eks, make_client("ec2", env.region, endpoint), cluster)
    if env.size_spec.storage.hot_kind is HotTierKind.FSX_LUSTRE:
        fs_id = outputs.fsx_file_system_id if outputs else None
        rows.append(_fsx_row(make_client("fsx", env.region, endpoint), env, fs_id))
    bucket = bucket or (outputs.models_bucket if outputs else None)
    if not bucket:
        rows.append(Row("cold tier", "-", "UNKNOWN", "no stack outputs; pass --bucket or --stack-dir"))
    else:
        prefix = outputs.models_prefix if outputs else MODELS_PREFIX
        rows += _bucket_rows(make_client("s3", env.region, endpoint), bucket, prefix)
    return rows


def _find_cluster(eks: Any, env: Environment) -> str | None:
    for page in eks.get_paginator("list_clusters").paginate():
        for name in page["clusters"]:
            if _tagged(eks.describe_cluster(name=name)["cluster"].get("tags"), env):
                return name
    return None


def _cluster_rows(eks: Any, ec2: Any, cluster: str) -> list[Row]:
    try:
        info = eks.describe_cluster(name=cluster)["cluster"]
    except Exception as err:
        if error_code(err) == "ResourceNotFoundException":
            return [Row("cluster", cluster, "NOT FOUND", "named in the stack outputs but absent")]
        raise
    rows = [Row("cluster", cluster, info["status"], f"Kubernetes {info.get('version')}, {info.get('endpoint', '')}")]
    for page in eks.get_paginator("list_nodegroups").paginate(clusterName=cluster):
        for name in page["nodegroups"]:
            ng = eks.describe_nodegroup(clusterName=cluster, nodegroupName=name)["nodegroup"]
            scaling = ng.get("scalingConfig") or {}
            ready = _running_nodes(ec2, cluster, name)
            rows.append(
                Row(
                    "node group",
                    name,
                    ng["status"],
                    f"desired {scaling.get('desiredSize', 0)} / ready {ready} "
                    f"(min {scaling.get('minSize', 0)}, max {scaling.get('maxSize', 0)}; "
                    f"{', '.join(ng.get('instanceTypes') or [])})",
                )
            )
    return rows


def _running_nodes(ec2: Any, cluster: str, nodegroup: str) -> int:
    """Instances of the node group that are running (EKS tags them with the cluster and node group)."""
    filters = [
        {"Name": "tag:eks:cluster-name", "Values": [cluster]},
        {"Name": "tag:eks:nodegroup-name", "Values": [nodegroup]},
        {"Name": "instance-state-name", "Values": ["running"]},
    ]
    count = 0
    for page in ec2.get_paginator("describe_instances").paginate(Filters=filters):
        count += sum(len(r["Instances"]) for r in page["Reservations"])
    return count


def _fsx_row(fsx: Any, env: Environment, fs_id: str | None) -> Row:
    found = []
    for page in fsx.get_paginator("describe_file_systems").paginate():
        for fs in page["FileSystems"]:
            tags = {t["Key"]: t["Value"] for t in fs.get("Tags") or []}
            if fs["FileSystemId"] == fs_id or (not fs_id and _tagged(tags, env)):
                found.append(fs)
    if not found:
        return Row("FSx for Lustre", fs_id or "-", "NOT FOUND", "hot tier of this size; deploy the stack")
    fs = found[0]
    detail = f"{fs.get('StorageCapacity')} GiB, {fs.get('DNSName', '')}"
    return Row("FSx for Lustre", fs["FileSystemId"], str(fs.get("Lifecycle", "UNKNOWN")), detail)


def latest_revision(s3: Any, bucket: str, prefix: str) -> tuple[str, Any] | None:
    """(revision prefix, LastModified) of the most recently completed upload: the newest manifest."""
    newest = None
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents") or []:
            if obj["Key"].endswith("/" + MANIFEST_NAME) and (newest is None or obj["LastModified"] > newest[1]):
                newest = (obj["Key"].removesuffix(MANIFEST_NAME), obj["LastModified"])
    return newest


def _bucket_rows(s3: Any, bucket: str, prefix: str) -> list[Row]:
    try:
        s3.head_bucket(Bucket=bucket)
    except Exception as err:
        if error_code(err) in ("404", "NoSuchBucket", "NotFound"):
            return [Row("cold tier", bucket, "NOT FOUND", "bucket named in the outputs is absent")]
        raise
    rows = [Row("cold tier", bucket, "OK", f"s3://{bucket}/{prefix}")]
    newest = latest_revision(s3, bucket, prefix)
    if newest is None:
        rows.append(Row("latest model", "-", "NONE", "no complete upload yet (moefleet weights upload)"))
        return rows
    key, when = newest
    manifest = Manifest.from_json(s3.get_object(Bucket=bucket, Key=key + MANIFEST_NAME)["Body"].read(), key)
    detail = f"{len(manifest.files)} files, {manifest.total_bytes / 1e9:.2f} GB, uploaded {when:%Y-%m-%d %H:%M} UTC"
    rows.append(Row("latest model", f"{manifest.model} @ {manifest.revision}", "COMPLETE", detail))
    return rows
