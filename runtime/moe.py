"""DeepSeekMoE: router (all DeepSeek routing variants), routed experts with sorted dispatch, shared experts.

Weight storage: the checkpoint names every expert separately (``mlp.experts.E.gate_proj.weight`` ...),
but the fast path wants one stacked tensor per projection. We keep both views of the *same memory*:
stacked non-persistent buffers ``w13`` ``[E, 2·I, H]`` (gate rows then up rows) and ``w2`` ``[E, H, I]``,
and per-expert ``Parameter`` objects that are views into them. ``state_dict()`` therefore shows exactly
the checkpoint names, loading a tensor into an expert parameter fills the stack, and no copy exists.
``_apply`` is overridden so ``.to()`` / ``.to_empty()`` move the stacks and re-create the views instead
of duplicating each expert. FP8 checkpoints kept in FP8 (:meth:`MoE.use_fp8`) add stacked block scales
``w13_scale`` / ``w2_scale`` with per-expert ``weight_scale_inv`` views, the same way.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from runtime.collectives import all_reduce
from runtime.config import ModelConfig
from runtime.execution import MoEImpl, moe_dispatch, moe_dispatch_fp8
from runtime.kernels.linear import ROUTER_MAX_TOKENS, project, small_linear
from runtime.kernels.moe_decode import moe_decode
from runtime.kernels.moe_fp8 import MOE_BY_PAIR_MAX_TOKENS, moe_fp8
from runtime.kernels.router import Routing, greedy_route, normalize_weights, route, route_scores
from runtime.quant.fp8 import FP8_DTYPE, Fp8Linear, dequantize, fp8_linear, keep_dtypes, scale_shape


class MLP(nn.Module):
    """SwiGLU feed-forward (dense layers and shared experts)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return project(self.down_proj, F.silu(project(self.gate_proj, x)) * project(self.up_proj, x))


class Gate(nn.Module):
    """Router. Runs in fp32 whatever the model dtype (as DeepSeek and transformers do): the weight and
    the correction bias are kept fp32 by ``_apply``.

    Returns ``(topk_ids [T, k] int64, topk_weights [T, k] fp32)``.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_experts = config.n_routed_experts
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.topk_method = config.topk_method
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size, dtype=torch.float32))
        # the choice's constants (scoring, renormalisation, scale), and whether the decode kernels can make
        # it themselves (greedy only)
        renorm = self.top_k > 1 and config.norm_topk_prob
        scale = config.routed_scaling_factor if (config.scale_weights_after_norm or not renorm) else 1.0
        self.routing = Routing(self.top_k, config.scoring_func == "softmax", renorm, scale)
        self.kernel_routable = self.topk_method == "greedy"
        if self.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def _apply(self, fn: Callable, recurse: bool = True) -> Gate:
        return super()._apply(lambda t: keep_fp32(fn(t)), recurse)

    def _group_mask(self, group_scores: torch.Tensor) -> torch.Tensor:
        """[T, G] group scores → [T, E] bool mask of experts in the ``topk_group`` best groups."""
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
        T = group_scores.shape[0]
        return mask.unsqueeze(-1).expand(T, self.n_group, self.n_experts // self.n_group).reshape(T, -1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        # fp32: the weight is fp32, the tokens are converted in the product
        return small_linear(x, self.weight, max_tokens=ROUTER_MAX_TOKENS)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.logits(x)
        if self.topk_method == "greedy":
            return greedy_route(logits, self.routing)
        scores = route_scores(logits, self.routing)
        T, G = scores.shape[0], self.n_group
        if self.topk_method == "group_limited_greedy":
            group_scores = scores.view(T, G, -1).max(dim=-1).values
            masked = scores.masked_fill(~self._group_mask(group_scores), 0.0)
            weights, ids = torch.topk(masked, k=self.top_k, dim=-1, sorted=False)
        else:  # noaux_tc: the bias only steers the choice; weights come from the raw scores
            choice = scores + self.e_score_correction_bias
            group_scores = choice.view(T, G, -1).topk(2, dim=-1)[0].sum(dim=-1)
            choice = choice.masked_fill(~self._group_mask(group_scores), float("-inf"))
            ids = torch.topk(choice, k=self.top_k, dim=-1, sorted=False)[1]
            weights = scores.gather(1, ids)
        return ids, normalize_weights(weights, self.routing)


def keep_fp32(t: torch.Tensor) -> torch.Tensor:
    """For ``_apply`` overrides: floating-point tensors that must stay fp32 whatever the model dtype."""
    return t.float() if t.is_floating_point() and t.dtype != torch.float32 else t


class _Proj(nn.Module):
    """Holds one expert projection's ``weight`` (a view into the stacked buffer) and, for FP8 experts, its
    ``weight_scale_inv`` (a view into the stacked scales)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        if scale is not None:
            self.weight_scale_inv = nn.Parameter(scale, requires_grad=False)


