"""The FP8 kernels (runtime.kernels.fp8) against their references, run by the Triton interpreter on the CPU
(``TRITON_INTERPRET=1`` is set before triton is imported, in a subprocess as tests/runtime/test_kernels.py
does), and on a GPU when there is one. Shapes have partial last blocks (K, N not multiples of 128)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_fp8_kernels_under_the_interpreter() -> None:
    """act_quant byte-exact; FP8 GEMM, weight-only GEMV / GEMM and the FP8 MoE decode kernels within 1e-5 of
    their references (fp32), EP offsets included (see tests/runtime/fp8_kernel_checks.py)."""
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    r = subprocess.run(
        [sys.executable, "-m", "tests.runtime.fp8_kernel_checks", "cpu"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "fp8 kernels ok" in r.stdout
