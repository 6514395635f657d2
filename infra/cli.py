"""`moefleet`: the operator's command line. One subcommand per job (plan-summary now; envs, preflight,
weights, cost and install are added by their issues through COMMANDS).

Heavy imports (cdktf bindings, boto3) happen inside the subcommand that needs them, so `moefleet --help`
and `moefleet plan-summary plan.json` stay fast and work in a venv without the `infra` extra.

Exit codes: 0 ok, 1 an external tool failed (terraform), 2 bad input (usage, config, plan JSON),
3 `--fail-on-destroy` found a stateful resource replaced or destroyed.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from infra.cli_options import add_emulator_endpoint_option, add_environments_option
from infra.kube.cli import register as register_kube_commands
from infra.ops.cli import OPS_COMMANDS
from infra.plan_summary import (
    STATEFUL_RESOURCE_TYPES,
    PlanError,
    PlanSummary,
    environment_name,
    load_plan,
    render,
    summarize,
)

EXIT_OK = 0
EXIT_TOOL_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_DESTROY = 3


class CliError(Exception):
    """A failure with a message for the operator and an exit code; never shown as a traceback."""

    def __init__(self, message: str, code: int = EXIT_BAD_INPUT) -> None:
        super().__init__(message)
        self.code = code


# ---- plan-summary -----------------------------------------------------------------------------------


def _add_plan_summary(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
        help=f"exit {EXIT_DESTROY} when any stateful resource is replaced or destroyed (protected environments)",
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
    parser.set_defaults(handler=_plan_summary)


def _plan_summary(args: argparse.Namespace) -> int:
    if not args.plans and not args.env:
        raise CliError("plan-summary: give plan JSON files or --env ENV")
    if (args.stack_dir or args.save_json or args.workdir) and len(args.env) != 1:
        raise CliError("plan-summary: --stack-dir, --save-json and --workdir need exactly one --env")
    summaries: list[PlanSummary] = []
    for path in args.plans:
        plan = load_plan(path)
        summaries.append(summarize(plan, environment_name(plan, path.stem), str(path)))
    for env in args.env:
        plan = _plan_environment(env, args)
        summaries.append(summarize(plan, env, f"plan of {env}"))
    text = render(summaries, args.format)
    sys.stdout.write(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
    risky = [change for summary in summaries for change in summary.risky]
    if args.fail_on_destroy and risky:
        print(
            f"plan-summary: {len(risky)} stateful resource(s) would be replaced or destroyed "
            f"({', '.join(c.address for c in risky)}); refusing (--fail-on-destroy)",
            file=sys.stderr,
        )
        return EXIT_DESTROY
    return EXIT_OK


def _plan_environment(env: str, args: argparse.Namespace) -> dict:
    """Synthesize only `env`, then terraform init + plan + show -json in its own working folder."""
    from infra.config import DEFAULT_ENVIRONMENTS_FILE, ConfigError, load_environments
    from infra.terraform import PROJECT_ROOT, Terraform, TerraformError

    environments_file = args.environments or DEFAULT_ENVIRONMENTS_FILE
    try:
        known = load_environments(environments_file)
    except ConfigError as err:
        raise CliError(str(err)) from None
    if env not in known:
        raise CliError(f"plan-summary: unknown environment {env!r} in {environments_file}; known: {', '.join(known)}")
    workdir = args.workdir or PROJECT_ROOT / ".cache" / "plan" / env
    stack_dir = args.stack_dir or _synth_one(env, environments_file, workdir / "cdktf.out", args.emulator_endpoint)
    if not (stack_dir / "cdk.tf.json").is_file():
        raise CliError(f"plan-summary: {stack_dir}/cdk.tf.json not found; synthesize first (make synth)")
    print(f"plan-summary: planning {env} in {workdir}", file=sys.stderr)
    try:
        tf = Terraform.from_stack(stack_dir, workdir)
        tf.init()
        tf.plan()
        plan = tf.show_json()
    except TerraformError as err:
        raise CliError(str(err), EXIT_TOOL_FAILED) from None
    if args.save_json:
        import json

        args.save_json.parent.mkdir(parents=True, exist_ok=True)
        args.save_json.write_text(json.dumps(plan))
    return plan


def _synth_one(env: str, environments_file: Path, outdir: Path, endpoint: str | None) -> Path:
    os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")
    from stacks.app import build_app

    build_app(outdir, environments_file, only=[env], endpoint_override=endpoint).synth()
    return outdir / "stacks" / env


# ---- entry point ------------------------------------------------------------------------------------

#: Each entry adds one subcommand (its parser sets `handler`). Other issues append theirs here.
COMMANDS: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = [
    _add_plan_summary,
    *OPS_COMMANDS,  # envs, preflight, weights, cost, status (infra/ops/cli.py)
    register_kube_commands,  # render, install (infra/kube/cli.py)
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moefleet", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; known failures print one line (or one message) and exit with their code."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except PlanError as err:
        print(f"{args.command}: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except CliError as err:
        print(str(err), file=sys.stderr)
        return err.code


if __name__ == "__main__":
    sys.exit(main())