class _ExpertView(nn.Module):
    def __init__(self, w13: torch.Tensor, w2: torch.Tensor, inter: int, scales: tuple | None = None) -> None:
        super().__init__()
        s13, s2, rows = scales if scales is not None else (None, None, 0)
        self.gate_proj = _Proj(w13[:inter], None if s13 is None else s13[:rows])
        self.up_proj = _Proj(w13[inter:], None if s13 is None else s13[rows:])
        self.down_proj = _Proj(w2, s2)


class MoE(nn.Module):
    """Routed experts (sorted dispatch) + shared experts; counts tokens per expert on device.

    Under expert parallelism (:meth:`shard_experts`) the module holds ``n_local`` experts with global ids
    ``[expert_offset, expert_offset + n_local)``, computes their share for every token, and all-reduces
    the partial sums over ``ep_group``; the router and the load statistics still cover all experts."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        E, H, inter = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.n_experts, self.top_k, self.inter = E, config.num_experts_per_tok, inter
        self.n_local, self.expert_offset = E, 0
        self.ep_group = None  # process group summing the routed partials (runtime.parallel)
        self.shared_partial = False  # shared experts' output is a TP partial summed with the routed one
        self.fp8_block: tuple[int, int] | None = None  # FP8 expert stacks (use_fp8)
        self.register_buffer("w13_scale", None, persistent=False)
        self.register_buffer("w2_scale", None, persistent=False)
        self.gate = Gate(config)
        self.register_buffer("w13", torch.empty(E, 2 * inter, H), persistent=False)
        self.register_buffer("w2", torch.empty(E, H, inter), persistent=False)
        self.experts = nn.ModuleList()
        self._tie_expert_views()
        self.shared_experts = MLP(H, inter * config.n_shared_experts) if config.n_shared_experts > 0 else None
        self.register_buffer("expert_load", torch.zeros(E, dtype=torch.int64), persistent=False)
        self.register_buffer("expert_range", torch.arange(E), persistent=False)

    def _tie_expert_views(self) -> None:
        # keyed by global expert id, so a rank holding experts 8..15 still shows ``experts.8.*`` names
        def scales(e: int) -> tuple | None:
            if self.fp8_block is None:
                return None
            return self.w13_scale[e], self.w2_scale[e], self.inter // self.fp8_block[0]

        views = {
            str(self.expert_offset + e): _ExpertView(self.w13[e], self.w2[e], self.inter, scales(e))
            for e in range(self.n_local)
        }
        self._modules["experts"] = nn.ModuleDict(views)

    def use_fp8(self, block: tuple[int, int]) -> None:
        """Keep the experts' stacks in FP8 with their block scales (``[n_local, ceil(rows/128), ceil(cols/128)]``,
        fp32), each expert's ``weight`` / ``weight_scale_inv`` views into them: the checkpoint's names and
        in-place loading stay as they are. The gate / up split must fall on a block boundary."""
        if self.inter % block[0]:
            raise ValueError(
                f"moe_intermediate_size {self.inter} is not a multiple of the FP8 block {block[0]}: the stacked"
                " gate / up scales cannot be split; load this checkpoint dequantized"
            )
        self.fp8_block = tuple(block)
        n, dev = self.n_local, self.w13.device
        self.w13 = torch.empty(self.w13.shape, dtype=FP8_DTYPE, device=dev)
        self.w2 = torch.empty(self.w2.shape, dtype=FP8_DTYPE, device=dev)
        self.w13_scale = torch.empty(n, *scale_shape(self.w13.shape, block), device=dev)
        self.w2_scale = torch.empty(n, *scale_shape(self.w2.shape, block), device=dev)
        self._tie_expert_views()

    def shard_experts(self, rank: int, n: int) -> None:
        """Keep only this EP rank's ``E/n`` experts (on the meta device, before materializing)."""
        self.n_local, self.expert_offset = self.n_experts // n, rank * (self.n_experts // n)
        self.w13 = torch.empty(self.n_local, *self.w13.shape[1:], dtype=self.w13.dtype, device=self.w13.device)
        self.w2 = torch.empty(self.n_local, *self.w2.shape[1:], dtype=self.w2.dtype, device=self.w2.device)
        self._tie_expert_views()

    def _apply(self, fn: Callable, recurse: bool = True) -> MoE:
        # Move only the stacks (and gate / shared experts); then rebuild the per-expert views.
        order = list(self._modules)
        experts = self._modules.pop("experts")
        if self.fp8_block is not None:  # FP8 stacks and their fp32 scales keep their dtypes
            fn = keep_dtypes(fn)
        try:
            super()._apply(fn, recurse)
        finally:
            self._modules["experts"] = experts
            self._modules = OrderedDict((k, self._modules[k]) for k in order)
        self._tie_expert_views()
        return self

    def expert_counts(self) -> torch.Tensor:
        """Tokens routed to each expert since the last reset ([E] int64, global ids, on device, no sync)."""
        return self.expert_load

    def reset_buffers(self) -> None:
        self.expert_load.zero_()
        self.expert_range.copy_(torch.arange(self.n_experts, device=self.expert_range.device))

    def forward(self, x: torch.Tensor, dispatch: MoEImpl | None = None, kernel_routing: bool = True) -> torch.Tensor:
        """``dispatch``: the step's path for the routed experts (:func:`runtime.execution.moe_dispatch`, decided
        outside compiled code; None: decide here). ``kernel_routing``: with the fused kernel, a greedy router's
        choice is one kernel too (:mod:`runtime.kernels.router`); False runs the Gate module."""
        if dispatch is None:
            dispatch = moe_dispatch(MoEImpl.AUTO, x)
        if self.fp8_block is not None:
            dispatch = moe_dispatch_fp8(dispatch, x)
        fused = dispatch is MoEImpl.FUSED
        fuse_shared = fused and self._shared_fusable(x)  # the kernel adds the shared experts itself
        y = self._fused(x, fuse_shared, kernel_routing) if fused else self.routed(x, *self.gate(x), dispatch)
        if self.shared_experts is None or fuse_shared:
            return all_reduce(y, self.ep_group)
        s = self.shared_experts(x)
        if self.shared_partial:
            return all_reduce(y + s, self.ep_group)
        return all_reduce(y, self.ep_group) + s

    def _shared_fusable(self, x: torch.Tensor) -> bool:
        """The shared experts can join the fused kernel when their output is added where the routed output
        is: unsharded (no EP all-reduce in between) or a TP partial summed by the same all-reduce. FP8 shared
        experts join the per-pair kernel only (steps of up to MOE_BY_PAIR_MAX_TOKENS tokens); above, their
        own FP8 linears run on the FP8 GEMM."""
        s = self.shared_experts
        if s is None or not (self.ep_group is None or self.shared_partial):
            return False
        if self.fp8_block is None:
            return type(s.down_proj) is nn.Linear
        plain_fp8 = all(type(p) is Fp8Linear and p.group is None for p in (s.gate_proj, s.up_proj, s.down_proj))
        return plain_fp8 and x.shape[0] <= MOE_BY_PAIR_MAX_TOKENS

    def _fused(self, x: torch.Tensor, with_shared: bool, kernel_routing: bool) -> torch.Tensor:
        """Routed experts (and, ``with_shared``, the shared ones) through the decode kernel; no all-reduce.
        With ``kernel_routing`` a greedy router's choice is one kernel too (:mod:`runtime.kernels.router`)."""
        s = self.shared_experts
        sw = (s.gate_proj.weight, s.up_proj.weight, s.down_proj.weight) if with_shared else (None, None, None)
        if kernel_routing and self.gate.kernel_routable:
            ids, weights = route(self.gate.logits(x), self.expert_load, *self.gate.routing)
        else:
            ids, weights = self.gate(x)
            flat = ids.reshape(-1)
            self.expert_load.scatter_add_(0, flat, torch.ones_like(flat))
        if self.fp8_block is not None:
            fp8_shared = ()
            if with_shared:
                fp8_shared = tuple(
                    t for p in (s.gate_proj, s.up_proj, s.down_proj) for t in (p.weight, p.weight_scale_inv)
                )
            y = moe_fp8(
                x, ids, weights, self.w13, self.w13_scale, self.w2, self.w2_scale, self.expert_offset, self.n_local,
                *fp8_shared,
            )  # fmt: skip
        else:
            y = moe_decode(x, ids, weights, self.w13, self.w2, *sw, self.expert_offset, self.n_local)
        return y.sum(dim=1).to(x.dtype)

    def _stacks(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The experts' stacks in ``dtype`` for the sorted-dispatch paths: FP8 stacks are dequantized for the
        step (a transient the size of this rank's experts in bf16; the fused decode kernel reads FP8)."""
        if self.fp8_block is None:
            return self.w13, self.w2
        return (
            dequantize(self.w13, self.w13_scale, self.fp8_block, dtype),
            dequantize(self.w2, self.w2_scale, self.fp8_block, dtype),
        )

    @torch.compiler.disable
    def _expert_loop(
        self, xs: torch.Tensor, offs: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, fp8: bool
    ) -> torch.Tensor:
        """``LOOP``: one GEMM pair per active expert over its slice of the sorted pairs. It reads the slice
        sizes on the host, so it always runs eagerly: traced by dynamo, the loop is unrolled over the active
        experts and specialised on their counts, and each new routing of a long prefill (the FP8 experts'
        path above FP8_FUSED_MAX_TOKENS where the grouped GEMM does not run, in compiled regions too) would
        compile a graph of 2 × E kernels."""
        out = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(torch.diff(offs, prepend=offs.new_zeros(1)).tolist()):
            if n == 0:
                continue
            seg = xs[start : start + n]
            if fp8:  # FP8 weights read as they are (runtime.quant.fp8.fp8_linear picks the kernel)
                g, u = fp8_linear(seg, w13[e], self.w13_scale[e]).split(self.inter, dim=-1)
                out[start : start + n] = fp8_linear(F.silu(g) * u, w2[e], self.w2_scale[e])
            else:
                g, u = F.linear(seg, w13[e]).split(self.inter, dim=-1)
                out[start : start + n] = F.linear(F.silu(g) * u, w2[e])
            start += n
        return out

    def routed(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, dispatch: MoEImpl) -> torch.Tensor:
        """Sort the T·k (token, expert) pairs by expert, run each expert on its contiguous slice,
        un-sort and sum each token's k outputs by routing weight. ``dispatch``: ``GROUPED`` (grouped GEMM,
        no host sync), ``GATHER`` (each pair against its gathered expert weights) or ``LOOP`` (one GEMM per
        active expert).

        Under EP the sort key is ``(id - expert_offset) mod E``: this rank's experts come first, in order,
        and the pairs routed elsewhere trail behind them, computed by no expert and masked to zero."""
        key = ids if not self.expert_offset else (ids - self.expert_offset) % self.n_experts
        sorted_ids, order = key.reshape(-1).sort(stable=True)
        token_idx = order // self.top_k
        # end offset of each expert's slice (in dispatch-key order: rolled back to global ids for the counts)
        offs_all = torch.searchsorted(sorted_ids, self.expert_range, right=True, out_int32=True)
        counts = torch.diff(offs_all, prepend=offs_all.new_zeros(1))
        self.expert_load += counts.roll(self.expert_offset) if self.expert_offset else counts
        offs = offs_all[: self.n_local]
        xs = x.index_select(0, token_idx)
        fp8_loop = self.fp8_block is not None and dispatch is MoEImpl.LOOP
        w13, w2 = (self.w13, self.w2) if fp8_loop else self._stacks(x.dtype)
        if dispatch is MoEImpl.GATHER:
            local = sorted_ids if self.n_local == self.n_experts else sorted_ids.clamp(max=self.n_local - 1)
            h = torch.bmm(w13.index_select(0, local), xs[:, :, None]).squeeze(-1)
            g, u = h.split(self.inter, dim=-1)
            out = torch.bmm(w2.index_select(0, local), (F.silu(g) * u)[:, :, None]).squeeze(-1)
        elif dispatch is MoEImpl.GROUPED:
            h = torch._grouped_mm(xs, w13.transpose(-2, -1), offs=offs)
            g, u = h.split(self.inter, dim=-1)
            out = torch._grouped_mm(F.silu(g) * u, w2.transpose(-2, -1), offs=offs)
        else:
            out = self._expert_loop(xs, offs, w13, w2, fp8_loop)
        if self.n_local < self.n_experts:  # rows of other ranks' experts hold no (or stale) values
            out = torch.where((sorted_ids < self.n_local)[:, None], out, 0)
        # back to (token, slot) order by the inverse permutation, then a weighted sum over the k slots: a
        # gather and a reduction, where a scatter-add (index_add_) would serialise on atomics
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        pairs = out.index_select(0, inverse).view(*ids.shape, -1).float()
        return (pairs * weights.float()[..., None]).sum(dim=1).to(x.dtype)
