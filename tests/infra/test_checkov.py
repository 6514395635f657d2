"""checkov on every synthesized stack: each failed check is fixed, or skipped next to its resource with a
reason (infra.constructs.checks.skip_check). checkov's terraform_json runner ignores inline suppressions, so this
harness applies them: a failure counts as skipped only where that very resource records the skip.

One checkov run scans every stack (one folder each, split back by file path afterwards): checkov's start-up
costs more than scanning a stack, and the findings are the same as from one run per stack."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

from infra.constructs.checks import skips_in
from infra.terraform.runner import PROJECT_ROOT

CHECKOV = PROJECT_ROOT / ".venv-tools" / "bin" / "checkov"


def run_checkov(root: Path) -> dict:
    """Every ``cdk.tf.json`` under ``root``; passed checks included so that each stack shows it was scanned."""
    assert CHECKOV.exists(), f"{CHECKOV} missing: `make setup` installs checkov into .venv-tools"
    proc = subprocess.run(
        [str(CHECKOV), "-d", str(root), "--framework", "terraform_json", "--skip-download", "--compact",
         "-o", "json"],
        capture_output=True, text=True, timeout=300, cwd=root,
    )  # fmt: skip
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    return report[0] if isinstance(report, list) else report


def logical_id(finding: dict) -> str:
    return finding["resource"].rsplit(".", 1)[-1]  # checkov names them "resource.<id>" or "<type>.<id>"


def stack_of(finding: dict) -> str:
    """The stack a finding is in: the folder of its file under the scanned root."""
    return Path(finding["file_abs_path"]).parent.name


@pytest.mark.slow
def test_checkov_every_stack(synth_dir: Path, stacks: dict[str, dict], tmp_path: Path) -> None:
    for env_name in stacks:
        (tmp_path / env_name).mkdir()
        shutil.copy(synth_dir / env_name / "cdk.tf.json", tmp_path / env_name / "cdk.tf.json")
    report = run_checkov(tmp_path)
    assert report["summary"]["parsing_errors"] == 0
    passed: dict[str, list[dict]] = defaultdict(list)
    failed: dict[str, list[dict]] = defaultdict(list)
    for finding in report["results"].get("passed_checks", []):
        passed[stack_of(finding)].append(finding)
    for finding in report["results"].get("failed_checks", []):
        failed[stack_of(finding)].append(finding)
    assert set(passed) | set(failed) == set(stacks), "checkov did not scan every stack"

    counts = {}
    unexplained = []
    for env_name, stack in stacks.items():
        skips = skips_in(stack)
        skipped = [f for f in failed[env_name] if (logical_id(f), f["check_id"]) in skips]
        for finding in failed[env_name]:
            if (logical_id(finding), finding["check_id"]) not in skips:
                unexplained.append(
                    f"{env_name}: {finding['check_id']} on {finding['resource']}: {finding['check_name']}"
                )
        counts[env_name] = (len(passed[env_name]), len(failed[env_name]) - len(skipped), len(skipped))
    print("\ncheckov (passed, failed, skipped):", counts)
    assert not unexplained, "checkov failures without a reasoned skip:\n" + "\n".join(unexplained)
