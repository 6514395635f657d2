"""`moefleet plan-summary`: real plans from real terraform against the emulator, plus bad-input errors.

The slow part applies one small emulated environment (`plan-a`, its own VPC range and cluster name so it
never meets other tests' resources on the shared emulator) once per module, then plans variants of the
SAME environment (identical resource addresses) against that applied state: one forces a GPU node-group
replacement, one changes the node group in place, then destroys it. That runs in the background from the
start of the session (tests/conftest.py); the two tests that read the plans run last.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import pytest

from infra.catalog.exit_codes import ExitCode
from infra.cli.main import main
from infra.terraform.plan_summary import (
    MARKDOWN_MARKER,
    STATEFUL_RESOURCE_TYPES,
    is_stateful,
    load_plan,
    parse_plan,
    render_markdown,
    render_text,
    summarize,
)
from infra.terraform.runner import PROJECT_ROOT, Terraform

ENV = "plan-a"
BASE_ENVIRONMENT = f"""
[environments.{ENV}]
size = "devtest"
region = "us-east-1"
azs = ["us-east-1a", "us-east-1b"]
vpc_cidr = "10.93.0.0/16"
kubernetes_version = "1.33"
aws_endpoint = "http://127.0.0.1:4566"
tags = {{ owner = "plan-summary-tests" }}
state = {{ kind = "local" }}
"""
#: Variants of the same environment. An instance-type change is immutable on an EKS node group (replace);
#: the scaling maximum is updated in place.
VARIANTS = {
    "base": "overrides = { gpu_nodes = { min = 0, max = 1 } }\n",
    "replace": 'overrides = { instance_type = "p5.4xlarge", gpu_nodes = { min = 0, max = 1 } }\n',
    "in-place": "overrides = { gpu_nodes = { min = 0, max = 3 } }\n",
}


@dataclass
class Plans:
    replace: Path
    in_place: Path


#: Speed, through Terraform's own variables (the runner in infra/terraform/runner.py reads the environment): more
#: parallel requests to the emulator; no refresh on plan/destroy, since the state was just applied and the
#: summary must show what the configuration change does, not emulator drift (test_terraform checks that).
TF_ARGS = {
    "TF_CLI_ARGS_apply": "-parallelism=32",
    "TF_CLI_ARGS_plan": "-refresh=false -parallelism=32",
    "TF_CLI_ARGS_destroy": "-refresh=false -parallelism=32",
}


def _write_variant(name: str, root: Path) -> Path:
    path = root / f"{name}.toml"
    path.write_text(BASE_ENVIRONMENT + VARIANTS[name])
    return path


def _synth(name: str, root: Path, emulator: str) -> Path:
    """Synthesize one variant of `plan-a` in-process (the bindings are imported once per session)."""
    from stacks.app import build_app

    outdir = root / f"out-{name}"
    build_app(outdir, _write_variant(name, root), only=[ENV], endpoint_override=emulator).synth()
    return outdir / "stacks" / ENV


def _plan_json(tf: Terraform, stack_dir: Path, out: Path) -> Path:
    """Plan `stack_dir`'s configuration against the applied state, as `terraform show -json` writes it."""
    shutil.copy(stack_dir / "cdk.tf.json", tf.workdir / "cdk.tf.json")
    tf.run("plan", "-input=false", "-out=variant.tfplan")
    out.write_text(json.dumps(tf.show_json("variant.tfplan")))
    return out


def synth_variants(root: Path, emulator: str) -> tuple[Path, Path]:
    """The base and the replacing variant, synthesized in this process (jsii: on the main thread)."""
    return _synth("base", root, emulator), _synth("replace", root, emulator)


