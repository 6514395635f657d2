"""Triton kernels for the decode step, each with a PyTorch reference that is the CPU path.

Decode of a MoE model is memory-bound and launch-bound: a step must read the weights it touches once, in
as few kernels as possible. These kernels replace the general-purpose paths where that pays (few tokens):

* :mod:`runtime.kernels.moe_decode` - routed + shared experts of a few tokens in two launches, reading
  each chosen expert's weights straight from the stacked buffers (no sort, gather or scatter);
* :mod:`runtime.kernels.mla_decode` - absorbed multi-head latent attention reading the paged latent cache
  through the block table (no gathered copy of the cache, no mask tensor);
* :mod:`runtime.kernels.router` - a greedy router's whole choice in one launch;
* :mod:`runtime.kernels.linear` - the step's small projections for one token at the bandwidth's pace;
* :mod:`runtime.kernels.fp8` and :mod:`runtime.kernels.moe_fp8` - linears and routed experts over DeepSeek-V3's
  block-scaled FP8 weights, read as they are (decode and prefill).

Each is a ``torch.library`` custom op: Triton on CUDA, the reference elsewhere, an abstract shape for
``torch.compile``. ``TRITON_INTERPRET=1`` runs the Triton code itself on the CPU (fp32), which is how the
tests check the kernels where there is no GPU.
"""

from __future__ import annotations

import os

try:  # Triton ships with CUDA builds of torch; CPU machines may lack it (then only the references run)
    import triton.language  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the machine
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def triton_usable(t) -> bool:
    """True where the Triton kernels run for tensor ``t``: on CUDA, or anywhere under the interpreter."""
    return HAS_TRITON and (t.device.type == "cuda" or INTERPRET)
