"""Process groups for one serving replica: torch.distributed (NCCL on GPUs, gloo on CPU), set up from
torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).

Three kinds of group: the tensor-parallel group of this rank, its expert-parallel group, and one gloo
group over every rank (``ctrl``) that carries the leader's per-step headers and heartbeats on the host,
so a lost rank shows up as a socket error or a timeout instead of a hang. Every collective has the
timeout given here (``init_process_group(timeout=...)``); NCCL's async error handling turns a
timed-out collective into a process abort rather than a hang.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from runtime import contract as c
from runtime.parallel.layout import ParallelLayout


@dataclass
class ParallelState:
    """This rank's place in the layout and its process groups (groups are None outside torch.distributed,
    e.g. when a test only wants the shard shapes)."""

    layout: ParallelLayout
    rank: int = 0
    local_rank: int = 0
    tp_group: Any = None
    ep_group: Any = None
    ctrl_group: Any = None
    timeout_s: float = c.DEFAULT_DIST_TIMEOUT_S

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def tp(self) -> int:
        return self.layout.tp

    @property
    def ep(self) -> int:
        return self.layout.ep

    @property
    def tp_rank(self) -> int:
        return self.rank % self.layout.tp

    @property
    def ep_rank(self) -> int:
        return self.rank % self.layout.ep

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @property
    def shared_fused(self) -> bool:
        """Shared experts are TP-sharded over exactly the EP group's ranks: their partial output and the
        routed experts' partial output are summed by one all-reduce instead of two."""
        return self.tp > 1 and self.layout.tp_ranks(self.rank) == self.layout.ep_ranks(self.rank)


def world_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun exports them; (0, 1, 0) when not under torchrun."""
    env = os.environ
    return int(env.get(c.ENV_RANK, 0)), int(env.get(c.ENV_WORLD_SIZE, 1)), int(env.get(c.ENV_LOCAL_RANK, 0))


def _my_group(blocks: int, size: int, rank: int, timeout: datetime.timedelta):
    """Create every block's group (all ranks must call new_group for each, in the same order); keep ours."""
    mine = None
    for b in range(blocks):
        ranks = list(range(b * size, (b + 1) * size))
        g = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            mine = g
    return mine


def init_distributed(layout: ParallelLayout, device: str, timeout_s: float) -> ParallelState:
    """Join the job's process group and build this rank's TP / EP / control groups."""
    rank, world, local_rank = world_from_env()
    if world != layout.world_size:
        raise ValueError(f"WORLD_SIZE {world} != layout world size {layout.world_size}")
    for name in (c.ENV_MASTER_ADDR, c.ENV_MASTER_PORT):
        if not os.environ.get(name):
            raise ValueError(f"${name} is not set: launch every rank with torchrun (see docs/parallel.md)")
    timeout = datetime.timedelta(seconds=timeout_s)
    cuda = device.startswith("cuda")
    if cuda:
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # a timed-out collective aborts
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world, timeout=timeout)
    return make_groups(layout, rank, local_rank, timeout_s)


def make_groups(layout: ParallelLayout, rank: int, local_rank: int, timeout_s: float) -> ParallelState:
    """This rank's groups for ``layout`` inside an initialized default group (collective: every rank calls)."""
    timeout, world = datetime.timedelta(seconds=timeout_s), layout.world_size
    st = ParallelState(layout, rank=rank, local_rank=local_rank, timeout_s=timeout_s)
    st.tp_group = _my_group(world // layout.tp, layout.tp, rank, timeout) if layout.tp > 1 else None
    st.ep_group = _my_group(world // layout.ep, layout.ep, rank, timeout) if layout.ep > 1 else None
    st.ctrl_group = dist.new_group(list(range(world)), timeout=timeout, backend="gloo")
    return st
