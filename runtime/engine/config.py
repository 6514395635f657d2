"""The engine's limits and switches (``moe-runtime serve`` flags map onto these one to one)."""

from __future__ import annotations

from dataclasses import dataclass

#: Decode batch sizes captured as CUDA graphs below ``max_num_seqs`` (which is captured too); the memory
#: planner (runtime.plan) sizes their pool from the same list.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


#: A step's token budget on CUDA. A prefill forward's launches cost about as much as its compute at 2,048
#: tokens on an H100 (V2-Lite), so a burst of prompts pays that fixed cost once per step: 8,192 takes 64
#: prompts of 128 tokens in one step (docs/benchmarks.md: 64 streams' inter-token P99 1.35× its P50 instead
#: of 2.1×, 256 streams 10.1k output tok/s). The serving engines we compare with default to the same.
CUDA_BATCHED_TOKENS = 8192


@dataclass
class EngineConfig:
    max_num_seqs: int = 64  # running batch cap (largest decode batch)
    max_queue: int = 256  # waiting sequences + scoring jobs; beyond this, QueueFullError (429)
    # tokens per engine step (decodes first, prompt chunks fill the rest); None: CUDA_BATCHED_TOKENS on
    # CUDA, 512 on CPU
    max_num_batched_tokens: int | None = None
    # while sequences decode, a step's prompt chunks are sized so that it takes at most this many times a
    # decode-only step (stall-free batching, runtime.engine.pacing): inter-token P99 within 2× its P50,
    # with room for the steps' own noise; None: prompts fill the whole budget (more throughput in bursts)
    max_decode_stall: float | None = 1.8
    prefix_caching: bool = True  # share cached full blocks of equal prompt prefixes between requests
    # a step with prompt chunks beside running decodes runs both in one forward (the weights read once);
    # False: a prefill forward, then the (captured) decode step
    mixed_steps: bool = True
    block_size: int = 16
    kv_blocks: int | None = None  # pool size; None: from memory (CUDA) or enough for a full batch (CPU)
    kv_memory_fraction: float = 0.5  # of free device memory, when kv_blocks is None on CUDA
    max_model_len: int | None = None  # prompt + max_tokens per request; default: the model's positions
    cuda_graphs: bool = True
    # launch decode step k+1 (its input tokens fed on the device) before reading step k's tokens, so the GPU
    # does not wait for the host's part of a step; a distributed leader's graphs take host inputs only, so an
    # engine given their capture runs without it
    overlap: bool = True
    compile: bool = True  # CUDA only: compiled layer regions (ExecutionOptions.compile) before graph capture
    imbalance_interval_s: float = 5.0  # window of the expert-load imbalance gauge

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_queue", "max_num_batched_tokens", "block_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_decode_stall is not None and not self.max_decode_stall > 1:
            raise ValueError(f"max_decode_stall must be > 1 (or None: no bound), got {self.max_decode_stall}")
        if self.kv_blocks is not None and self.kv_blocks < 2:
            raise ValueError(f"kv_blocks must be >= 2, got {self.kv_blocks}")
        if not 0 < self.kv_memory_fraction <= 0.95:
            raise ValueError(f"kv_memory_fraction must be in (0, 0.95], got {self.kv_memory_fraction}")

    def batched_tokens(self, device_type: str) -> int:
        """The step's token budget on this device (``max_num_batched_tokens`` or its default)."""
        if self.max_num_batched_tokens is not None:
            return self.max_num_batched_tokens
        return CUDA_BATCHED_TOKENS if device_type == "cuda" else 512
