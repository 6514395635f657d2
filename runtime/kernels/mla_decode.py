"""Absorbed multi-head latent attention for a decode step, straight from the paged latent cache.

In the absorbed form every head attends over the same cached rows ``[latent (R) | roped key (Dr)]``: the
query is ``[q_nope·W_UK | q_pe]`` per head and the output ``p·latent`` is taken through ``W_UV`` later.
That is multi-query attention with one 576-wide key and a 512-wide value, so one program serves up to 16
heads of a sequence (all of them for V2-Lite, or a TP rank's share) with two tensor-core products per tile
of cached rows; more heads (DeepSeek-V2/V3's 128 on one GPU) take more programs, each re-reading the rows
from L2.

The kernel walks the block table itself (no gathered copy of the cache, no mask tensor) and splits long
contexts across programs (flash-decoding): each split writes its normalized output and log-sum-exp, and a
few elementwise ops combine them. The split count is fixed by the block table's width, so the step keeps
static shapes for CUDA graphs; the rows of each split follow the sequence's real context (a table as wide
as the longest context a model allows must not leave a short sequence's rows all in one program). Rows
with context 0 (padding of a graph bucket) read the one scratch slot their table points at, as the
reference does.
"""

from __future__ import annotations

import torch

from runtime.kernels import HAS_TRITON, triton_usable

