"""The engine's share of the service metrics: per-step gauges, token counters and request outcomes.

The engine thread reports here as it works; nothing is read back. Counters are updated once per step, not
per token, and the expert-load imbalance gauge once per window (reading it syncs with the device).
"""

from __future__ import annotations

import collections
import time
from typing import TYPE_CHECKING

from runtime.engine.sequence import Sequence
from runtime.interfaces import CausalLM

if TYPE_CHECKING:  # importing runtime.metrics configures prometheus-client process-wide
    from runtime.metrics import ServiceMetrics


class EngineStats:
    def __init__(self, metrics: ServiceMetrics | None, model: CausalLM, imbalance_interval_s: float) -> None:
        self.metrics, self.model = metrics, model
        self.imbalance_interval_s = imbalance_interval_s
        self._imbalance_at = time.monotonic()
        # (padding rows, total rows) of the last forwards: the padding-ratio gauge
        self._pad_window: collections.deque[tuple[int, int]] = collections.deque(maxlen=64)
        self._generated = 0  # tokens accepted this step

    def kv_pool(self, capacity: int) -> None:
        if self.metrics is not None:
            self.metrics.kv_blocks.set(capacity)

    def prefill(self, prompt_tokens: int, padding: int) -> None:
        self._pad_window.append((padding, prompt_tokens + padding))
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(prompt_tokens)

    def scheduled(self, preempted: int, cache_queries: int, cache_hits: int, paced: bool = False) -> None:
        """A step's preemptions, its admissions' prefix-cache lookups (in tokens), and whether the decode-stall
        bound held prompt tokens back."""
        m = self.metrics
        if m is None:
            return
        if preempted:
            m.preemptions.inc(preempted)
        if paced:
            m.paced_steps.inc()
        if cache_queries:
            m.prefix_cache_queries.inc(cache_queries)
            m.prefix_cache_hits.inc(cache_hits)

    def step(self, tokens: int) -> None:
        """A step ran ``tokens`` tokens (decodes and prompt chunks)."""
        if self.metrics is not None and tokens:
            self.metrics.iteration_tokens.observe(tokens)

    def decode(self, batch: int, rows: int) -> None:
        """A decode step of ``batch`` sequences over ``rows`` rows (a CUDA graph's bucket, or the batch)."""
        self._pad_window.append((rows - batch, rows))
        if self.metrics is not None:
            self.metrics.batch_size.set(batch)

    def token(self) -> None:
        self._generated += 1

    def finished(self, s: Sequence, reason: str) -> None:
        m = self.metrics
        if m is None or s.warmup:
            return
        now = time.monotonic()
        if reason == "error":
            m.errors.labels("engine").inc()
        else:
            m.success.labels(reason).inc()
        if reason != "abort":
            m.e2e_latency.observe(now - s.arrival)
            if s.scheduled_at is not None:
                m.queue_time.observe(s.scheduled_at - s.arrival)
            if s.first_token_at is not None:
                m.ttft.observe(s.first_token_at - s.arrival)
                if s.scheduled_at is not None:
                    m.prefill_time.observe(s.first_token_at - s.scheduled_at)
                if len(s.output_ids) > 1:
                    m.tpot.observe((now - s.first_token_at) / (len(s.output_ids) - 1))

    def count_tokens(self) -> None:
        """End of a step's token accounting: one counter update for all of them."""
        if self.metrics is not None and self._generated:
            self.metrics.generation_tokens.inc(self._generated)
        self._generated = 0

    def update_gauges(self, running: int, waiting: int, kv_usage: float) -> None:
        m = self.metrics
        if m is None:
            return
        m.running.set(running)
        m.waiting.set(waiting)
        m.kv_usage.set(kv_usage)
        pad = sum(p for p, _ in self._pad_window)
        total = sum(t for _, t in self._pad_window)
        m.padding_ratio.set(pad / total if total else 0.0)
        now = time.monotonic()
        if now - self._imbalance_at >= self.imbalance_interval_s:
            self._imbalance_at = now
            for layer, ratio in self.model.expert_load_imbalance().items():
                if ratio > 0:
                    m.expert_imbalance.labels(str(layer)).set(ratio)
            self.model.reset_expert_load()
