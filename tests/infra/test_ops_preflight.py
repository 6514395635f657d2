"""`moefleet preflight` against the emulator: instance offerings per AZ (moto's real offering data), GPU
vCPU quotas and capacity reservations (infra/embedded/emulator/ops_extras.py), the Kubernetes version (not
answerable by moto: the row must say so). Each test uses its own environment names and, where it changes
quotas, its own region, so the shared emulator's state never leaks between tests."""

from __future__ import annotations

import os
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from infra.catalog.environments import load_environments
from infra.ops.aws import make_client
from infra.ops.preflight import Status, gpu_pool_azs, run_preflight

pytestmark = pytest.mark.moto
ROOT = Path(__file__).resolve().parents[2]
MOEFLEET = ROOT / ".venv" / "bin" / "moefleet"


@pytest.fixture(scope="module")
def ops_emulator(emulator: str) -> str:
    """The shared emulator; infra/embedded/emulator/ops_extras.py serves the quotas and reservations moto lacks."""
    return emulator


def _env_file(tmp_path: Path, name: str, size: str, region: str, azs: list[str], extra: str = "") -> Path:
    path = tmp_path / "environments.toml"
    azs_toml = ", ".join(f'"{az}"' for az in azs)
    path.write_text(
        f"""
[environments.{name}]
size = "{size}"
region = "{region}"
azs = [{azs_toml}]
vpc_cidr = "10.91.0.0/16"
kubernetes_version = "1.33"
aws_endpoint = "http://127.0.0.1:4566"
state = {{ kind = "local" }}
{extra}
"""
    )
    return path


