"""Options that several ``moefleet`` commands share, defined once (name, environment variable, help)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

ENVIRONMENTS_VAR = "MOEFLEET_ENVIRONMENTS"
EMULATOR_ENDPOINT_VAR = "MOEFLEET_EMULATOR_ENDPOINT"


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
