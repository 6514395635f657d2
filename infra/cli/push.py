"""`python -m infra.cli.push` (`make push ENV=<env>`): push the runtime image to the environment's ECR.

The repository comes from the stack outputs (`--outputs FILE`, else `terraform output -json` in
`cdktf.out/stacks/<env>`); the docker and ECR steps live in `infra.kube.push`. Errors are reported and
mapped onto exit codes as in every `moefleet` subcommand (`CliError`, `infra.catalog.exit_codes`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from infra.catalog.exit_codes import ExitCode
from infra.cli.common import CliError, add_environments_option, environment
from infra.cli.main import exit_codes_epilog, run_handler


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m infra.cli.push",
        description="Log in to the environment's ECR repository and push the runtime image.",
        epilog=exit_codes_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--env", required=True, help="environment whose ECR repository receives the image")
    parser.add_argument("--tag", required=True, help="image tag (make: git describe --tags --always --dirty)")
    parser.add_argument("--image", default="moe-runtime", help="local image name (default: moe-runtime)")
    parser.add_argument("--outputs", type=Path, help="stack outputs JSON instead of terraform output")
    add_environments_option(parser)
    parser.set_defaults(command="push")
    return parser


def run(args: argparse.Namespace) -> int:
    from infra.catalog.outputs import OutputsError, StackOutputs
    from infra.kube.push import PushError, push
    from infra.terraform.outputs import default_stack_dir, read_stack_outputs

    env = environment(args, args.env)
    try:
        if args.outputs:
            outputs = StackOutputs.from_file(args.outputs)
        else:
            outputs = read_stack_outputs(default_stack_dir(env.name))
        remote = push(f"{args.image}:{args.tag}", outputs.ecr_repository_url, args.tag, outputs.region)
    except OutputsError as err:
        raise CliError(f"push: {err}") from None
    except PushError as err:
        raise CliError(f"push: {err}", err.code) from None
    print(f"push: {remote}", file=sys.stderr)
    return ExitCode.OK


def main(argv: list[str] | None = None) -> int:
    return run_handler(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