def _moefleet(*args: str, endpoint: str, environments: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MOEFLEET_EMULATOR_ENDPOINT": endpoint, "MOEFLEET_ENVIRONMENTS": str(environments)}
    return subprocess.run([str(MOEFLEET), *args], capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)


def test_devtest_passes_and_says_what_the_emulator_cannot_check(ops_emulator: str, tmp_path: Path) -> None:
    path = _env_file(tmp_path, "pf-dev", "devtest", "us-east-1", ["us-east-1a", "us-east-1b", "us-east-1c"])
    proc = _moefleet("preflight", "pf-dev", endpoint=ops_emulator, environments=path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "g6e.4xlarge offered (GPU pool)" in out and "m6i.large offered (system pool)" in out
    assert "L-DB2E81BA" in out and "= 16" in out  # 1 node × 16 vCPUs against the G/VT quota
    assert "none configured" in out
    assert "not checkable on the emulator" in out
    assert "FAIL" not in out and "\x1b[" not in out
    assert "preflight pf-dev: ok" in out


def test_instance_type_missing_in_an_az_and_quota_too_low_fail_with_remedies(ops_emulator: str, tmp_path: Path) -> None:
    """moto's offering data (like AWS) has p4de.24xlarge in us-east-1b/c only; 96 vCPUs > the 64 of the quota."""
    path = _env_file(tmp_path, "pf-medium", "medium", "us-east-1", ["us-east-1a", "us-east-1b"])
    env = load_environments(path)["pf-medium"]
    checks = run_preflight(env, ops_emulator)
    offered = next(c for c in checks if c.name.startswith("p4de.24xlarge"))
    assert offered.status is Status.FAIL
    assert "not offered in us-east-1a" in offered.detail
    assert "us-east-1b" in offered.remedy and "p5.48xlarge" in offered.remedy
    quota = next(c for c in checks if c.name.startswith("GPU vCPU quota"))
    assert quota.status is Status.FAIL and "= 96" in quota.detail
    assert "--quota-code L-417A185B --desired-value 96" in quota.remedy
    proc = _moefleet("preflight", "pf-medium", endpoint=ops_emulator, environments=path)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert "2 check(s) failed" in proc.stdout
    assert "request-service-quota-increase" in proc.stdout


def test_large_with_quota_and_matching_reservation_passes(ops_emulator: str, tmp_path: Path) -> None:
    region, azs = "us-west-2", ["us-west-2a", "us-west-2b"]
    ec2 = make_client("ec2", region, ops_emulator)
    reservation = ec2.create_capacity_reservation(
        InstanceType="p5.48xlarge", InstancePlatform="Linux/UNIX", AvailabilityZone="us-west-2a", InstanceCount=2
    )["CapacityReservation"]["CapacityReservationId"]
    extra = f'overrides = {{ capacity_reservation_id = "{reservation}", gpu_nodes = {{ min = 0, max = 2 }} }}'
    path = _env_file(tmp_path, "pf-large", "large", region, azs, extra)
    env = load_environments(path)["pf-large"]
    assert gpu_pool_azs(env) == ["us-west-2a"], "a placement group keeps the GPU pool in one AZ"

    before = {c.name.split(" ")[0]: c for c in run_preflight(env, ops_emulator)}
    assert before["GPU"].status is Status.FAIL and "= 384" in before["GPU"].detail  # 2 × 192 > 64
    assert before["capacity"].status is Status.PASS

    quotas = make_client("service-quotas", region, ops_emulator)
    quotas.request_service_quota_increase(ServiceCode="ec2", QuotaCode="L-417A185B", DesiredValue=384)
    proc = _moefleet("preflight", "pf-large", endpoint=ops_emulator, environments=path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"capacity reservation {reservation}" in proc.stdout and "2 × p5.48xlarge in us-west-2a" in proc.stdout


def test_reservation_that_does_not_match_or_exist_fails(ops_emulator: str, tmp_path: Path) -> None:
    region, azs = "us-east-2", ["us-east-2a", "us-east-2b"]
    ec2 = make_client("ec2", region, ops_emulator)
    wrong = ec2.create_capacity_reservation(
        InstanceType="p4d.24xlarge", InstancePlatform="Linux/UNIX", AvailabilityZone="us-east-2b", InstanceCount=1
    )["CapacityReservation"]["CapacityReservationId"]
    path = _env_file(tmp_path, "pf-cr", "large", region, azs, f'overrides = {{ capacity_reservation_id = "{wrong}" }}')
    check = next(c for c in run_preflight(load_environments(path)["pf-cr"], ops_emulator) if "capacity" in c.name)
    assert check.status is Status.FAIL
    for expected in ("instance type p4d.24xlarge", "AZ us-east-2b", "1 instance(s) reserved, pool max is 2"):
        assert expected in check.detail
    assert "create-capacity-reservation --instance-type p5.48xlarge --availability-zone us-east-2a" in check.remedy

    ec2.cancel_capacity_reservation(CapacityReservationId=wrong)
    check = next(c for c in run_preflight(load_environments(path)["pf-cr"], ops_emulator) if "capacity" in c.name)
    assert "state cancelled (needs active)" in check.detail

    absent = _env_file(
        tmp_path, "pf-cr2", "large", region, azs, 'overrides = { capacity_reservation_id = "cr-00000000000000001" }'
    )
    proc = _moefleet("preflight", "pf-cr2", endpoint=ops_emulator, environments=absent)
    assert proc.returncode == 4
    assert "cr-00000000000000001 does not exist in us-east-2" in proc.stdout


def _buy_block(region: str, emulator: str, start: datetime, hours: int, count: int = 2) -> str:
    """A Capacity Block for ML bought through the real API (the emulator accepts a start in the past)."""
    ec2 = make_client("ec2", region, emulator)
    offer = ec2.describe_capacity_block_offerings(
        InstanceType="p5.48xlarge", InstanceCount=count, CapacityDurationHours=hours, StartDateRange=start
    )["CapacityBlockOfferings"][0]
    assert offer["AvailabilityZone"] == f"{region}a"
    bought = ec2.purchase_capacity_block(
        CapacityBlockOfferingId=offer["CapacityBlockOfferingId"], InstancePlatform="Linux/UNIX"
    )["CapacityReservation"]
    assert bought["ReservationType"] == "capacity-block"
    return bought["CapacityReservationId"]


def _block_check(tmp_path: Path, name: str, region: str, block: str, emulator: str):  # type: ignore[no-untyped-def]
    extra = f'overrides = {{ capacity_block_id = "{block}", gpu_nodes = {{ min = 0, max = 2 }} }}'
    (tmp_path / name).mkdir()
    path = _env_file(tmp_path / name, name, "large", region, [f"{region}a", f"{region}b"], extra)
    env = load_environments(path)[name]
    checks = {c.name.split(" ")[0] + " " + c.name.split(" ")[1]: c for c in run_preflight(env, emulator)}
    assert checks["capacity reservation"].status is Status.SKIP
    return checks["capacity block"], path


def test_active_capacity_block_passes_and_prints_its_window(ops_emulator: str, tmp_path: Path) -> None:
    region = "eu-west-1"
    now = datetime.now(UTC).replace(microsecond=0)
    block = _buy_block(region, ops_emulator, now - timedelta(hours=1), 72)
    check, path = _block_check(tmp_path, "pf-cb", region, block, ops_emulator)
    assert check.status is Status.PASS, check
    assert check.name == f"capacity block {block}"
    assert "active, 2 × p5.48xlarge in eu-west-1a" in check.detail
    end = now + timedelta(hours=71)
    assert f"{(now - timedelta(hours=1)):%Y-%m-%d %H:%M} UTC → {end:%Y-%m-%d %H:%M} UTC" in check.detail
    scheduled = _buy_block(region, ops_emulator, now + timedelta(days=2), 24)
    check, _ = _block_check(tmp_path, "pf-cb2", region, scheduled, ops_emulator)
    assert (
        check.status is Status.PASS
        and check.detail.startswith("scheduled")
        and "once the block is active" in check.detail
    )
    proc = _moefleet("preflight", "pf-cb", endpoint=ops_emulator, environments=path)
    assert f"capacity block {block}" in proc.stdout and "active, 2 × p5.48xlarge" in proc.stdout, proc.stdout


def test_expired_ending_or_wrong_capacity_block_fails(ops_emulator: str, tmp_path: Path) -> None:
    region = "eu-west-1"
    now = datetime.now(UTC)
    expired = _buy_block(region, ops_emulator, now - timedelta(hours=48), 24)
    check, path = _block_check(tmp_path, "pf-cbx", region, expired, ops_emulator)
    assert check.status is Status.FAIL
    assert "state expired (needs scheduled or active)" in check.detail and "→" in check.detail
    assert "describe-capacity-block-offerings --instance-type p5.48xlarge --instance-count 2" in check.remedy
    proc = _moefleet("preflight", "pf-cbx", endpoint=ops_emulator, environments=path)
    assert proc.returncode == 4 and "state expired" in proc.stdout, proc.stdout

    ending = _buy_block(region, ops_emulator, now - timedelta(hours=2), 24)
    check, _ = _block_check(tmp_path, "pf-cbe", region, ending, ops_emulator)
    assert check.status is Status.FAIL and "in 22.0 h (less than 1 day, 0:00:00 left)" in check.detail
    assert f"describe-capacity-block-extension-offerings --capacity-reservation-id {ending}" in check.remedy

    small = _buy_block(region, ops_emulator, now - timedelta(hours=1), 48, count=1)
    check, _ = _block_check(tmp_path, "pf-cbs", region, small, ops_emulator)
    assert check.status is Status.FAIL and "1 instance(s) reserved, pool max is 2" in check.detail

    odcr = make_client("ec2", region, ops_emulator).create_capacity_reservation(
        InstanceType="p5.48xlarge", InstancePlatform="Linux/UNIX", AvailabilityZone=f"{region}a", InstanceCount=2
    )["CapacityReservation"]["CapacityReservationId"]
    check, _ = _block_check(tmp_path, "pf-cbo", region, odcr, ops_emulator)
    assert check.status is Status.FAIL and "not a capacity block" in check.detail
    assert f"overrides.capacity_reservation_id = '{odcr}'" in check.remedy

    check, _ = _block_check(tmp_path, "pf-cbn", region, "cr-0000000000000000a", ops_emulator)
    assert check.status is Status.FAIL and "does not exist in eu-west-1" in check.detail


def test_unknown_environment_is_bad_input(ops_emulator: str, tmp_path: Path) -> None:
    path = _env_file(tmp_path, "pf-known", "devtest", "us-east-1", ["us-east-1a", "us-east-1b"])
    proc = _moefleet("preflight", "nope", endpoint=ops_emulator, environments=path)
    assert proc.returncode == 2
    assert "unknown environment 'nope'" in proc.stderr and "allowed: pf-known" in proc.stderr
