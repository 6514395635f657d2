"""The infrastructure fault sequence on one environment, run in the background from the start of the
session (tests/conftest.py `infra_faults`): terraform mostly waits, so the rest of the suite runs
meanwhile. It records what it observed; tests/infra/test_infra_faults.py asserts on the record.

1. apply, SIGINT once the network exists (before the cluster), then apply again (the runner adopts what the
   interrupt left untracked: infra/terraform/untracked.py);
2. a second apply while a first one runs (the state lock), then a replan once the first has ended;
3. destroy, then list every resource type the stack creates through boto3.
"""

from __future__ import annotations

import collections
import json
import signal
import subprocess
import time
import traceback
from pathlib import Path
from typing import Any

from infra.terraform.runner import StateLockedError, Terraform
from tests.infra.helpers import resource_types
from tests.infra.inventory import inventory
from tests.infra.lifecycle import aws

ENV = "faults-emu"
CLUSTER = f"moefleet-{ENV}"


def _popen(tf: Terraform, log: Path, *args: str) -> subprocess.Popen:
    """terraform in the background, its output in a file (a pipe nobody reads would fill and block it)."""
    with log.open("w") as fh:
        return subprocess.Popen(
            ["terraform", *args, "-no-color"], cwd=tf.workdir, env=tf.env, stdout=fh, stderr=subprocess.STDOUT
        )


def second_apply(tf: Terraform, first: subprocess.Popen) -> dict[str, Any]:
    """Apply while ``first`` holds the state: ``second`` is the lock error's message (None if the apply ran),
    ``info`` its lock fields, ``first_running_after`` whether the holder still ran when it was refused."""
    out: dict[str, Any] = {}
    try:
        tf.apply()
        out["second"] = None
    except StateLockedError as err:
        out["second"], out["info"] = str(err), err.info
    out["first_running_after"] = first.poll() is None
    return out


def _managed(tf: Terraform) -> collections.Counter:
    return collections.Counter(r["type"] for r in tf.state_resources() if r["mode"] == "managed")


_SUBNET_ARGS = (("cidr_block", "CidrBlock"), ("availability_zone", "AvailabilityZone"))


def cancelled_create(tf: Terraform, emulator: str) -> str | None:
    """Leave what an interrupt leaves when it cancels a create call that AWS had already received: the object,
    created with the stack's tags, and no state entry. Whether the real interrupt lands inside such a call is
    a matter of milliseconds (it did in some runs: a subnet, a route table), so one is added for sure: a route
    table, or failing that a subnet, that the interrupted apply had not created. When the graceful stop had
    already finished all of them (a fast run), a route table is dropped from the state instead: the same
    shape, a tagged object the state does not hold. Returns its address."""
    config = json.loads((tf.workdir / "cdk.tf.json").read_text())
    state = {r["address"]: r["values"] for r in tf.state_resources() if r["mode"] == "managed"}
    vpc = next(v["id"] for address, v in state.items() if address.startswith("aws_vpc."))
    default_tags = config["provider"]["aws"][0]["default_tags"][0]["tags"]
    ec2 = aws("ec2", emulator)
    in_vpc = [{"Name": "vpc-id", "Values": [vpc]}]
    kinds = (
        ("aws_route_table", "route-table", ec2.describe_route_tables, "RouteTables", ec2.create_route_table, ()),
        ("aws_subnet", "subnet", ec2.describe_subnets, "Subnets", ec2.create_subnet, _SUBNET_ARGS),
    )
    for rtype, kind, describe, key, create, args in kinds:
        live = {t["Value"] for o in describe(Filters=in_vpc)[key] for t in o.get("Tags", []) if t["Key"] == "Name"}
        for name, body in config["resource"].get(rtype, {}).items():
            if f"{rtype}.{name}" in state or body["tags"]["Name"] in live:
                continue
            tags = [{"Key": k, "Value": v} for k, v in {**default_tags, **body["tags"]}.items()]
            extra = {param: body[attr] for attr, param in args}
            create(VpcId=vpc, TagSpecifications=[{"ResourceType": kind, "Tags": tags}], **extra)
            return f"{rtype}.{name}"
    tracked = sorted(address for address in state if address.startswith("aws_route_table."))
    if not tracked:
        return None
    subprocess.run(
        ["terraform", "state", "rm", tracked[0]], cwd=tf.workdir, env=tf.env, check=True, capture_output=True
    )
    return tracked[0]


def interrupted_apply(tf: Terraform, emulator: str, want: dict[str, int]) -> dict[str, Any]:
    log = tf.workdir.parent / "interrupted-apply.log"
    apply = _popen(tf, log, "apply", "-auto-approve", "-input=false")
    deadline = time.monotonic() + 600
    while not inventory(emulator, CLUSTER, {"aws_subnet"})["aws_subnet"]:
        if apply.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"apply ended or stalled before creating a subnet:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    apply.send_signal(signal.SIGINT)
    apply.wait(timeout=600)
    text = log.read_text()  # the first line says so; a cancelled create's errors can fill the tail
    out = {"returncode": apply.returncode, "log": text[-4000:], "partial": sum(_managed(tf).values())}
    out["interrupt_received"] = "Interrupt received" in text
    out["injected"] = cancelled_create(tf, emulator)
    out["adopted"] = tf.untracked().imports
    tf.apply()
    live = inventory(emulator, CLUSTER, set(want))
    out["live"] = {t: len(ids) for t, ids in live.items()}
    out["replan"] = tf.plan()
    return out


def concurrent_deploys(tf: Terraform) -> dict[str, Any]:
    log = tf.workdir.parent / "first-deploy.log"
    lock_file = tf.workdir / f".terraform.{ENV}.tfstate.lock.info"
    first = _popen(tf, log, "apply", "-auto-approve", "-input=false")
    deadline = time.monotonic() + 120
    while not lock_file.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    out: dict[str, Any] = {"first_running": first.poll() is None, "lock_seen": lock_file.exists()}
    out.update(second_apply(tf, first))
    first.wait(timeout=600)
    out["first_returncode"], out["first_log"] = first.returncode, log.read_text()[-2000:]
    out["lock_left"] = lock_file.exists()
    out["replan"] = tf.plan()
    return out


def destroy(tf: Terraform, emulator: str, stack: dict) -> dict[str, Any]:
    tf.destroy()
    live = inventory(emulator, CLUSTER, resource_types(stack))
    return {"left": {t: ids for t, ids in live.items() if ids}, "state": sum(_managed(tf).values())}


def run_fault_sequence(stack_dir: Path, workdir: Path, stack: dict, emulator: str) -> dict[str, Any]:
    """Every stage's observations; a stage that raised records its traceback under `error:<stage>` and the
    later stages are skipped (the environment is destroyed whatever happened)."""
    record: dict[str, Any] = {}
    tf = Terraform.from_stack(stack_dir, workdir)
    want = {t: len(rs) for t, rs in stack["resource"].items()}
    stages = (
        ("interrupted", lambda: interrupted_apply(tf, emulator, want)),
        ("lock", lambda: concurrent_deploys(tf)),
        ("destroy", lambda: destroy(tf, emulator, stack)),
    )
    try:
        tf.init()
        for name, stage in stages:
            try:
                record[name] = stage()
            except Exception:
                record[f"error:{name}"] = traceback.format_exc()[-4000:]
                break
    finally:
        if "destroy" not in record:
            try:  # an object left in the VPC makes destroy retry for long: keep the record of what failed
                tf.run("destroy", "-auto-approve", "-input=false", check=False, timeout=300)
            except subprocess.TimeoutExpired as err:
                record["error:cleanup"] = str(err)
    return record
