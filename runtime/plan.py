"""Memory plan of one serving replica: what each GPU holds, and how much paged latent KV cache is left.

Pure arithmetic over a model config (no torch, nothing loaded), so a layout can be checked before any GPU
is bought or booked: ``moe-runtime plan`` prints it, and the deployment sizes are tested against it. Per GPU:

* **weights**, sharded the way :mod:`runtime.parallel.shard` shards them: attention's ``q_proj`` /
  ``q_b_proj``, ``kv_b_proj`` and ``o_proj`` and the dense MLPs and shared experts split ``tp`` ways; the
  routed experts split ``ep`` ways; the latent path (``q_a_proj``, ``kv_a_proj_with_mqa``), norms, router,
  embeddings and LM head replicated. An FP8 checkpoint (``quantization_config.quant_method = "fp8"``) keeps
  its linear layers at 1 byte per weight plus one float32 scale per ``weight_block_size`` block; embeddings,
  norms and the LM head stay in the model dtype, and the router is fp32 whatever the checkpoint holds
  (:class:`runtime.moe.Gate`);
* **activations**: the peak of one engine step, a step of ``max_num_batched_tokens`` tokens (whose last chunk
  may read back a cached prefix of ``max_model_len`` tokens and expand it per head) or a decode of
  ``max_num_seqs`` sequences;
* **CUDA graphs**: the captured decode batches share one memory pool (largest captured first), which keeps
  the largest decode step's intermediates plus every graph's output logits;
* **framework**: the CUDA context with cuBLAS workspaces (0.68 GiB measured on an H100, torch 2.11) and
  NCCL's buffers for each process group the rank is in;
* the **KV cache** gets the rest: per token and layer ``kv_lora_rank + qk_rope_head_dim`` values in the
  model dtype, replicated on every rank (MLA caches one latent per token, shared by all heads), in blocks of
  ``block_size`` tokens with block 0 reserved (:mod:`runtime.kv_cache`).

A plan *fits* when the KV cache left holds at least one sequence of ``max_model_len`` tokens. The
estimates are deliberately simple; the weights are exact to the byte for the runtime's layout.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from runtime.config import ModelConfig
from runtime.engine.config import BATCH_BUCKETS, EngineConfig
from runtime.parallel.layout import LayoutError, ParallelLayout

GIB = 1024**3
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
FP8_FORMATS = ("e4m3", "e5m2")
SCALE_BYTES = 4  # float32 block scales (``weight_scale_inv``)
ROUTER_BYTES = 4  # the router's weight is fp32 at run time (runtime.moe.Gate keeps it so)
#: CUDA context, cuBLAS/cuBLASLt workspaces and loaded kernels: 0.68 GiB measured on an H100 (torch 2.11),
#: rounded up for Triton's and the compiled regions' kernels.
CUDA_CONTEXT_BYTES = int(0.75 * GIB)
#: NCCL's communicator buffers per process group a rank belongs to (channels × peers × NCCL_BUFFSIZE, plus
#: the proxy's): an estimate, not a measurement.
NCCL_GROUP_BYTES = int(0.5 * GIB)
#: A padded prefill batch is used only when real tokens fill at least this share of it (AttentionMetadata).
PADDED_PREFILL_FILL = 0.75


class PlanError(ValueError):
    """An input the planner cannot plan for; names the flag or field, the value and what is allowed."""

    def __init__(self, name: str, value: Any, allowed: str) -> None:
        self.name, self.value, self.allowed = name, value, allowed
        super().__init__(f"{name} {value}: {allowed}")


@dataclass(frozen=True)
class Quantization:
    """A checkpoint's ``quantization_config`` as far as memory goes (only block-wise FP8 exists today)."""

    method: str = "fp8"
    fmt: str = "e4m3"
    block: tuple[int, int] = (128, 128)

    @classmethod
    def of(cls, config: ModelConfig) -> Quantization | None:
        """From the config the runtime parsed (runtime.config validates ``quantization_config``)."""
        q = config.quantization
        return None if q is None else cls(q.quant_method, q.fmt, q.weight_block_size)


