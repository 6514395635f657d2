"""README's path from an AWS account to a serving pod: every command well formed (tests/infra/readme_path.py
says against what), and a misspelling anywhere in the block fails. The `moefleet` commands also run for
real, against the embedded AWS and the fake Kubernetes API, inside the `local` lifecycle
(tests/infra/lifecycle.py, `run_readme_path`)."""

from __future__ import annotations

import pytest

from infra.catalog.environments import load_environments
from infra.kube.render import render
from tests.infra.kube.inputs import make_input
from tests.infra.readme_path import ENVIRONMENT, README, Checker, ReadmeCommandError, code_block, commands


def checker() -> Checker:
    return Checker(rendered=render(make_input(load_environments()[ENVIRONMENT])))


def check_all(block: str) -> int:
    c = checker()
    argvs = commands(block)
    for argv in argvs:
        c.check(argv)
    return len(argvs)


def test_every_command_of_the_readme_path_is_well_formed() -> None:
    block = code_block(README.read_text())
    assert check_all(block) >= 20
    programs = {argv[0] for argv in commands(block)}
    assert programs == {".venv/bin/moefleet", "make", "aws", "kubectl", "helm", "curl"}
    text = " ".join(" ".join(argv) for argv in commands(block))
    for step in (
        "preflight",
        "deploy",
        "weights upload",
        "update-kubeconfig",
        "start-session",
        "install",
        "port-forward",
    ):
        assert step in text, f"the README path lacks its {step!r} step"


@pytest.mark.parametrize(
    ("right", "wrong"),
    [
        ("moefleet weights upload staging", "moefleet weights uplaod staging"),
        ("moefleet install staging --dry-run", "moefleet install staging --dryrun"),
        ("make deploy ENV=staging", "make deplyo ENV=staging"),
        ("aws eks update-kubeconfig", "aws eks update-kubeconfg"),
        ("aws ssm start-session --target", "aws ssm start-session --targt"),
        ("aws ec2 describe-instances", "aws ec2 describe-instance"),
        ("port-forward svc/moe-runtime 8000:8000", "port-forward svc/moe-runtim 8000:8000"),
        ("port-forward svc/moe-runtime 8000:8000", "port-forward svc/moe-runtime 8000:80"),
        (
            "annotate scaledobject moe-runtime autoscaling.keda.sh/paused-replicas=0",
            "annotate scaledobject moe autoscaling.keda.sh/paused-replicas=0",
        ),
        ("--version 2.18.0 --namespace keda", "--version 2.17.0 --namespace keda"),
        ("http://127.0.0.1:8000/v1/chat/completions", "http://127.0.0.1:8000/v1/chat/completion"),
        ("http://127.0.0.1:8000/v1/chat/completions", "http://127.0.0.1:8001/v1/chat/completions"),
    ],
)
def test_a_misspelled_command_fails(right: str, wrong: str) -> None:
    block = code_block(README.read_text())
    assert right in block, f"the README no longer contains {right!r}: update this test's examples"
    with pytest.raises(ReadmeCommandError):
        check_all(block.replace(right, wrong, 1))
