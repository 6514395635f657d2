"""`moefleet weights upload|verify|pull ENV`: model weights in an environment's cold tier.

The revision is the environment's `model` setting in environments.toml (`--model`/`--revision` override
it); the bucket comes from `--bucket` or from the environment's stack outputs. Progress is a rich bar on a
terminal and one plain line per file into a pipe or a log. The transfer logic lives in
`infra.ops.weights` (boto3 + stdlib, shared with the init container); this module only parses, reports
and maps its errors onto the exit codes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from infra.catalog.exit_codes import ExitCode
from infra.cli.common import (
    CliError,
    Subparsers,
    add_environment_options,
    add_model_options,
    aws_call,
    console,
    emulator_endpoint,
    environment,
    model_ref,
)

if TYPE_CHECKING:
    from infra.catalog.sizes import ModelRef


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

        self.console = console(stderr=True)
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


def register(sub: Subparsers) -> None:
    parser = sub.add_parser("weights", help="model weights in the cold tier: upload, verify, pull")
    actions = parser.add_subparsers(dest="weights_command", required=True, metavar="ACTION")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("env", help="environment name")
        add_model_options(p)
        p.add_argument("--bucket", help="cold-tier bucket (default: stack output models_bucket)")
        p.add_argument("--stack-dir", type=Path, help="where the stack was applied (default cdktf.out/stacks/ENV)")
        add_environment_options(p)

    up = actions.add_parser("upload", help="upload a checkpoint folder (parallel multipart, resumable)")
    common(up)
    up.add_argument("folder", type=Path, help="checkpoint folder")
    up.add_argument("--overwrite", action="store_true", help="replace a complete revision with different files")
    up.set_defaults(handler=_upload)
    verify = actions.add_parser("verify", help="recompute every object's SHA-256 and compare to the manifest")
    common(verify)
    verify.add_argument("--quick", action="store_true", help="sizes and metadata only, no download")
    verify.set_defaults(handler=_verify)
    pull = actions.add_parser("pull", help="sync a revision into a local hot-tier folder, atomically")
    common(pull)
    pull.add_argument("--dest", required=True, type=Path, help="local folder")
    pull.set_defaults(handler=_pull)


def _cold_tier(args: argparse.Namespace) -> tuple[ModelRef, Any, str, str]:
    """(model revision, s3 client, bucket, models prefix): the model from the environment's setting or
    --model/--revision; the bucket from --bucket, else the stack's outputs."""
    from infra.catalog.outputs import OutputsError
    from infra.ops.aws import make_client
    from infra.ops.weights import DEFAULT_MODELS_PREFIX, FILE_WORKERS, PART_WORKERS

    env = environment(args, args.env)
    bucket, prefix = args.bucket, DEFAULT_MODELS_PREFIX
    if not bucket:
        from infra.terraform.outputs import default_stack_dir, read_stack_outputs

        try:
            outputs = read_stack_outputs(args.stack_dir or default_stack_dir(env.name))
        except OutputsError as err:
            raise CliError(
                f"weights: no cold-tier bucket for {env.name!r}: {err}; deploy the stack or pass --bucket"
            ) from None
        bucket, prefix = outputs.models_bucket, outputs.models_prefix
    s3 = make_client("s3", env.region, emulator_endpoint(args, env), max_pool=FILE_WORKERS * PART_WORKERS)
    return model_ref(args, env), s3, bucket, prefix


def _call(func: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a weights operation; its errors become CliErrors with the operation's exit code."""
    from infra.ops.weights import WeightsError, exit_now_on_interrupt

    try:
        return aws_call(func, *args, **kwargs)
    except WeightsError as err:
        raise CliError(f"weights: {err}", err.exit_code) from None
    except OSError as err:  # the local side: permissions, disk full
        raise CliError(f"weights: {err}", ExitCode.FAILED) from None
    except KeyboardInterrupt:
        exit_now_on_interrupt("weights")


def _upload(args: argparse.Namespace) -> int:
    from infra.ops.weights import upload

    if not args.folder.is_dir():
        raise CliError(f"weights upload: folder {str(args.folder)!r} not found or not a directory")
    model, s3, bucket, prefix = _cold_tier(args)
    report = _call(
        upload,
        s3,
        bucket,
        prefix,
        model.name,
        model.revision,
        args.folder,
        progress=_progress(),
        overwrite=args.overwrite,
    )
    where = f"s3://{bucket}/{report.prefix}"
    if report.already_complete:
        print(f"weights upload: {where} already complete ({len(report.skipped)} files match); nothing to do")
        return ExitCode.OK
    rate = report.bytes_uploaded / report.seconds / 1e6 if report.seconds else 0.0
    print(
        f"weights upload: {where}: {len(report.uploaded)} uploaded, {len(report.skipped)} already there "
        f"(resumed), {report.bytes_uploaded / 1e6:.1f} MB in {report.seconds:.1f} s ({rate:.0f} MB/s); manifest written"
    )
    return ExitCode.OK


def _verify(args: argparse.Namespace) -> int:
    from infra.ops.weights import revision_prefix, verify

    model, s3, bucket, prefix = _cold_tier(args)
    rev_prefix = _call(revision_prefix, prefix, model.name, model.revision)
    manifest = _call(verify, s3, bucket, rev_prefix, progress=_progress(), deep=not args.quick)
    how = "sizes and metadata" if args.quick else "SHA-256 of the stored bytes"
    print(f"weights verify: s3://{bucket}/{rev_prefix}: {len(manifest.files)} file(s) match the manifest ({how})")
    return ExitCode.OK


def _pull(args: argparse.Namespace) -> int:
    from infra.ops.weights import pull, revision_prefix

    model, s3, bucket, prefix = _cold_tier(args)
    rev_prefix = _call(revision_prefix, prefix, model.name, model.revision)
    report = _call(pull, s3, bucket, rev_prefix, args.dest, progress=_progress())
    if report.up_to_date:
        print(f"weights pull: {report.dest} already holds {model.name}@{model.revision}; nothing to do")
    else:
        print(
            f"weights pull: {report.dest}: {len(report.downloaded)} downloaded, {len(report.reused)} reused, "
            f"verified against the manifest in {report.seconds:.1f} s"
        )
    return ExitCode.OK
