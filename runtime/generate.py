"""Offline batched generation: one packed prefill, then static-shape decode steps over the paged cache.

This is the simple reference loop (no admission, no continuous batching); the service's engine reuses
the same pieces - :class:`~runtime.kv_cache.PagedKVCache`, the block allocator, the metadata builders and
:mod:`runtime.sampling` - and adds scheduling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from runtime.interfaces import CausalLM
from runtime.kv_cache import (
    BlockAllocator,
    PagedKVCache,
    SequenceBlocks,
    decode_metadata,
    prefill_metadata,
)
from runtime.loader import Tokenizer
from runtime.sampling import SamplingParams, make_generator, sample


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str | None = None
    finish_reason: str | None = None  # "stop" (stop token / string) or "length"


class Generator:
    """Owns a KV block pool sized for ``max_batch`` sequences of ``max_model_len`` tokens."""

    def __init__(
        self,
        model: CausalLM,
        tokenizer: Tokenizer | None = None,
        max_batch: int = 8,
        max_model_len: int | None = None,
        block_size: int = 16,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.config = model.config
        self.max_model_len = max_model_len or self.config.max_position_embeddings
        self.block_size = block_size
        blocks_per_seq = -(-self.max_model_len // block_size)
        self.cache = PagedKVCache(
            self.config, 1 + max_batch * blocks_per_seq, block_size, dtype=model.dtype, device=model.device
        )
        self.allocator = BlockAllocator(self.cache.num_blocks)

    def _encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[GenerationResult]:
        params = params or SamplingParams()
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(plist) != len(prompts):
            raise ValueError("one SamplingParams per prompt")
        dev = self.model.device
        results = [GenerationResult(self._encode(p)) for p in prompts]
        for r, p in zip(results, plist, strict=True):
            if not r.prompt_ids:
                raise ValueError("empty prompt")
            if len(r.prompt_ids) + p.max_new_tokens > self.max_model_len:
                raise ValueError(
                    f"prompt ({len(r.prompt_ids)}) + max_new_tokens ({p.max_new_tokens}) exceeds "
                    f"max_model_len={self.max_model_len}"
                )
        gens = [make_generator(p, dev) for p in plist]
        eos = set(self.config.eos_token_id)
        seqs = [SequenceBlocks(self.allocator, self.block_size) for _ in prompts]
        try:
            # ---- prefill: all prompts packed into one forward -------------------------------------
            lens = [len(r.prompt_ids) for r in results]
            slots = [s for seq, n in zip(seqs, lens, strict=True) for s in seq.append(n)]
            meta = prefill_metadata(lens, lens, [s.blocks for s in seqs], slots, device=dev)
            ids = torch.tensor([t for r in results for t in r.prompt_ids], device=dev)
            pos = torch.cat([torch.arange(n) for n in lens]).to(dev)
            last = torch.tensor(lens, device=dev).cumsum(0) - 1
            logits = self.model(ids, pos, meta, self.cache, logits_indices=last)
            next_tokens = sample(logits, plist, gens).tolist()
            active = list(range(len(results)))
            max_blocks = -(-max(n + p.max_new_tokens for n, p in zip(lens, plist, strict=True)) // self.block_size)
            while True:
                still = []
                for j, i in enumerate(active):
                    if not self._accept(results[i], plist[i], next_tokens[j], eos):
                        still.append(i)
                active = still
                if not active:
                    break
                # ---- one decode step for the active sequences (fixed-shape tensors) -------------
                toks = [results[i].token_ids[-1] for i in active]
                slots = [seqs[i].append(1)[0] for i in active]
                ctx = [seqs[i].num_tokens for i in active]
                meta = decode_metadata(ctx, [seqs[i].blocks for i in active], slots, max_blocks, device=dev)
                pos = torch.tensor(ctx, device=dev) - 1
                logits = self.model(torch.tensor(toks, device=dev), pos, meta, self.cache)
                next_tokens = sample(logits, [plist[i] for i in active], [gens[i] for i in active]).tolist()
        finally:
            for s in seqs:
                s.release()
        return results

    def _accept(self, r: GenerationResult, p: SamplingParams, tok: int, eos: set[int]) -> bool:
        """Append ``tok`` to ``r`` unless it stops; returns True when ``r`` is finished."""
        if tok in p.stop_token_ids or (tok in eos and not p.ignore_eos):
            r.finish_reason = "stop"
            self._finish_text(r, p)
            return True
        r.token_ids.append(tok)
        if p.stop and self.tokenizer is not None:
            text = self.tokenizer.decode(r.token_ids)
            hits = [text.find(s) for s in p.stop if s and s in text]
            if hits:
                r.text, r.finish_reason = text[: min(hits)], "stop"
                return True
        if len(r.token_ids) >= p.max_new_tokens:
            r.finish_reason = "length"
            self._finish_text(r, p)
            return True
        return False

    def _finish_text(self, r: GenerationResult, p: SamplingParams) -> None:
        if self.tokenizer is not None and r.text is None:
            r.text = self.tokenizer.decode(r.token_ids)
