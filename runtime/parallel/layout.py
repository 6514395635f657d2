"""Which rank holds which shard: the ``--tp`` / ``--ep`` layout, validated against the model and the world.

Ranks are laid out in consecutive blocks: tensor-parallel groups are ``[i·tp, (i+1)·tp)`` (one node's GPUs
when ``tp`` = GPUs per node, so the per-layer all-reduces stay on NVLink) and expert-parallel groups are
``[j·ep, (j+1)·ep)``. Attention and dense MLPs are split ``tp`` ways (and repeated ``world/tp`` times);
routed experts are split ``ep`` ways (and repeated ``world/ep`` times); embeddings, norms, the router and
the LM head are replicated. Every rank must hold a different set of shards, so ``lcm(tp, ep) == world``:
16 H100s over two nodes run ``--tp 8 --ep 16``; one 4-GPU replica ``--tp 4 --ep 4``.

Torch-free (the CLI validates before loading anything heavy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from runtime.config import ModelConfig


class LayoutError(ValueError):
    """A --tp / --ep value this model or world size cannot run; names the flag, the value, what is allowed."""

    def __init__(self, flag: str, value: int, allowed: str) -> None:
        self.flag, self.value, self.allowed = flag, value, allowed
        super().__init__(f"{flag} {value}: {allowed}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class ParallelLayout:
    tp: int = 1
    ep: int = 1
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def tp_ranks(self, rank: int) -> list[int]:
        start = rank // self.tp * self.tp
        return list(range(start, start + self.tp))

    def ep_ranks(self, rank: int) -> list[int]:
        start = rank // self.ep * self.ep
        return list(range(start, start + self.ep))

    def validate(self, config: ModelConfig | None = None) -> ParallelLayout:
        """Raise LayoutError for the first impossible value; returns self."""
        w = self.world_size
        for flag, v in (("--tp", self.tp), ("--ep", self.ep)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise LayoutError(flag, v, "must be an integer >= 1")
            if w % v:
                launch = " (launch with torchrun --nproc-per-node, or LeaderWorkerSet for several nodes)"
                raise LayoutError(
                    flag, v, f"must divide the world size {w}; allowed: {_divisors(w)}{launch if w == 1 else ''}"
                )
        if math.lcm(self.tp, self.ep) != w:
            raise LayoutError(
                "--ep",
                self.ep,
                f"with --tp {self.tp} every one of the {w} ranks must hold a different shard: lcm(tp, ep) must "
                f"equal the world size {w} (e.g. --tp {self.tp} --ep {w})",
            )
        if config is None:
            return self
        checks = [
            ("--tp", self.tp, config.num_attention_heads, "num_attention_heads"),
            ("--tp", self.tp, config.intermediate_size, "intermediate_size (dense MLP)"),
            ("--ep", self.ep, config.n_routed_experts, "n_routed_experts"),
        ]
        if config.n_shared_experts:
            shared = config.moe_intermediate_size * config.n_shared_experts
            checks.append(("--tp", self.tp, shared, "moe_intermediate_size × n_shared_experts (shared experts)"))
        for flag, v, n, what in checks:
            if n % v:
                ok = [d for d in _divisors(n) if w % d == 0]
                raise LayoutError(flag, v, f"the model's {what} = {n} is not divisible by it; allowed: {ok}")
        return self
