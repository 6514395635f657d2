"""The GitHub workflows: actionlint (from the tools venv) and the safety properties reviewers rely on."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.terraform.plan_summary import MARKDOWN_MARKER

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / ".github" / "workflows"
ACTIONLINT = ROOT / ".venv-tools" / "bin" / "actionlint"


def load(name: str) -> dict[str, Any]:
    data = yaml.safe_load((WORKFLOWS / name).read_text())
    # YAML 1.1 reads the key `on` as True.
    data["on"] = data.pop(True, data.get("on"))
    return data


def all_steps() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(WORKFLOWS.glob("*.yml")):
        for job in load(path.name)["jobs"].values():
            found.extend((path.name, step) for step in job.get("steps", []))
    return found


def test_actionlint_passes() -> None:
    if not ACTIONLINT.exists():
        pytest.fail(f"{ACTIONLINT} missing: run `make setup` (scripts/tools-requirements.txt installs actionlint)")
    files = sorted(str(p) for p in WORKFLOWS.glob("*.yml"))
    proc = subprocess.run(
        [str(ACTIONLINT), "-color=false", *files], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_actions_pinned_by_version_tag() -> None:
    for name, step in all_steps():
        uses = step.get("uses")
        if uses and not uses.startswith("./"):
            assert re.fullmatch(r"[\w.-]+/[\w./-]+@v\d+(\.\d+){0,2}", uses), f"{name}: pin {uses!r} to a version tag"


def test_no_cloud_keys_only_oidc() -> None:
    text = "\n".join(p.read_text() for p in WORKFLOWS.glob("*.yml"))
    assert "aws-access-key-id" not in text and "AWS_SECRET_ACCESS_KEY" not in text
    for name, step in all_steps():
        if step.get("uses", "").startswith("aws-actions/configure-aws-credentials@"):
            assert "role-to-assume" in step["with"], name


def test_pr_plan_diffs_every_cloud_environment_and_updates_one_comment() -> None:
    from infra.catalog.environments import load_environments

    flow = load("pr-plan.yml")
    assert "pull_request" in flow["on"]
    plan = flow["jobs"]["plan"]
    assert plan["permissions"]["id-token"] == "write"
    cloud_envs = {name for name, env in load_environments().items() if not env.emulated}
    assert {row["env"] for row in plan["strategy"]["matrix"]["include"]} == cloud_envs
    runs = " ".join(step.get("run", "") for step in plan["steps"])
    assert "make setup" in runs and "cdktf diff" in runs and "moefleet plan-summary" in runs
    script = next(s["with"]["script"] for s in flow["jobs"]["comment"]["steps"] if "github-script" in s.get("uses", ""))
    assert MARKDOWN_MARKER in script and "updateComment" in script


def test_deploy_order_approval_and_destroy_gate() -> None:
    flow = load("deploy.yml")
    assert flow["on"]["push"]["branches"] == ["main"]
    jobs = flow["jobs"]
    assert jobs["staging"]["needs"] == "dev" and "staging" in jobs["prod"]["needs"]
    assert jobs["dev"]["with"]["fail_on_destroy"] is False
    assert "allow_destroy" in jobs["prod"]["with"]["fail_on_destroy"]
    deploy = load("deploy-env.yml")["jobs"]["deploy"]
    assert deploy["environment"]["name"] == "${{ inputs.environment }}"  # protection rules (prod approval) apply
    runs = [step.get("run", "") for step in deploy["steps"]]
    gate = next(i for i, r in enumerate(runs) if "--fail-on-destroy" in r)
    apply = next(i for i, r in enumerate(runs) if "apply" in r and "tfplan" in r)
    install = next(i for i, r in enumerate(runs) if "moefleet install" in r)
    smoke = next(i for i, r in enumerate(runs) if "/v1/completions" in r)
    assert gate < apply < install < smoke
