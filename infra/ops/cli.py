"""`moefleet` subcommands for operations: envs, preflight, weights (upload/verify/pull), cost, status.

Registered in infra/cli.py through OPS_COMMANDS. Only argparse is imported here at module level; rich,
boto3 and the environments file load inside the handlers, so `moefleet --help` stays fast. Tables and
progress bars are drawn with rich on a terminal; into a pipe or a log the same output is plain text
(no cursor movement, no colour), one line per file.

Exit codes (as infra/cli.py): 0 ok, 1 AWS or terraform failed, 2 bad input, 4 a check failed (preflight
failure, or weights that do not match their manifest).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from infra.cli_options import add_emulator_endpoint_option, add_environments_option

if TYPE_CHECKING:
    from infra.config import Environment

EXIT_CHECK_FAILED = 4
Subparsers = argparse._SubParsersAction


def _env_options(parser: argparse.ArgumentParser) -> None:
    add_environments_option(parser)
    add_emulator_endpoint_option(parser)


def _cli_error(message: str, code: int = 2) -> Exception:
    from infra.cli import CliError

    return CliError(message, code)


def _environments(args: argparse.Namespace) -> dict[str, Environment]:
    from infra.config import DEFAULT_ENVIRONMENTS_FILE, ConfigError, load_environments

    try:
        return load_environments(args.environments or DEFAULT_ENVIRONMENTS_FILE)
    except ConfigError as err:
        raise _cli_error(str(err)) from None


def _environment(args: argparse.Namespace, name: str) -> Environment:
    from infra.config import DEFAULT_ENVIRONMENTS_FILE

    known = _environments(args)
    if name not in known:
        raise _cli_error(
            f"{args.command}: unknown environment {name!r} in {args.environments or DEFAULT_ENVIRONMENTS_FILE}; "
            f"allowed: {', '.join(known)}"
        )
    return known[name]


def _endpoint(args: argparse.Namespace, env: Environment) -> str | None:
    return (args.emulator_endpoint or env.aws_endpoint) if env.emulated else None


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # Into a pipe rich would wrap at 80 columns; tables stay readable in CI logs at 200.
    return Console(file=stream, width=None if stream.isatty() else 200, highlight=False)


def _aws_call(func: Any, *args: Any, **kwargs: Any) -> Any:
    """Run an AWS-touching function; botocore failures become one-line CLI errors (exit 1)."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return func(*args, **kwargs)
    except (BotoCoreError, ClientError) as err:
        raise _cli_error(f"AWS error: {err}", 1) from None


# ---- envs -------------------------------------------------------------------------------------------


def _add_envs(sub: Subparsers) -> None:
    parser = sub.add_parser("envs", help="list environments: size, region, instance types, GPUs")
    _env_options(parser)
    parser.set_defaults(handler=_envs)


def _envs(args: argparse.Namespace) -> int:
    from rich.table import Table

    table = Table(title="MoE Fleet environments")
    for column in ("environment", "size", "region", "AZs", "GPU instance", "GPU nodes (min/desired/max)",
                   "GPUs (at max)", "system nodes", "emulated"):  # fmt: skip
        table.add_column(column)
    for env in _environments(args).values():
        it = env.gpu_instance_spec
        lo, desired, hi = env.gpu_node_counts
        size = env.size_spec
        table.add_row(
            env.name,
            env.size.value,
            env.region,
            ", ".join(env.azs),
            f"{it.name} ({it.gpus}× {it.gpu_model} {it.gpu_memory_gib} GB)",
            f"{lo}/{desired}/{hi}",
            str(hi * it.gpus),
            f"{size.system_nodes[1]} × {size.system_instance_type}",
            env.aws_endpoint or "no",
        )
    _console().print(table)
    return 0


# ---- preflight --------------------------------------------------------------------------------------


