"""Two deploys of one environment at once, with the state in S3: the second is refused by the state lock.

dev, staging and prod keep their state in S3 and lock it with S3-native locking (`use_lockfile`,
Terraform >= 1.10): terraform writes a `<key>.tflock` object with a conditional put (`If-None-Match: *`)
and a second run's put fails with 412 while it exists. This runs the real terraform with `dev`'s own
synthesized backend block (only the bucket and the settings that reach the embedded AWS are replaced)
against the shared emulator. The lock does not need the environment's resources: the configuration is one
`terraform_data` whose creation waits until the test lets it go, so the first apply holds the lock for
exactly as long as the test needs (built-in provider and provisioner only: nothing to install).

The emulator honours the conditional put, but checks and stores in two steps: two lock writes at the
same instant could both succeed there (not on AWS), so the second deploy starts once the first holds.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from infra.terraform.runner import Terraform, terraform_env
from tests.infra.fault_sequence import second_apply
from tests.infra.lifecycle import aws

ENV = "dev"  # an environment whose state lives in S3
BUCKET = "moefleet-tests-s3-state-lock"
HOLD_LIMIT_S = 60  # the holder gives up waiting after this, so a failing test never leaves it behind


def emulated_backend(stacks: dict[str, dict], emulator: str) -> dict[str, Any]:
    """`ENV`'s S3 backend as synthesized (key, encryption, `use_lockfile`), on a test bucket in the emulator."""
    backend = dict(stacks[ENV]["terraform"]["backend"]["s3"])
    backend.update(
        bucket=BUCKET,
        endpoints={"s3": emulator},
        use_path_style=True,
        skip_credentials_validation=True,
        skip_requesting_account_id=True,
        skip_metadata_api_check=True,
        skip_region_validation=True,
    )
    return backend


def holding_configuration(backend: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """One resource whose creation blocks until `release` appears in `workdir`. Only the first creator
    blocks (`mkdir` is atomic): an apply that was wrongly let through ends at once, so the test fails on
    its assertion instead of waiting."""
    wait = (
        f"if mkdir {workdir}/held 2>/dev/null; then touch {workdir}/started; "
        f"timeout {HOLD_LIMIT_S} sh -c 'while [ ! -e {workdir}/release ]; do sleep 0.05; done'; fi"
    )
    return {
        "terraform": {"backend": {"s3": backend}},
        "resource": {"terraform_data": {"deploy": {"input": ENV, "provisioner": {"local-exec": {"command": wait}}}}},
    }


def keys(s3: Any) -> set[str]:
    return {obj["Key"] for obj in s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])}


@pytest.fixture(scope="module")
def concurrent_deploys(
    stacks: dict[str, dict], emulator: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict]:
    """What two overlapping applies on one S3 state observe (the first held until the second has ended)."""
    workdir = tmp_path_factory.mktemp("s3-state-lock") / ENV
    workdir.mkdir()
    backend = emulated_backend(stacks, emulator)
    (workdir / "main.tf.json").write_text(json.dumps(holding_configuration(backend, workdir), indent=2))
    s3 = aws("s3", emulator)
    s3.create_bucket(Bucket=BUCKET)
    tf = Terraform(
        workdir, env={**terraform_env(), "AWS_ACCESS_KEY_ID": "emulated", "AWS_SECRET_ACCESS_KEY": "emulated"}
    )
    lock_key = f"{backend['key']}.tflock"
    out: dict[str, Any] = {"backend": backend, "lock_key": lock_key}
    try:
        tf.init()
        log = workdir.parent / "first-apply.log"
        with log.open("w") as fh:
            first = subprocess.Popen(
                ["terraform", "apply", "-auto-approve", "-input=false", "-no-color"],
                cwd=workdir,
                env=tf.env,
                stdout=fh,
                stderr=subprocess.STDOUT,
            )
        try:
            deadline = time.monotonic() + HOLD_LIMIT_S
            while not (workdir / "started").exists() and first.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            out["first_holding"] = (workdir / "started").exists() and first.poll() is None
            out["held_keys"] = keys(s3)
            if lock_key in out["held_keys"]:
                out["held_lock"] = json.loads(s3.get_object(Bucket=BUCKET, Key=lock_key)["Body"].read())
            out.update(second_apply(tf, first))
        finally:
            (workdir / "release").touch()
            first.wait(timeout=HOLD_LIMIT_S + 30)
        out["first_returncode"], out["first_log"] = first.returncode, log.read_text()[-2000:]
        out["released_keys"] = keys(s3)
        out["replan"] = tf.plan()
        out["after_replan_keys"] = keys(s3)
        yield out
    finally:
        for key in keys(s3):
            s3.delete_object(Bucket=BUCKET, Key=key)
        s3.delete_bucket(Bucket=BUCKET)


def test_backend_under_test_is_the_environments_own(concurrent_deploys: dict) -> None:
    backend = concurrent_deploys["backend"]
    assert backend["use_lockfile"] is True and "dynamodb_table" not in backend
    assert concurrent_deploys["lock_key"] == f"{ENV}/terraform.tfstate.tflock"


def test_lock_object_exists_while_the_first_deploy_runs(concurrent_deploys: dict) -> None:
    assert concurrent_deploys["first_holding"], concurrent_deploys.get("first_log")
    assert concurrent_deploys["lock_key"] in concurrent_deploys["held_keys"]
    held = concurrent_deploys["held_lock"]
    assert held["Operation"] == "OperationTypeApply"
    assert held["Path"] == f"{BUCKET}/{concurrent_deploys['backend']['key']}"


def test_second_deploy_is_refused_naming_the_lock_holder(concurrent_deploys: dict) -> None:
    second, held = concurrent_deploys["second"], concurrent_deploys.get("held_lock", {})
    assert second is not None, "the second apply ran while the first held the S3 state (no lock)"
    info = concurrent_deploys["info"]
    # the runner names what the `.tflock` object holds: who, which operation, the ID force-unlock needs
    assert info["ID"] == held["ID"] and info["Who"] == held["Who"] and info["Path"] == held["Path"]
    assert f"locked by {held['Who']} (apply, since " in second
    assert f"terraform force-unlock {held['ID']}" in second
    assert concurrent_deploys["first_running_after"], "the first apply must still be running (it holds the lock)"


def test_lock_is_released_when_the_first_deploy_ends(concurrent_deploys: dict) -> None:
    assert concurrent_deploys["first_returncode"] == 0, concurrent_deploys["first_log"]
    lock_key, state_key = concurrent_deploys["lock_key"], concurrent_deploys["backend"]["key"]
    assert concurrent_deploys["released_keys"] == {state_key}
    # a later run takes the lock, sees the first apply's state (no changes) and releases it again
    assert concurrent_deploys["replan"] == 0
    assert lock_key not in concurrent_deploys["after_replan_keys"]
