"""Preflight: what must be true in the AWS account before a GPU environment is deployed.

GPU capacity errors otherwise show up only in node-group or autoscaler logs, long after `cdktf deploy`
returned. Each check returns a row with a remedy; the CLI prints them and exits non-zero when any
fails. The emulator cannot answer every question; such rows say so instead of passing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from infra.catalog.environments import Environment
from infra.catalog.sizes import allowed_instance_types
from infra.ops.aws import error_code, make_client

#: Service Quotas codes of the EC2 on-demand vCPU quotas, per instance family letter.
GPU_QUOTAS = {
    "p": ("L-417A185B", "Running On-Demand P instances"),
    "g": ("L-DB2E81BA", "Running On-Demand G and VT instances"),
}
#: A capacity block that ends sooner than this fails preflight: nodes would be reclaimed mid-deploy or soon after.
CAPACITY_BLOCK_MIN_REMAINING = timedelta(hours=24)
_BLOCK_OK_STATES = ("scheduled", "active")
_NOT_IMPLEMENTED = {"404", "NotImplemented", "NotImplementedException", "InvalidAction", "UnknownOperationException"}


class Status(StrEnum):
    PASS = "pass"
    FAIL = "FAIL"
    SKIP = "skip"  # nothing to check (e.g. no capacity reservation configured)
    NOT_CHECKABLE = "n/a"  # the emulator lacks the API; never counted as a pass on real AWS


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    remedy: str = ""


def gpu_pool_azs(env: Environment) -> list[str]:
    """AZs the GPU node group spans: all of them, or the first only when a cluster placement group or a
    reservation pins it to one AZ (infra/constructs/node_pools.py puts such a pool in the first private subnet)."""
    return env.azs[:1] if env.gpu_pool_single_az else list(env.azs)


def run_preflight(env: Environment, endpoint: str | None = None) -> list[Check]:
    """Every check for one environment, against `endpoint` (emulator) or the account in the environment."""
    # Only emulated environments may be re-pointed (at the test's or demo's emulator port).
    endpoint = (endpoint or env.aws_endpoint) if env.emulated else None
    ec2 = make_client("ec2", env.region, endpoint)
    checks: list[Check] = []
    checks += offerings(ec2, env)
    checks.append(_guarded("GPU vCPU quota", lambda: quota(make_client("service-quotas", env.region, endpoint), env)))
    checks.append(_guarded("capacity reservation", lambda: capacity_reservation(ec2, env)))
    if env.gpu_capacity_block:
        checks.append(_guarded("capacity block", lambda: capacity_block(ec2, env)))
    checks.append(
        _guarded(
            f"Kubernetes {env.kubernetes_version}",
            lambda: kubernetes_version(make_client("eks", env.region, endpoint), env, emulated=env.emulated),
        )
    )
    return checks


def _guarded(name: str, check: Callable[[], Check]) -> Check:
    """An AWS error in one check becomes a failed row (the others still run), except missing credentials."""
    from botocore.exceptions import ClientError, EndpointConnectionError

    try:
        return check()
    except ClientError as err:
        return Check(name, Status.FAIL, f"AWS error: {err}", "check the credentials' IAM permissions and region")
    except EndpointConnectionError as err:
        return Check(name, Status.FAIL, f"cannot reach AWS: {err}", "check the network, region or aws_endpoint")


def offerings(ec2: Any, env: Environment) -> list[Check]:
    """The GPU type must be offered in every AZ of the GPU pool, the system type in every AZ."""
    gpu, system = env.gpu_instance_type, env.size_spec.system_instance_type
    wanted = {gpu: gpu_pool_azs(env), system: list(env.azs)}
    pages = ec2.get_paginator("describe_instance_type_offerings").paginate(
        LocationType="availability-zone",
        Filters=[{"Name": "instance-type", "Values": sorted(wanted)}, {"Name": "location", "Values": env.azs}],
    )
    offered: dict[str, set[str]] = {name: set() for name in wanted}
    for page in pages:
        for offer in page["InstanceTypeOfferings"]:
            offered.setdefault(offer["InstanceType"], set()).add(offer["Location"])
    checks = []
    for name, azs in wanted.items():
        role = "GPU pool" if name == gpu else "system pool"
        missing = [az for az in azs if az not in offered[name]]
        label = f"{name} offered ({role})"
        if not missing:
            checks.append(Check(label, Status.PASS, f"in {', '.join(azs)}"))
            continue
        where = ", ".join(sorted(offered[name])) or "none of the configured AZs"
        remedy = f"set `azs` in environments.toml to AZs that offer {name} ({where})"
        if name == gpu:
            others = [t for t in allowed_instance_types(env.size_spec) if t != gpu]
            if others:
                remedy += f", or set overrides.instance_type to one of: {', '.join(others)}"
        checks.append(Check(label, Status.FAIL, f"not offered in {', '.join(missing)}; offered in {where}", remedy))
    return checks


def quota(service_quotas: Any, env: Environment) -> Check:
    """The on-demand vCPU quota of the GPU family must cover the pool at its maximum size."""
    it = env.gpu_instance_spec
    family = it.name[0]
    name = "GPU vCPU quota"
    if family not in GPU_QUOTAS:
        return Check(name, Status.SKIP, f"no GPU quota code known for {it.name}")
    code, quota_name = GPU_QUOTAS[family]
    nodes = env.gpu_node_counts[2]
    needed = nodes * it.vcpus
    label = f"{name} {code}"
    try:
        value = service_quotas.get_service_quota(ServiceCode="ec2", QuotaCode=code)["Quota"]["Value"]
    except Exception as err:
        if error_code(err) != "NoSuchResourceException":
            raise
        try:  # never adjusted in this account: the AWS default applies
            value = service_quotas.get_aws_default_service_quota(ServiceCode="ec2", QuotaCode=code)["Quota"]["Value"]
        except Exception as err2:
            if env.emulated and error_code(err2) in {"NoSuchResourceException", *_NOT_IMPLEMENTED}:
                return Check(label, Status.NOT_CHECKABLE, "not checkable on the emulator (no EC2 quotas served)")
            raise
    detail = f"{quota_name}: {value:g} vCPUs; pool max {nodes} × {it.name} ({it.vcpus} vCPUs) = {needed}"
    if value >= needed:
        return Check(label, Status.PASS, detail)
    return Check(
        label,
        Status.FAIL,
        detail,
        f"aws service-quotas request-service-quota-increase --service-code ec2 --quota-code {code} "
        f"--desired-value {needed} --region {env.region} (or lower overrides.gpu_nodes.max)",
    )


def capacity_reservation(ec2: Any, env: Environment) -> Check:
    """A configured reservation must exist, be active, and match the pool's instance type, AZ and size."""
    rid = env.overrides.capacity_reservation_id
    name = "capacity reservation"
    if not rid:
        if env.gpu_capacity_block:
            return Check(name, Status.SKIP, "none configured (a capacity block is used: see its row)")
        return Check(name, Status.SKIP, "none configured (on-demand capacity)")
    label = f"{name} {rid}"
    remedy_new = (
        f"create one (aws ec2 create-capacity-reservation --instance-type {env.gpu_instance_type} "
        f"--availability-zone {gpu_pool_azs(env)[0]} --instance-count {env.gpu_node_counts[2]} "
        "--instance-platform Linux/UNIX) and set overrides.capacity_reservation_id, or remove the override"
    )
    cr = _reservation(ec2, env, rid, label, remedy_new)
    if isinstance(cr, Check):
        return cr
    problems = []
    if cr["State"] != "active":
        problems.append(f"state {cr['State']} (needs active)")
    problems += _fit_problems(cr, env)
    detail = f"{cr['State']}, {cr['TotalInstanceCount']} × {cr['InstanceType']} in {cr['AvailabilityZone']}"
    if problems:
        return Check(label, Status.FAIL, "; ".join(problems), remedy_new)
    return Check(label, Status.PASS, detail)