def _add_preflight(sub: Subparsers) -> None:
    parser = sub.add_parser(
        "preflight",
        help="check the account before deploying: instance offerings per AZ, GPU quotas, capacity reservation",
        description="Pass/fail table with a remedy per failure; exit 4 when any check fails.",
    )
    parser.add_argument("env", help="environment name")
    _env_options(parser)
    parser.set_defaults(handler=_preflight)


def _preflight(args: argparse.Namespace) -> int:
    from rich.table import Table

    from infra.ops.preflight import Status, failed, run_preflight

    env = _environment(args, args.env)
    checks = _aws_call(run_preflight, env, _endpoint(args, env))
    where = f"emulator {_endpoint(args, env)}" if env.emulated else f"account in {env.region}"
    table = Table(title=f"preflight {env.name} ({env.size.value}, {where})")
    for column in ("check", "result", "detail", "remedy"):
        table.add_column(column)
    style = {Status.PASS: "green", Status.FAIL: "bold red", Status.SKIP: "dim", Status.NOT_CHECKABLE: "yellow"}
    for check in checks:
        table.add_row(check.name, f"[{style[check.status]}]{check.status.value}[/]", check.detail, check.remedy)
    console = _console()
    console.print(table)
    bad = failed(checks)
    if bad:
        console.print(f"preflight {env.name}: {len(bad)} check(s) failed")
        return EXIT_CHECK_FAILED
    console.print(f"preflight {env.name}: ok")
    return 0


# ---- weights ----------------------------------------------------------------------------------------


class RichProgress:
    """The weights core's progress sink drawn as a rich bar (terminal only; see `_progress`)."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.console = _console(stderr=True)
        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=self.console,
        )
        self.task: Any = None

    def start(self, label: str, total_bytes: int) -> None:
        self.finish()
        self.bar.start()
        self.task = self.bar.add_task(label, total=total_bytes or 1)

    def advance(self, nbytes: int) -> None:
        if self.task is not None:
            self.bar.update(self.task, advance=nbytes)

    def file_done(self, path: str, action: str) -> None:
        self.bar.console.print(f"  {action}: {path}")

    def finish(self) -> None:
        if self.task is not None:
            self.bar.stop()
            self.bar.remove_task(self.task)
            self.task = None


def _progress() -> Any:
    from infra.ops.weights import LineProgress

    return RichProgress() if sys.stderr.isatty() else LineProgress(sys.stderr)


def _add_weights(sub: Subparsers) -> None:
    parser = sub.add_parser("weights", help="model weights in the cold tier: upload, verify, pull")
    actions = parser.add_subparsers(dest="weights_command", required=True, metavar="ACTION")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("env", help="environment name")
        p.add_argument("--model", required=True, help="model name, e.g. deepseek-ai/DeepSeek-V2-Lite")
        p.add_argument("--revision", required=True, help="revision, e.g. main or a commit sha")
        p.add_argument("--bucket", help="cold-tier bucket (default: stack output models_bucket)")
        p.add_argument("--stack-dir", type=Path, help="where the stack was applied (default cdktf.out/stacks/ENV)")
        _env_options(p)

    up = actions.add_parser("upload", help="upload a checkpoint folder (parallel multipart, resumable)")
    common(up)
    up.add_argument("folder", type=Path, help="checkpoint folder")
    up.add_argument("--overwrite", action="store_true", help="replace a complete revision with different files")
    up.set_defaults(handler=_weights_upload)
    verify = actions.add_parser("verify", help="recompute every object's SHA-256 and compare to the manifest")
    common(verify)
    verify.add_argument("--quick", action="store_true", help="sizes and metadata only, no download")
    verify.set_defaults(handler=_weights_verify)
    pull = actions.add_parser("pull", help="sync a revision into a local hot-tier folder, atomically")
    common(pull)
    pull.add_argument("--dest", required=True, type=Path, help="local folder")
    pull.set_defaults(handler=_weights_pull)


def _cold_tier(args: argparse.Namespace) -> tuple[Environment, Any, str, str]:
    """(environment, s3 client, bucket, models prefix): --bucket, else the stack's outputs."""
    from infra.ops.aws import make_client
    from infra.ops.weights import DEFAULT_MODELS_PREFIX, FILE_WORKERS, PART_WORKERS

    env = _environment(args, args.env)
    bucket, prefix = args.bucket, DEFAULT_MODELS_PREFIX
    if not bucket:
        from infra.ops.outputs import OutputsUnavailable, default_stack_dir, stack_outputs

        stack_dir = args.stack_dir or default_stack_dir(env.name)
        try:
            outputs = stack_outputs(stack_dir)
        except OutputsUnavailable as err:
            raise _cli_error(
                f"weights: no cold-tier bucket for {env.name!r}: {err}; deploy the stack or pass --bucket"
            ) from None
        if "models_bucket" not in outputs:
            raise _cli_error(f"weights: the outputs in {stack_dir} have no models_bucket; pass --bucket")
        bucket, prefix = outputs["models_bucket"], outputs.get("models_prefix", prefix)
    s3 = make_client("s3", env.region, _endpoint(args, env), max_pool=FILE_WORKERS * PART_WORKERS)
    return env, s3, bucket, prefix


