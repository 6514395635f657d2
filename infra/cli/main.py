"""`moefleet`: the operator's command line. One subcommand per job; each module here registers its own.

Heavy imports (cdktf bindings, boto3, rich, pydantic) happen inside the subcommand that needs them, so
`moefleet --help` and `moefleet plan-summary plan.json` stay fast and work in a venv without the `infra`
extra. Every subcommand reports a known failure by raising `CliError`; `main` alone prints it (one
message, never a traceback) and exits with its code (`infra.catalog.exit_codes`, listed in `--help`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from infra.catalog.exit_codes import EXIT_CODE_MEANINGS, ExitCode
from infra.cli import kubernetes, operations, plan_summary, review, weights
from infra.cli.common import CliError, Subparsers

DESCRIPTION = "moefleet: provision, load, install and watch the MoE Fleet environments."

#: Each entry adds its subcommands (every parser sets `handler`), in the order `--help` lists them.
COMMANDS: list[Callable[[Subparsers], None]] = [
    plan_summary.register,
    operations.add_envs,
    operations.add_preflight,
    operations.add_adopt,
    weights.register,  # weights upload / verify / pull
    operations.add_cost,
    operations.add_status,
    review.add_review,
    kubernetes.add_render,
    kubernetes.add_install,
]


def exit_codes_epilog() -> str:
    return "exit codes:\n" + "\n".join(f"  {int(code):>3}  {meaning}" for code, meaning in EXIT_CODE_MEANINGS.items())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moefleet",
        description=DESCRIPTION,
        epilog=exit_codes_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in COMMANDS:
        register(sub)
    return parser


def run_handler(handler: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """The one place a CliError is caught: its message goes to stderr, its code becomes the exit status."""
    try:
        return handler(args)
    except CliError as err:
        print(str(err), file=sys.stderr)
        return err.exit_code
    except Exception as err:  # credentials fail as early as making a client (an unknown AWS_PROFILE)
        if not type(err).__module__.startswith("botocore"):
            raise
        from infra.ops.aws import credential_problem

        problem = credential_problem(err)
        if problem is None:
            raise
        print(problem, file=sys.stderr)
        return ExitCode.FAILED


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand."""
    args = build_parser().parse_args(argv)
    return run_handler(args.handler, args)


if __name__ == "__main__":
    sys.exit(main())
