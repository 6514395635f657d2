"""Terraform outputs of an applied stack: where the buckets, cluster and file system of an environment are.

`cdktf deploy <env>` runs terraform in `cdktf.out/stacks/<env>`, so that folder (initialised, with its
backend: local state or the S3 state bucket) answers `terraform output -json`. Any other folder where the
stack was applied can be given instead (`--stack-dir`; the demo uses `.demo/local`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from infra.terraform import PROJECT_ROOT, Terraform, TerraformError


class OutputsUnavailable(RuntimeError):
    """No outputs could be read: the stack was not applied there, or terraform failed."""


def default_stack_dir(env_name: str) -> Path:
    return PROJECT_ROOT / "cdktf.out" / "stacks" / env_name


def stack_outputs(stack_dir: Path) -> dict[str, Any]:
    """`terraform output -json` of the stack applied in `stack_dir`, as {name: value}."""
    stack_dir = Path(stack_dir)
    if not stack_dir.is_dir():
        raise OutputsUnavailable(f"{stack_dir}: no such folder (synthesize and deploy the stack first)")
    try:
        outputs = Terraform(stack_dir).outputs()
    except TerraformError as err:
        raise OutputsUnavailable(str(err).splitlines()[0]) from None
    if not outputs:
        raise OutputsUnavailable(f"{stack_dir}: the stack has no outputs (not applied yet?)")
    return outputs
