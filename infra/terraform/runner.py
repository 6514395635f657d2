"""Run the real terraform binary on a synthesized stack (tests, the demo, plan summaries)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra.terraform.untracked import Untracked, find_untracked, raw_state

PROJECT_ROOT = Path(__file__).resolve().parents[2]


class TerraformError(RuntimeError):
    """terraform exited non-zero; the message carries the command and the tail of its output."""


class StateLockedError(TerraformError):
    """Another run holds this environment's state lock (a deploy, plan or destroy already in progress).

    Terraform refuses to run rather than let two writers race on one state; the lock is a file beside
    the state for the local backend and a `.tflock` object next to it in S3 (`use_lockfile`). The message
    names the holder (user@host), its operation, since when, and the lock ID that `force-unlock` needs."""

    def __init__(self, workdir: Path, info: dict[str, str]) -> None:
        self.info = info
        who, op, since, lock_id = (info.get(k, "?") for k in ("Who", "Operation", "Created", "ID"))
        super().__init__(
            f"the state of {workdir.name} is locked by {who} ({op.removeprefix('OperationType').lower()}, "
            f"since {since}, lock ID {lock_id}): another deploy is running; wait for it to end. If that process "
            f"is gone for good: terraform force-unlock {lock_id}"
        )


class UntrackedResourcesError(TerraformError):
    """The account holds copies of the stack's objects that the state does not track and that cannot be
    adopted safely (infra/terraform/untracked.py): applying would add more, so the apply stops first."""

    def __init__(self, workdir: Path, conflicts: list[str]) -> None:
        self.conflicts = conflicts
        super().__init__(
            f"refusing to apply {workdir.name}: the account holds objects of this stack that its state does not "
            f"track (left by an interrupted apply?): {'; '.join(conflicts)}"
        )


#: The import blocks the runner writes for one apply (removed after it), beside cdk.tf.json.
ADOPT_FILE = "adopt-untracked.tf.json"

_LOCK_FIELDS = ("ID", "Path", "Operation", "Who", "Version", "Created")


def parse_lock_info(output: str) -> dict[str, str] | None:
    """The `Lock Info:` block terraform prints when the state is locked, or None."""
    if "Error acquiring the state lock" not in output:
        return None
    info = {}
    for line in output.splitlines():
        key, sep, value = line.strip().partition(":")
        if sep and key in _LOCK_FIELDS and key not in info:
            info[key] = value.strip()
    return info


def terraform_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment terraform runs with: the project's CLI config (provider mirror) when setup wrote
    one, a plugin cache inside the project, no telemetry. Otherwise the caller's settings stand."""
    env = dict(os.environ if base is None else base)
    tfrc = PROJECT_ROOT / ".tfrc"
    if tfrc.exists():
        env["TF_CLI_CONFIG_FILE"] = str(tfrc)
    env.setdefault("TF_PLUGIN_CACHE_DIR", str(PROJECT_ROOT / ".cache" / "terraform" / "plugins"))
    Path(env["TF_PLUGIN_CACHE_DIR"]).mkdir(parents=True, exist_ok=True)
    # Our stacks carry no lock file, so by default every init reinstalls the provider into the shared cache,
    # and one can do so under another workdir's running apply ("there is no package ... cached in
    # .terraform/providers", seen in CI). This lets init link a cached package instead; the package comes
    # from the provider mirror either way.
    env.setdefault("TF_PLUGIN_CACHE_MAY_BREAK_DEPENDENCY_LOCK_FILE", "1")
    env["CHECKPOINT_DISABLE"] = "1"
    env["TF_IN_AUTOMATION"] = "1"
    env["TF_INPUT"] = "0"
    return env


@contextlib.contextmanager
def plugin_cache_turn(env: dict[str, str]) -> Iterator[None]:
    """Hold the plugin cache alone while ``terraform init`` installs into it. Terraform's cache is not safe
    for concurrent installs (two inits at once can fail with "after installing ... it is still not detected
    in <cache>; this is a bug in Terraform"), and without a lock file every init installs. An flock beside
    the cache makes inits take turns across threads and processes (the tests' background jobs, the demo)."""
    cache = env.get("TF_PLUGIN_CACHE_DIR")
    if not cache:
        yield
        return
    lock = Path(cache).parent / f".{Path(cache).name}.init-lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass
