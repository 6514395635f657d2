"""Session-wide real parts: one embedded-AWS server, one synthesis of every stack.

Synthesis imports the AWS provider bindings (~12 s, ~550 MB), so it runs once per session and every
test reads its JSON. The emulator (moto + our patches) is shared too; tests that apply a stack use
their own environment (own cluster name, VPC) so they never collide.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")

from infra.catalog.environments import DEFAULT_ENVIRONMENTS_FILE
from infra.embedded.emulator.process import Emulator
from tests.e2e.demo_runs import DemoRun

#: Test-only environments appended to the real file: they exercise, against the emulator, what the
#: standard `local` (devtest) environment does not — multi-node GPU (EFA, placement group, NVMe RAID0,
#: capacity reservation), the FSx hot tier (medium), and `prod` as it runs on a Capacity Block for ML
#: (prod-cb: prod's size, AZs and tags on the emulator, no placement group by default).
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
# A cluster placement group is left out by default with a reservation; forced here to keep applying one.
overrides.capacity_reservation_id = "cr-0123456789abcdef0"
overrides.placement_group = true
overrides.gpu_nodes = { min = 0, max = 2 }

[environments.prod-cb]
size = "large"
region = "us-east-1"
azs = ["us-east-1a", "us-east-1b", "us-east-1c"]
vpc_cidr = "10.79.0.0/16"
kubernetes_version = "1.33"
aws_endpoint = "http://127.0.0.1:4566"
tags = { owner = "ml-platform", cost-center = "ml-prod" }
state = { kind = "local" }
overrides = { capacity_block_id = "cr-0fedcba9876543210", gpu_nodes = { min = 0, max = 2 } }

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

# tests/infra/test_infra_faults.py: interrupted apply, concurrent deploys, destroy inventory.
[environments.faults-emu]
size = "devtest"
region = "us-east-1"
azs = ["us-east-1a", "us-east-1b", "us-east-1c"]
vpc_cidr = "10.81.0.0/16"
kubernetes_version = "1.33"
api_access_cidrs = ["127.0.0.1/32"]
public_api_endpoint = true
aws_endpoint = "http://127.0.0.1:4566"
tags = { owner = "tests" }
state = { kind = "local" }
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


@pytest.fixture(scope="session")
def tiny_v2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny DeepSeek-V2 checkpoint (seed 1) the runtime tests and the e2e servers share: written once."""
    from runtime.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny-v2") / "v2_greedy", arch="v2", seed=1)


# ---- long jobs that mostly wait, started at the beginning of the session ---------------------------
#
# Applying and destroying four environments and running the demo twice take ~15 minutes of wall time,
# nearly all of it waiting on terraform's polling and on child processes. They start as soon as the
# session does, and the tests that read their results run last, so the rest of the suite runs meanwhile.

BACKGROUND_FIXTURES = (
    "once_demo",
    "stay_up_demo",
    "cdktf_cli_run",
    "lifecycles",
    "plan_summary_job",
    "infra_faults",
    "adopt_job",
)


@pytest.fixture(scope="session")
def lifecycles(
    request: pytest.FixtureRequest,
    synth_dir: Path,
    stacks: dict[str, dict],
    emulator: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, Future[dict[str, float]]]]:
    from tests.infra.lifecycle import LIVE_CHECKS, apply_replan_destroy

    # Only the environments whose test was selected (`-k prod-cb` applies one stack, not all of them).
    selected = {
        item.callspec.params["env_name"]
        for item in request.session.items
        if "lifecycles" in getattr(item, "fixturenames", ()) and hasattr(item, "callspec")
    }
    checks = {env: check for env, check in LIVE_CHECKS.items() if env in selected} or LIVE_CHECKS
    root = tmp_path_factory.mktemp("applied")
    with ThreadPoolExecutor(max_workers=len(checks)) as pool:
        yield {
            env: pool.submit(
                apply_replan_destroy,
                synth_dir / env,
                root / env,
                stacks[env],
                emulator,
                lambda outputs, check=check, env=env: check(emulator, outputs, root / env),
            )
            for env, check in checks.items()
        }


@pytest.fixture(scope="session")
def infra_faults(
    synth_dir: Path, stacks: dict[str, dict], emulator: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Future[dict]]:
    """Interrupted apply, concurrent deploys and destroy on `faults-emu` (tests/infra/fault_sequence.py)."""
    from tests.infra.fault_sequence import ENV, run_fault_sequence

    workdir = tmp_path_factory.mktemp("faults") / ENV
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield pool.submit(run_fault_sequence, synth_dir / ENV, workdir, stacks[ENV], emulator)


@pytest.fixture(scope="session")
def adopt_job(
    emulator: str, stacks: dict[str, dict], environments_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Future[dict]]:
    """`moefleet adopt` on a one-VPC stack (tests/infra/test_adopt.py)."""
    from tests.infra.test_adopt import adopt_scenario

    workdir = tmp_path_factory.mktemp("adopt") / "stack"
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield pool.submit(adopt_scenario, emulator, stacks, environments_file, workdir)


@pytest.fixture(scope="session")
def once_demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoRun]:
    run = DemoRun.start(tmp_path_factory.mktemp("demo-once"), "--once")
    yield run
    run.stop()


@pytest.fixture(scope="session")
def stay_up_demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Future[dict]]:
    run = DemoRun.start(tmp_path_factory.mktemp("demo-stay-up"))
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield pool.submit(run.explore_then_interrupt)
        run.stop()


@pytest.fixture(scope="session")
def cdktf_cli_run(emulator: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Future[tuple]]:
    from tests.infra.test_cdktf_cli import synth_then_diff

    with ThreadPoolExecutor(max_workers=1) as pool:
        yield pool.submit(synth_then_diff, emulator, tmp_path_factory.mktemp("cdktf-cli") / "cdktf.out")


@pytest.fixture(scope="session")
def plan_summary_job(emulator: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Future]:
    from tests.infra.test_plan_summary import plan_variants, synth_variants

    root = tmp_path_factory.mktemp("plan-summary")
    stacks = synth_variants(root, emulator)  # in-process synth stays on the main thread (jsii)
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield pool.submit(plan_variants, root, emulator, *stacks)


@pytest.fixture(scope="session", autouse=True)
def _start_background_jobs(request: pytest.FixtureRequest) -> None:
    wanted = {name for item in request.session.items for name in item.fixturenames}
    for name in BACKGROUND_FIXTURES:
        if name in wanted:
            request.getfixturevalue(name)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that collect background results go last (stable: the rest keep their order)."""
    items.sort(key=lambda item: any(name in getattr(item, "fixturenames", ()) for name in BACKGROUND_FIXTURES))
