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
import signal
import subprocess
import time
import traceback
from pathlib import Path
from typing import Any

from infra.terraform.runner import StateLockedError, Terraform
from tests.infra.helpers import resource_types
from tests.infra.inventory import inventory

ENV = "faults-emu"
CLUSTER = f"moefleet-{ENV}"


def _popen(tf: Terraform, log: Path, *args: str) -> subprocess.Popen:
    """terraform in the background, its output in a file (a pipe nobody reads would fill and block it)."""
    with log.open("w") as fh:
        return subprocess.Popen(
            ["terraform", *args, "-no-color"], cwd=tf.workdir, env=tf.env, stdout=fh, stderr=subprocess.STDOUT
        )


def _managed(tf: Terraform) -> collections.Counter:
    return collections.Counter(r["type"] for r in tf.state_resources() if r["mode"] == "managed")


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
    out = {"returncode": apply.returncode, "log": log.read_text()[-4000:], "partial": sum(_managed(tf).values())}
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
    try:
        tf.apply()
        out["second"] = None
    except StateLockedError as err:
        out["second"], out["info"] = str(err), err.info
    out["first_running_after"] = first.poll() is None
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
            tf.run("destroy", "-auto-approve", "-input=false", check=False)
    return record
