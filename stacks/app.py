"""cdktf app: one stack per environment in stacks/environments.toml, synthesized in one process.

`cdktf.json` runs this module; `npx cdktf diff <env>` / `deploy <env>` pick one stack from it.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

# jsii prints a banner for Node 20 on every import; the pinned CLI set is tested on it.
os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")

from cdktf import App

from infra.catalog.environments import DEFAULT_ENVIRONMENTS_FILE, load_environments
from infra.catalog.names import EMULATOR_ENDPOINT_VAR, ENVIRONMENTS_VAR
from stacks.environment_stack import EnvironmentStack


def build_app(
    outdir: Path | str = "cdktf.out",
    environments_file: Path | str = DEFAULT_ENVIRONMENTS_FILE,
    only: list[str] | None = None,
    endpoint_override: str | None = None,
) -> App:
    """Validate every environment first (nothing is synthesized from a bad file), then build the stacks.

    `endpoint_override` re-points emulated environments at another emulator port (the tests' moto).
    """
    envs = load_environments(environments_file)
    app = App(outdir=str(outdir), skip_validation=False)
    for name, env in envs.items():
        if only and name not in only:
            continue
        EnvironmentStack(app, env, endpoint_override=endpoint_override if env.emulated else None)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--outdir", default=os.environ.get("CDKTF_OUTDIR", "cdktf.out"))
    parser.add_argument("--environments", default=os.environ.get(ENVIRONMENTS_VAR, DEFAULT_ENVIRONMENTS_FILE))
    parser.add_argument(
        "--emulator-endpoint",
        default=os.environ.get(EMULATOR_ENDPOINT_VAR),
        help="re-point emulated environments at this loopback URL (the demo and tests pick free ports)",
    )
    args = parser.parse_args(argv)
    build_app(args.outdir, args.environments, endpoint_override=args.emulator_endpoint).synth()


if __name__ == "__main__":
    main()