def _weights_call(func: Any, *args: Any, **kwargs: Any) -> Any:
    from infra.ops.weights import WeightsError, exit_now_on_interrupt

    try:
        return _aws_call(func, *args, **kwargs)
    except WeightsError as err:
        raise _cli_error(f"weights: {err}", err.exit_code) from None
    except OSError as err:  # the local side: permissions, disk full
        raise _cli_error(f"weights: {err}", 1) from None
    except KeyboardInterrupt:
        exit_now_on_interrupt("weights")


def _weights_upload(args: argparse.Namespace) -> int:
    from infra.ops.weights import upload

    if not args.folder.is_dir():
        raise _cli_error(f"weights upload: folder {str(args.folder)!r} not found or not a directory")
    _env, s3, bucket, prefix = _cold_tier(args)
    report = _weights_call(
        upload,
        s3,
        bucket,
        prefix,
        args.model,
        args.revision,
        args.folder,
        progress=_progress(),
        overwrite=args.overwrite,
    )
    where = f"s3://{bucket}/{report.prefix}"
    if report.already_complete:
        print(f"weights upload: {where} already complete ({len(report.skipped)} files match); nothing to do")
        return 0
    rate = report.bytes_uploaded / report.seconds / 1e6 if report.seconds else 0.0
    print(
        f"weights upload: {where}: {len(report.uploaded)} uploaded, {len(report.skipped)} already there "
        f"(resumed), {report.bytes_uploaded / 1e6:.1f} MB in {report.seconds:.1f} s ({rate:.0f} MB/s); manifest written"
    )
    return 0


def _weights_verify(args: argparse.Namespace) -> int:
    from infra.ops.weights import revision_prefix, verify

    _env, s3, bucket, prefix = _cold_tier(args)
    rev_prefix = _weights_call(revision_prefix, prefix, args.model, args.revision)
    manifest = _weights_call(verify, s3, bucket, rev_prefix, progress=_progress(), deep=not args.quick)
    how = "sizes and metadata" if args.quick else "SHA-256 of the stored bytes"
    print(f"weights verify: s3://{bucket}/{rev_prefix}: {len(manifest.files)} file(s) match the manifest ({how})")
    return 0


def _weights_pull(args: argparse.Namespace) -> int:
    from infra.ops.weights import pull, revision_prefix

    _env, s3, bucket, prefix = _cold_tier(args)
    rev_prefix = _weights_call(revision_prefix, prefix, args.model, args.revision)
    report = _weights_call(pull, s3, bucket, rev_prefix, args.dest, progress=_progress())
    if report.up_to_date:
        print(f"weights pull: {report.dest} already holds {args.model}@{args.revision}; nothing to do")
    else:
        print(
            f"weights pull: {report.dest}: {len(report.downloaded)} downloaded, {len(report.reused)} reused, "
            f"verified against the manifest in {report.seconds:.1f} s"
        )
    return 0


