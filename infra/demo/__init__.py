"""`make demo`: the whole system on the embedded default, one command, no AWS account.

Steps (each named when it fails; everything started so far is torn down):
  1. start the embedded AWS (moto + our patches) on 127.0.0.1
  2. synthesize the `local` environment and `terraform apply` it with the real binary
  3. show the stack outputs and what the emulator now holds
  4. stay up until Ctrl-C (or, with --once, continue at once), then destroy the stack and stop everything

The runtime, the weights path and Prometheus join this sequence as their issues land (docs/demo.md).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from infra.emulator.process import Emulator, EmulatorError, port_in_use
from infra.terraform import PROJECT_ROOT, Terraform, TerraformError

DEMO_ENV = "local"
DEFAULT_EMULATOR_PORT = 4566


class StepFailed(RuntimeError):
    def __init__(self, step: str, cause: BaseException) -> None:
        super().__init__(f"step '{step}' failed: {cause}")
        self.step = step


@contextlib.contextmanager
def step(name: str) -> Iterator[None]:
    started = time.monotonic()
    print(f"==> {name}", flush=True)
    try:
        yield
    except (EmulatorError, TerraformError, OSError, ValueError) as err:
        raise StepFailed(name, err) from err
    print(f"    done in {time.monotonic() - started:.1f} s", flush=True)


def check_tools() -> None:
    missing = [tool for tool in ("terraform",) if shutil.which(tool) is None]
    if missing:
        raise StepFailed("check tools", RuntimeError(f"not on PATH: {', '.join(missing)} (see README: requirements)"))


def print_outputs(outputs: dict[str, Any]) -> None:
    width = max(len(k) for k in outputs)
    for key, value in sorted(outputs.items()):
        shown = ", ".join(value) if isinstance(value, list) else value
        print(f"    {key:<{width}}  {shown}")


def run(once: bool, port: int, workdir: Path) -> int:
    check_tools()
    if port_in_use(port):
        raise StepFailed("start emulated AWS", RuntimeError(f"port {port} on 127.0.0.1 is already in use (try --port)"))
    with contextlib.ExitStack() as teardown:
        workdir.mkdir(parents=True, exist_ok=True)
        emulator = Emulator(port=port, log_path=workdir / "emulator.log")
        with step(f"start emulated AWS on 127.0.0.1:{port}"):
            url = emulator.start()
        teardown.callback(emulator.stop)

        with step(f"synthesize environment '{DEMO_ENV}'"):
            os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")
            from stacks.app import build_app

            outdir = workdir / "cdktf.out"
            build_app(outdir, only=[DEMO_ENV], endpoint_override=url).synth()

        tf = Terraform.from_stack(outdir / "stacks" / DEMO_ENV, workdir / DEMO_ENV)
        with step("terraform init + apply (real terraform, emulated AWS)"):
            tf.init()
            teardown.callback(_destroy, tf)
            tf.apply()

        with step("read stack outputs"):
            outputs = tf.outputs()
        print_outputs(outputs)
        print(f"\n    emulated AWS: {url}   (state and logs under {workdir})")

        if not once:
            print("\nThe stack is up. Press Ctrl-C to destroy it and stop everything.", flush=True)
            _wait_for_interrupt()
        print("==> tearing down", flush=True)
    print("demo: finished, nothing left running", flush=True)
    return 0


def _destroy(tf: Terraform) -> None:
    try:
        tf.destroy()
        print("    stack destroyed", flush=True)
    except TerraformError as err:
        print(f"    destroy failed: {err}", file=sys.stderr, flush=True)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt  # SIGTERM tears down like Ctrl-C


def _wait_for_interrupt(sleep: Callable[[float], None] = time.sleep) -> None:
    # Explicit for SIGINT too: a shell that starts us in the background leaves SIGINT ignored.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            sleep(3600)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="make demo", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--once", action="store_true", help="run end to end, tear down and exit (for CI)")
    parser.add_argument("--port", type=int, default=DEFAULT_EMULATOR_PORT, help="emulated AWS port on 127.0.0.1")
    parser.add_argument("--workdir", type=Path, default=PROJECT_ROOT / ".demo", help="state and logs")
    args = parser.parse_args(argv)
    try:
        sys.exit(run(args.once, args.port, args.workdir))
    except StepFailed as err:
        print(f"demo: {err}\ndemo: everything started so far was torn down", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
