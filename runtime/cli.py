"""``moe-runtime`` command line. Each subcommand is a function registered in :data:`COMMANDS`; the
service adds ``serve`` the same way. Heavy imports happen inside the handlers, so ``--help`` is instant."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence


def _add_make_tiny(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-tiny", help="write a tiny random DeepSeek checkpoint (HF format)")
    p.add_argument("out_dir", help="output folder (created if missing)")
    p.add_argument("--arch", choices=["v2", "v3"], default="v2", help="DeepSeek-V2 or -V3 layout")
    p.add_argument("--seed", type=int, default=0, help="random seed for the weights")
    p.set_defaults(handler=_make_tiny)


def _make_tiny(args: argparse.Namespace) -> int:
    from runtime.tiny import make_tiny

    t0 = time.perf_counter()
    out = make_tiny(args.out_dir, arch=args.arch, seed=args.seed)
    print(f"wrote tiny {args.arch} checkpoint to {out} in {time.perf_counter() - t0:.1f} s")
    return 0


# name → function adding the subparser; append to extend the CLI.
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_make_tiny]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-runtime", description="MoE Fleet runtime")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
