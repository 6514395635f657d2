"""What every `moefleet` subcommand shares: the one error type, the shared options, the environment lookup.

Standard library only at import time (rich, boto3 and pydantic load inside the functions that need them),
so `moefleet --help` and `moefleet plan-summary plan.json` stay fast and work without the `infra` extra.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from infra.catalog.exit_codes import ExitCode
from infra.catalog.names import DEFAULT_ENVIRONMENTS_FILE, EMULATOR_ENDPOINT_VAR, ENVIRONMENTS_VAR

if TYPE_CHECKING:
    from infra.catalog.environments import Environment
    from infra.catalog.sizes import ModelRef

Subparsers = argparse._SubParsersAction
T = TypeVar("T")


class CliError(Exception):
    """A failure with a message for the operator and an exit code; `main` prints it, never a traceback."""

    def __init__(self, message: str, exit_code: int = ExitCode.BAD_INPUT) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# ---- shared options -----------------------------------------------------------------------------------


def add_environments_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--environments",
        type=Path,
        default=os.environ.get(ENVIRONMENTS_VAR),
        help=f"environments file (default: stacks/environments.toml; env {ENVIRONMENTS_VAR})",
    )


def add_emulator_endpoint_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--emulator-endpoint",
        default=os.environ.get(EMULATOR_ENDPOINT_VAR),
        help=f"re-point emulated environments (aws_endpoint) at this loopback URL (env {EMULATOR_ENDPOINT_VAR})",
    )


def add_environment_options(parser: argparse.ArgumentParser) -> None:
    """--environments and --emulator-endpoint: what every subcommand that takes an environment accepts."""
    add_environments_option(parser)
    add_emulator_endpoint_option(parser)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """--model and --revision: each overrides its half of the environment's `model` setting."""
    parser.add_argument(
        "--model", help="model name, e.g. deepseek-ai/DeepSeek-V2-Lite (default: the environment's model.name)"
    )
    parser.add_argument("--revision", help="revision, e.g. main or a commit sha (default: the environment's)")


# ---- environments -------------------------------------------------------------------------------------


def environments_file(args: argparse.Namespace) -> Path:
    return Path(args.environments or DEFAULT_ENVIRONMENTS_FILE)


def load_environments(args: argparse.Namespace) -> dict[str, Environment]:
    """Every environment of the file (--environments), validated; an invalid file is bad input."""
    from infra.catalog.environments import ConfigError
    from infra.catalog.environments import load_environments as load

    try:
        return load(environments_file(args))
    except ConfigError as err:
        raise CliError(str(err)) from None


def environment(args: argparse.Namespace, name: str) -> Environment:
    """One environment by name; an unknown name is bad input, and the message lists the known ones."""
    known = load_environments(args)
    if name not in known:
        raise CliError(
            f"{args.command}: unknown environment {name!r} in {environments_file(args)}; allowed: {', '.join(known)}"
        )
    return known[name]


def model_ref(args: argparse.Namespace, env: Environment) -> ModelRef:
    """The model revision a command acts on: the environment's `model` setting, --model/--revision override."""
    from infra.catalog.names import model_name_problem, model_revision_problem
    from infra.catalog.sizes import ModelRef

    ref = ModelRef(args.model or env.model.name, args.revision or env.model.revision)
    for flag, value, problem in (
        ("--model", ref.name, model_name_problem(ref.name)),
        ("--revision", ref.revision, model_revision_problem(ref.revision)),
    ):
        if problem:
            raise CliError(f"{args.command}: {flag} {value!r}: {problem}")
    return ref


def emulator_endpoint(args: argparse.Namespace, env: Environment) -> str | None:
    """Where an emulated environment's AWS calls go (--emulator-endpoint or its aws_endpoint); None for AWS."""
    return (args.emulator_endpoint or env.aws_endpoint) if env.emulated else None


# ---- output and errors --------------------------------------------------------------------------------


def console(stderr: bool = False) -> Any:
    """A rich console: tables and bars on a terminal; plain text, no control codes, into a pipe or a log."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # Into a pipe rich would wrap at 80 columns; at 240 the widest table (envs) keeps every cell on one line.
    return Console(file=stream, width=None if stream.isatty() else 240, highlight=False)


def aws_call(func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run an AWS-touching function; botocore failures become one-line CLI errors (ExitCode.FAILED)."""
    from botocore.exceptions import BotoCoreError, ClientError

    from infra.ops.aws import credential_problem

    try:
        return func(*args, **kwargs)
    except (BotoCoreError, ClientError) as err:
        raise CliError(credential_problem(err) or f"AWS error: {err}", ExitCode.FAILED) from None