def load_config(path: str | Path) -> tuple[ModelConfig, Quantization | None]:
    """A checkpoint folder or a config.json path → the model config and its quantization (None: unquantized)."""
    p = Path(path)
    file = p / "config.json" if p.is_dir() else p
    if not file.is_file():
        where = "no config.json in that folder" if p.is_dir() else "no such file"
        raise PlanError("--model", str(path), f"{where} (give a checkpoint folder or its config.json)")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise PlanError("--model", str(file), f"valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise PlanError("--model", str(file), "a JSON object")
    config = ModelConfig.from_dict(raw)
    return config, Quantization.of(config)


# ---- parameters and weight bytes -------------------------------------------------------------------------


def parameter_count(config: ModelConfig) -> int:
    """Parameters of the whole model the runtime builds (``num_hidden_layers`` layers, no multi-token
    prediction module): the figure DeepSeek publishes (671B for V3, 236B for V2, 15.7B for V2-Lite)."""
    return sum(_Weights(config, None, 4, 1, 1).parameters().values())


class _Weights:
    """Walks the model's tensors as one rank holds them: ``breakdown()`` in bytes, ``parameters()`` in elements."""

    def __init__(self, config: ModelConfig, quant: Quantization | None, dtype_bytes: int, tp: int, ep: int) -> None:
        self.c, self.q, self.db, self.tp, self.ep = config, quant, dtype_bytes, tp, ep
        self._params = False

    def linear(self, out_features: int, in_features: int) -> int:
        n = out_features * in_features
        if self._params:
            return n
        if self.q is None:
            return n * self.db
        bo, bi = self.q.block
        return n + math.ceil(out_features / bo) * math.ceil(in_features / bi) * SCALE_BYTES

    def plain(self, n: int, elem_bytes: int | None = None) -> int:
        """A tensor never quantized (embeddings, norms, biases; the router with ``elem_bytes``)."""
        return n if self._params else n * (elem_bytes or self.db)

    def mlp(self, hidden: int, inter: int) -> int:
        return 2 * self.linear(inter, hidden) + self.linear(hidden, inter)

    def parameters(self) -> dict[str, int]:
        self._params = True
        try:
            return self.breakdown()
        finally:
            self._params = False

    def breakdown(self) -> dict[str, int]:
        c, tp, ep = self.c, self.tp, self.ep
        H, nh = c.hidden_size, c.num_attention_heads // tp
        bias = c.attention_bias
        attn_sharded = attn_replicated = 0
        if c.q_lora_rank is None:
            attn_sharded += self.linear(nh * c.qk_head_dim, H)
        else:
            attn_replicated += self.linear(c.q_lora_rank, H) + self.plain(c.q_lora_rank)  # q_a_proj, its norm
            attn_replicated += self.plain(c.q_lora_rank) if bias else 0
            attn_sharded += self.linear(nh * c.qk_head_dim, c.q_lora_rank)
        attn_replicated += self.linear(c.kv_cache_dim, H) + self.plain(c.kv_lora_rank)  # kv_a_proj_with_mqa, norm
        attn_replicated += self.plain(c.kv_cache_dim) + self.plain(H) if bias else 0  # kv_a and o_proj biases
        attn_sharded += self.linear(nh * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank)  # kv_b_proj
        attn_sharded += self.linear(H, nh * c.v_head_dim)  # o_proj
        L = c.num_hidden_layers
        n_moe = sum(c.is_moe_layer(i) for i in range(L))
        E = c.n_routed_experts
        parts = {
            "attention (tp-sharded)": L * attn_sharded,
            "attention latent path (replicated)": L * attn_replicated,
            "dense MLPs (tp-sharded)": (L - n_moe) * self.mlp(H, c.intermediate_size // tp),
            "routed experts (ep-sharded)": n_moe * (E // ep) * self.mlp(H, c.moe_intermediate_size),
            "shared experts (tp-sharded)": n_moe
            * (self.mlp(H, c.n_shared_experts * c.moe_intermediate_size // tp) if c.n_shared_experts else 0),
            "router (replicated, fp32)": n_moe
            * (self.plain(E * H, ROUTER_BYTES) + (self.plain(E, 4) if c.topk_method == "noaux_tc" else 0)),
            "embeddings + LM head (replicated)": self.plain(c.vocab_size * H) * (1 if c.tie_word_embeddings else 2),
            "norms (replicated)": self.plain((2 * L + 1) * H),
        }
        return parts


def weight_bytes(
    config: ModelConfig, quant: Quantization | None, dtype: str, tp: int = 1, ep: int = 1
) -> dict[str, int]:
    """Bytes of each part of the model on one rank of a ``--tp tp --ep ep`` layout."""
    return _Weights(config, quant, DTYPE_BYTES[dtype], tp, ep).breakdown()


# ---- activations, graphs, framework ----------------------------------------------------------------------


def _layer_peak(c: ModelConfig, T: int, context: int, tp: int, db: int) -> int:
    """Transient bytes of the largest layer of a step of ``T`` tokens attending over ``context`` tokens."""
    nh = c.num_attention_heads // tp
    H = c.hidden_size
    # attention: the q projections, and the context expanded per head (latent read back, kv_b_proj's output,
    # keys with the roped part, values made contiguous for SDPA) plus the mask of a cached prefix; SDPA
    # itself runs the memory-efficient kernel (no [heads, T, context] scores: measured on an H100)
    q = T * ((c.q_lora_rank or 0) + 2 * nh * c.qk_head_dim) * db
    expanded = context * (c.kv_cache_dim + nh * (c.qk_nope_head_dim + 2 * c.v_head_dim + c.qk_head_dim)) * db
    attention = q + expanded + T * context + T * nh * c.v_head_dim * db
    # MoE: router scores (fp32) and T·k dispatched rows: the sorted inputs, gate/up output, the activation
    # and its temporaries, down output and its weighted copy (the grouped-GEMM path on an H100: 143 MiB
    # measured for a 683-token V2-Lite step, 141 MiB estimated; the attention term above over-estimates a
    # 512-token chunk over a 32,768-token context by 18 %: 546 MiB measured)
    rows = T * c.num_experts_per_tok
    moe = 3 * T * c.n_routed_experts * 4 + rows * (5 * H + 4 * c.moe_intermediate_size) * db
    shared = T * 3 * (c.n_shared_experts * c.moe_intermediate_size // tp) * db
    dense = T * 3 * (c.intermediate_size // tp) * db
    return max(attention, moe + shared, dense)


def activation_bytes(c: ModelConfig, dtype: str, tp: int, engine: EngineConfig, max_model_len: int) -> int:
    """Peak of one engine step: the larger of a full prefill step and a full decode step."""
    db = DTYPE_BYTES[dtype]
    H = c.hidden_size
    T = math.ceil(engine.batched_tokens("cuda") / PADDED_PREFILL_FILL)  # a padded batch holds up to this many rows
    prefill = 4 * T * H * db + _layer_peak(c, T, max(T, max_model_len), tp, db)
    return max(prefill, decode_step_bytes(c, dtype, tp, engine.max_num_seqs))


def decode_step_bytes(c: ModelConfig, dtype: str, tp: int, batch: int) -> int:
    """One decode step of ``batch`` sequences: residual stream, the largest layer's transients, and logits
    with the sampler's fp32 copies. (The paged attention kernel's per-split fp32 outputs, at most a few tens
    of MiB, are left out.)"""
    db = DTYPE_BYTES[dtype]
    layer = _layer_peak(c, batch, 0, tp, db)
    logits = batch * c.vocab_size * (db + 2 * 4)
    return 4 * batch * c.hidden_size * db + max(layer, logits)


def graph_batches(engine: EngineConfig) -> list[int]:
    """The decode batch sizes the runner captures (runtime.engine.model_runner)."""
    return [b for b in BATCH_BUCKETS if b < engine.max_num_seqs] + [engine.max_num_seqs]


def graph_pool_bytes(c: ModelConfig, dtype: str, tp: int, engine: EngineConfig) -> int:
    """The graphs' shared pool: the largest batch's step, plus each graph's logits and hidden state kept."""
    if not engine.cuda_graphs:
        return 0
    db = DTYPE_BYTES[dtype]
    kept = sum(b * (c.vocab_size + c.hidden_size) * db for b in graph_batches(engine))
    return decode_step_bytes(c, dtype, tp, engine.max_num_seqs) + kept


def framework_bytes(layout: ParallelLayout) -> int:
    groups = (layout.tp > 1) + (layout.ep > 1)
    return CUDA_CONTEXT_BYTES + groups * NCCL_GROUP_BYTES


# ---- the plan --------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """Per-GPU bytes of one replica and the KV cache they leave; ``problem`` says why it does not fit."""

    model: str
    parameters: int
    quantization: str
    dtype: str
    gpus: int
    nodes: int
    tp: int
    ep: int
    gpu_memory_bytes: int
    max_model_len: int
    seq_len: int
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    weights: dict[str, int]
    activations: int
    cuda_graphs: int
    framework: int
    kv_bytes_per_token: int
    kv_blocks: int = 0
    problem: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def weights_total(self) -> int:
        return sum(self.weights.values())

    @property
    def used(self) -> int:
        return self.weights_total + self.activations + self.cuda_graphs + self.framework

    @property
    def kv_bytes(self) -> int:
        return self.kv_blocks * self.block_size * self.kv_bytes_per_token

    @property
    def kv_tokens(self) -> int:
        """Tokens the pool holds (block 0 is the scratch block)."""
        return max(0, self.kv_blocks - 1) * self.block_size

    def sequences(self, length: int) -> int:
        return max(0, self.kv_blocks - 1) // math.ceil(length / self.block_size)

    @property
    def fits(self) -> bool:
        return self.problem is None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            fits=self.fits,
            weights_total=self.weights_total,
            kv_bytes=self.kv_bytes,
            kv_tokens=self.kv_tokens,
            sequences_at_max_model_len=self.sequences(self.max_model_len),
            sequences_at_seq_len=self.sequences(self.seq_len),
        )
        return d

    def table(self) -> str:
        g = self.gpu_memory_bytes

        def row(name: str, n: int) -> str:
            return f"  {name:<38} {n / GIB:>9.2f} GiB {100 * n / g:>6.1f} %"

        quant = self.quantization if self.quantization != "none" else f"{self.dtype} weights"
        lines = [
            f"{self.model}: {self.parameters / 1e9:.1f}B parameters, {quant}, {self.dtype} activations and KV cache",
            f"{self.gpus} GPU(s) of {g / GIB:.1f} GiB over {self.nodes} node(s): --tp {self.tp} --ep {self.ep}",
            f"  {'per GPU':<38} {'GiB':>13} {'of GPU':>8}",
        ]
        lines += [row(name, n) for name, n in self.weights.items()]
        lines += [
            row("weights", self.weights_total),
            row(f"activations (step {self.max_num_batched_tokens} / decode {self.max_num_seqs})", self.activations),
            row("CUDA-graph pool", self.cuda_graphs),
            row("CUDA context + NCCL", self.framework),
            row(f"KV cache ({self.kv_blocks} blocks of {self.block_size})", self.kv_bytes),
            f"  KV per token: {self.kv_bytes_per_token} B (all layers, replicated on every GPU)",
            f"  tokens: {self.kv_tokens:,}; sequences at {self.max_model_len:,} tokens (max model len): "
            f"{self.sequences(self.max_model_len)}; at {self.seq_len:,}: {self.sequences(self.seq_len)}",
        ]
        lines += [f"  note: {n}" for n in self.notes]
        lines.append(f"fits: serve with --kv-blocks {self.kv_blocks}" if self.fits else "does not fit")
        return "\n".join(lines)


def plan(
    config: ModelConfig,
    quant: Quantization | None,
    *,
    gpus: int,
    gpu_memory_gib: float,
    tp: int | None = None,
    ep: int | None = None,
    nodes: int = 1,
    dtype: str = "bfloat16",
    max_model_len: int | None = None,
    seq_len: int | None = None,
    engine: EngineConfig | None = None,
    name: str = "model",
) -> Plan:
    """The memory plan of ``config`` on ``gpus`` GPUs of ``gpu_memory_gib`` each. Raises PlanError for an
    invalid layout or input; a valid layout that does not fit returns a Plan with ``problem`` set.

    ``tp`` defaults to a node's GPUs (its all-reduces stay on NVLink), ``ep`` to every GPU of the replica."""
    engine = engine or EngineConfig()
    for flag, v in (("--gpus", gpus), ("--nodes", nodes)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise PlanError(flag, v, "an integer >= 1")
    if gpus % nodes:
        raise PlanError("--nodes", nodes, f"must divide --gpus {gpus} (the same number of GPUs on every node)")
    if not gpu_memory_gib > 0:
        raise PlanError("--gpu-memory", gpu_memory_gib, "a positive number of GiB")
    if dtype not in DTYPE_BYTES:
        raise PlanError("--dtype", dtype, ", ".join(DTYPE_BYTES))
    tp = gpus // nodes if tp is None else tp
    ep = gpus if ep is None else ep
    layout = ParallelLayout(tp, ep, gpus)
    try:
        layout.validate(config)
    except LayoutError as exc:  # already names the flag, the value and what is allowed
        raise PlanError(exc.flag, exc.value, exc.allowed) from exc
    limit = config.max_position_embeddings
    max_model_len = limit if max_model_len is None else max_model_len
    if not 1 <= max_model_len <= limit:
        raise PlanError("--max-model-len", max_model_len, f"1 to the model's max_position_embeddings {limit}")
    seq_len = min(max_model_len, 4096) if seq_len is None else seq_len
    if not 1 <= seq_len <= max_model_len:
        raise PlanError("--seq-len", seq_len, f"1 to --max-model-len {max_model_len}")

    db = DTYPE_BYTES[dtype]
    p = Plan(
        model=name,
        parameters=parameter_count(config),
        quantization=f"fp8 {quant.fmt} {quant.block[0]}x{quant.block[1]} blocks" if quant else "none",
        dtype=dtype,
        gpus=gpus,
        nodes=nodes,
        tp=tp,
        ep=ep,
        gpu_memory_bytes=int(gpu_memory_gib * GIB),
        max_model_len=max_model_len,
        seq_len=seq_len,
        block_size=engine.block_size,
        max_num_seqs=engine.max_num_seqs,
        max_num_batched_tokens=engine.batched_tokens("cuda"),
        weights=weight_bytes(config, quant, dtype, tp, ep),
        activations=activation_bytes(config, dtype, tp, engine, max_model_len),
        cuda_graphs=graph_pool_bytes(config, dtype, tp, engine),
        framework=framework_bytes(layout),
        kv_bytes_per_token=config.num_hidden_layers * config.kv_cache_dim * db,
    )
    if config.num_nextn_predict_layers:
        first = config.num_hidden_layers
        p.notes.append(
            f"not counted: the checkpoint's {config.num_nextn_predict_layers} multi-token-prediction layer(s) "
            f"(model.layers.{first}...), which the runtime does not build"
        )
    if tp > gpus // nodes:
        p.notes.append(f"--tp {tp} spans nodes: every layer's all-reduces cross the network")
    block = p.block_size * p.kv_bytes_per_token
    free = p.gpu_memory_bytes - p.used
    p.kv_blocks = max(0, free // block)
    need = math.ceil(max_model_len / p.block_size) + 1  # one full-length sequence + the scratch block
    if p.kv_blocks >= need:
        return p
    where = f"{name} on {gpus}× {gpu_memory_gib:g} GiB (--tp {tp} --ep {ep})"
    parts = (
        f"weights {p.weights_total / GIB:.1f} + activations {p.activations / GIB:.1f} + CUDA graphs "
        f"{p.cuda_graphs / GIB:.1f} + CUDA context {p.framework / GIB:.1f} = {p.used / GIB:.1f} GiB per GPU"
    )
    one_seq = f"one {max_model_len:,}-token sequence's KV cache ({need * block / GIB:.1f} GiB)"
    if free < 0:
        p.problem = f"{where}: {parts}, {-free / GIB:.1f} GiB over the card before {one_seq}"
    else:
        p.problem = (
            f"{where}: {parts} leave {free / GIB:.1f} GiB, {(need * block - free) / GIB:.1f} GiB short of {one_seq}"
        )
    return p
