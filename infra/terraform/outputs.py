"""Terraform outputs of an applied stack, read into the typed contract (`infra.catalog.outputs.StackOutputs`).

`cdktf deploy <env>` runs terraform in `cdktf.out/stacks/<env>`, so that folder (initialised, with its
backend: local state or the S3 state bucket) answers `terraform output -json`. Any other folder where the
stack was applied can be given instead (`--stack-dir`; the demo uses its own work folder).
"""

from __future__ import annotations

import os
from pathlib import Path

from infra.catalog.names import STACKS_DIR_VAR
from infra.catalog.outputs import OutputsError, StackOutputs
from infra.terraform.runner import PROJECT_ROOT, Terraform, TerraformError


class OutputsUnavailable(OutputsError):
    """No outputs could be read: the stack was not applied there, or terraform failed.

    A kind of OutputsError, so a caller that only reports problems catches both; a caller that can fall
    back (representative outputs, tags) catches this one alone and still fails on malformed outputs."""


def default_stack_dir(env_name: str) -> Path:
    """Where `cdktf deploy <env>` applies an environment's stack (`$MOEFLEET_STACKS_DIR/<env>` when set)."""
    root = os.environ.get(STACKS_DIR_VAR)
    return (Path(root) if root else PROJECT_ROOT / "cdktf.out" / "stacks") / env_name


def read_stack_outputs(stack_dir: Path) -> StackOutputs:
    """`terraform output -json` of the stack applied in `stack_dir`, checked against the contract.

    Raises OutputsUnavailable when nothing can be read, OutputsError naming every missing or malformed
    output otherwise."""
    stack_dir = Path(stack_dir)
    if not stack_dir.is_dir():
        raise OutputsUnavailable(f"{stack_dir}: no such folder (synthesize and deploy the stack first)")
    try:
        raw = Terraform(stack_dir).output_json()
    except TerraformError as err:
        raise OutputsUnavailable(str(err).splitlines()[0]) from None
    if not raw:
        raise OutputsUnavailable(f"{stack_dir}: the stack has no outputs (not applied yet?)")
    return StackOutputs.from_terraform_json(raw, f"terraform output in {stack_dir}")
