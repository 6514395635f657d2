"""The README's path from an AWS account to a serving pod, as data: its commands parsed out of the code
block, a checker that holds each one against the real thing it names, and a runner for the commands that
can run here (the `moefleet` ones, against the embedded AWS and a fake Kubernetes API).

A command is well formed when:
- `moefleet …` parses with `moefleet`'s own argument parser;
- `make …` is accepted by `make -n` (the targets exist);
- `aws SERVICE COMMAND …` names an operation of that service in botocore's API models (or one of the AWS
  CLI's own commands, listed below) and only options that operation takes;
- `kubectl …` names objects that `moefleet render` produces for the environment (kind, name, namespace,
  Service port);
- `helm …` is one of the pinned prerequisite commands (`infra/catalog/prerequisites.py`);
- `curl …` calls a route of the runtime on the port a preceding `kubectl port-forward` opened, with a body
  the runtime's request schema accepts.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from infra.catalog.prerequisites import PREREQUISITES

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
SECTION = "## From an AWS account to a running service"
ENVIRONMENT = "staging"

#: AWS CLI commands that are not API operations (the CLI's own customizations), with their options.
AWS_CLI_COMMANDS = {
    ("eks", "update-kubeconfig"): {"--name", "--region", "--alias", "--role-arn", "--kubeconfig"},
    ("ecr", "get-login-password"): {"--region"},
}
AWS_GLOBAL_OPTIONS = {"--region", "--profile", "--query", "--output", "--endpoint-url", "--no-cli-pager"}
KUBECTL_KINDS = {
    "svc": "Service",
    "service": "Service",
    "scaledobject": "ScaledObject",
    "deployment": "Deployment",
    "leaderworkerset": "LeaderWorkerSet",
    "pods": "Pod",
    "pod": "Pod",
}


class ReadmeCommandError(AssertionError):
    pass


def code_block(text: str) -> str:
    """The first ```bash block after the section heading."""
    section = text[text.index(SECTION) :]
    match = re.search(r"```bash\n(.*?)```", section, re.S)
    if not match:
        raise ReadmeCommandError(f"README: no bash block under {SECTION!r}")
    return match.group(1)


def commands(block: str) -> list[list[str]]:
    """Each command as argv; comments dropped, `a && b` split."""
    out: list[list[str]] = []
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        current: list[str] = []
        for word in words:
            if word == "&&":
                out.append(current)
                current = []
            else:
                current.append(word)
        if current:
            out.append(current)
    return out


def readme_commands() -> list[list[str]]:
    return commands(code_block(README.read_text()))


def _camel(kebab: str) -> str:
    return "".join(part.capitalize() for part in kebab.split("-"))


@dataclass
class Checker:
    """Holds the commands against the real CLIs and objects; remembers what earlier commands set up."""

    rendered: list[dict]
    forwarded_ports: set[int] = field(default_factory=set)

    def check(self, argv: list[str]) -> None:
        program = argv[0]
        handler = {
            ".venv/bin/moefleet": self._moefleet,
            "make": self._make,
            "aws": self._aws,
            "kubectl": self._kubectl,
            "helm": self._helm,
            "curl": self._curl,
        }.get(program)
        if handler is None:
            raise ReadmeCommandError(f"{shlex.join(argv)}: unknown program {program!r}")
        handler(argv)

    def _moefleet(self, argv: list[str]) -> None:
        from infra.cli.main import build_parser

        try:
            build_parser().parse_args(argv[1:])
        except SystemExit as exc:
            raise ReadmeCommandError(f"{shlex.join(argv)}: moefleet rejects it (exit {exc.code})") from None

    def _make(self, argv: list[str]) -> None:
        done = subprocess.run(["make", "-n", *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise ReadmeCommandError(f"{shlex.join(argv)}: make -n fails: {done.stderr.strip()[-300:]}")

    def _aws(self, argv: list[str]) -> None:
        import botocore.session

        service, command = argv[1], argv[2]
        options = {word for word in argv[3:] if word.startswith("--")}
        allowed = AWS_CLI_COMMANDS.get((service, command))
        if allowed is None:
            session = botocore.session.get_session()
            if service not in session.get_available_services():
                raise ReadmeCommandError(f"{shlex.join(argv)}: no AWS service {service!r}")
            model = session.get_service_model(service)
            if _camel(command) not in model.operation_names:
                raise ReadmeCommandError(f"{shlex.join(argv)}: {service} has no command {command!r}")
            shape = model.operation_model(_camel(command)).input_shape
            allowed = {
                "--" + re.sub(r"(?<!^)(?=[A-Z])", "-", name).lower() for name in (shape.members if shape else {})
            }
        unknown = options - allowed - AWS_GLOBAL_OPTIONS
        if unknown:
            raise ReadmeCommandError(
                f"{shlex.join(argv)}: options not taken by aws {service} {command}: {sorted(unknown)}"
            )

    def _kubectl(self, argv: list[str]) -> None:
        words = argv[1:]
        namespace = None
        if words[:1] == ["-n"]:
            namespace, words = words[1], words[2:]
        verb, rest = words[0], words[1:]
        if verb == "config":
            if rest[:1] != ["set-cluster"] or "--server" not in rest:
                raise ReadmeCommandError(f"{shlex.join(argv)}: expected `kubectl config set-cluster NAME --server URL`")
            return
        if verb not in {"get", "annotate", "scale", "port-forward", "describe", "logs"}:
            raise ReadmeCommandError(f"{shlex.join(argv)}: unexpected kubectl verb {verb!r}")
        positional = [w for w in rest if not w.startswith("-")]
        if not positional:
            raise ReadmeCommandError(f"{shlex.join(argv)}: no object named")
        kind_word, _, name = positional[0].partition("/")
        if not name and len(positional) > 1 and verb in {"annotate", "scale", "get", "describe"}:
            name = positional[1]
        kind = KUBECTL_KINDS.get(kind_word.lower())
        if kind is None:
            raise ReadmeCommandError(f"{shlex.join(argv)}: unknown kind {kind_word!r}")
        if kind == "Pod":
            if namespace and not any(o["metadata"].get("namespace") == namespace for o in self.rendered):
                raise ReadmeCommandError(f"{shlex.join(argv)}: nothing is rendered into namespace {namespace!r}")
            return
        matches = [
            o
            for o in self.rendered
            if o["kind"] == kind and o["metadata"]["name"] == name and o["metadata"].get("namespace") == namespace
        ]
        if not matches:
            raise ReadmeCommandError(f"{shlex.join(argv)}: `moefleet render` has no {kind} {name!r} in {namespace!r}")
        if verb == "port-forward":
            local, _, remote = positional[1].partition(":")
            ports = {p["port"] for p in matches[0]["spec"]["ports"]}
            if int(remote or local) not in ports:
                raise ReadmeCommandError(f"{shlex.join(argv)}: {kind} {name} has ports {sorted(ports)}")
            self.forwarded_ports.add(int(local))

    def _helm(self, argv: list[str]) -> None:
        pinned = {command for p in PREREQUISITES for command in p.install_commands}
        if shlex.join(argv) not in {shlex.join(shlex.split(c)) for c in pinned}:
            raise ReadmeCommandError(f"{shlex.join(argv)}: not one of the pinned prerequisite commands")

    def _curl(self, argv: list[str]) -> None:
        from runtime import contract
        from runtime.server.schemas import ChatCompletionRequest, CompletionRequest

        urls = [w for w in argv[1:] if w.startswith("http")]
        url = urlparse(urls[0])
        if url.port not in self.forwarded_ports:
            raise ReadmeCommandError(f"{shlex.join(argv)}: port {url.port} is not forwarded by an earlier command")
        schemas = {contract.CHAT_COMPLETIONS_PATH: ChatCompletionRequest, contract.COMPLETIONS_PATH: CompletionRequest}
        known = {value for name, value in vars(contract).items() if name.endswith("_PATH") and isinstance(value, str)}
        if url.path not in known:
            raise ReadmeCommandError(f"{shlex.join(argv)}: the runtime serves no {url.path!r}")
        if "-d" in argv:
            body = json.loads(argv[argv.index("-d") + 1])
            if url.path in schemas:
                schemas[url.path].model_validate(body)
