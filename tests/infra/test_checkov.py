"""checkov on every synthesized stack: each failed check is fixed, or skipped next to its resource with a
reason (infra.constructs.checks.skip_check). checkov's terraform_json runner ignores inline suppressions, so this
harness applies them: a failure counts as skipped only where that very resource records the skip."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from infra.constructs.checks import skips_in
from infra.terraform.runner import PROJECT_ROOT

CHECKOV = PROJECT_ROOT / ".venv-tools" / "bin" / "checkov"


def run_checkov(stack_dir: Path) -> dict:
    assert CHECKOV.exists(), f"{CHECKOV} missing: `make setup` installs checkov into .venv-tools"
    proc = subprocess.run(
        [str(CHECKOV), "-d", str(stack_dir), "--framework", "terraform_json", "--skip-download", "--quiet",
         "--compact", "-o", "json"],
        capture_output=True, text=True, timeout=300, cwd=stack_dir,
    )  # fmt: skip
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    return report[0] if isinstance(report, list) else report


def logical_id(finding: dict) -> str:
    return finding["resource"].rsplit(".", 1)[-1]  # checkov names them "resource.<id>" or "<type>.<id>"


@pytest.mark.slow
def test_checkov_every_stack(synth_dir: Path, stacks: dict[str, dict], tmp_path: Path) -> None:
    counts = {}
    unexplained = []
    for env_name, stack in stacks.items():
        work = tmp_path / env_name
        work.mkdir()
        shutil.copy(synth_dir / env_name / "cdk.tf.json", work / "cdk.tf.json")
        report = run_checkov(work)
        skips = skips_in(stack)
        failed = report["results"]["failed_checks"]
        skipped = [f for f in failed if (logical_id(f), f["check_id"]) in skips]
        for finding in failed:
            if (logical_id(finding), finding["check_id"]) not in skips:
                unexplained.append(
                    f"{env_name}: {finding['check_id']} on {finding['resource']}: {finding['check_name']}"
                )
        counts[env_name] = (report["summary"]["passed"], len(failed) - len(skipped), len(skipped))
        assert report["summary"]["parsing_errors"] == 0
    print("\ncheckov (passed, failed, skipped):", counts)
    assert not unexplained, "checkov failures without a reasoned skip:\n" + "\n".join(unexplained)
