"""DeepSeek-V2/V3 decoder in plain PyTorch, with MLA over a paged latent KV cache.

Module and parameter names equal the Hugging Face checkpoint's tensor names (see docs/runtime.md).
Tokens are packed (no padding): ``forward(input_ids [T], positions [T], attn_metadata, kv_cache)``.

Numerics follow transformers' reference: RMSNorm in fp32, router in fp32, attention softmax in fp32,
rotary in fp32 on DeepSeek's interleaved pair layout, YaRN mscale folded into the softmax scale.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from runtime.config import ModelConfig, yarn_get_mscale
from runtime.kernels import triton_usable
from runtime.kernels.linear import project, small_linear
from runtime.kernels.mla_decode import combine_splits, mla_decode
from runtime.kv_cache import AttentionMetadata, PagedKVCache, write_cache
from runtime.moe import MLP, MOE_IMPLS, MoE, _keep_fp32

ATTENTION_DECODE = ("auto", "paged", "gather")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 normalisation, then the weight in the model dtype (transformers' order of roundings);
        # F.rms_norm is one fused kernel on CUDA instead of six.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Default or YaRN rotary frequencies (DeepSeek's variant); cos/sin computed per step from positions
    so there is no length limit baked into a table and the step stays shape-static."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.dim = config.qk_rope_head_dim
        self.interleave = config.rope_interleave
        inv_freq, self.attention_factor = self._compute(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @staticmethod
    def _compute(config: ModelConfig) -> tuple[torch.Tensor, float]:
        r, dim = config.rope, config.qk_rope_head_dim
        pos_freqs = r.theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        if r.rope_type == "default":
            return 1.0 / pos_freqs, 1.0
        factor = r.factor
        if r.attention_factor is not None:
            attention_factor = float(r.attention_factor)
        elif r.mscale and r.mscale_all_dim:
            attention_factor = yarn_get_mscale(factor, r.mscale) / yarn_get_mscale(factor, r.mscale_all_dim)
        else:
            attention_factor = yarn_get_mscale(factor)

        def correction_dim(num_rot: float) -> float:
            return (dim * math.log(r.original_max_position_embeddings / (num_rot * 2 * math.pi))) / (
                2 * math.log(r.theta)
            )

        low, high = correction_dim(r.beta_fast), correction_dim(r.beta_slow)
        if r.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        extrapolation = 1 - ramp
        inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
        return inv_freq, attention_factor

    def _apply(self, fn, recurse: bool = True) -> RotaryEmbedding:
        return super()._apply(lambda t: _keep_fp32(fn(t)), recurse)  # frequencies stay fp32

    def reset_buffers(self) -> None:
        self.inv_freq = self._compute(self.config)[0].to(self.inv_freq.device)

    def forward(
        self, positions: torch.Tensor, with_cis: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """positions [T] → (cos, sin, cis): [T, dim/2] fp32 with the YaRN attention factor applied;
        ``cis = cos + i·sin`` (complex64) for the interleaved layout, computed once per step (eager only:
        compiled code spells the complex multiply out)."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        cos, sin = freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor
        return cos, sin, torch.complex(cos, sin) if self.interleave and with_cis else None

    def apply(self, x: torch.Tensor, rope: tuple) -> torch.Tensor:
        """x [T, ..., dim], rotated in fp32. DeepSeek checkpoints pair dims (x0,x1),(x2,x3)...: one
        complex multiply (3 kernels) keeps that interleaved layout, as transformers' V2 does; V3's
        ``rope_interleave=False`` uses the rotate-half pairing (x_i, x_{i+dim/2})."""
        cos, sin, cis = rope
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)
        if cis is not None:
            xc = torch.view_as_complex(x.float().contiguous().unflatten(-1, (-1, 2)))
            return torch.view_as_real(xc * cis.view(shape)).flatten(-2).to(x.dtype)
        c, s = cos.view(shape), sin.view(shape)
        if self.interleave:  # no cis: the compiled path, where the complex multiply is spelled out
            xp = x.float().unflatten(-1, (-1, 2))
            a, b = xp[..., 0], xp[..., 1]
            return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2).to(x.dtype)
        xf = x.float()
        x1, x2 = xf[..., : self.dim // 2], xf[..., self.dim // 2 :]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


class MLAttention(nn.Module):
    """Multi-head latent attention. Caches ``[kv_a_layernorm(latent), rope(k_pe)]`` per token.

    Prefill expands the latent through ``kv_b_proj`` and runs SDPA per sequence; decode uses the
    absorbed form (``q_nope·W_UK`` against the latent, output through ``W_UV``), which reads only the
    compressed cache. ``absorb=False`` keeps the expanded form for decode too (used to check one
    against the other).
    """

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.nope, self.rope_dim, self.v_dim = (
            config.qk_nope_head_dim,
            config.qk_rope_head_dim,
            config.v_head_dim,
        )
        self.q_head_dim = config.qk_head_dim
        self.scale = config.softmax_scale
        H, nh, bias = config.hidden_size, self.n_heads, config.attention_bias
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(H, nh * self.q_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(H, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank)
            self.q_b_proj = nn.Linear(self.q_lora_rank, nh * self.q_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(H, self.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, nh * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(nh * self.v_dim, H, bias=bias)
        # q_proj (or q_a_proj) and kv_a_proj_with_mqa stacked (fuse_input_projections): one GEMM for both
        self.register_buffer("in_proj_weight", None, persistent=False)
        self.absorb = True
        # absorbed decode over "paged" (the kernel reading the cache through the block table) or "gather"
        # (a gathered copy and a mask); "auto": paged where its Triton kernel runs (CUDA, 16-bit)
        self.decode_kernel = "auto"

    def paged_decode(self, q: torch.Tensor) -> bool:
        if self.decode_kernel == "auto":
            return triton_usable(q) and q.dtype in (torch.bfloat16, torch.float16)
        return self.decode_kernel == "paged"

    def forward(
        self,
        x: torch.Tensor,
        rotary: RotaryEmbedding,
        rope: tuple,
        meta: AttentionMetadata,
        cache: torch.Tensor | None,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        q_nope, q_pe, kv_new = self.project(x, rotary, rope)
        return self.o_proj(self.attend(q_nope, q_pe, kv_new, meta, cache, bias))

    def _input_projections(self) -> tuple[nn.Linear, nn.Linear]:
        """The two projections of the normed input: q_proj (or q_a_proj) and kv_a_proj_with_mqa."""
        return (self.q_proj if self.q_lora_rank is None else self.q_a_proj), self.kv_a_proj_with_mqa

    def fuse_input_projections(self) -> None:
        """Stack the two input projections' weights in one buffer, the two parameters becoming views of it
        (checkpoint names and in-place loading unchanged, no extra memory), so that one GEMM computes both: at
        decode, one launch instead of two per layer. Skipped for biased or tensor-parallel-wrapped ones;
        kept through ``.to()`` / ``.float()`` (stacked again after the conversion)."""
        first, kv_a = self._input_projections()
        if any(type(m) is not nn.Linear or m.bias is not None for m in (first, kv_a)):
            return
        stacked = torch.cat([first.weight.detach(), kv_a.weight.detach()])
        n = first.weight.shape[0]
        first.weight = nn.Parameter(stacked[:n], requires_grad=False)
        kv_a.weight = nn.Parameter(stacked[n:], requires_grad=False)
        self.in_proj_weight = stacked

    def _apply(self, fn, recurse: bool = True) -> MLAttention:
        # .to() / .float() convert the two parameters and the stack separately: stack them again afterwards
        fused = self.in_proj_weight is not None
        self.in_proj_weight = None
        super()._apply(fn, recurse)
        if fused:
            self.fuse_input_projections()
        return self

    def project(self, x: torch.Tensor, rotary: RotaryEmbedding, rope: tuple):
        """x [T, H] (normed) → q_nope [T, nh, dn], q_pe [T, nh, dr] (roped), kv_new [T, r + dr]."""
        T = x.shape[0]
        first, kv_a = self._input_projections()
        if self.in_proj_weight is not None:
            a, kv = small_linear(x, self.in_proj_weight).split([first.weight.shape[0], kv_a.weight.shape[0]], dim=-1)
        else:
            a, kv = first(x), kv_a(x)
        q = a if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(a))
        q = q.view(T, self.n_heads, self.q_head_dim)
        q_nope, q_pe = q.split([self.nope, self.rope_dim], dim=-1)
        q_pe = rotary.apply(q_pe, rope)
        latent, k_pe = kv.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv_new = torch.cat([self.kv_a_layernorm(latent), rotary.apply(k_pe, rope)], dim=-1)  # [T, D]
        return q_nope, q_pe, kv_new

    def attend(self, q_nope, q_pe, kv_new, meta: AttentionMetadata, cache, bias, compiled: bool = False):
        """Cache write + attention core → [T, nh·dv] (the input of ``o_proj``)."""
        T = q_nope.shape[0]
        if cache is not None:
            write_cache(cache, meta.slot_mapping, kv_new)
        if meta.is_decode:
            if self.absorb and self.paged_decode(q_nope):
                fn = _compiled("paged", _decode_absorbed_paged) if compiled else _decode_absorbed_paged
                out = fn(self, q_nope, q_pe, cache, meta.block_tables, meta.context_lens)
            elif self.absorb:
                kv = self._gather(cache, meta.block_tables)  # [B, S, r + dr]
                if compiled:
                    out = _compiled("decode", _decode_absorbed)(self, q_nope, q_pe, kv, bias)
                else:
                    out = _decode_absorbed(self, q_nope, q_pe, kv, bias)
            else:
                out = self._decode_expanded(q_nope, q_pe, bias, meta, cache)
        else:
            out = self._prefill(q_nope, q_pe, kv_new, meta, cache)
        return out.reshape(T, self.n_heads * self.v_dim)

    # -- helpers --------------------------------------------------------------------------------
    def _expand(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[..., S, D] cached latent+rope → keys [..., S, nh, dq], values [..., S, nh, dv]."""
        latent, k_pe = kv.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kvb = self.kv_b_proj(latent).unflatten(-1, (self.n_heads, self.nope + self.v_dim))
        k_nope, v = kvb.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(-2).expand(*k_nope.shape[:-1], self.rope_dim)], dim=-1)
        return k, v

    def _gather(self, cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
        """[B, max_blocks] → [B, max_blocks·block_size, D] (static shape)."""
        B = block_tables.shape[0]
        return cache[block_tables].view(B, -1, cache.shape[-1])

    def _prefill(self, q_nope, q_pe, kv_new, meta: AttentionMetadata, cache) -> torch.Tensor:
        q = torch.cat([q_nope, q_pe], dim=-1)
        padded = meta.padded_index()
        if padded is not None:
            return self._prefill_padded(q, kv_new, meta, padded)
        outs, start = [], 0
        for i, ql in enumerate(meta.query_lens):
            cl = meta.context_lens_cpu[i]
            if cl == ql:  # fresh sequence: the new tokens are the whole context
                kv = kv_new[start : start + ql]
            else:  # cached prefix (chunked prefill / prefix reuse): read it back from the pool
                nb = -(-cl // cache.shape[1])
                kv = cache[meta.block_tables[i, :nb]].view(-1, cache.shape[-1])[:cl]
            k, v = self._expand(kv)
            qi = q[start : start + ql].transpose(0, 1).unsqueeze(0)  # [1, nh, ql, dq]
            k, v = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
            if cl == ql:
                o = F.scaled_dot_product_attention(qi, k, v, is_causal=True, scale=self.scale)
            else:
                qpos = torch.arange(ql, device=q.device)[:, None] + (cl - ql)
                mask = torch.arange(cl, device=q.device)[None, :] <= qpos
                o = F.scaled_dot_product_attention(qi, k, v, attn_mask=mask, scale=self.scale)
            outs.append(o.squeeze(0).transpose(0, 1))
            start += ql
        return torch.cat(outs, dim=0)

    def _prefill_padded(self, q, kv_new, meta: AttentionMetadata, idx: torch.Tensor) -> torch.Tensor:
        """Fresh sequences of similar length: one causal SDPA over a right-padded [B, L] batch. Causal
        masking alone is exact for real rows (padding only ever sits after them); padded rows are
        dropped when gathering back to the packed layout."""
        B, L = len(meta.query_lens), max(meta.query_lens)
        k, v = self._expand(kv_new)  # expand only the real tokens

        def pad(x: torch.Tensor) -> torch.Tensor:
            out = x.new_zeros(B * L, *x.shape[1:]).index_copy_(0, idx, x)
            return out.view(B, L, *x.shape[1:]).transpose(1, 2)  # [B, nh, L, d]

        o = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), is_causal=True, scale=self.scale)
        return o.transpose(1, 2).reshape(B * L, self.n_heads, self.v_dim).index_select(0, idx)

    def _decode_expanded(self, q_nope, q_pe, bias, meta: AttentionMetadata, cache) -> torch.Tensor:
        kv = self._gather(cache, meta.block_tables)
        k, v = self._expand(kv)  # [B, S, nh, *]
        q = torch.cat([q_nope, q_pe], dim=-1).unsqueeze(2)  # [B, nh, 1, dq]
        o = F.scaled_dot_product_attention(
            q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias[:, None], scale=self.scale
        )
        return o.squeeze(2)


def _absorbed_weights(attn: MLAttention) -> tuple[torch.Tensor, torch.Tensor]:
    """``kv_b_proj`` split per head into W_UK [nh, dn, r] and W_UV [nh, dv, r] (views, no copy)."""
    w = attn.kv_b_proj.weight.view(attn.n_heads, attn.nope + attn.v_dim, attn.kv_lora_rank)
    return w[:, : attn.nope], w[:, attn.nope :]


def _absorbed_query(attn: MLAttention, q_nope, q_pe) -> torch.Tensor:
    """[q_nope·W_UK | q_pe] → [B, nh, r + dr]: the query against the cached latent and roped key."""
    w_uk = _absorbed_weights(attn)[0]
    q_lat = small_linear(q_nope.transpose(0, 1), w_uk.transpose(1, 2)).transpose(0, 1)  # [B, nh, r]
    return torch.cat([q_lat, q_pe], dim=-1)


def _absorbed_output(attn: MLAttention, o_lat) -> torch.Tensor:
    """Attention over the latent [B, nh, r] → per-head values [B, nh, dv] through W_UV."""
    return small_linear(o_lat.transpose(0, 1), _absorbed_weights(attn)[1]).transpose(0, 1)


def _decode_absorbed(attn: MLAttention, q_nope, q_pe, kv, bias) -> torch.Tensor:
    """Absorbed MLA decode over the gathered latent cache ``kv`` [B, S, r + dr] → [B, nh, dv]."""
    q_cat = _absorbed_query(attn, q_nope, q_pe)
    # scores in the model dtype, softmax in fp32 (as transformers' eager attention)
    scores = torch.baddbmm(bias, q_cat, kv.transpose(1, 2), alpha=attn.scale)  # [B, nh, S]
    p = scores.softmax(dim=-1, dtype=torch.float32).to(kv.dtype)
    return _absorbed_output(attn, torch.bmm(p, kv[..., : attn.kv_lora_rank]))


def _decode_absorbed_paged(attn: MLAttention, q_nope, q_pe, cache, block_tables, context_lens) -> torch.Tensor:
    """The absorbed form of :func:`_decode_absorbed`, attending straight from the paged cache
    (:mod:`runtime.kernels.mla_decode`) → [B, nh, dv]."""
    q_cat = _absorbed_query(attn, q_nope, q_pe)
    splits = mla_decode(q_cat, cache, block_tables, context_lens, attn.scale, attn.kv_lora_rank)
    return _absorbed_output(attn, combine_splits(*splits).to(q_cat.dtype))


def _layer_in(layer: DecoderLayer, x, rotary: RotaryEmbedding, rope: tuple):
    """input norm + q / kv projections + rope: everything of a layer before the cache write."""
    return layer.self_attn.project(layer.input_layernorm(x), rotary, rope)


def _layer_in_real(layer: DecoderLayer, x, rotary: RotaryEmbedding, cos, sin):
    return _layer_in(layer, x, rotary, (cos, sin, None))  # compiled: rope without complex tensors


def _layer_out(layer: DecoderLayer, x, attn_out, grouped: bool):
    """o_proj + residual + post-attention norm + MLP / MoE + residual."""
    x = x + project(layer.self_attn.o_proj, attn_out)
    h = layer.post_attention_layernorm(x)
    return x + (layer.mlp(h, grouped) if isinstance(layer.mlp, MoE) else layer.mlp(h))


def _decode_layer(layer: DecoderLayer, x, rotary, cos, sin, cache, slots, tables, ctx, bias, grouped, paged: bool):
    """A whole decode layer (absorbed attention) as one compiled graph: norms, rope, casts and residual adds
    fuse across what are region boundaries in prefill, and nothing between them returns to Python."""
    attn = layer.self_attn
    q_nope, q_pe, kv_new = _layer_in(layer, x, rotary, (cos, sin, None))
    write_cache(cache, slots, kv_new)
    if paged:
        o = _decode_absorbed_paged(attn, q_nope, q_pe, cache, tables, ctx)
    else:
        o = _decode_absorbed(attn, q_nope, q_pe, attn._gather(cache, tables), bias)
    return _layer_out(layer, x, o.reshape(x.shape[0], -1), grouped)


def _embed(model: DeepseekForCausalLM, input_ids, positions):
    """Token embeddings and the step's rope cos/sin (real form: the compiled layers need no complex)."""
    cos, sin, _ = model.rotary(positions, with_cis=False)
    return model.model.embed_tokens(input_ids), cos, sin


# torch.compile'd regions (see DeepseekForCausalLM.set_compile). Each function takes its module as an
# argument, so one compiled graph serves every layer (parameters are graph inputs); dynamic=True gives
# one graph for all token counts > 1 (prefill and every decode batch) plus one specialised to 1 token.
_COMPILED: dict[str, object] = {}
_COMPILE_FNS = {
    "in": _layer_in_real,
    "out": _layer_out,
    "decode": _decode_absorbed,
    "paged": _decode_absorbed_paged,
    "decode_layer": _decode_layer,
    "embed": _embed,
}
_compile_failed: list[str] = []


def _compiled(name: str, fn):
    if _compile_failed:
        return fn
    c = _COMPILED.get(name)
    if c is None:
        c = _COMPILED[name] = torch.compile(_COMPILE_FNS[name], dynamic=True)

    def call(*args):
        if _compile_failed:
            return fn(*args)
        try:
            return c(*args)
        except Exception as exc:  # never lose a step to the compiler: fall back to eager for good
            import warnings

            _compile_failed.append(f"{type(exc).__name__}: {exc}"[:500])
            warnings.warn(f"torch.compile failed ({_compile_failed[0]}); running eager", stacklevel=2)
            return fn(*args)

    return call


def decode_bias(meta: AttentionMetadata, block_size: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, S] additive mask (0 / -inf) over the gathered block-table slots, built once per step.
    Padded rows (context 0) still see one (scratch) slot, so no row is all -inf."""
    B, S = meta.block_tables.shape[0], meta.block_tables.shape[1] * block_size
    ctx = meta.context_lens.clamp(min=1)
    hidden = torch.arange(S, device=ctx.device)[None, :] >= ctx[:, None]
    return torch.zeros(B, 1, S, dtype=dtype, device=ctx.device).masked_fill_(hidden[:, None], float("-inf"))


@dataclass
class Step:
    """One forward's state between :meth:`DeepseekForCausalLM.begin` and ``finish``."""

    x: torch.Tensor
    rope: tuple
    bias: torch.Tensor | None
    meta: AttentionMetadata
    kv_cache: PagedKVCache | None


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = MLAttention(config, layer_idx)
        if config.is_moe_layer(layer_idx):
            self.mlp: nn.Module = MoE(config)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.compiled = False  # DeepseekForCausalLM.set_compile
        self.decode_region = True  # compiled decode as one region (False: the prefill's three; benchmarks)

    def forward(self, x, rotary, rope, meta, cache, bias=None) -> torch.Tensor:
        # Compiled decode (absorbed attention): the whole layer is one region. Compiled prefill: two regions
        # around the cache write and the attention core (which need the metadata's host-side lists). Eager
        # otherwise.
        attn, c = self.self_attn, self.compiled
        grouped = self.mlp.use_grouped(x, compiled=c) if isinstance(self.mlp, MoE) else False
        if c and self.decode_region and meta.is_decode and attn.absorb and cache is not None:
            args = (cache, meta.slot_mapping, meta.block_tables, meta.context_lens, bias, grouped, attn.paged_decode(x))
            return _compiled("decode_layer", _decode_layer)(self, x, rotary, rope[0], rope[1], *args)
        if c:
            q_nope, q_pe, kv_new = _compiled("in", _layer_in_real)(self, x, rotary, rope[0], rope[1])
        else:
            q_nope, q_pe, kv_new = _layer_in(self, x, rotary, rope)
        o = attn.attend(q_nope, q_pe, kv_new, meta, cache, bias, compiled=c)
        return (_compiled("out", _layer_out) if c else _layer_out)(self, x, o, grouped)


class DeepseekModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DeepseekForCausalLM(nn.Module):
    """The whole model. ``forward`` returns logits (model dtype) for the rows in ``logits_indices``
    (all rows when None): prefill usually asks only for each sequence's last token."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DeepseekModel(config)
        self.rotary = RotaryEmbedding(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # -- state ----------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def moe_layers(self) -> list[tuple[int, MoE]]:
        return [(i, layer.mlp) for i, layer in enumerate(self.model.layers) if isinstance(layer.mlp, MoE)]

    def reset_buffers(self) -> None:
        """Recompute non-persistent state (after ``to_empty``): rotary frequencies, load counters."""
        self.rotary.reset_buffers()
        for _, m in self.moe_layers():
            m.reset_buffers()

    def set_moe_impl(self, impl: str) -> None:
        if impl not in MOE_IMPLS:
            raise ValueError(f"moe impl {impl!r}; allowed: {', '.join(MOE_IMPLS)}")
        for _, m in self.moe_layers():
            m.impl = impl

    def set_compile(self, enabled: bool = True) -> None:
        """Run each layer through torch.compile'd regions (inductor, default mode): norms, rope,
        routing and the MoE epilogue fuse into a few kernels. Meant for CUDA, under CUDAGraphDecoder
        (compile first, then capture: the warm-up calls compile) and for prefill; the first call per
        shape class (1 token / more) compiles, about a minute in all. Falls back to eager if the
        compiler fails. On CPU it needs a C++ compiler (used by the tests)."""
        if enabled:
            import torch._dynamo

            for _, m in self.moe_layers():  # stacked expert buffers: static shapes (params already are)
                torch._dynamo.mark_static(m.w13)
                torch._dynamo.mark_static(m.w2)
            for layer in self.model.layers:
                if layer.self_attn.in_proj_weight is not None:
                    torch._dynamo.mark_static(layer.self_attn.in_proj_weight)
        for layer in self.model.layers:
            layer.compiled = enabled

    @property
    def compile_enabled(self) -> bool:
        return bool(self.model.layers) and self.model.layers[0].compiled and not _compile_failed

    def set_absorb(self, absorb: bool) -> None:
        for layer in self.model.layers:
            layer.self_attn.absorb = absorb

    def set_attention_decode(self, kind: str) -> None:
        """Absorbed decode attention: "paged" kernel, "gather" + mask, or "auto" (paged on CUDA 16-bit)."""
        if kind not in ATTENTION_DECODE:
            raise ValueError(f"attention decode {kind!r}; allowed: {', '.join(ATTENTION_DECODE)}")
        for layer in self.model.layers:
            layer.self_attn.decode_kernel = kind

    # -- expert-load statistics (for the service's metrics) -------------------------------------
    def expert_load(self) -> dict[int, torch.Tensor]:
        """Tokens routed to each expert since the last reset, per MoE layer index (device tensors)."""
        return {i: m.expert_counts() for i, m in self.moe_layers()}

    def expert_load_imbalance(self) -> dict[int, float]:
        """max/mean tokens per expert, per MoE layer (1.0 = perfectly balanced; 0 when no tokens)."""
        loads = self.expert_load()
        if not loads:
            return {}
        stacked = torch.stack(list(loads.values())).float()
        mean = stacked.mean(dim=1)
        ratio = torch.where(mean > 0, stacked.max(dim=1).values / mean.clamp(min=1e-9), 0.0)
        return dict(zip(loads.keys(), ratio.tolist(), strict=True))

    def reset_expert_load(self) -> None:
        for _, m in self.moe_layers():
            m.expert_load.zero_()

    def _decode_paged(self, x: torch.Tensor) -> bool:
        attn = self.model.layers[0].self_attn if self.model.layers else None
        return attn is not None and attn.absorb and attn.paged_decode(x)

    # -- compute --------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn_metadata: AttentionMetadata,
        kv_cache: PagedKVCache | None = None,
        logits_indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids, positions: [T] (packed). Returns logits [len(logits_indices) or T, vocab]."""
        step = self.begin(input_ids, positions, attn_metadata, kv_cache)
        self.run_layers(step, 0, len(self.model.layers))
        return self.finish(step, logits_indices)

    # The three parts of ``forward``, separately callable so a captured decode step can be cut into
    # pieces (runtime.cuda_graph): the host launches the next piece while the GPU runs the one before.
    def begin(self, input_ids, positions, meta: AttentionMetadata, kv_cache: PagedKVCache | None) -> Step:
        """Embeddings, the step's rope terms and (gathered decode paths only) the attention mask."""
        if kv_cache is None and (meta.is_decode or meta.query_lens != meta.context_lens_cpu):
            raise ValueError("a decode step or a cached prefix needs kv_cache")
        if self.compile_enabled:
            x, cos, sin = _compiled("embed", _embed)(self, input_ids, positions)
            rope = (cos, sin, None)
        else:
            x, rope = self.model.embed_tokens(input_ids), self.rotary(positions)
        bias = None
        if meta.is_decode and not self._decode_paged(x):  # the gathered decode paths mask by an additive bias
            bias = decode_bias(meta, kv_cache.block_size, x.dtype)
        return Step(x, rope, bias, meta, kv_cache)

    def run_layers(self, step: Step, start: int, end: int) -> None:
        """Layers ``[start, end)`` on ``step.x`` (replaced, not written in place)."""
        for i in range(start, end):
            cache = None if step.kv_cache is None else step.kv_cache.layer(i)
            step.x = self.model.layers[i](step.x, self.rotary, step.rope, step.meta, cache, step.bias)

    def finish(self, step: Step, logits_indices: torch.Tensor | None = None) -> torch.Tensor:
        x = step.x if logits_indices is None else step.x.index_select(0, logits_indices)
        return self.lm_head(self.model.norm(x))


@contextlib.contextmanager
def _skip_init() -> Iterator[None]:
    """No-op ``torch.nn.init`` while building on meta: nothing is initialized there anyway, and
    ``normal_`` on meta alone costs ~2.5 s the first time (it pulls in torch._dynamo)."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_")
    saved = {n: getattr(nn.init, n) for n in names}
    try:
        for n in names:
            setattr(nn.init, n, lambda t, *a, **k: t)
        yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


def build_model(
    config: ModelConfig,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    parallel=None,  # runtime.parallel.dist.ParallelState: build only this rank's shard
) -> DeepseekForCausalLM:
    """An uninitialized model on ``device``: built on the meta device then materialized, so no time is
    spent on random init that the checkpoint overwrites (and no CPU detour for GPU models). With
    ``parallel``, layers are cut to this rank's shard while still on meta, so only the shard is allocated."""
    with torch.device("meta"), _skip_init():
        model = DeepseekForCausalLM(config)
    if parallel is not None and parallel.world_size > 1:
        from runtime.parallel.shard import shard_model

        shard_model(model, parallel)
    model = model.to(dtype).to_empty(device=device)
    for layer in model.model.layers:
        layer.self_attn.fuse_input_projections()
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.reset_buffers()
    model.requires_grad_(False)
    return model.eval()
