"""The layering rules in pyproject.toml's [tool.importlinter], checked by the real `lint-imports`.

The first test runs the linter on the project as it is. The others copy the three packages into a scratch
folder, add one import that breaks exactly one rule, and expect the linter to name that rule: a contract
that cannot fail would let the layering rot unnoticed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("infra", "runtime", "stacks")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--config", str(root / "pyproject.toml")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_project_keeps_every_contract() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0 broken" in result.stdout, result.stdout


# (module that gets the bad import, the import, the contract's name that must be reported broken)
BAD_IMPORTS = {
    "runtime imports infra": ("runtime/model.py", "import infra.catalog.sizes", "The runtime stands alone"),
    "infra imports the runtime's model": (
        "infra/observability/alerts.py",
        "import runtime.model",
        "Infrastructure sees only the runtime's contract",
    ),
    "a construct imports ops": (
        "infra/constructs/network.py",
        "import infra.ops.preflight",
        "Constructs and the catalog are the base layer",
    ),
    "the catalog imports the CLI": (
        "infra/catalog/sizes.py",
        "import infra.cli.main",
        "Constructs and the catalog are the base layer",
    ),
    "the KV cache imports the server": (
        "runtime/kv_cache.py",
        "import runtime.server.app",
        "Model, kernels and KV cache know nothing of serving",
    ),
    "the contract imports the model": (
        "runtime/contract.py",
        "import runtime.model",
        "The runtime's contract imports nothing of the runtime",
    ),
    "kube imports the CLI (a cycle)": ("infra/kube/render.py", "import infra.cli.main", "No import cycles"),
}


@pytest.fixture(scope="module")
def scratch_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("layering")
    for package in PACKAGES:
        shutil.copytree(ROOT / package, root / package, ignore=shutil.ignore_patterns("__pycache__", "*.toml"))
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    return root


@pytest.mark.parametrize("case", sorted(BAD_IMPORTS))
def test_a_bad_import_breaks_its_contract(scratch_tree: Path, case: str) -> None:
    relative, statement, contract = BAD_IMPORTS[case]
    module = scratch_tree / relative
    original = module.read_text()
    module.write_text(original + f"\n{statement}  # noqa\n")
    try:
        result = lint_imports(scratch_tree)
    finally:
        module.write_text(original)
    assert result.returncode != 0, f"{case}: lint-imports kept every contract\n{result.stdout}"
    broken = result.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken, f"{case}: expected '{contract}' broken\n{result.stdout}"