BLOCK_S = 32  # cached rows per tile
HEAD_BLOCK = 16  # heads per program: the fp32 accumulator is HEAD_BLOCK x kv_lora_rank
SPLIT_MIN = 32  # rows per split at least (one tile): at batch 1 the split count sets the parallelism
MAX_PROGRAMS = 264  # splits are added until B·splits reaches this (2 per H200/H100 SM)

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _mla_decode_kernel(
        q_ptr,
        cache_ptr,
        tables_ptr,
        ctx_ptr,
        o_ptr,
        lse_ptr,
        n_heads,
        scale,
        split_len,
        stride_qb,
        stride_qh,
        stride_cb,
        stride_cs,
        stride_tb,
        stride_ob,
        stride_os,
        stride_oh,
        stride_lb,
        stride_ls,
        R,
        DR,
        RP: tl.constexpr,
        DRP: tl.constexpr,
        HP: tl.constexpr,
        PAGE: tl.constexpr,
        BLOCK_S: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        b = tl.program_id(0)
        sp = tl.program_id(1)
        ctx = tl.maximum(tl.load(ctx_ptr + b), 1)
        # the grid is sized for the widest context the block table allows (static for CUDA graphs); the rows a
        # program takes are sized by this sequence's real context, so a short one is spread over as many
        # programs as it has tiles instead of all landing in the first split
        per = tl.cdiv(tl.cdiv(ctx, tl.num_programs(1)), BLOCK_S) * BLOCK_S
        rows = tl.minimum(tl.maximum(per, BLOCK_S), split_len)
        start = sp * rows
        end = tl.minimum(ctx, start + rows)
        offs_h = tl.program_id(2) * HP + tl.arange(0, HP)  # this program's block of heads
        h_mask = offs_h < n_heads
        offs_r = tl.arange(0, RP)  # widths padded to powers of two (and >= 16 for the tensor cores)
        offs_dr = tl.arange(0, DRP)
        r_mask = offs_r < R
        dr_mask = offs_dr < DR
        q_row = q_ptr + b * stride_qb + offs_h[:, None] * stride_qh
        q_lat = tl.load(q_row + offs_r[None, :], mask=h_mask[:, None] & r_mask[None, :], other=0.0)
        q_pe = tl.load(q_row + R + offs_dr[None, :], mask=h_mask[:, None] & dr_mask[None, :], other=0.0)
        m_i = tl.full([HP], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([HP], dtype=tl.float32)
        acc = tl.zeros([HP, RP], dtype=tl.float32)
        for s0 in range(start, end, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            s_mask = offs_s < end
            blk = tl.load(tables_ptr + b * stride_tb + offs_s // PAGE, mask=s_mask, other=0)
            row = cache_ptr + blk * stride_cb + (offs_s % PAGE) * stride_cs
            kv = tl.load(row[:, None] + offs_r[None, :], mask=s_mask[:, None] & r_mask[None, :], other=0.0)
            kpe = tl.load(row[:, None] + R + offs_dr[None, :], mask=s_mask[:, None] & dr_mask[None, :], other=0.0)
            s = tl.dot(q_lat, tl.trans(kv), input_precision=PRECISION) + tl.dot(
                q_pe, tl.trans(kpe), input_precision=PRECISION
            )
            s = tl.where(s_mask[None, :], s * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(kv.dtype), kv, input_precision=PRECISION)
            m_i = m_new
        has = l_i > 0
        o = acc / tl.where(has, l_i, 1.0)[:, None]
        lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(
            o_ptr + b * stride_ob + sp * stride_os + offs_h[:, None] * stride_oh + offs_r[None, :],
            o,
            mask=h_mask[:, None] & r_mask[None, :],
        )
        tl.store(lse_ptr + b * stride_lb + sp * stride_ls + offs_h, lse, mask=h_mask)


def num_splits(batch: int, max_rows: int) -> tuple[int, int]:
    """(splits, rows per split) for a block table of ``max_rows`` rows: enough programs to occupy the card
    at small batch, never a split shorter than ``SPLIT_MIN`` rows; a multiple of ``BLOCK_S``."""
    n = max(1, min(-(-max_rows // SPLIT_MIN), -(-MAX_PROGRAMS // batch)))
    rows = -(-max_rows // n)
    rows = -(-rows // BLOCK_S) * BLOCK_S
    return -(-max_rows // rows), rows


def mla_decode_triton(
    q: torch.Tensor,
    cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    kv_lora_rank: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, nh, R + Dr], cache [num_blocks, page, R + Dr] → per split: output [B, S, nh, R] and log-sum-exp
    [B, S, nh], fp32 (combine with :func:`combine_splits`)."""
    B, nh, D = q.shape
    R, page = kv_lora_rank, cache.shape[1]
    n_split, split_len = num_splits(B, block_tables.shape[1] * page)
    o = torch.empty(B, n_split, nh, R, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, n_split, nh, dtype=torch.float32, device=q.device)
    q, tables = q.contiguous(), block_tables.contiguous()
    pow2 = triton.next_power_of_2
    head_blocks = triton.cdiv(nh, HEAD_BLOCK)
    head_pad = HEAD_BLOCK if head_blocks > 1 else max(16, pow2(nh))
    _mla_decode_kernel[(B, n_split, head_blocks)](
        q, cache, tables, context_lens, o, lse, nh, scale, split_len,
        q.stride(0), q.stride(1), cache.stride(0), cache.stride(1), tables.stride(0),
        o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1),
        R, D - R, RP=max(16, pow2(R)), DRP=max(16, pow2(D - R)), HP=head_pad,
        PAGE=page, BLOCK_S=BLOCK_S,
        # fp32 (tests, CPU-parity runs on a GPU) multiplies in full precision, not TF32
        PRECISION="ieee" if q.dtype == torch.float32 else None, num_warps=4, num_stages=2,
    )  # fmt: skip
    return o, lse


def combine_splits(o: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Per-split outputs weighted by their share of the softmax mass → [B, nh, R] (fp32). Empty splits
    have lse -inf and weight 0. Plain tensor ops, so inside compiled code they fuse into one kernel."""
    if o.shape[1] == 1:
        return o[:, 0]
    return (o * torch.softmax(lse, dim=1)[..., None]).sum(dim=1)


def mla_decode_reference(
    q: torch.Tensor,
    cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    kv_lora_rank: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same in PyTorch over a gathered copy of the sequences' cache rows (fp32 scores)."""
    B = q.shape[0]
    kv = cache[block_tables].view(B, -1, cache.shape[-1])
    hidden = torch.arange(kv.shape[1], device=q.device)[None, :] >= context_lens.clamp(min=1)[:, None]
    scores = (torch.bmm(q.float(), kv.float().transpose(1, 2)) * scale).masked_fill(hidden[:, None], float("-inf"))
    o = torch.bmm(scores.softmax(dim=-1), kv[..., :kv_lora_rank].float())
    return o[:, None], torch.logsumexp(scores, dim=-1)[:, None]  # one "split"


@torch.library.custom_op("moefleet::mla_decode", mutates_args=())
def mla_decode(
    q: torch.Tensor,
    cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    kv_lora_rank: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed-MLA attention of one new token per sequence over its cached rows, per context split:
    (output [B, S, nh, kv_lora_rank], log-sum-exp [B, S, nh]), fp32; :func:`combine_splits` → [B, nh, r]."""
    fn = mla_decode_triton if triton_usable(q) else mla_decode_reference
    return fn(q, cache, block_tables, context_lens, scale, kv_lora_rank)


@mla_decode.register_fake
def _(q, cache, block_tables, context_lens, scale, kv_lora_rank):
    B, nh = q.shape[0], q.shape[1]
    n = num_splits(B, block_tables.shape[1] * cache.shape[1])[0] if triton_usable(q) else 1
    return q.new_empty(B, n, nh, kv_lora_rank, dtype=torch.float32), q.new_empty(B, n, nh, dtype=torch.float32)