class Terraform:
    """A working directory holding one stack's cdk.tf.json."""

    workdir: Path
    env: dict[str, str] = field(default_factory=terraform_env)
    timings: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_stack(cls, stack_dir: Path, workdir: Path) -> Terraform:
        """Copy a synthesized stack into its own folder so state never lands in cdktf.out."""
        workdir.mkdir(parents=True, exist_ok=True)
        shutil.copy(stack_dir / "cdk.tf.json", workdir / "cdk.tf.json")
        return cls(workdir)

    def run(self, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        start = time.monotonic()
        with plugin_cache_turn(self.env) if args[0] == "init" else contextlib.nullcontext():
            proc = subprocess.run(
                ["terraform", *args, "-no-color"],
                cwd=self.workdir,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        self.timings[args[0]] = self.timings.get(args[0], 0.0) + time.monotonic() - start
        if check and proc.returncode != 0:
            lock = parse_lock_info(proc.stdout + "\n" + proc.stderr)
            if lock is not None:
                raise StateLockedError(self.workdir, lock)
            tail = (proc.stdout[-3000:] + "\n" + proc.stderr[-3000:]).strip()
            raise TerraformError(
                f"terraform {' '.join(args)} failed in {self.workdir} (exit {proc.returncode}):\n{tail}"
            )
        return proc

    def init(self) -> None:
        self.run("init", "-input=false")

    def validate(self) -> None:
        self.run("validate")

    def apply(self) -> None:
        """Apply, first adopting what an interrupted apply created but never recorded (an interrupt cancels
        the provider's calls in flight; infra/terraform/untracked.py): each such object gets an `import`
        block for this apply instead of a duplicate; copies that cannot be matched stop the apply, named."""
        found = self.untracked()
        if found.conflicts:
            raise UntrackedResourcesError(self.workdir, found.conflicts)
        with self._imports(found):
            self.run("apply", "-auto-approve", "-input=false")

    def adopt(self, found: Untracked) -> None:
        """Import only the objects in ``found`` (an apply targeted at their addresses): the state then holds
        them, and the next deploy, by whatever tool, updates them instead of creating copies."""
        if found.conflicts:
            raise UntrackedResourcesError(self.workdir, found.conflicts)
        if not found.imports:
            return
        targets = [f"-target={address}" for address in sorted(found.imports)]
        with self._imports(found):
            self.run("apply", "-auto-approve", "-input=false", *targets)

    @contextlib.contextmanager
    def _imports(self, found: Untracked) -> Iterator[None]:
        """``found``'s import blocks beside cdk.tf.json for one command, removed after it."""
        adopt = self.workdir / ADOPT_FILE
        if found.imports:
            adopt.write_text(json.dumps(found.import_blocks(), indent=2))
        try:
            yield
        finally:
            adopt.unlink(missing_ok=True)

    def untracked(self) -> Untracked:
        """The stack's live objects (EC2 ones by their tags, named ones by name) that the state does not hold
        (see infra/terraform/untracked.py). A working directory without a synthesized stack (hand-written
        configuration) has nothing to compare."""
        stack = self.workdir / "cdk.tf.json"
        if not stack.is_file():
            return Untracked()
        config = json.loads(stack.read_text())
        return find_untracked(config, raw_state(self.run("state", "pull").stdout))

    def destroy(self) -> None:
        self.run("destroy", "-auto-approve", "-input=false")

    def plan(self, out: str = "tfplan") -> int:
        """Plan into a file; returns 0 (no changes) or 2 (changes), as -detailed-exitcode does."""
        proc = self.run("plan", "-input=false", "-detailed-exitcode", f"-out={out}", check=False)
        if proc.returncode not in (0, 2):
            raise TerraformError(f"terraform plan failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        return proc.returncode

    def show_json(self, plan_file: str = "tfplan") -> dict[str, Any]:
        return json.loads(self.run("show", "-json", plan_file).stdout)

    def output_json(self) -> dict[str, Any]:
        """`terraform output -json` as terraform prints it: {name: {"value": ..., "type": ..., ...}}."""
        return json.loads(self.run("output", "-json").stdout)

    def outputs(self) -> dict[str, Any]:
        """The applied outputs as plain {name: value}."""
        return {key: value["value"] for key, value in self.output_json().items()}

    def state_resources(self) -> list[dict[str, Any]]:
        proc = self.run("show", "-json")
        values = json.loads(proc.stdout).get("values") or {}
        return (values.get("root_module") or {}).get("resources") or []
