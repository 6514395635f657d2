"""prometheus-client objects built from :mod:`runtime.contract`, on a registry of our own.

Every metric the service exports is declared once in the contract; this module only turns those
declarations into live objects, so the names infra alerts on cannot drift from what is exported. Every
series carries the served model's name (``model_name``, as vLLM's do): the attributes of
:class:`ServiceMetrics` are already bound to it, so callers pass only the other labels.
Gauges that are cheap to read at scrape time (process memory, NVML) are refreshed by
:meth:`ServiceMetrics.refresh_scrape_time`; the engine sets its own gauges once per step.
"""

from __future__ import annotations

import contextlib
import logging
import os

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from runtime import contract as c

log = logging.getLogger(__name__)

# ``*_created`` series double the exposition and nothing here reads them.
disable_created_metrics()

__all__ = ["CONTENT_TYPE_LATEST", "ServiceMetrics"]


def build(defn: c.MetricDef, registry: CollectorRegistry):
    """One prometheus-client object for a contract entry (counters drop ``_total``: the client adds it)."""
    if defn.type == "counter":
        name = defn.name.removesuffix("_total")
        return Counter(name, defn.help, defn.labels, registry=registry)
    if defn.type == "gauge":
        return Gauge(defn.name, defn.help, defn.labels, registry=registry)
    if defn.type == "histogram":
        return Histogram(defn.name, defn.help, defn.labels, buckets=defn.buckets, registry=registry)
    raise ValueError(f"unknown metric type {defn.type!r} for {defn.name}")


class _Bound:
    """A labelled family with its leading ``model_name`` label fixed: ``.labels(*rest)`` gives a child."""

    def __init__(self, family, model_name: str) -> None:
        self.family, self.model_name = family, model_name

    def labels(self, *values: str):
        return self.family.labels(self.model_name, *values)


def bind(family, defn: c.MetricDef, model_name: str):
    """The child for ``model_name`` when that is the only label, else a :class:`_Bound`."""
    if defn.labels == (c.LABEL_MODEL_NAME,):
        return family.labels(model_name)
    return _Bound(family, model_name)


class _NVML:
    """GPU utilisation/memory through nvidia-ml-py; silently absent on machines without a driver."""

    def __init__(self) -> None:
        self.handles: list = []
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:  # no library, no driver, no GPU: all the same to us
            self.handles = []

    def read(self) -> list[tuple[int, float, int]]:
        out = []
        for i, h in enumerate(self.handles):
            with contextlib.suppress(Exception):
                util = self.nvml.nvmlDeviceGetUtilizationRates(h).gpu
                mem = self.nvml.nvmlDeviceGetMemoryInfo(h).used
                out.append((i, float(util), int(mem)))
        return out


class ServiceMetrics:
    """All service metrics; attribute names are the contract constant names in lower case."""

    def __init__(self, model_name: str = "", registry: CollectorRegistry | None = None) -> None:
        """``model_name``: the value of every series' ``model_name`` label."""
        self.registry = registry or CollectorRegistry()
        self.model_name = model_name
        self.objects = {d.name: build(d, self.registry) for d in c.METRICS}
        m = {d.name: bind(self.objects[d.name], d, model_name) for d in c.METRICS}
        self.e2e_latency = m[c.E2E_LATENCY.name]
        self.ttft = m[c.TIME_TO_FIRST_TOKEN.name]
        self.tpot = m[c.TIME_PER_OUTPUT_TOKEN.name]
        self.queue_time = m[c.REQUEST_QUEUE_TIME.name]
        self.prefill_time = m[c.REQUEST_PREFILL_TIME.name]
        self.iteration_tokens = m[c.ITERATION_TOKENS.name]
        self.running = m[c.REQUESTS_RUNNING.name]
        self.waiting = m[c.REQUESTS_WAITING.name]
        self.queue_capacity = m[c.QUEUE_CAPACITY.name]
        self.batch_size = m[c.BATCH_SIZE.name]
        self.prompt_tokens = m[c.PROMPT_TOKENS.name]
        self.generation_tokens = m[c.GENERATION_TOKENS.name]
        self.kv_usage = m[c.KV_CACHE_USAGE.name]
        self.kv_blocks = m[c.KV_CACHE_BLOCKS.name]
        self.preemptions = m[c.PREEMPTIONS.name]
        self.paced_steps = m[c.PACED_STEPS.name]
        self.prefix_cache_queries = m[c.PREFIX_CACHE_QUERIES.name]
        self.prefix_cache_hits = m[c.PREFIX_CACHE_HITS.name]
        self.padding_ratio = m[c.PADDING_RATIO.name]
        self.rejected = m[c.REQUESTS_REJECTED.name]
        self.success = m[c.REQUEST_SUCCESS.name]
        self.errors = m[c.REQUEST_ERRORS.name]
        self.expert_imbalance = m[c.EXPERT_LOAD_IMBALANCE.name]
        self.risk_predictions = m[c.RISK_PREDICTIONS.name]
        self.feedback = m[c.FEEDBACK.name]
        self.risk_labelled = m[c.RISK_LABELLED.name]
        self.risk_correct = m[c.RISK_CORRECT.name]
        self.records_pending = m[c.RISK_RECORDS_PENDING.name]
        self.records_dropped = m[c.RISK_RECORDS_DROPPED.name]
        self.accuracy_rolling = m[c.ACCURACY_ROLLING.name]
        self.accuracy_baseline = m[c.ACCURACY_BASELINE.name]
        self.gpu_util = m[c.GPU_UTILIZATION.name]
        self.gpu_mem = m[c.GPU_MEMORY_USED.name]
        self.rss = m[c.PROCESS_RESIDENT_MEMORY.name]
        self.ready = m[c.MODEL_READY.name]
        # Labelled series exist from the start so rate() and absent() behave before the first event.
        for r in c.REJECT_REASONS:
            self.rejected.labels(r)
        for r in c.FINISH_REASONS:
            self.success.labels(r)
        self.errors.labels("internal")
        self._nvml = _NVML()
        try:
            import psutil

            self._proc = psutil.Process(os.getpid())
        except Exception:  # psutil is a runtime dependency; keep /metrics alive without it anyway
            self._proc = None

    def refresh_scrape_time(self) -> None:
        if self._proc is not None:
            self.rss.set(self._resident_bytes())
        for i, util, mem in self._nvml.read():
            self.gpu_util.labels(str(i)).set(util)
            self.gpu_mem.labels(str(i)).set(mem)

    def _resident_bytes(self) -> int:
        """This process and its descendants (the engine process, compile workers): what the pod holds."""
        import psutil

        total = self._proc.memory_info().rss
        for child in self._proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):  # gone since it was listed
                total += child.memory_info().rss
        return total

    def render(self) -> bytes:
        self.refresh_scrape_time()
        return generate_latest(self.registry)
