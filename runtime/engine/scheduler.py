"""Who runs each engine step: the waiting queue, the running batch, and the policy between them.

Per step the scheduler (1) continues chunked prefills of running sequences, (2) admits waiting sequences
first-come-first-served while the batch, the KV pool (counting blocks already promised to running
sequences) and the per-step prefill-token budget allow, then (3) decodes every prefilled sequence.
The prefill budget is what keeps a long prompt from stalling everyone's decode: it is split into
chunks across steps, and each step still decodes the whole running batch. Admission never skips the
head of the queue, so a large request cannot be starved by a stream of small ones.

The policy functions (:func:`plan_prefill`, :func:`group_by_length`, :func:`padded_slots`) work on any
sequence-like objects, so they can be reasoned about (and tested) on their own; :class:`Scheduler` applies
them to the engine's queues.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from runtime.engine.sequence import Sequence
from runtime.kv_cache import BlockAllocator, SequenceBlocks

#: a padded prefill group must be at least this full of real tokens (the model's own rule for its
#: batched-attention path; below it, it loops over sequences with no padding at all)
MIN_FILL = 0.75


@dataclass
class PrefillChunk:
    seq: object  # runtime.engine.sequence.Sequence
    start: int  # first prompt position in this chunk
    length: int

    @property
    def fresh(self) -> bool:
        """Whole prompt in one go, no cached prefix: eligible for padded batched attention."""
        return self.start == 0 and self.length == self.seq.prompt_len


def group_by_length(chunks: Seq[PrefillChunk]) -> list[list[PrefillChunk]]:
    """Length-aware grouping (the source document's "dynamic padding"): sort by length and cut a new group when
    adding the next chunk would make the right-padded group less than ``MIN_FILL`` real tokens.
    Chunks with a cached prefix go into one group of their own (attention loops over them unpadded)."""
    fresh = sorted((c for c in chunks if c.fresh), key=lambda c: -c.length)
    rest = [c for c in chunks if not c.fresh]
    groups: list[list[PrefillChunk]] = []
    cur: list[PrefillChunk] = []
    total = 0
    for c in fresh:
        if cur and (total + c.length) < MIN_FILL * (len(cur) + 1) * cur[0].length:
            groups.append(cur)
            cur, total = [], 0
        cur.append(c)
        total += c.length
    if cur:
        groups.append(cur)
    if rest:
        groups.append(rest)
    return groups


def padded_slots(lengths: Seq[int], contexts: Seq[int]) -> int:
    """Padding the model's prefill attention really adds for one forward (mirrors
    ``AttentionMetadata.padded_index``: padded only for ≥ 2 fresh sequences that are ≥ 75% full)."""
    ql, cl = list(lengths), list(contexts)
    if len(ql) < 2 or ql != cl or sum(ql) < MIN_FILL * len(ql) * max(ql):
        return 0
    return len(ql) * max(ql) - sum(ql)


def plan_prefill(
    partial: Seq[object],
    waiting: Seq[object],
    *,
    budget: int,
    free_seq_slots: int,
    free_blocks: int,
    block_size: int,
) -> tuple[list[PrefillChunk], int]:
    """Chunks to prefill this step and how many sequences from the head of ``waiting`` to admit.

    ``partial``: running sequences whose prompt is not fully cached yet (served first, in order).
    ``free_blocks``: pool blocks not held and not promised to running sequences."""
    chunks: list[PrefillChunk] = []
    for s in partial:
        if budget <= 0:
            break
        n = min(s.prompt_len - s.num_computed, budget)
        chunks.append(PrefillChunk(s, s.num_computed, n))
        budget -= n
    admitted = 0
    for s in waiting:
        if budget <= 0 or free_seq_slots <= 0:
            break
        need = s.total_blocks(block_size)
        if need > free_blocks:
            break  # FCFS: wait for room rather than let later requests overtake
        n = min(s.prompt_len, budget)
        chunks.append(PrefillChunk(s, 0, n))
        budget -= n
        free_blocks -= need
        free_seq_slots -= 1
        admitted += 1
    return chunks, admitted


@dataclass
class ScheduledStep:
    """What one engine step runs: prefill chunks grouped into forwards, then one decode step."""

    prefill_groups: list[list[PrefillChunk]]
    decode: list[Sequence]


class Scheduler:
    """The engine's sequences between admission and finish: ``waiting`` (FCFS) and ``running`` (holding KV
    blocks). Other threads append to ``waiting`` under the engine's lock; everything else is the engine
    thread's."""

    def __init__(self, allocator: BlockAllocator, block_size: int, max_num_seqs: int, max_prefill_tokens: int) -> None:
        self.allocator, self.block_size = allocator, block_size
        self.max_num_seqs, self.max_prefill_tokens = max_num_seqs, max_prefill_tokens
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []

    def schedule(self) -> ScheduledStep:
        """This step's work (call under the engine's lock: it takes from ``waiting``). Sequences whose prompt
        completes in this step's prefill decode from the next step on; chunks count as computed once
        scheduled."""
        decode = [s for s in self.running if s.prefilled]
        partial = [s for s in self.running if not s.prefilled]
        chunks, admitted = plan_prefill(
            partial,
            self.waiting,
            budget=self.max_prefill_tokens,
            free_seq_slots=self.max_num_seqs - len(self.running),
            free_blocks=self.allocator.num_free - self._reserved_blocks(),
            block_size=self.block_size,
        )
        for _ in range(admitted):
            s = self.waiting.popleft()
            s.blocks = SequenceBlocks(self.allocator, self.block_size)
            self.running.append(s)
        for c in chunks:
            c.seq.num_computed += c.length
        return ScheduledStep(group_by_length(chunks), decode)

    def _reserved_blocks(self) -> int:
        return sum(s.outstanding_blocks(self.block_size) for s in self.running)

    def remove_waiting(self, ids: set[str]) -> list[Sequence]:
        """Take the sequences with these ids out of the queue (call under the engine's lock)."""
        gone = [s for s in self.waiting if s.id in ids]
        for s in gone:
            self.waiting.remove(s)
        return gone

    def finish(self, s: Sequence) -> None:
        """``s`` leaves the batch; its blocks return to the pool."""
        if s.blocks is not None:
            s.blocks.release()
        if s in self.running:
            self.running.remove(s)
