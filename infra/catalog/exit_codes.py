"""Exit statuses of every command the project ships, defined once.

`moefleet` (all subcommands), `python -m infra.cli.push` (`make push`) and the init container's
`python -m infra.ops.weights pull` share one scheme, so CI jobs and scripts can branch on the status
without knowing which command ran. The `moefleet --help` epilog and docs/operations.md list them from
`EXIT_CODE_MEANINGS`. Standard library only: the init container imports it without the infra extra.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    #: Something outside the command failed: terraform, AWS, the Kubernetes API or a rollout, docker,
    #: the local disk, or the rendered objects failed their schema check.
    FAILED = 1
    #: The input is wrong: usage, environments.toml, an unknown environment, stack outputs, plan JSON,
    #: model names, a missing folder or tool.
    BAD_INPUT = 2
    #: `plan-summary --fail-on-destroy` found a stateful resource that would be replaced or destroyed.
    STATEFUL_CHANGE = 3
    #: A check ran and failed: a preflight check, weights that do not match their manifest, or `install`
    #: finding the model revision missing or incomplete in the cold tier.
    CHECK_FAILED = 4
    #: Interrupted (Ctrl-C / SIGINT), as shells report it; an interrupted upload resumes when re-run.
    INTERRUPTED = 130


EXIT_CODE_MEANINGS: dict[ExitCode, str] = {
    ExitCode.OK: "ok",
    ExitCode.FAILED: "an external tool or service failed (terraform, AWS, Kubernetes, docker, local disk)",
    ExitCode.BAD_INPUT: "bad input (usage, environments file, unknown environment, stack outputs, plan JSON)",
    ExitCode.STATEFUL_CHANGE: "plan-summary --fail-on-destroy: a stateful resource would be replaced or destroyed",
    ExitCode.CHECK_FAILED: "a check failed (preflight, weights that do not match their manifest or are not uploaded)",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C)",
}