def capacity_block(ec2: Any, env: Environment, now: datetime | None = None) -> Check:
    """A configured Capacity Block for ML must exist, be a block, be scheduled or active with more than
    CAPACITY_BLOCK_MIN_REMAINING left, and match the pool's instance type, AZ and size."""
    rid = env.overrides.capacity_block_id
    label = f"capacity block {rid}"
    now = now or datetime.now(UTC)
    remedy_new = (
        f"buy one (aws ec2 describe-capacity-block-offerings --instance-type {env.gpu_instance_type} "
        f"--instance-count {env.gpu_node_counts[2]} --capacity-duration-hours 24 --region {env.region}, then "
        "aws ec2 purchase-capacity-block --capacity-block-offering-id … --instance-platform Linux/UNIX) and set "
        "overrides.capacity_block_id, or remove the override (on-demand capacity)"
    )
    cr = _reservation(ec2, env, rid, label, remedy_new)
    if isinstance(cr, Check):
        return cr
    if cr.get("ReservationType", "default") != "capacity-block":
        return Check(
            label,
            Status.FAIL,
            f"{rid} is an On-Demand Capacity Reservation, not a capacity block",
            f"set overrides.capacity_reservation_id = {rid!r} instead of overrides.capacity_block_id",
        )
    start, end = cr.get("StartDate"), cr.get("EndDate")
    window = f"{_when(start)} → {_when(end)}"
    detail = f"{cr['State']}, {cr['TotalInstanceCount']} × {cr['InstanceType']} in {cr['AvailabilityZone']}, {window}"
    problems = []
    remedy = remedy_new
    if cr["State"] not in _BLOCK_OK_STATES:
        problems.append(f"state {cr['State']} (needs {' or '.join(_BLOCK_OK_STATES)})")
    elif end is not None and end - now < CAPACITY_BLOCK_MIN_REMAINING:
        hours = max((end - now).total_seconds() / 3600, 0)
        problems.append(f"ends {_when(end)}, in {hours:.1f} h (less than {CAPACITY_BLOCK_MIN_REMAINING} left)")
        remedy = (
            f"extend it (aws ec2 describe-capacity-block-extension-offerings --capacity-reservation-id {rid} "
            "--capacity-block-extension-duration-hours 24, then aws ec2 purchase-capacity-block-extension), or "
            + remedy_new
        )
    problems += _fit_problems(cr, env)
    if problems:
        return Check(label, Status.FAIL, "; ".join(problems) + f" [{window}]", remedy)
    note = " (GPU nodes start only once the block is active)" if cr["State"] == "scheduled" else ""
    return Check(label, Status.PASS, detail + note)


