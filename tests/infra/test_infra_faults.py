"""Infrastructure faults with the real terraform binary against the embedded AWS, on one environment
(`faults-emu`, tests/conftest.py). The sequence (tests/infra/fault_sequence.py) runs in the background from
the start of the session; these tests assert on what it observed:

1. an apply interrupted with SIGINT half-way, then applied again: it converges with exactly the stack's
   resources (no duplicates: every type is counted live through boto3 against the stack), adopting the
   objects whose create call the interrupt cancelled (one such object is added for sure);
2. two deploys at once: the second is refused by the state lock, naming the holder; the lock is
   released when the first ends;
3. destroy: no live object of any resource type the stack creates remains (tests/infra/inventory.py).
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

import pytest

from tests.infra.fault_sequence import ENV
from tests.infra.helpers import resource_types
from tests.infra.inventory import LISTERS

pytestmark = [pytest.mark.terraform, pytest.mark.slow]


def _stage(infra_faults: Future[dict[str, Any]], name: str) -> dict[str, Any]:
    record = infra_faults.result()
    assert f"error:{name}" not in record, record[f"error:{name}"]
    assert name in record, f"stage {name} did not run: {sorted(record)}"
    return record[name]


def test_every_resource_type_can_be_listed_live(stacks: dict[str, dict]) -> None:
    missing = {t for stack in stacks.values() for t in resource_types(stack)} - set(LISTERS)
    assert not missing, f"add a lister to tests/infra/inventory.py for: {sorted(missing)}"


def test_interrupted_apply_converges_without_duplicates(infra_faults, stacks: dict[str, dict]) -> None:
    got = _stage(infra_faults, "interrupted")
    want = {t: len(rs) for t, rs in stacks[ENV]["resource"].items()}
    assert got["returncode"] != 0, "the interrupted apply must not report success"
    assert got["interrupt_received"], got["log"]
    assert 0 < got["partial"] < sum(want.values()), "interrupted half-way: some, not all, resources in the state"
    assert got["injected"], "no route table or subnet to leave untracked"
    assert got["injected"] in got["adopted"], f"not adopted by the next apply: {got['adopted']}"
    wrong = {t: (got["live"][t], n) for t, n in want.items() if got["live"][t] != n}
    assert not wrong, f"live count != stack count per type, (live, stack): {wrong}"
    assert got["replan"] == 0, "converged: a replan shows no changes"


def test_second_deploy_is_refused_by_the_state_lock_and_the_lock_is_released(infra_faults) -> None:
    got = _stage(infra_faults, "lock")
    assert got["lock_seen"] and got["first_running"], "the first deploy never held the lock while running"
    assert got["second"] is not None, "a second apply ran while the first held the lock"
    assert got["first_running_after"], "the first deploy ended before the second was refused: nothing tested"
    assert "is locked by" in got["second"] and "@" in got["info"]["Who"], got["second"]
    assert "(apply," in got["second"] and f"force-unlock {got['info']['ID']}" in got["second"]
    assert got["first_returncode"] == 0, got["first_log"]
    assert not got["lock_left"], "the lock outlived the deploy that held it"
    assert got["replan"] == 0  # plan takes the lock again: it was released


def test_destroy_leaves_no_resource_of_any_type(infra_faults) -> None:
    got = _stage(infra_faults, "destroy")
    assert not got["left"], f"left behind after destroy: {got['left']}"
    assert got["state"] == 0
