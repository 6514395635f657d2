"""`moefleet plan-summary`: summarize Terraform plans per environment, stateful replaces/destroys flagged.

From plan JSON files (`terraform show -json tfplan`, standard library only: the PR-comment job installs
the project without extras), or with `--env` by planning environments here (synth + init + plan + show).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from infra.catalog.exit_codes import ExitCode
from infra.cli.common import (
    CliError,
    Subparsers,
    add_emulator_endpoint_option,
    add_environments_option,
    environment,
    environments_file,
)
from infra.terraform.plan_summary import (
    STATEFUL_RESOURCE_TYPES,
    PlanError,
    PlanSummary,
    environment_name,
    load_plan,
    render,
    summarize,
)


def register(sub: Subparsers) -> None:
    types = ", ".join(STATEFUL_RESOURCE_TYPES)
    parser = sub.add_parser(
        "plan-summary",
        help="summarize Terraform plans: counts per resource type, stateful replaces/destroys flagged",
        description=(
            "Summarize `terraform show -json` plans per environment. Stateful or disruptive types: "
            f"{types}. Give plan JSON files, or --env to plan environments here (synth + init + plan)."
        ),
    )
    parser.add_argument("plans", nargs="*", type=Path, help="plan JSON files (`terraform show -json tfplan`)")
    parser.add_argument("--env", action="append", default=[], metavar="ENV", help="plan this environment (repeat)")
    parser.add_argument("--format", choices=("text", "markdown"), default="text")
    parser.add_argument(
        "--fail-on-destroy",
        action="store_true",
        help=f"exit {int(ExitCode.STATEFUL_CHANGE)} when any stateful resource is replaced or destroyed "
        "(protected environments)",
    )
    parser.add_argument("--output", type=Path, help="also write the summary to this file")
    add_environments_option(parser)
    parser.add_argument(
        "--workdir",
        type=Path,
        help="terraform working folder for --env (default .cache/plan/<env>); keeps `tfplan` for a later apply",
    )
    parser.add_argument("--stack-dir", type=Path, help="with one --env: use this synthesized stack, skip synth")
    parser.add_argument("--save-json", type=Path, help="with one --env: write the plan JSON here too")
    add_emulator_endpoint_option(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if not args.plans and not args.env:
        raise CliError("plan-summary: give plan JSON files or --env ENV")
    if (args.stack_dir or args.save_json or args.workdir) and len(args.env) != 1:
        raise CliError("plan-summary: --stack-dir, --save-json and --workdir need exactly one --env")
    summaries: list[PlanSummary] = []
    try:
        for path in args.plans:
            plan = load_plan(path)
            summaries.append(summarize(plan, environment_name(plan, path.stem), str(path)))
        for env in args.env:
            plan = _plan_environment(env, args)
            summaries.append(summarize(plan, env, f"plan of {env}"))
    except PlanError as err:
        raise CliError(f"{args.command}: {err}") from None
    text = render(summaries, args.format)
    sys.stdout.write(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
    risky = [change for summary in summaries for change in summary.risky]
    if args.fail_on_destroy and risky:
        raise CliError(
            f"plan-summary: {len(risky)} stateful resource(s) would be replaced or destroyed "
            f"({', '.join(c.address for c in risky)}); refusing (--fail-on-destroy)",
            ExitCode.STATEFUL_CHANGE,
        )
    return ExitCode.OK


def _plan_environment(name: str, args: argparse.Namespace) -> dict:
    """Synthesize only `name`, then terraform init + plan + show -json in its own working folder."""
    from infra.terraform.runner import PROJECT_ROOT, Terraform, TerraformError

    env = environment(args, name)
    workdir = args.workdir or PROJECT_ROOT / ".cache" / "plan" / env.name
    stack_dir = args.stack_dir or _synth_one(env.name, args, workdir / "cdktf.out")
    if not (stack_dir / "cdk.tf.json").is_file():
        raise CliError(f"plan-summary: {stack_dir}/cdk.tf.json not found; synthesize first (make synth)")
    print(f"plan-summary: planning {env.name} in {workdir}", file=sys.stderr)
    try:
        tf = Terraform.from_stack(stack_dir, workdir)
        tf.init()
        tf.plan()
        plan = tf.show_json()
    except TerraformError as err:
        raise CliError(str(err), ExitCode.FAILED) from None
    if args.save_json:
        args.save_json.parent.mkdir(parents=True, exist_ok=True)
        args.save_json.write_text(json.dumps(plan))
    return plan


def _synth_one(name: str, args: argparse.Namespace, outdir: Path) -> Path:
    os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")
    from stacks.app import build_app

    build_app(outdir, environments_file(args), only=[name], endpoint_override=args.emulator_endpoint).synth()
    return outdir / "stacks" / name
