"""`moefleet render <env>` and `moefleet install <env>`: registered in infra/cli.py's COMMANDS.

Both read the environment from environments.toml and its stack outputs (`--outputs FILE`, else
`terraform output -json` in the deployed stack folder). `render` falls back to representative outputs
for an environment that was never applied here (and says so); `install` never does.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

from infra.cli_options import add_environments_option
from infra.kube.objects import DEFAULT_MODELS, ModelRef

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class KubeCliError(Exception):
    def __init__(self, message: str, code: int = EXIT_BAD_INPUT) -> None:
        super().__init__(message)
        self.code = code


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
    parser.add_argument("--model", help="model name under models/ in the cold tier (default per size)")
    parser.add_argument("--revision", default="main", help="model revision folder (default: main)")
    add_environments_option(parser)


def add_render(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "render",
        help="render the runtime's Kubernetes objects (YAML, apply order) for GitOps",
        description="Render and validate the Kubernetes objects of one environment.",
    )
    _common(parser)
    parser.add_argument("--out", type=Path, help="write one YAML file per object here (default: all to stdout)")
    parser.add_argument("--no-validate", action="store_true", help="skip the OpenAPI/CRD schema check")
    parser.set_defaults(handler=run_render)


def add_install(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    parser.set_defaults(handler=run_install)


def _environment(args: argparse.Namespace) -> Any:
    from infra.config import DEFAULT_ENVIRONMENTS_FILE, ConfigError, load_environments

    path = args.environments or DEFAULT_ENVIRONMENTS_FILE
    try:
        envs = load_environments(path)
    except ConfigError as err:
        raise KubeCliError(str(err)) from None
    if args.env not in envs:
        raise KubeCliError(f"{args.command}: unknown environment {args.env!r} in {path}; known: {', '.join(envs)}")
    return envs[args.env]


def _outputs(args: argparse.Namespace, env: Any, *, allow_representative: bool) -> Any:
    from infra.kube.outputs import OutputsError, StackOutputs, representative_outputs
    from infra.ops.outputs import OutputsUnavailable, default_stack_dir, stack_outputs

    try:
        if args.outputs:
            return StackOutputs.from_file(args.outputs)
        stack_dir = args.stack_dir or default_stack_dir(env.name)
        why = f"{stack_dir} was never initialised by a deploy"
        if (stack_dir / ".terraform").is_dir():
            try:
                return StackOutputs.from_mapping(stack_outputs(stack_dir), f"terraform output in {stack_dir}")
            except OutputsUnavailable as err:
                why = str(err)
        if not allow_representative:
            raise KubeCliError(
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
        raise KubeCliError(str(err)) from None


def _objects(args: argparse.Namespace, *, allow_representative: bool) -> tuple[Any, list[dict]]:
    from infra.kube.outputs import OutputsError
    from infra.kube.render import render, render_input

    env = _environment(args)
    outputs = _outputs(args, env, allow_representative=allow_representative)
    tag = args.tag or git_tag()
    image = args.image or f"{outputs.ecr_repository_url}:{tag}"
    model = ModelRef(args.model or DEFAULT_MODELS[outputs.size], args.revision)
    try:
        inp = render_input(env, outputs, image=image, model=model, version=tag)
    except OutputsError as err:
        raise KubeCliError(str(err)) from None
    return env, render(inp)


def _validate(objs: list[dict], kubernetes_version: str) -> None:
    from infra.kube.schema import validate_all

    problems = validate_all(objs, kubernetes_version)
    if problems:
        raise KubeCliError("schema check failed:\n  " + "\n  ".join(map(str, problems)), EXIT_FAILED)


def run_render(args: argparse.Namespace) -> int:
    from infra.kube.render import to_yaml, write_dir

    env, objs = _objects(args, allow_representative=True)
    if not args.no_validate:
        _validate(objs, env.kubernetes_version)
    if args.out:
        paths = write_dir(objs, args.out)
        print(f"render: wrote {len(paths)} objects for {env.name} ({env.size.value}) to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(to_yaml(objs))
    return EXIT_OK


def run_install(args: argparse.Namespace) -> int:
    from infra.kube.installer import Installer, InstallError, api_client

    env, objs = _objects(args, allow_representative=False)
    _validate(objs, env.kubernetes_version)
    try:
        installer = Installer(api_client(args.kubeconfig, args.context), timeout_s=args.timeout, poll_s=args.poll)
        if args.dry_run:
            installer.plan(objs)
            return EXIT_OK
        installer.install(objs)
    except InstallError as err:
        raise KubeCliError(f"install: {err}", err.code) from None
    print(f"install: {env.name} is rolled out ({len(objs)} objects)", file=sys.stderr)
    return EXIT_OK


def main_wrapper(handler: Any) -> Any:
    """Turn KubeCliError into a message and exit code (infra/cli.py only knows its own CliError)."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except KubeCliError as err:
            print(str(err), file=sys.stderr)
            return err.code

    return run


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Both subcommands; infra/cli.py lists this function in COMMANDS."""
    add_render(sub)
    add_install(sub)
    for name in ("render", "install"):
        parser = sub.choices[name]
        parser.set_defaults(handler=main_wrapper(parser.get_default("handler")))
