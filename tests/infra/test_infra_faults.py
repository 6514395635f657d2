"""Infrastructure faults with the real terraform binary against the embedded AWS, on one environment
(`faults-emu`, tests/conftest.py) that shares one apply across the module's tests, in order:

1. an apply interrupted with SIGINT half-way, then applied again: it converges with exactly the stack's
   resources (no duplicates: every type is counted live through boto3 against the stack);
2. two deploys at once: the second is refused by the state lock, naming the holder; the lock is
   released when the first ends;
3. destroy: no live object of any resource type the stack creates remains (tests/infra/inventory.py).
"""

from __future__ import annotations

import collections
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.terraform.runner import StateLockedError, Terraform
from tests.infra.helpers import resource_types
from tests.infra.inventory import LISTERS, inventory

pytestmark = [pytest.mark.terraform, pytest.mark.slow]
ENV = "faults-emu"
CLUSTER = f"moefleet-{ENV}"


def _counts(stack: dict) -> dict[str, int]:
    return {t: len(rs) for t, rs in stack["resource"].items()}


@pytest.fixture(scope="module")
def tf(synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Terraform]:
    tf = Terraform.from_stack(synth_dir / ENV, tmp_path_factory.mktemp("faults") / ENV)
    tf.init()
    yield tf
    tf.run("destroy", "-auto-approve", "-input=false", check=False)  # whatever the tests left


def test_every_resource_type_can_be_listed_live(stacks: dict[str, dict]) -> None:
    missing = {t for stack in stacks.values() for t in resource_types(stack)} - set(LISTERS)
    assert not missing, f"add a lister to tests/infra/inventory.py for: {sorted(missing)}"


def _popen(tf: Terraform, log: Path, *args: str) -> subprocess.Popen:
    """terraform in the background, its output in a file (a pipe nobody reads would fill and block it)."""
    with log.open("w") as fh:
        return subprocess.Popen(
            ["terraform", *args, "-no-color"], cwd=tf.workdir, env=tf.env, stdout=fh, stderr=subprocess.STDOUT
        )


def test_interrupted_apply_converges_without_duplicates(tf: Terraform, stacks: dict[str, dict], emulator: str):
    stack = stacks[ENV]
    want = _counts(stack)
    log = tf.workdir.parent / "interrupted-apply.log"
    apply = _popen(tf, log, "apply", "-auto-approve", "-input=false")
    deadline = time.monotonic() + 600
    # half-way: the network exists, the cluster (created after it) does not yet
    while not inventory(emulator, CLUSTER, {"aws_subnet"})["aws_subnet"]:
        assert apply.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "apply created no subnet in 10 minutes"
        time.sleep(0.5)
    apply.send_signal(signal.SIGINT)
    apply.wait(timeout=600)
    out = log.read_text()
    assert apply.returncode != 0, "the interrupted apply must not report success"
    assert "Interrupt received" in out or "interrupt" in out.lower(), out[-2000:]
    partial = collections.Counter(r["type"] for r in tf.state_resources() if r["mode"] == "managed")
    assert 0 < sum(partial.values()) < sum(want.values()), "interrupted half-way: some, not all, resources"

    tf.apply()  # the next apply converges
    live = inventory(emulator, CLUSTER, set(want))
    wrong = {t: (len(live[t]), n) for t, n in want.items() if len(live[t]) != n}
    assert not wrong, f"live count != stack count per type (duplicates or leftovers): {wrong}"
    assert tf.plan() == 0, "converged: a replan shows no changes"


def test_second_deploy_is_refused_by_the_state_lock_and_the_lock_is_released(tf: Terraform):
    log = tf.workdir.parent / "first-deploy.log"
    first = _popen(tf, log, "apply", "-auto-approve", "-input=false", "-refresh=true")
    lock_file = tf.workdir / f".terraform.{ENV}.tfstate.lock.info"
    lock_files = [
        lock_file,
        tf.workdir / f"terraform.{ENV}.tfstate.lock.info",
        tf.workdir / ".terraform.tfstate.lock.info",
    ]
    deadline = time.monotonic() + 120
    while not any(p.exists() for p in lock_files) and first.poll() is None:
        assert time.monotonic() < deadline, "the first deploy never took the lock"
        time.sleep(0.05)
    assert first.poll() is None, "the first deploy ended before a second could start"
    with pytest.raises(StateLockedError) as refused:
        tf.apply()
    message = str(refused.value)
    assert "is locked by" in message and "@" in refused.value.info["Who"], message
    assert "apply" in message and "force-unlock" in message
    first.wait(timeout=600)
    assert first.returncode == 0, log.read_text()[-2000:]
    assert not any(p.exists() for p in lock_files), "the lock outlived the deploy that held it"
    assert tf.plan() == 0  # takes the lock again: released


def test_destroy_leaves_no_resource_of_any_type(tf: Terraform, stacks: dict[str, dict], emulator: str):
    tf.destroy()
    live = inventory(emulator, CLUSTER, resource_types(stacks[ENV]))
    left = {t: ids for t, ids in live.items() if ids}
    assert not left, f"left behind after destroy: {left}"
    assert not [r for r in tf.state_resources() if r["mode"] == "managed"]
