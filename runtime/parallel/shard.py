"""Turn a full model (built on the meta device) into this rank's shard, keeping checkpoint names.

Tensor parallelism (Megatron style, one all-reduce per block):
  * attention: ``q_proj`` / ``q_b_proj`` and ``kv_b_proj`` are column-parallel (each rank owns
    ``heads/tp`` whole heads), ``o_proj`` is row-parallel and all-reduces its output; the latent path
    (``q_a_proj``, ``kv_a_proj_with_mqa``, their norms) is small and replicated, and so is the latent KV
    cache (MLA caches one latent per token, shared by all heads);
  * dense MLPs and shared experts: ``gate_proj`` / ``up_proj`` column-parallel, ``down_proj`` row-parallel.
Expert parallelism: each rank keeps ``E/ep`` routed experts (global ids ``[ep_rank·E/ep, ...)``); every
rank already holds every token after the attention all-reduce, so dispatch needs no communication and
combine is one all-reduce of the per-rank partial sums over the EP group (see docs/parallel.md).

Only shapes change: a sharded tensor keeps its checkpoint name, and :func:`checkpoint_slice` tells the
loader which part of the on-disk tensor a rank reads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from runtime.collectives import all_reduce
from runtime.moe import MoE
from runtime.parallel.dist import ParallelState


class RowParallelLinear(nn.Linear):
    """``nn.Linear`` whose input features are split across ``group``: partial products are all-reduced,
    then the (replicated) bias is added once. Same parameter names as ``nn.Linear``."""

    group = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = all_reduce(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias


def _split(t: torch.Tensor, dim: int, n: int) -> nn.Parameter:
    shape = list(t.shape)
    shape[dim] //= n
    return nn.Parameter(torch.empty(shape, dtype=t.dtype, device=t.device), requires_grad=False)


def _column(linear: nn.Linear, n: int) -> None:
    linear.weight = _split(linear.weight, 0, n)
    if linear.bias is not None:
        linear.bias = _split(linear.bias, 0, n)
    linear.out_features //= n


def _row(linear: nn.Linear, n: int, group) -> None:
    """Split the input features; ``group=None`` leaves the output a partial sum for the caller to reduce."""
    linear.weight = _split(linear.weight, 1, n)
    linear.in_features //= n
    if group is not None:
        linear.__class__ = RowParallelLinear
        linear.group = group


def _shard_mlp(mlp: nn.Module, n: int, group) -> None:
    _column(mlp.gate_proj, n)
    _column(mlp.up_proj, n)
    _row(mlp.down_proj, n, group)


def shard_model(model: nn.Module, ps: ParallelState) -> nn.Module:
    """In place, on the meta device (before ``to_empty``): the layout's shard of every layer."""
    tp = ps.tp
    for layer in model.model.layers:
        attn = layer.self_attn
        if tp > 1:
            _column(attn.q_proj if attn.q_lora_rank is None else attn.q_b_proj, tp)
            _column(attn.kv_b_proj, tp)
            _row(attn.o_proj, tp, ps.tp_group)
            attn.n_heads //= tp
        mlp = layer.mlp
        if not isinstance(mlp, MoE):
            if tp > 1:
                _shard_mlp(mlp, tp, ps.tp_group)
            continue
        if ps.ep > 1:
            mlp.shard_experts(ps.ep_rank, ps.ep)
        mlp.ep_group = ps.ep_group
        if mlp.shared_experts is not None and tp > 1:
            # fused: the shared partial joins the routed partial in the MoE's one all-reduce
            _shard_mlp(mlp.shared_experts, tp, None if ps.shared_fused else ps.tp_group)
            mlp.shared_partial = ps.shared_fused
    return model


def checkpoint_slice(full: tuple[int, ...], local: tuple[int, ...], ps: ParallelState) -> tuple[slice, ...] | None:
    """Index into the on-disk tensor of shape ``full`` giving this rank's ``local`` shard (None: whole).

    Only tensor parallelism cuts a tensor (along one dim, ``tp`` equal parts); expert parallelism keeps
    whole tensors and simply leaves other ranks' experts out of the model."""
    if tuple(full) == tuple(local):
        return None
    dims = [d for d, (f, loc) in enumerate(zip(full, local, strict=True)) if f != loc]
    if len(dims) != 1 or full[dims[0]] != local[dims[0]] * ps.tp:
        raise ValueError(f"cannot shard {list(full)} into {list(local)} with --tp {ps.tp}")
    d, n = dims[0], local[dims[0]]
    idx = [slice(None)] * len(full)
    idx[d] = slice(ps.tp_rank * n, (ps.tp_rank + 1) * n)
    return tuple(idx)
