"""Session-wide real parts: one embedded-AWS server, one synthesis of every stack.

Synthesis imports the AWS provider bindings (~12 s, ~550 MB), so it runs once per session and every
test reads its JSON. The emulator (moto + our patches) is shared too; tests that apply a stack use
their own environment (own cluster name, VPC) so they never collide.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")

from infra.config import DEFAULT_ENVIRONMENTS_FILE
from infra.emulator.process import Emulator

#: Test-only environments appended to the real file: they exercise, against the emulator, what the
#: standard `local` (devtest) environment does not — multi-node GPU (EFA, placement group, NVMe RAID0,
#: capacity reservation) and the FSx hot tier (medium).
TEST_ENVIRONMENTS = """
[environments.large-emu]
size = "large"
region = "us-east-1"
azs = ["us-east-1a", "us-east-1b"]
vpc_cidr = "10.77.0.0/16"
kubernetes_version = "1.33"
aws_endpoint = "http://127.0.0.1:4566"
tags = { owner = "tests" }
state = { kind = "local" }
overrides = { capacity_reservation_id = "cr-0123456789abcdef0", gpu_nodes = { min = 0, max = 2 } }

[environments.medium-emu]
size = "medium"
region = "us-east-1"
azs = ["us-east-1a", "us-east-1b"]
vpc_cidr = "10.78.0.0/16"
kubernetes_version = "1.33"
aws_endpoint = "http://127.0.0.1:4566"
tags = { owner = "tests" }
state = { kind = "local" }
alarm_email = "oncall@example.com"
"""

STANDARD_ENVIRONMENTS = ("local", "dev", "staging", "prod")


@pytest.fixture(scope="session")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("emulator") / "emulator.log"
    with Emulator(log_path=log) as url:
        yield url


@pytest.fixture(scope="session")
def environments_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "environments.toml"
    path.write_text(DEFAULT_ENVIRONMENTS_FILE.read_text() + TEST_ENVIRONMENTS)
    return path


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory, emulator: str, environments_file: Path) -> Path:
    from stacks.app import build_app

    outdir = tmp_path_factory.mktemp("cdktf.out")
    build_app(outdir, environments_file, endpoint_override=emulator).synth()
    return outdir / "stacks"


@pytest.fixture(scope="session")
def stacks(synth_dir: Path) -> dict[str, dict]:
    return {d.name: json.loads((d / "cdk.tf.json").read_text()) for d in sorted(synth_dir.iterdir())}