# ---- cost -------------------------------------------------------------------------------------------


def _add_cost(sub: Subparsers) -> None:
    parser = sub.add_parser("cost", help="hourly and monthly list-price cost per environment vs the seed's capex")
    parser.add_argument("env", nargs="?", help="one environment (default: all)")
    _env_options(parser)
    parser.set_defaults(handler=_cost)


def _cost(args: argparse.Namespace) -> int:
    from rich.table import Table

    from infra.ops.cost import HOURS_PER_MONTH, estimate, price_note

    envs = [_environment(args, args.env)] if args.env else list(_environments(args).values())
    console = _console()
    summary = Table(title="summary: serving 24/7 vs buying the seed's hardware")
    for column in ("environment", "size", "$/hour", "$/month", "$/month idle (GPU pool at 0)", "seed's hardware",
                   "seed capex", "break-even"):  # fmt: skip
        summary.add_column(column, justify="right" if column.startswith(("$", "break", "seed capex")) else "left")
    for env in envs:
        est = estimate(env)
        table = Table(title=f"{env.name} ({est.size}): ${est.hourly:,.2f}/h, ${est.monthly:,.0f}/month")
        table.add_column("item")
        table.add_column("quantity")
        table.add_column("$/hour", justify="right")
        table.add_column(f"$/month ({HOURS_PER_MONTH} h)", justify="right")
        for line in est.lines:
            table.add_row(line.item, line.quantity, f"{line.usd_per_hour:,.3f}", f"{line.usd_per_month:,.0f}")
        table.add_row("total", "", f"{est.hourly:,.2f}", f"{est.monthly:,.0f}", style="bold")
        console.print(table)
        summary.add_row(
            env.name,
            est.size,
            f"{est.hourly:,.2f}",
            f"{est.monthly:,.0f}",
            f"{est.idle_monthly:,.0f}",
            est.seed_hardware,
            f"¥{est.seed_capex_cny:,} (${est.seed_capex_usd:,.0f})",
            f"{est.break_even_months:.1f} months",
        )
    console.print(summary)
    console.print(price_note())
    return 0


# ---- status -----------------------------------------------------------------------------------------


def _add_status(sub: Subparsers) -> None:
    parser = sub.add_parser("status", help="cluster, node groups, FSx and the latest model of an environment")
    parser.add_argument("env", help="environment name")
    parser.add_argument("--stack-dir", type=Path, help="where the stack was applied (default cdktf.out/stacks/ENV)")
    parser.add_argument("--bucket", help="cold-tier bucket, when the stack outputs cannot be read")
    _env_options(parser)
    parser.set_defaults(handler=_status)


def _status(args: argparse.Namespace) -> int:
    from rich.table import Table

    from infra.ops.outputs import OutputsUnavailable, default_stack_dir, stack_outputs
    from infra.ops.status import gather

    env = _environment(args, args.env)
    stack_dir = args.stack_dir or default_stack_dir(env.name)
    try:
        outputs = stack_outputs(stack_dir)
        source = f"outputs in {stack_dir}"
    except OutputsUnavailable as err:
        if args.stack_dir:
            raise _cli_error(f"status: {err}") from None
        outputs, source = {}, "tags (no stack outputs here)"
    if args.bucket:
        outputs = {**outputs, "models_bucket": args.bucket}
    rows = _aws_call(gather, env, outputs, _endpoint(args, env))
    table = Table(title=f"status {env.name} ({env.size.value}, {env.region}; names from {source})")
    for column in ("component", "name", "state", "detail"):
        table.add_column(column)
    for row in rows:
        table.add_row(row.component, row.name, row.state, row.detail)
    _console().print(table)
    return 0


#: Appended to infra.cli.COMMANDS.
OPS_COMMANDS = [_add_envs, _add_preflight, _add_weights, _add_cost, _add_status]
