"""Who runs each engine step: the waiting queue, the running batch, and the policy between them.

Each step has a token budget (``max_num_batched_tokens``). Every running sequence that has finished its
prefill gets its one decode token first; the rest of the budget, capped by the engine's pacer so that
the decodes are not stalled (:mod:`runtime.engine.pacing`), goes to prompts, in chunks: running
sequences whose prefill is not complete continue (oldest first), then waiting sequences are admitted
first-come-first-served while the batch (``max_num_seqs``), the budget and the free KV blocks allow. A
long prompt is therefore spread over several steps and never stalls the running decodes.

KV blocks are taken as sequences grow: a step holds only the blocks its tokens need (a client's
``max_tokens`` reserves nothing). When the pool runs dry, the newest running sequences are preempted
(recompute, as vLLM does): their blocks go back to the pool and they return to the front of the waiting
queue; when readmitted, their prompt and the tokens generated so far are prefilled again, and generation
continues where it stopped. The oldest sequence can always grow (the engine refuses requests that
could not fit the pool alone), so the batch always makes progress.

With prefix caching, an admitted sequence first takes the cached blocks that hold its leading full
blocks (matched by content hash, see :mod:`runtime.kv_cache`): its prefill starts at the first uncached
token. Full blocks are registered once written: prompt blocks when their chunk is scheduled, generated
ones as decoding fills them (a follow-up turn that repeats the conversation hits both). Admission
never skips the head of the queue, so a large request cannot be starved by small ones.

The grouping functions (:func:`group_by_length`, :func:`padded_slots`) work on any chunk-like objects;
:class:`Scheduler` applies the policy to the engine's queues.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from runtime.engine.pacing import PrefillPacer
from runtime.engine.sequence import Sequence
from runtime.kv_cache import MIN_FILL, BlockAllocator, SequenceBlocks, block_hash, cached_batch, fresh_batch


@dataclass
class PrefillChunk:
    seq: object  # runtime.engine.sequence.Sequence
    start: int  # first prompt position in this chunk
    length: int

    @property
    def fresh(self) -> bool:
        """Whole prefill in one go, no cached prefix: eligible for padded batched attention."""
        return self.start == 0 and self.length == self.seq.prefill_len


def group_by_length(chunks: Seq[PrefillChunk]) -> list[list[PrefillChunk]]:
    """Length-aware grouping (the source document's "dynamic padding"): sort by length and cut a new group when
    adding the next chunk would make the right-padded group less than ``MIN_FILL`` real tokens. Chunks over
    cached context (a cached prefix, or a prompt's earlier chunks) are grouped apart, sorted by context, and a
    group is cut when either their chunk lengths or their context lengths would fall below ``MIN_FILL``: the
    model attends to such a group as one padded batch too (``AttentionMetadata.cached_padded_index``)."""
    fresh = sorted((c for c in chunks if c.fresh), key=lambda c: -c.length)
    rest = sorted((c for c in chunks if not c.fresh), key=lambda c: (-(c.start + c.length), -c.length))
    return _fill_groups(fresh, lambda c: (c.length,)) + _fill_groups(rest, lambda c: (c.length, c.start + c.length))


def _fill_groups(
    chunks: list[PrefillChunk], lengths: Callable[[PrefillChunk], tuple[int, ...]]
) -> list[list[PrefillChunk]]:
    """Greedy cuts over sorted chunks: in each group, every one of ``lengths(chunk)`` stays ``MIN_FILL`` full
    when right-padded (running sums and maxima: a step can hold hundreds of chunks)."""
    groups: list[list[PrefillChunk]] = []
    cur: list[PrefillChunk] = []
    totals: list[int] = []
    tops: list[int] = []
    for c in chunks:
        ls = lengths(c)
        if cur:
            n = len(cur) + 1
            grown = [(t + x, max(m, x)) for t, m, x in zip(totals, tops, ls, strict=True)]
            if all(t >= MIN_FILL * n * m for t, m in grown):
                cur.append(c)
                totals, tops = [t for t, _ in grown], [m for _, m in grown]
                continue
            groups.append(cur)
        cur, totals, tops = [c], list(ls), list(ls)
    if cur:
        groups.append(cur)
    return groups


def padded_slots(lengths: Seq[int], contexts: Seq[int]) -> int:
    """Query rows of padding the model's prefill attention really adds for one group (mirrors
    ``AttentionMetadata.padded_index`` and ``cached_padded_index``: padded only for ≥ 2 sequences that are
    ≥ 75% full, fresh ones, or ones over cached context whose contexts are that close too)."""
    if not (fresh_batch(lengths, contexts) or cached_batch(lengths, contexts)):
        return 0
    return len(lengths) * max(lengths) - sum(lengths)


#: admission keeps this share of the pool free for the running sequences' next tokens (fewer preemptions)
WATERMARK = 0.01


@dataclass
class ScheduledStep:
    """What one engine step runs: prefill chunks, grouped for attention (one forward for all of them), and
    the decodes (in the same forward with mixed steps, else one decode step after it)."""

    prefill_groups: list[list[PrefillChunk]]
    decode: list[Sequence]
    preempted: list[Sequence] = field(default_factory=list)
    cache_queries: int = 0  # prompt tokens looked up in the prefix cache at admission
    cache_hits: int = 0  # of which found cached
    paced: bool = False  # the pacer's cap, not the token budget, left prompt tokens for later steps

    @property
    def num_tokens(self) -> int:
        return len(self.decode) + sum(c.length for g in self.prefill_groups for c in g)


class Scheduler:
    """The engine's sequences between admission and finish: ``waiting`` (FCFS) and ``running`` (holding KV
    blocks, in admission order). Other threads append to ``waiting`` under the engine's lock; everything
    else is the engine thread's."""

    def __init__(
        self, allocator: BlockAllocator, block_size: int, max_num_seqs: int, max_num_batched_tokens: int
    ) -> None:
        self.allocator, self.block_size = allocator, block_size
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.watermark = int(WATERMARK * allocator.capacity)
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def schedule(self, pacer: PrefillPacer | None = None) -> ScheduledStep:
        """This step's work (call under the engine's lock: it takes from and returns to ``waiting``). Blocks
        for every scheduled token are held on return; chunks count as computed once scheduled. Sequences
        whose prefill completes in this step decode from the next step on. ``pacer``: caps the prompt
        tokens taken beside running decodes (see :mod:`runtime.engine.pacing`)."""
        step = ScheduledStep([], [])
        decoding = sum(s.prefilled for s in self.running)
        budget = max(0, self.max_num_batched_tokens - decoding)
        # sequences that may get prompt tokens this step: partly prefilled ones, and as many waiting as the
        # batch has room for (a queue behind a full batch is not a ramp-up)
        starting = len(self.running) - decoding + min(len(self.waiting), self.max_num_seqs - len(self.running))
        cap = pacer.prompt_budget(decoding, starting) if pacer is not None else None
        capped = cap is not None and cap < budget
        if capped:
            budget = cap
        chunks: list[PrefillChunk] = []
        i = 0
        while i < len(self.running):
            s = self.running[i]
            n = 1 if s.prefilled else min(s.prefill_len - s.num_computed, budget)
            if n <= 0:
                i += 1
                continue
            while s.blocks.blocks_needed(n) > self.allocator.num_free:
                victim = self.running[-1]  # the newest: never scheduled yet this step (we go oldest first)
                self._preempt(victim)
                step.preempted.append(victim)
                if victim is s:
                    break
            if s.blocks is None:  # preempted itself: it was the newest, nothing follows
                break
            s.blocks.reserve(n)
            if s.prefilled:
                step.decode.append(s)
                self._seal_generated(s)
            else:
                chunks.append(PrefillChunk(s, s.num_computed, n))
                budget -= n
            i += 1
        if not step.preempted:  # the pool is tight when something was preempted: admit nobody this step
            budget = self._admit(budget, chunks, step)
        step.paced = capped and budget == 0 and self._prompts_left(chunks)
        for c in chunks:
            c.seq.num_computed += c.length
            c.seq.blocks.seal(c.seq.token_ids, c.seq.num_computed)
        step.prefill_groups = group_by_length(chunks)
        return step

    def _prompts_left(self, chunks: list[PrefillChunk]) -> bool:
        """Prompt tokens this step could have taken beyond ``chunks`` (before they count as computed): a
        chunk that does not finish its prompt, a partly prefilled sequence left without a chunk, or a waiting
        sequence with room in the batch."""
        if any(c.seq.num_computed + c.length < c.seq.prefill_len for c in chunks):
            return True
        chunked = {c.seq for c in chunks}
        if any(not s.prefilled and s not in chunked for s in self.running):
            return True
        return bool(self.waiting) and len(self.running) < self.max_num_seqs

    def _admit(self, budget: int, chunks: list[PrefillChunk], step: ScheduledStep) -> int:
        bs, alloc = self.block_size, self.allocator
        now = time.monotonic()
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            s = self.waiting[0]
            tokens = s.token_ids
            target = len(tokens)
            hits, hashes = self._cached_prefix(tokens)
            cached = len(hits) * bs
            n = min(target - cached, budget)
            need = -(-(cached + n) // bs) - len(hits) + sum(alloc.is_evictable(b) for b in hits)
            reserve = self.watermark if self.running else 0
            if need + reserve > alloc.num_free:
                break  # FCFS: wait for room rather than let later requests overtake
            self.waiting.popleft()
            s.blocks = SequenceBlocks(alloc, bs)
            s.blocks.adopt_cached(hits, hashes)
            s.blocks.reserve(n)
            s.prefill_len, s.num_computed = target, cached
            self.running.append(s)
            if s.scheduled_at is None:
                s.scheduled_at = now
            chunks.append(PrefillChunk(s, cached, n))
            budget -= n
            if not s.warmup:
                step.cache_queries += target
                step.cache_hits += cached
        return budget

    def _cached_prefix(self, tokens: list[int]) -> tuple[list[int], list[int]]:
        """Cached blocks holding the leading full blocks of ``tokens`` (at most all but the last token: the
        prefill must compute at least one, whose logits give the next token), and their hashes."""
        if not self.allocator.caching:
            return [], []
        bs, blocks, hashes = self.block_size, [], []
        for j in range((len(tokens) - 1) // bs):
            h = block_hash(hashes[-1] if hashes else None, tokens[j * bs : (j + 1) * bs])
            b = self.allocator.cached(h)
            if b is None:
                break
            blocks.append(b)
            hashes.append(h)
        return blocks, hashes

    def _seal_generated(self, s: Sequence) -> None:
        """Register the blocks that decode steps filled (a later prompt that repeats this conversation hits
        them). Only positions whose token the host has read: with overlapped decode, the newest token
        can still be on the device, its KV written but not yet in ``output_ids``."""
        b = s.blocks
        known = min(b.num_tokens, s.prompt_len + len(s.output_ids))
        if self.allocator.caching and known // self.block_size > len(b.hashes):
            b.seal(s.token_ids, known)

    def _preempt(self, s: Sequence) -> None:
        """Recompute preemption: ``s`` gives its blocks back and waits at the head of the queue."""
        self.running.remove(s)
        s.blocks.release()
        s.blocks = None
        s.num_computed = s.prefill_len = 0
        s.preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(s)

    def remove_waiting(self, ids: set[str]) -> list[Sequence]:
        """Take the sequences with these ids out of the queue (call under the engine's lock)."""
        gone = [s for s in self.waiting if s.id in ids]
        for s in gone:
            self.waiting.remove(s)
        return gone

    def finish(self, s: Sequence) -> None:
        """``s`` leaves the batch (or the queue, if it finished while preempted); its blocks return to the
        pool. Call under the engine's lock."""
        if s.blocks is not None:
            s.blocks.release()
            s.blocks = None
        if s in self.running:
            self.running.remove(s)
        elif s in self.waiting:
            self.waiting.remove(s)
