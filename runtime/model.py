"""DeepSeek-V2/V3 decoder in plain PyTorch, with MLA over a paged latent KV cache.

Read top-down: the causal LM, the decoder stack, a decoder layer, multi-head latent attention, rotary
embedding, RMSNorm; the MoE block is :mod:`runtime.moe`. Module and parameter names equal the Hugging Face
checkpoint's tensor names (see docs/runtime.md). Tokens are packed (no padding):
``forward(input_ids [T], positions [T], attn_metadata, kv_cache)``.

Numerics follow transformers' reference: RMSNorm in fp32, router in fp32, attention softmax in fp32,
rotary in fp32 on DeepSeek's interleaved pair layout, YaRN mscale folded into the softmax scale.

How a step runs (which kernels, which compiled regions) is :mod:`runtime.execution`'s business, set once
with :meth:`DeepseekForCausalLM.configure`; each forward resolves it into a :class:`StepPlan`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from runtime.config import ModelConfig, yarn_get_mscale
from runtime.execution import (
    AttentionPath,
    ExecutionOptions,
    MoEImpl,
    StepPlan,
    compile_failures,
    embed_compiled,
    mark_static,
    plan_step,
    run_layer_compiled,
)
from runtime.kernels.linear import project, small_linear
from runtime.kernels.mla_decode import combine_splits, mla_decode
from runtime.kv_cache import AttentionMetadata, PagedKVCache, write_cache
from runtime.moe import MLP, MoE, keep_fp32


@dataclass
class Step:
    """One forward's state between :meth:`DeepseekForCausalLM.begin` and ``finish``."""

    x: torch.Tensor
    rope: tuple
    bias: torch.Tensor | None
    meta: AttentionMetadata
    kv_cache: PagedKVCache | None
    plan: StepPlan


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
        self.options = ExecutionOptions()

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
        self.run_layers(step, 0, self.num_layers)
        return self.finish(step, logits_indices)

    # The three parts of ``forward``, separately callable so a captured decode step can be cut into
    # pieces (runtime.cuda_graph): the host launches the next piece while the GPU runs the one before.
    def begin(self, input_ids, positions, meta: AttentionMetadata, kv_cache: PagedKVCache | None) -> Step:
        """Embeddings, the step's rope terms, its plan and (gathered decode paths only) the attention mask."""
        if kv_cache is None and (meta.is_decode or meta.query_lens != meta.context_lens_cpu):
            raise ValueError("a decode step or a cached prefix needs kv_cache")
        if self.compile_enabled:
            x, rope = embed_compiled(self, input_ids, positions)
        else:
            x, rope = self.embed(input_ids, positions)
        plan = plan_step(self.options, x, meta, fp8_experts=self.fp8_experts)
        bias = decode_bias(meta, kv_cache.block_size, x.dtype) if plan.attention.needs_bias else None
        return Step(x, rope, bias, meta, kv_cache, plan)

    def run_layers(self, step: Step, start: int, end: int) -> None:
        """Layers ``[start, end)`` on ``step.x`` (replaced, not written in place)."""
        for i in range(start, end):
            layer = self.model.layers[i]
            cache = None if step.kv_cache is None else step.kv_cache.layer(i)
            if step.plan.compiled:
                step.x = run_layer_compiled(
                    layer, step.x, self.rotary, step.rope, step.meta, cache, step.bias, step.plan
                )
            else:
                step.x = layer(step.x, self.rotary, step.rope, step.meta, cache, step.bias, step.plan)

    def finish(self, step: Step, logits_indices: torch.Tensor | None = None) -> torch.Tensor:
        x = step.x if logits_indices is None else step.x.index_select(0, logits_indices)
        return self.lm_head(self.model.norm(x))

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor, complex_rope: bool = True):
        """Token embeddings and the step's rope terms (``complex_rope=False``: real cos / sin only)."""
        return self.model.embed_tokens(input_ids), self.rotary(positions, with_cis=complex_rope)

    # -- how it runs ----------------------------------------------------------------------------
    def configure(self, options: ExecutionOptions) -> None:
        """Run every later forward with ``options`` (kernels, compiled regions: runtime.execution)."""
        if options.compile:  # compiled regions see the stacked buffers as static shapes
            mark_static(self._stacked_buffers())
        self.options = options

    @property
    def compile_enabled(self) -> bool:
        return self.options.compile and bool(self.model.layers) and not compile_failures()

    def _stacked_buffers(self) -> list[torch.Tensor]:
        stacks = [t for _, m in self.moe_layers() for t in (m.w13, m.w2)]
        return stacks + [a.in_proj_weight for a in self._attentions() if a.in_proj_weight is not None]

    # -- state ----------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def num_layers(self) -> int:
        return len(self.model.layers)

    @property
    def fp8_experts(self) -> bool:
        return any(moe.fp8_block is not None for _, moe in self.moe_layers())

    def moe_layers(self) -> list[tuple[int, MoE]]:
        return [(i, layer.mlp) for i, layer in enumerate(self.model.layers) if isinstance(layer.mlp, MoE)]

    def _attentions(self) -> list[MLAttention]:
        return [layer.self_attn for layer in self.model.layers]

    def on_materialized(self) -> None:
        """After ``to_empty`` (build_model): stack the input projections, tie the head, recompute
        non-persistent state (rotary frequencies, load counters)."""
        for attn in self._attentions():
            attn.fuse_input_projections()
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """Recompute non-persistent state (after ``to_empty``): rotary frequencies, load counters."""
        self.rotary.reset_buffers()
        for _, m in self.moe_layers():
            m.reset_buffers()

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


class DeepseekModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


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

    def forward(self, x, rotary, rope, meta: AttentionMetadata, cache, bias, plan: StepPlan) -> torch.Tensor:
        """Eager; compiled regions run the same two halves (runtime.execution.run_layer_compiled)."""
        q_nope, q_pe, kv_new = self.attention_input(x, rotary, rope)
        o = self.self_attn.attend(q_nope, q_pe, kv_new, meta, cache, bias, plan.attention)
        return self.attention_output(x, o, plan.moe, plan.kernel_routing)

    def attention_input(self, x, rotary: RotaryEmbedding, rope: tuple):
        """Input norm, q / kv projections and rope: everything of the layer before its cache write."""
        return self.self_attn.project(self.input_layernorm(x), rotary, rope)

    def attention_output(self, x, attn_out, moe: MoEImpl, kernel_routing: bool) -> torch.Tensor:
        """o_proj, residual, post-attention norm, MLP or MoE, residual."""
        x = x + project(self.self_attn.o_proj, attn_out)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, moe, kernel_routing) if isinstance(self.mlp, MoE) else self.mlp(h))


class MLAttention(nn.Module):
    """Multi-head latent attention. Caches ``[kv_a_layernorm(latent), rope(k_pe)]`` per token.

    Prefill expands the latent through ``kv_b_proj`` and runs SDPA per sequence; decode uses the
    absorbed form (``q_nope·W_UK`` against the latent, output through ``W_UV``), which reads only the
    compressed cache, either through the paged kernel or over a gathered copy of the cache. The expanded
    form also serves decode when the plan asks for it (to check one form against the other).
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

    def forward(
        self,
        x: torch.Tensor,
        rotary: RotaryEmbedding,
        rope: tuple,
        meta: AttentionMetadata,
        cache: torch.Tensor | None,
        bias: torch.Tensor | None,
        path: AttentionPath,
    ) -> torch.Tensor:
        """Normed input [T, H] → attention output [T, H] (decoder layers call the halves separately)."""
        q_nope, q_pe, kv_new = self.project(x, rotary, rope)
        return self.o_proj(self.attend(q_nope, q_pe, kv_new, meta, cache, bias, path))

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

    def attend(self, q_nope, q_pe, kv_new, meta: AttentionMetadata, cache, bias, path: AttentionPath):
        """Cache write + attention core → [T, nh·dv] (the input of ``o_proj``)."""
        T = q_nope.shape[0]
        if cache is not None:
            write_cache(cache, meta.slot_mapping, kv_new)
        if path is AttentionPath.PAGED:
            out = self.decode_paged(q_nope, q_pe, cache, meta.block_tables, meta.context_lens)
        elif path is AttentionPath.GATHERED:
            out = self.decode_gathered(q_nope, q_pe, self.gather(cache, meta.block_tables), bias)
        elif path is AttentionPath.EXPANDED:
            out = self._decode_expanded(q_nope, q_pe, bias, meta, cache)
        elif path in (AttentionPath.MIXED, AttentionPath.MIXED_GATHERED):
            out = self._mixed(q_nope, q_pe, kv_new, meta, cache, paged=path is AttentionPath.MIXED)
        else:
            out = self._prefill(q_nope, q_pe, kv_new, meta, cache)
        return out.reshape(T, self.n_heads * self.v_dim)

    # -- absorbed decode ------------------------------------------------------------------------
    def decode_gathered(self, q_nope, q_pe, kv, bias) -> torch.Tensor:
        """Absorbed MLA decode over the gathered latent cache ``kv`` [B, S, r + dr] → [B, nh, dv]."""
        q_cat = self._absorbed_query(q_nope, q_pe)
        # scores in the model dtype, softmax in fp32 (as transformers' eager attention)
        scores = torch.baddbmm(bias, q_cat, kv.transpose(1, 2), alpha=self.scale)  # [B, nh, S]
        p = scores.softmax(dim=-1, dtype=torch.float32).to(kv.dtype)
        return self._absorbed_output(torch.bmm(p, kv[..., : self.kv_lora_rank]))

    def decode_paged(self, q_nope, q_pe, cache, block_tables, context_lens) -> torch.Tensor:
        """:meth:`decode_gathered`'s result, attending straight from the paged cache
        (:mod:`runtime.kernels.mla_decode`) → [B, nh, dv]."""
        q_cat = self._absorbed_query(q_nope, q_pe)
        splits = mla_decode(q_cat, cache, block_tables, context_lens, self.scale, self.kv_lora_rank)
        return self._absorbed_output(combine_splits(*splits).to(q_cat.dtype))

    def _absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``kv_b_proj`` split per head into W_UK [nh, dn, r] and W_UV [nh, dv, r] (views, no copy)."""
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.kv_lora_rank)
        return w[:, : self.nope], w[:, self.nope :]

    def _absorbed_query(self, q_nope, q_pe) -> torch.Tensor:
        """[q_nope·W_UK | q_pe] → [B, nh, r + dr]: the query against the cached latent and roped key."""
        w_uk = self._absorbed_weights()[0]
        q_lat = small_linear(q_nope.transpose(0, 1), w_uk.transpose(1, 2)).transpose(0, 1)  # [B, nh, r]
        return torch.cat([q_lat, q_pe], dim=-1)

    def _absorbed_output(self, o_lat) -> torch.Tensor:
        """Attention over the latent [B, nh, r] → per-head values [B, nh, dv] through W_UV."""
        return small_linear(o_lat.transpose(0, 1), self._absorbed_weights()[1]).transpose(0, 1)

    def _mixed(self, q_nope, q_pe, kv_new, meta: AttentionMetadata, cache, paged: bool) -> torch.Tensor:
        """A mixed step (the cache already written): its decode rows attend in the absorbed form, as a decode
        step's would, its prompt chunks as a prefill's; the rest of the layer runs once over all rows, so a
        step that admits prompts beside running decodes reads the weights once, not twice."""
        n = meta.num_decode
        decode, prompts = meta.split()
        if paged:
            head = self.decode_paged(q_nope[:n], q_pe[:n], cache, decode.block_tables, decode.context_lens)
        else:
            bias = decode_bias(decode, cache.shape[1], q_nope.dtype)
            head = self.decode_gathered(q_nope[:n], q_pe[:n], self.gather(cache, decode.block_tables), bias)
        tail = self._prefill(q_nope[n:], q_pe[n:], kv_new[n:], prompts, cache)
        return torch.cat([head.to(tail.dtype), tail])

    # -- prefill and the expanded form ----------------------------------------------------------
    def _expand(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[..., S, D] cached latent+rope → keys [..., S, nh, dq], values [..., S, nh, dv]."""
        latent, k_pe = kv.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kvb = self.kv_b_proj(latent).unflatten(-1, (self.n_heads, self.nope + self.v_dim))
        k_nope, v = kvb.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(-2).expand(*k_nope.shape[:-1], self.rope_dim)], dim=-1)
        return k, v

    def gather(self, cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
        """[B, max_blocks] → [B, max_blocks·block_size, D] (static shape)."""
        B = block_tables.shape[0]
        return cache[block_tables].view(B, -1, cache.shape[-1])

    def _prefill(self, q_nope, q_pe, kv_new, meta: AttentionMetadata, cache) -> torch.Tensor:
        parts = meta.prompt_parts()
        if len(parts) == 1:
            return self._prefill_group(q_nope, q_pe, kv_new, meta, cache)
        return torch.cat([self._prefill_group(q_nope[a:b], q_pe[a:b], kv_new[a:b], m, cache) for a, b, m in parts])

    def _prefill_group(self, q_nope, q_pe, kv_new, meta: AttentionMetadata, cache) -> torch.Tensor:
        """One group of prompt chunks: one padded SDPA when they are fresh and close in length, or over cached
        context with close chunk and context lengths; else one per sequence (a cached prefix is read back
        from the pool)."""
        q = torch.cat([q_nope, q_pe], dim=-1)
        padded = meta.padded_index()
        if padded is not None:
            return self._prefill_padded(q, kv_new, meta, padded)
        padded = meta.cached_padded_index()
        if padded is not None:
            return self._prefill_cached_padded(q, meta, cache, padded)
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
                o = prefill_sdpa(qi, k, v, is_causal=True, scale=self.scale)
            else:
                qpos = torch.arange(ql, device=q.device)[:, None] + (cl - ql)
                mask = torch.arange(cl, device=q.device)[None, :] <= qpos
                o = prefill_sdpa(qi, k, v, attn_mask=mask, scale=self.scale)
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

        o = prefill_sdpa(pad(q), pad(k), pad(v), is_causal=True, scale=self.scale)
        return o.transpose(1, 2).reshape(B * L, self.n_heads, self.v_dim).index_select(0, idx)

    def _prefill_cached_padded(self, q, meta: AttentionMetadata, cache, idx: torch.Tensor) -> torch.Tensor:
        """Chunks over cached context, of close chunk and context lengths: their contexts gathered from the
        pool into a right-padded [B, max_context] batch (this step's rows are already written), one SDPA
        with each chunk's causal offset as the mask. Padded context rows read the scratch block, and sit
        after every row a real query sees; padded query rows see real ones too (no row is all masked) and
        are dropped when gathering back."""
        B, Lq, Lc = len(meta.query_lens), max(meta.query_lens), max(meta.context_lens_cpu)
        nb = -(-Lc // cache.shape[1])
        kv = cache[meta.block_tables[:, :nb]].view(B, nb * cache.shape[1], cache.shape[-1])[:, :Lc]
        k, v = self._expand(kv)  # [B, Lc, nh, *]
        qp = q.new_zeros(B * Lq, *q.shape[1:]).index_copy_(0, idx, q).view(B, Lq, *q.shape[1:]).transpose(1, 2)
        query_pos = meta.chunk_offsets()[:, None] + torch.arange(Lq, device=q.device)[None, :]  # [B, Lq]
        mask = torch.arange(Lc, device=q.device)[None, None, :] <= query_pos[:, :, None]  # [B, Lq, Lc]
        o = prefill_sdpa(qp, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None], scale=self.scale)
        return o.transpose(1, 2).reshape(B * Lq, self.n_heads, self.v_dim).index_select(0, idx)

    def _decode_expanded(self, q_nope, q_pe, bias, meta: AttentionMetadata, cache) -> torch.Tensor:
        kv = self.gather(cache, meta.block_tables)
        k, v = self._expand(kv)  # [B, S, nh, *]
        q = torch.cat([q_nope, q_pe], dim=-1).unsqueeze(2)  # [B, nh, 1, dq]
        o = F.scaled_dot_product_attention(
            q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias[:, None], scale=self.scale
        )
        return o.squeeze(2)

    # -- the stacked input projections ----------------------------------------------------------
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


# Prefill attention backends, in order of preference. cuDNN's is left out: it builds an execution plan for
# every new shape (prompt length, group size), which the first request of each shape pays while serving.
PREFILL_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def prefill_sdpa(q, k, v, **kwargs) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` restricted to :data:`PREFILL_SDPA_BACKENDS` (flash needs equal
    q / k / v head dims, so MLA's prefill runs the memory-efficient kernel on CUDA)."""
    with sdpa_kernel(PREFILL_SDPA_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)


def decode_bias(meta: AttentionMetadata, block_size: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, S] additive mask (0 / -inf) over the gathered block-table slots, built once per step.
    Padded rows (context 0) still see one (scratch) slot, so no row is all -inf."""
    B, S = meta.block_tables.shape[0], meta.block_tables.shape[1] * block_size
    ctx = meta.context_lens.clamp(min=1)
    hidden = torch.arange(S, device=ctx.device)[None, :] >= ctx[:, None]
    return torch.zeros(B, 1, S, dtype=dtype, device=ctx.device).masked_fill_(hidden[:, None], float("-inf"))


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
        return super()._apply(lambda t: keep_fp32(fn(t)), recurse)  # frequencies stay fp32

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
