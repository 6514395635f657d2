"""`moefleet` subcommands for a deployed (or planned) environment: envs, preflight, adopt, cost, status.

Tables are drawn with rich on a terminal; into a pipe or a log the same output is plain text (no cursor
movement, no colour). rich, boto3 and the environments file load inside the handlers.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from infra.catalog.exit_codes import ExitCode
from infra.cli.common import (
    CliError,
    Subparsers,
    add_environment_options,
    aws_call,
    console,
    emulator_endpoint,
    environment,
    load_environments,
)

# ---- envs -------------------------------------------------------------------------------------------


def add_envs(sub: Subparsers) -> None:
    parser = sub.add_parser("envs", help="list environments: size, region, instance types, GPUs, model")
    add_environment_options(parser)
    parser.set_defaults(handler=_envs)


def _envs(args: argparse.Namespace) -> int:
    from rich.table import Table

    table = Table(title="MoE Fleet environments")
    for column in ("environment", "size", "region", "AZs", "GPU instance", "GPU nodes (min/desired/max)",
                   "GPUs (at max)", "system nodes", "model (name@revision)", "emulated"):  # fmt: skip
        table.add_column(column)
    for env in load_environments(args).values():
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
            f"{env.model.name}@{env.model.revision}",
            env.aws_endpoint or "no",
        )
    console().print(table)
    return ExitCode.OK


# ---- preflight --------------------------------------------------------------------------------------


def add_preflight(sub: Subparsers) -> None:
    parser = sub.add_parser(
        "preflight",
        help="check the account before deploying: instance offerings per AZ, GPU quotas, capacity reservation",
        description=f"Pass/fail table with a remedy per failure; exit {int(ExitCode.CHECK_FAILED)} when any fails.",
    )
    parser.add_argument("env", help="environment name")
    add_environment_options(parser)
    parser.set_defaults(handler=_preflight)


def _preflight(args: argparse.Namespace) -> int:
    from rich.table import Table

    from infra.ops.preflight import Status, failed, run_preflight

    env = environment(args, args.env)
    endpoint = emulator_endpoint(args, env)
    checks = aws_call(run_preflight, env, endpoint)
    where = f"emulator {endpoint}" if env.emulated else f"account in {env.region}"
    table = Table(title=f"preflight {env.name} ({env.size.value}, {where})")
    for column in ("check", "result", "detail", "remedy"):
        table.add_column(column)
    style = {Status.PASS: "green", Status.FAIL: "bold red", Status.SKIP: "dim", Status.NOT_CHECKABLE: "yellow"}
    for check in checks:
        table.add_row(check.name, f"[{style[check.status]}]{check.status.value}[/]", check.detail, check.remedy)
    out = console()
    out.print(table)
    bad = failed(checks)
    if bad:
        out.print(f"preflight {env.name}: {len(bad)} check(s) failed")
        return ExitCode.CHECK_FAILED
    out.print(f"preflight {env.name}: ok")
    return ExitCode.OK


# ---- adopt ------------------------------------------------------------------------------------------


def add_adopt(sub: Subparsers) -> None:
    parser = sub.add_parser(
        "adopt",
        help="after an interrupted deploy: import the stack's objects that AWS holds but the state does not",
        description=(
            "An interrupted `cdktf deploy` can leave objects it was creating in AWS but not in the state (the "
            "interrupt cancels the provider's calls in flight); deploying again would create copies. This "
            "lists the stack's untracked objects (network objects by its default tags and each resource's "
            "Name tag; log groups, KMS aliases, IAM roles, tables, repositories and the cluster by name, "
            "when they carry the stack's tags) and imports each one that matches exactly one resource the "
            "state lacks. Ambiguous copies, and named objects without the stack's tags, are listed, never "
            f"deleted, with exit {int(ExitCode.CHECK_FAILED)}."
        ),
    )
    parser.add_argument("env", help="environment name")
    parser.add_argument("--stack-dir", type=Path, help="where the stack was applied (default cdktf.out/stacks/ENV)")
    parser.add_argument("--check", action="store_true", help="list what would be adopted; import nothing")
    add_environment_options(parser)
    parser.set_defaults(handler=_adopt)


def _adopt(args: argparse.Namespace) -> int:
    from rich.table import Table

    from infra.terraform.outputs import default_stack_dir
    from infra.terraform.runner import Terraform, TerraformError

    env = environment(args, args.env)
    stack_dir = args.stack_dir or default_stack_dir(env.name)
    if not (stack_dir / "cdk.tf.json").is_file():
        why = f"adopt: {stack_dir} holds no synthesized stack (cdktf synth, or --stack-dir)"
        raise CliError(why, ExitCode.BAD_INPUT)
    if not (stack_dir / ".terraform").is_dir():
        raise CliError(f"adopt: {stack_dir} was never initialised by a deploy: nothing to adopt", ExitCode.BAD_INPUT)
    tf = Terraform(stack_dir)
    try:
        found = aws_call(tf.untracked)
    except TerraformError as err:
        raise CliError(f"adopt: {str(err).splitlines()[0]}") from None
    out = console()
    table = Table(title=f"untracked objects of {env.name} ({stack_dir})")
    for column in ("resource", "object", "action"):
        table.add_column(column)
    for address, oid in sorted(found.imports.items()):
        table.add_row(address, oid, "import" if not args.check else "would import")
    for line in found.conflicts:
        table.add_row("", line, "[bold red]left as is[/]")
    out.print(table)
    if found.conflicts:
        out.print(f"adopt {env.name}: {len(found.conflicts)} object(s) cannot be matched safely; see above")
        return ExitCode.CHECK_FAILED
    if not found.imports:
        out.print(f"adopt {env.name}: the state holds every object of the stack")
        return ExitCode.OK
    if args.check:
        out.print(f"adopt {env.name}: {len(found.imports)} object(s) to import (run without --check)")
        return ExitCode.OK
    try:
        aws_call(tf.adopt, found)
    except TerraformError as err:
        raise CliError(f"adopt: {err}") from None
    out.print(f"adopt {env.name}: imported {len(found.imports)} object(s); deploy again to converge")
    return ExitCode.OK


# ---- cost -------------------------------------------------------------------------------------------


def add_cost(sub: Subparsers) -> None:
    parser = sub.add_parser(
        "cost", help="hourly and monthly list-price cost per environment vs the source document's capex"
    )
    parser.add_argument("env", nargs="?", help="one environment (default: all)")
    add_environment_options(parser)
    parser.set_defaults(handler=_cost)


def _cost(args: argparse.Namespace) -> int:
    from rich.table import Table

    from infra.ops.cost import HOURS_PER_MONTH, estimate, price_note

    envs = [environment(args, args.env)] if args.env else list(load_environments(args).values())
    out = console()
    summary = Table(title="summary: serving 24/7 vs buying the source document's hardware")
    capex = "source document's capex"
    for column in ("environment", "size", "$/hour", "$/month", "$/month idle (GPU pool at 0)",
                   "source document's hardware", capex, "break-even"):  # fmt: skip
        summary.add_column(column, justify="right" if column.startswith(("$", "break", capex)) else "left")
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
        out.print(table)
        summary.add_row(
            env.name,
            est.size,
            f"{est.hourly:,.2f}",
            f"{est.monthly:,.0f}",
            f"{est.idle_monthly:,.0f}",
            est.source_hardware,
            f"¥{est.source_capex_cny:,} (${est.source_capex_usd:,.0f})",
            f"{est.break_even_months:.1f} months",
        )
    out.print(summary)
    out.print(price_note())
    return ExitCode.OK


# ---- status -----------------------------------------------------------------------------------------


def add_status(sub: Subparsers) -> None:
    parser = sub.add_parser("status", help="cluster, node groups, FSx and the latest model of an environment")
    parser.add_argument("env", help="environment name")
    parser.add_argument("--stack-dir", type=Path, help="where the stack was applied (default cdktf.out/stacks/ENV)")
    parser.add_argument("--bucket", help="cold-tier bucket, when the stack outputs cannot be read")
    add_environment_options(parser)
    parser.set_defaults(handler=_status)


def _status(args: argparse.Namespace) -> int:
    from rich.table import Table

    from infra.catalog.outputs import OutputsError
    from infra.ops.status import gather
    from infra.terraform.outputs import OutputsUnavailable, default_stack_dir, read_stack_outputs

    env = environment(args, args.env)
    stack_dir = args.stack_dir or default_stack_dir(env.name)
    outputs = None
    try:
        outputs = read_stack_outputs(stack_dir)
        source = f"outputs in {stack_dir}"
    except OutputsUnavailable as err:
        if args.stack_dir:
            raise CliError(f"status: {err}") from None
        source = "tags (no stack outputs here)"
    except OutputsError as err:
        raise CliError(f"status: {err}") from None
    rows = aws_call(gather, env, outputs, emulator_endpoint(args, env), bucket=args.bucket)
    table = Table(title=f"status {env.name} ({env.size.value}, {env.region}; names from {source})")
    for column in ("component", "name", "state", "detail"):
        table.add_column(column)
    for row in rows:
        table.add_row(row.component, row.name, row.state, row.detail)
    console().print(table)
    return ExitCode.OK