def plan_variants(root: Path, emulator: str, base_stack: Path, replace_stack: Path) -> Plans:
    """Apply `plan-a` once, plan both variants against it, destroy: a background job of the session
    (tests/conftest.py), since only the plan files are needed afterwards. The replacement plan comes from
    terraform directly, the in-place one from `moefleet plan-summary --env` in its own process (synth of
    that one environment + init + plan + show, as CI runs it)."""
    tf = Terraform.from_stack(base_stack, root / "work")
    tf.env.update(TF_ARGS)
    tf.init()
    try:
        tf.apply()
        replace = _plan_json(tf, replace_stack, root / "replace.json")
        in_place = root / "in-place.json"
        cmd = [sys.executable, "-m", "infra.cli", "plan-summary", "--env", ENV]
        cmd += ["--environments", str(_write_variant("in-place", root)), "--emulator-endpoint", emulator]
        cmd += ["--workdir", str(tf.workdir), "--save-json", str(in_place)]
        run = subprocess.run(cmd, env=tf.env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900)
        assert run.returncode == ExitCode.OK, run.stdout + run.stderr
        return Plans(replace=replace, in_place=in_place)
    finally:
        shutil.copy(base_stack / "cdk.tf.json", tf.workdir / "cdk.tf.json")
        tf.destroy()


@pytest.fixture(scope="module")
def plans(plan_summary_job: Future[Plans]) -> Plans:
    return plan_summary_job.result(timeout=1800)


def _node_group(summary_changes: list) -> list:
    return [c for c in summary_changes if c.type == "aws_eks_node_group"]


@pytest.mark.slow
@pytest.mark.terraform
def test_node_group_replacement_is_flagged(plans: Plans, capsys: pytest.CaptureFixture[str]) -> None:
    summary = summarize(load_plan(plans.replace), ENV)
    (gpu,) = summary.risky
    assert gpu.type == "aws_eks_node_group" and "gpu-pool" in gpu.address and gpu.action == "replace"
    assert "instance_types" in gpu.forced_by
    assert any('"g6e.4xlarge"' in d and '"p5.4xlarge"' in d for d in gpu.details)
    assert summary.counts()["aws_eks_node_group"]["replace"] == 1
    # the node group's Auto Scaling group is new, so its autoscaler tags are replaced with it
    replaced = sum(c.get("replace", 0) for c in summary.counts().values())
    assert replaced == 1 + summary.counts()["aws_autoscaling_group_tag"]["replace"] > 1

    assert main(["plan-summary", str(plans.replace)]) == ExitCode.OK
    text = capsys.readouterr().out
    assert f"Environment {ENV}:" in text and f"{replaced} to replace" in text
    assert f"!! REPLACE {gpu.address} (forced by instance_types" in text

    assert main(["plan-summary", "--format", "markdown", str(plans.replace)]) == ExitCode.OK
    markdown = capsys.readouterr().out
    assert markdown.startswith(MARKDOWN_MARKER + "\n")
    assert "[!CAUTION]" in markdown and f"### `{ENV}`" in markdown and f"**{replaced} replace**" in markdown
    assert f"| :warning: **replace** | `{gpu.address}` |" in markdown
    assert "| `aws_eks_node_group` |" in markdown

    assert main(["plan-summary", "--fail-on-destroy", str(plans.replace)]) == ExitCode.STATEFUL_CHANGE
    assert gpu.address in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.terraform
def test_in_place_change_passes_the_gate(plans: Plans, capsys: pytest.CaptureFixture[str]) -> None:
    summary = summarize(load_plan(plans.in_place), ENV)
    assert not summary.risky, f"unexpected replace/destroy (emulator drift?): {summary.risky}"
    (gpu,) = _node_group(summary.changes)
    assert gpu.action == "update" and "scaling_config" in gpu.forced_by
    assert summary.totals()["replace"] == summary.totals()["destroy"] == 0

    assert main(["plan-summary", "--fail-on-destroy", "--format", "markdown", str(plans.in_place)]) == ExitCode.OK
    markdown = capsys.readouterr().out
    assert "No stateful or disruptive resource is replaced or destroyed." in markdown
    assert "[!CAUTION]" not in markdown and "| `aws_eks_node_group` |  | 1 |  |  |" in markdown


# ---- fast: synthetic plans and bad input ------------------------------------------------------------


