"""`moefleet render <env>` and `moefleet install <env>`: the runtime's Kubernetes objects.

Both read the environment from environments.toml and its stack outputs (`--outputs FILE`, else
`terraform output -json` in the deployed stack folder), through the outputs contract. `render` falls
back to representative outputs for an environment that was never applied here (and says so); `install`
never does. The pods serve the environment's `model` setting (`--model`/`--revision` override it).

Before it touches the cluster (also with `--dry-run`), `install` checks that the revision is complete in the
environment's cold tier: its manifest exists and every object it lists is there with the listed size and
checksum metadata (`infra.ops.weights.verify`, without downloading). A revision that is missing or
incomplete stops the install with ExitCode.CHECK_FAILED and the upload command to run; without that check
the pods' init container would fail and the rollout would wait until its timeout. `--skip-weights-check`
skips it (the weights are uploaded by another pipeline, or from a machine without AWS credentials).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from infra.catalog.exit_codes import ExitCode
from infra.cli.common import (
    CliError,
    Subparsers,
    add_emulator_endpoint_option,
    add_environments_option,
    add_model_options,
    aws_call,
    emulator_endpoint,
    environment,
    model_ref,
)

if TYPE_CHECKING:
    from infra.catalog.environments import Environment
    from infra.catalog.outputs import StackOutputs
    from infra.catalog.sizes import ModelRef


def git_tag(cwd: Path | None = None) -> str:
    """`git describe --tags --always --dirty`: the image tag `make image` uses too."""
    try:
        out = subprocess.run(
            ["git", "describe", "--tags", "--always", "--dirty"], capture_output=True, text=True, cwd=cwd, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "dev"
    return out.stdout.strip() or "dev"


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("env", help="environment name from environments.toml")
    parser.add_argument("--outputs", type=Path, help="stack outputs JSON (`terraform output -json`)")
    parser.add_argument("--stack-dir", type=Path, help="deployed stack folder (default cdktf.out/stacks/<env>)")
    parser.add_argument("--tag", help="image tag (default: git describe --tags --always --dirty)")
    parser.add_argument("--image", help="full image reference (default: <ecr_repository_url>:<tag>)")
    add_model_options(parser)
    add_environments_option(parser)


def add_render(sub: Subparsers) -> None:
    parser = sub.add_parser(
        "render",
        help="render the runtime's Kubernetes objects (YAML, apply order) for GitOps",
        description="Render and validate the Kubernetes objects of one environment.",
    )
    _common(parser)
    parser.add_argument("--out", type=Path, help="write one YAML file per object here (default: all to stdout)")
    parser.add_argument("--no-validate", action="store_true", help="skip the OpenAPI/CRD schema check")
    parser.set_defaults(handler=run_render)


def add_install(sub: Subparsers) -> None:
    parser = sub.add_parser(
        "install",
        help="server-side apply the runtime's objects, wait for the rollout, roll back on failure",
        description="Install the runtime on the environment's cluster (kubeconfig from `aws eks update-kubeconfig`).",
    )
    _common(parser)
    parser.add_argument("--dry-run", action="store_true", help="server-side dry run: show what would change")
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
    parser.add_argument("--context", help="kubeconfig context")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for the rollout")
    parser.add_argument("--poll", type=float, default=5.0, help="seconds between rollout checks")
    parser.add_argument(
        "--skip-weights-check",
        action="store_true",
        help="do not check that the model revision is complete in the cold tier before installing",
    )
    parser.add_argument(
        "--api-key-file",
        type=Path,
        help="the runtime's API key(s), one per line, for the Secret the pods read when it does not exist yet "
        "(default: a generated key; an existing Secret is never changed)",
    )
    add_emulator_endpoint_option(parser)
    parser.set_defaults(handler=run_install)


def _outputs(args: argparse.Namespace, env: Environment, *, allow_representative: bool) -> StackOutputs:
    from infra.catalog.outputs import OutputsError, StackOutputs, representative_outputs
    from infra.terraform.outputs import OutputsUnavailable, default_stack_dir, read_stack_outputs

    try:
        if args.outputs:
            return StackOutputs.from_file(args.outputs)
        stack_dir = args.stack_dir or default_stack_dir(env.name)
        why = f"{stack_dir} was never initialised by a deploy"
        if (stack_dir / ".terraform").is_dir():
            try:
                return read_stack_outputs(stack_dir)
            except OutputsUnavailable as err:
                why = str(err)
        if not allow_representative:
            raise CliError(
                f"{args.command}: no stack outputs for {env.name!r} ({why}): deploy it first "
                f"(make deploy ENV={env.name}) or pass --outputs FILE (`terraform output -json`)"
            )
        print(
            f"{args.command}: no applied stack outputs for {env.name!r} ({why}); rendering with representative "
            "outputs (placeholder account and IDs) — for review and GitOps templates, not for applying",
            file=sys.stderr,
        )
        return StackOutputs.from_mapping(representative_outputs(env), f"representative outputs of {env.name}")
    except OutputsError as err:
        raise CliError(str(err)) from None


def _objects(
    args: argparse.Namespace, *, allow_representative: bool
) -> tuple[Environment, StackOutputs, ModelRef, list[dict[str, Any]]]:
    from infra.catalog.outputs import OutputsError
    from infra.kube.render import render, render_input

    env = environment(args, args.env)
    outputs = _outputs(args, env, allow_representative=allow_representative)
    tag = args.tag or git_tag()
    image = args.image or f"{outputs.ecr_repository_url}:{tag}"
    model = model_ref(args, env)
    try:
        inp = render_input(env, outputs, image=image, model=model, version=tag)
    except OutputsError as err:
        raise CliError(str(err)) from None
    return env, outputs, model, render(inp)


def check_weights(args: argparse.Namespace, env: Environment, outputs: StackOutputs, model: ModelRef) -> None:
    """Refuse unless the revision is complete in the cold tier (manifest present, every object listed in it
    present with its size and checksum metadata); the message names the bucket, the prefix and the fix."""
    from infra.ops.aws import make_client
    from infra.ops.weights import WeightsError, revision_prefix, verify

    bucket = outputs.models_bucket
    try:
        prefix = revision_prefix(outputs.models_prefix, model.name, model.revision)
    except WeightsError as err:
        raise CliError(f"{args.command}: {err}", err.exit_code) from None
    s3 = make_client("s3", env.region, emulator_endpoint(args, env))
    try:
        aws_call(verify, s3, bucket, prefix, deep=False)
    except WeightsError as err:  # no manifest, an unreadable one, or objects that do not match it
        raise CliError(
            f"{args.command}: model {model.name}@{model.revision} is not complete in the cold tier "
            f"(bucket {bucket}, prefix {prefix}): {err}\n"
            f"  upload it first: moefleet weights upload {env.name} DIR --model {model.name} "
            f"--revision {model.revision}\n"
            f"  (or set `model` of {env.name!r} in the environments file to a revision that is uploaded)",
            ExitCode.CHECK_FAILED,
        ) from None
    print(f"{args.command}: weights s3://{bucket}/{prefix} complete (manifest and every object)", file=sys.stderr)


def _validate(objs: list[dict[str, Any]], kubernetes_version: str) -> None:
    from infra.kube.schema import validate_all

    problems = validate_all(objs, kubernetes_version)
    if problems:
        raise CliError("schema check failed:\n  " + "\n  ".join(map(str, problems)), ExitCode.FAILED)


def run_render(args: argparse.Namespace) -> int:
    from infra.kube.render import to_yaml, write_dir

    env, _, _, objs = _objects(args, allow_representative=True)
    if not args.no_validate:
        _validate(objs, env.kubernetes_version)
    if args.out:
        paths = write_dir(objs, args.out)
        print(f"render: wrote {len(paths)} objects for {env.name} ({env.size.value}) to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(to_yaml(objs))
    return ExitCode.OK


def read_api_keys(path: Path | None) -> str | None:
    """The operator's keys as the Secret stores them ($MOE_API_KEYS: comma-separated); None: generate one."""
    if path is None:
        return None
    try:
        lines = [ln.strip() for ln in path.read_text().splitlines()]
    except OSError as err:
        why = f"cannot read it ({err.strerror or err})"
        raise CliError(f"install: --api-key-file {path}: {why}", ExitCode.BAD_INPUT) from None
    keys = [ln for ln in lines if ln and not ln.startswith("#")]
    bad = [k for k in keys if "," in k or " " in k]
    if not keys or bad:
        raise CliError(
            f"install: --api-key-file {path}: {'a key holds a comma or space' if bad else 'no key in it'}; "
            "allowed: one key per line",
            ExitCode.BAD_INPUT,
        )
    return ",".join(keys)


def run_install(args: argparse.Namespace) -> int:
    from infra.kube.installer import Installer, InstallError, api_client

    api_key = read_api_keys(args.api_key_file)
    env, outputs, model, objs = _objects(args, allow_representative=False)
    _validate(objs, env.kubernetes_version)
    if args.skip_weights_check:
        skipped = f"{model.name}@{model.revision}"
        print(f"install: --skip-weights-check: {skipped} not checked in the cold tier", file=sys.stderr)
    else:
        check_weights(args, env, outputs, model)
    try:
        installer = Installer(api_client(args.kubeconfig, args.context), timeout_s=args.timeout, poll_s=args.poll)
        if args.dry_run:
            installer.plan(objs)
            return ExitCode.OK
        installer.install(objs, api_key)
    except InstallError as err:
        raise CliError(f"install: {err}", err.code) from None
    print(f"install: {env.name} is rolled out ({len(objs)} objects)", file=sys.stderr)
    return ExitCode.OK
