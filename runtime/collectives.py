"""The one collective the model's layers call: a sum over a process group.

Its own module, below both the layers (``runtime.moe``) and the package that shards them
(``runtime.parallel``), so that the layers need nothing of the sharding code to run sharded.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    """Sum over ``group`` in place (identity when None: the module is not sharded)."""
    if group is not None:
        dist.all_reduce(x, group=group)
    return x