def _change(address: str, actions: list[str], **change: object) -> dict:
    rtype = address.split(".")[0]
    return {"address": address, "mode": "managed", "type": rtype, "change": {"actions": actions, **change}}


def test_stateful_types_are_one_constant() -> None:
    assert "aws_fsx_lustre_file_system" in STATEFUL_RESOURCE_TYPES
    assert is_stateful("aws_s3_bucket") and is_stateful("aws_s3_bucket_versioning")
    assert is_stateful("aws_eks_node_group") and not is_stateful("aws_launch_template")


def test_fsx_replace_and_bucket_destroy_are_flagged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = {
        "format_version": "1.2",
        "resource_changes": [
            _change(
                "aws_fsx_lustre_file_system.hot",
                ["delete", "create"],
                before={"storage_capacity": 1200, "deployment_type": "PERSISTENT_2"},
                after={"storage_capacity": 1200, "deployment_type": "SCRATCH_2"},
                after_unknown={},
                replace_paths=[["deployment_type"]],
            ),
            {**_change("aws_s3_bucket.cold", ["delete"]), "action_reason": "delete_because_no_resource_config"},
            _change("aws_iam_role.node", ["create"]),
            _change("aws_cloudwatch_log_group.x", ["no-op"]),
            {**_change("data.aws_partition.p", ["read"]), "mode": "data"},
        ],
    }
    path = tmp_path / "prod.json"
    path.write_text(json.dumps(plan))
    summary = summarize(load_plan(path), "prod")
    assert [c.address for c in summary.risky] == ["aws_fsx_lustre_file_system.hot", "aws_s3_bucket.cold"]
    assert summary.risky[0].details == ('deployment_type: "PERSISTENT_2" → "SCRATCH_2"',)
    text = render_text([summary])
    assert "1 to create, 0 to update, 1 to replace, 1 to destroy" in text
    assert "!! DESTROY aws_s3_bucket.cold (removed from the configuration)" in text
    assert "aws_cloudwatch_log_group" not in text
    assert render_markdown([summary]).count(MARKDOWN_MARKER) == 1
    assert main(["plan-summary", "--fail-on-destroy", str(path)]) == ExitCode.STATEFUL_CHANGE
    assert "Environment prod:" in capsys.readouterr().out


def test_no_changes(tmp_path: Path) -> None:
    summary = summarize(parse_plan('{"format_version": "1.2", "planned_values": {}}'), "dev")
    assert "No changes." in render_text([summary]) and "No changes." in render_markdown([summary])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "empty file"),
        ("   \n", "empty file"),
        ('{"format_version": ', "not valid JSON (line 1"),
        ("[1, 2]", "expected a JSON object at the top level, found list"),
        ('{"resource_changes": []}', "no 'format_version'"),
        ('{"format_version": "1.0", "values": {}}', "not a Terraform plan (this is a state"),
        ('{"format_version": "1.2", "resource_changes": {}}', "'resource_changes' must be a list"),
        ('{"format_version": "1.2", "resource_changes": [42]}', "resource_changes[0]: expected an object"),
        (
            '{"format_version": "1.2", "resource_changes": [{"address": "a.b", "type": "a", '
            '"change": {"actions": ["explode"]}}]}',
            "unknown actions ['explode']",
        ),
    ],
)
def test_bad_plan_json_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, message: str
) -> None:
    path = tmp_path / "plan.json"
    path.write_text(content)
    assert main(["plan-summary", str(path)]) == ExitCode.BAD_INPUT
    captured = capsys.readouterr()
    assert message in captured.err and str(path) in captured.err
    assert "Traceback" not in captured.err and captured.out == ""


def test_missing_file_and_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan-summary", str(tmp_path / "nope.json")]) == ExitCode.BAD_INPUT
    assert "file not found" in capsys.readouterr().err
    assert main(["plan-summary"]) == ExitCode.BAD_INPUT
    assert "give plan JSON files or --env" in capsys.readouterr().err
    assert main(["plan-summary", "--env", "nowhere"]) == ExitCode.BAD_INPUT
    assert "unknown environment 'nowhere'" in capsys.readouterr().err