def _reservation(ec2: Any, env: Environment, rid: str, label: str, remedy: str) -> dict[str, Any] | Check:
    """The capacity reservation (On-Demand or block) `rid`, or the failing Check that says why there is none."""
    try:
        found = ec2.describe_capacity_reservations(CapacityReservationIds=[rid])["CapacityReservations"]
    except Exception as err:
        if error_code(err) in ("InvalidCapacityReservationId.NotFound", "InvalidCapacityReservationId.Malformed"):
            return Check(label, Status.FAIL, f"{rid} does not exist in {env.region}", remedy)
        if env.emulated and error_code(err) in _NOT_IMPLEMENTED:
            return Check(label, Status.NOT_CHECKABLE, "not checkable on the emulator (no capacity reservations)")
        raise
    if not found:
        return Check(label, Status.FAIL, f"{rid} does not exist in {env.region}", remedy)
    return found[0]


def _fit_problems(cr: dict[str, Any], env: Environment) -> list[str]:
    """Why reserved capacity cannot hold the GPU pool: another instance type, another AZ, too few instances."""
    problems = []
    if cr["InstanceType"] != env.gpu_instance_type:
        problems.append(f"instance type {cr['InstanceType']} (pool uses {env.gpu_instance_type})")
    if cr["AvailabilityZone"] not in gpu_pool_azs(env):
        problems.append(f"AZ {cr['AvailabilityZone']} (pool in {', '.join(gpu_pool_azs(env))})")
    nodes = env.gpu_node_counts[2]
    if int(cr.get("TotalInstanceCount", 0)) < nodes:
        problems.append(f"{cr.get('TotalInstanceCount')} instance(s) reserved, pool max is {nodes}")
    return problems


def _when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC") if value is not None else "?"


def kubernetes_version(eks: Any, env: Environment, emulated: bool) -> Check:
    """The configured Kubernetes version must still be offered by EKS (standard or extended support)."""
    version = env.kubernetes_version
    label = f"Kubernetes {version}"
    try:
        versions = eks.describe_cluster_versions(clusterVersions=[version])["clusterVersions"]
    except Exception as err:
        if emulated and error_code(err) in _NOT_IMPLEMENTED:
            return Check(label, Status.NOT_CHECKABLE, "not checkable on the emulator (no DescribeClusterVersions)")
        raise
    remedy = "set kubernetes_version in environments.toml to a version EKS offers (aws eks describe-cluster-versions)"
    if not versions:
        return Check(label, Status.FAIL, f"EKS does not offer {version} in {env.region}", remedy)
    status = str(versions[0].get("versionStatus") or versions[0].get("status") or "").upper()
    if status in ("UNSUPPORTED", "END_OF_SUPPORT"):
        return Check(label, Status.FAIL, f"{version} is {status.lower()}", remedy)
    note = " (extended support is billed at a higher control-plane price)" if "EXTENDED" in status else ""
    return Check(label, Status.PASS, f"{status.lower() or 'offered'}{note}")


def failed(checks: list[Check]) -> list[Check]:
    return [c for c in checks if c.status is Status.FAIL]
