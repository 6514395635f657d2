"""A greedy router's choice (softmax or sigmoid scores, top-k, renormalise / scale, load counts) in one
launch per layer.

Given the fp32 logits ``[T, E]``, the general path spends a launch each on the scores, ``topk``, the weight
normalisation and the expert-load count: at batch 1, several launches per MoE layer for a few dozen
numbers. Here one program per token picks its k experts (k rounds of max, ties to the lower id), writes
ids and weights, and adds its picks to the load counts (integer atomics: exact, order-free). Routers with
expert groups or a correction bias (DeepSeek-V2's ``group_limited_greedy``, V3's ``noaux_tc``) stay on the
general path.

(Routing is not folded into the MoE kernels themselves: every one of their thousands of programs would then
repeat the selection, which pays at batch 1 and costs more than it saves from a few tokens on.)
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from runtime.kernels import HAS_TRITON, triton_usable


class Routing(NamedTuple):
    """A greedy router's constants. ``scale`` multiplies the weights after the optional renormalisation
    over the k chosen experts."""

    top_k: int
    softmax: bool  # else sigmoid
    renorm: bool
    scale: float


def normalize_weights(weights: torch.Tensor, routing: Routing) -> torch.Tensor:
    """The chosen experts' scores → routing weights (renormalised over the k chosen, then scaled)."""
    if routing.renorm:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * routing.scale if routing.scale != 1.0 else weights


def route_scores(logits: torch.Tensor, routing: Routing) -> torch.Tensor:
    """fp32 logits [T, E] → each expert's score (softmax over the experts, or a sigmoid each)."""
    return logits.softmax(dim=-1, dtype=torch.float32) if routing.softmax else logits.sigmoid()


def greedy_route(logits: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits [T, E] → (ids [T, k] int64, weights [T, k] fp32): the top-k scores."""
    weights, ids = torch.topk(route_scores(logits, routing), k=routing.top_k, dim=-1, sorted=False)
    return ids, normalize_weights(weights, routing)


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _route_kernel(
        logits_ptr, ids_ptr, wts_ptr, load_ptr, E, top_k, scale, stride_l,
        BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, SOFTMAX: tl.constexpr, RENORM: tl.constexpr,
    ):  # fmt: skip
        t = tl.program_id(0)
        offs = tl.arange(0, BLOCK_E)
        live = offs < E
        logits = tl.load(logits_ptr + t * stride_l + offs, mask=live, other=-float("inf"))
        if SOFTMAX:
            z = tl.exp(logits - tl.max(logits, axis=0))
            scores = z / tl.sum(z, axis=0)
        else:
            scores = tl.sigmoid(logits)
        scores = tl.where(live, scores, -1.0)  # never chosen
        slots = tl.arange(0, BLOCK_K)
        ids = tl.zeros([BLOCK_K], dtype=tl.int32)
        wts = tl.zeros([BLOCK_K], dtype=tl.float32)
        for i in range(top_k):
            best = tl.max(scores, axis=0)
            idx = tl.argmax(scores, axis=0)
            ids = tl.where(slots == i, idx, ids)
            wts = tl.where(slots == i, best, wts)
            scores = tl.where(offs == idx, -1.0, scores)
        if RENORM:
            wts = wts / (tl.sum(wts, axis=0) + 1e-20)
        chosen = slots < top_k
        tl.store(ids_ptr + t * top_k + slots, ids.to(tl.int64), mask=chosen)
        tl.store(wts_ptr + t * top_k + slots, wts * scale, mask=chosen)
        tl.atomic_add(load_ptr + ids, 1, mask=chosen)


def route_triton(
    logits: torch.Tensor, expert_load: torch.Tensor, routing: Routing
) -> tuple[torch.Tensor, torch.Tensor]:
    T, E = logits.shape
    k = routing.top_k
    logits = logits.contiguous()
    ids = torch.empty(T, k, dtype=torch.int64, device=logits.device)
    weights = torch.empty(T, k, dtype=torch.float32, device=logits.device)
    if T:
        _route_kernel[(T,)](
            logits, ids, weights, expert_load, E, k, routing.scale, logits.stride(0),
            BLOCK_E=triton.next_power_of_2(E), BLOCK_K=triton.next_power_of_2(k), SOFTMAX=routing.softmax,
            RENORM=routing.renorm, num_warps=1,
        )  # fmt: skip
    return ids, weights


def route_reference(
    logits: torch.Tensor, expert_load: torch.Tensor, routing: Routing
) -> tuple[torch.Tensor, torch.Tensor]:
    ids, weights = greedy_route(logits, routing)
    flat = ids.reshape(-1)
    expert_load.scatter_add_(0, flat, torch.ones_like(flat))
    return ids, weights


@torch.library.custom_op("moefleet::route", mutates_args=("expert_load",))
def route(
    logits: torch.Tensor, expert_load: torch.Tensor, top_k: int, softmax: bool, renorm: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits [T, E] → (ids [T, k] int64, weights [T, k] fp32); adds each pick to ``expert_load`` [E]."""
    fn = route_triton if triton_usable(logits) else route_reference
    return fn(logits, expert_load, Routing(top_k, softmax, renorm, scale))


@route.register_fake
def _(logits, expert_load, top_k, softmax, renorm, scale):
    T = logits.shape[0]
    return logits.new_empty(T, top_k, dtype=torch.int64), logits.new_empty(T, top_k, dtype=torch.float32)
