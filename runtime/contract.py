"""What the runtime service exposes to the outside world: the one source of truth for infra.

Alert rules, dashboards, Kubernetes objects, the ServiceMonitor and the local demo import the names
below instead of repeating strings, so a renamed metric or path breaks a test, not a pager. This module
must stay importable without torch, fastapi or prometheus-client (stdlib only): the infrastructure
tooling imports it and never installs the runtime's heavy dependencies. It imports nothing else from the
runtime.

Metric names follow vLLM's (``vllm:e2e_request_latency_seconds`` → ``moe_e2e_request_latency_seconds``)
where vLLM has one, so existing dashboards and habits carry over.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# ---- network ------------------------------------------------------------------------------------

DEFAULT_HOST = "0.0.0.0"
DEFAULT_PORT = 8000
PORT_NAME = "http"  # container / service port name the ServiceMonitor selects

# ---- endpoint paths -----------------------------------------------------------------------------

COMPLETIONS_PATH = "/v1/completions"
CHAT_COMPLETIONS_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"
RISK_PATH = "/v1/risk/predict"
RISK_ALIAS_PATH = "/risk_predict"  # the source document's original path
FEEDBACK_PATH = "/v1/feedback"
HEALTH_PATH = "/healthz"  # liveness: the process answers
READY_PATH = "/readyz"  # readiness: model loaded, warmed up, not draining
METRICS_PATH = "/metrics"

LIVENESS_PROBE_PATH = HEALTH_PATH
READINESS_PROBE_PATH = READY_PATH

API_PATHS = (
    COMPLETIONS_PATH,
    CHAT_COMPLETIONS_PATH,
    MODELS_PATH,
    RISK_PATH,
    RISK_ALIAS_PATH,
    FEEDBACK_PATH,
)
ALL_PATHS = (*API_PATHS, HEALTH_PATH, READY_PATH, METRICS_PATH)
#: Answered without an API key: kubelet probes and Prometheus scrapes carry no credentials, and these
#: answers hold no request content. Every other path needs one once keys are configured.
OPEN_PATHS = (HEALTH_PATH, READY_PATH, METRICS_PATH)

# ---- environment variables ----------------------------------------------------------------------

ENV_MODEL_PATH = "MODEL_PATH"  # as in the source document's image: MODEL_PATH=/opt/deepseek/model_weights
ENV_MODEL_NAME = "MOE_MODEL_NAME"  # name served in /v1/models (default: the folder name)
ENV_HOST = "MOE_HOST"
ENV_PORT = "MOE_PORT"
ENV_DEVICE = "MOE_DEVICE"
ENV_DTYPE = "MOE_DTYPE"
DTYPE_AUTO = "auto"  # bf16 on CUDA, fp32 on CPU
DTYPES = ("float32", "bfloat16", "float16", "fp32", "bf16", "fp16")  # serve --dtype / $MOE_DTYPE besides auto
ENV_KV_BLOCKS = "MOE_KV_BLOCKS"
ENV_MAX_QUEUE = "MOE_MAX_QUEUE"
ENV_ACCURACY_BASELINE = "MOE_ACCURACY_BASELINE"  # reference accuracy of the drift alert (unset: no baseline)
ENV_ACCURACY_WINDOW = "MOE_ACCURACY_WINDOW"  # labelled predictions in the rolling accuracy
ENV_LOG_LEVEL = "MOE_LOG_LEVEL"
ENV_MODEL_REVISION = "MOE_MODEL_REVISION"  # revision of the served checkpoint, written into prediction records
# ---- the risk task and its prediction records (docs/risk.md) ----
ENV_RISK_TASK = "MOE_RISK_TASK"  # the task: inline JSON or a .toml/.json file (unset: risk routes answer 503)
ENV_RISK_STORE_TABLE = "MOE_RISK_STORE_TABLE"  # DynamoDB table of prediction records (shared by all replicas)
ENV_RISK_STORE_ENDPOINT = "MOE_RISK_STORE_ENDPOINT"  # DynamoDB endpoint override (the embedded AWS only)
ENV_RISK_STORE_PATH = "MOE_RISK_STORE_PATH"  # SQLite file of prediction records (single node, no AWS)
ENV_AWS_REGION = "AWS_REGION"
ENV_WORLD_SIZE = "WORLD_SIZE"  # torchrun / LeaderWorkerSet convention
ENV_SHM_MIN_BYTES = "MOE_SHM_MIN_BYTES"
ENV_API_KEYS = "MOE_API_KEYS"  # comma-separated bearer keys the API accepts (several: rotation)
ENV_MAX_REQUEST_BYTES = "MOE_MAX_REQUEST_BYTES"  # request body size limit (413 above it)
DEFAULT_MAX_REQUEST_BYTES = 1 << 20
#: serve: how long a thread may hold the interpreter lock while another waits for it (CPython's own: 5 ms)
DEFAULT_GIL_SWITCH_INTERVAL_S = 0.0005

# ---- multi-GPU / multi-node (docs/parallel.md) --------------------------------------------------

DISTRIBUTED_PORT = 29500  # torchrun's --master-port on the leader (rendezvous + process-group store)
ENV_RANK = "RANK"  # set by torchrun for each process
ENV_LOCAL_RANK = "LOCAL_RANK"
ENV_MASTER_ADDR = "MASTER_ADDR"
ENV_MASTER_PORT = "MASTER_PORT"
ENV_LWS_LEADER_ADDRESS = "LWS_LEADER_ADDRESS"  # set by LeaderWorkerSet in every pod of a group
ENV_LWS_GROUP_SIZE = "LWS_GROUP_SIZE"  # pods (nodes) per group → torchrun --nnodes
ENV_LWS_WORKER_INDEX = "LWS_WORKER_INDEX"  # 0 on the leader → torchrun --node-rank
ENV_TP = "MOE_TP"  # default of serve --tp
ENV_EP = "MOE_EP"  # default of serve --ep
ENV_DIST_TIMEOUT = "MOE_DIST_TIMEOUT_S"  # collective / heartbeat timeout, seconds
DEFAULT_DIST_TIMEOUT_S = 120.0

DEFAULT_ACCURACY_WINDOW = 500
#: Prediction records: partition key and TTL attribute (the DynamoDB table is built with the same names).
RISK_RECORD_KEY = "request_id"
RISK_RECORD_TTL_ATTRIBUTE = "expires_at"
DEFAULT_RISK_RECORD_TTL_DAYS = 90
#: DynamoDB item actions the runtime uses on the prediction table (its IAM policy allows exactly these).
RISK_STORE_ACTIONS = ("dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:UpdateItem")
LOG_LEVELS = ("debug", "info", "warning", "error")  # serve --log-level / $MOE_LOG_LEVEL
DEFAULT_LOG_LEVEL = "info"

DEFAULT_MODEL_PATH = "/opt/deepseek/model_weights"
SHM_PATH = "/dev/shm"
DEFAULT_SHM_MIN_BYTES = 1 << 30  # NCCL wants far more than Docker's 64 MiB default

# ---- labels -------------------------------------------------------------------------------------

APP_NAME = "moe-runtime"
POD_LABEL_KEYS = {"name": "app.kubernetes.io/name", "component": "app.kubernetes.io/component"}

LABEL_MODEL_NAME = "model_name"  # the served model's name (/v1/models id), on every runtime metric, as vLLM
LABEL_FINISH_REASON = "finish_reason"  # stop | length | abort
LABEL_REASON = "reason"  # rejection / error reason
LABEL_LAYER = "layer"  # MoE layer index
LABEL_GPU = "gpu"  # NVML device index

REJECT_REASONS = ("queue_full", "shutting_down", "context_length", "invalid_request", "unauthorized", "too_large")
FINISH_REASONS = ("stop", "length", "abort")

# ---- metrics ------------------------------------------------------------------------------------

MetricType = Literal["counter", "gauge", "histogram"]

#: Latency buckets (seconds) fine enough around the 500 ms P99 threshold to tell 0.4 from 0.6.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Tokens per engine step: a decode batch's size up to a full prompt budget and beyond.
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


@dataclass(frozen=True)
class MetricDef:
    """One exposed series family. ``name`` is the full exposed name (counters end in ``_total``); ``labels``
    start with :data:`LABEL_MODEL_NAME`, which every runtime series carries."""

    name: str
    help: str
    type: MetricType
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] | None = None


def _m(name: str, help: str, type: MetricType, labels: tuple[str, ...] = (), buckets=None) -> MetricDef:
    return MetricDef(name, help, type, (LABEL_MODEL_NAME, *labels), buckets)


E2E_LATENCY = _m(
    "moe_e2e_request_latency_seconds",
    "End-to-end latency of a generation request, from admission to last token.",
    "histogram",
    buckets=LATENCY_BUCKETS,
)
TIME_TO_FIRST_TOKEN = _m(
    "moe_time_to_first_token_seconds",
    "Time from admission to the first generated token.",
    "histogram",
    buckets=LATENCY_BUCKETS,
)
TIME_PER_OUTPUT_TOKEN = _m(
    "moe_time_per_output_token_seconds",
    "Mean time between generated tokens after the first, per request.",
    "histogram",
    buckets=TPOT_BUCKETS,
)
REQUEST_QUEUE_TIME = _m(
    "moe_request_queue_time_seconds",
    "Time from admission to the request's first engine step (waiting for room in the batch or the step's "
    "token budget); time to first token = this + moe_request_prefill_time_seconds.",
    "histogram",
    buckets=LATENCY_BUCKETS,
)
REQUEST_PREFILL_TIME = _m(
    "moe_request_prefill_time_seconds",
    "Time from the request's first engine step to its first token (its prompt's chunks, and the steps they "
    "share with other work).",
    "histogram",
    buckets=LATENCY_BUCKETS,
)
ITERATION_TOKENS = _m(
    "moe_iteration_tokens",
    "Tokens per engine step (one per decoding sequence plus the step's prompt tokens); count / time = steps "
    "per second.",
    "histogram",
    buckets=ITERATION_TOKEN_BUCKETS,
)
REQUESTS_RUNNING = _m("moe_num_requests_running", "Sequences in the running batch.", "gauge")
REQUESTS_WAITING = _m("moe_num_requests_waiting", "Sequences admitted but waiting to start.", "gauge")
QUEUE_CAPACITY = _m(
    "moe_queue_capacity",
    "Capacity of the admission queue (max_queue); queue fill = moe_num_requests_waiting / this. 0 until set.",
    "gauge",
)
BATCH_SIZE = _m("moe_batch_size", "Sequences in the last decode step.", "gauge")
PROMPT_TOKENS = _m("moe_prompt_tokens_total", "Prompt tokens prefilled.", "counter")
GENERATION_TOKENS = _m("moe_generation_tokens_total", "Tokens generated.", "counter")
KV_CACHE_USAGE = _m("moe_kv_cache_usage_perc", "Fraction of the KV-cache block pool in use (1 = full).", "gauge")
KV_CACHE_BLOCKS = _m("moe_kv_cache_blocks", "Usable blocks in the KV-cache pool (fixed at start-up).", "gauge")
PREEMPTIONS = _m(
    "moe_num_preemptions_total",
    "Running sequences preempted because the KV pool ran dry (their blocks freed, recomputed later).",
    "counter",
)
PACED_STEPS = _m(
    "moe_paced_steps_total",
    "Engine steps that held prompt tokens back so as not to stall the running decodes (--max-decode-stall); "
    "a high rate beside a growing time to first token says the bound, not the GPU, delays new requests.",
    "counter",
)
PREFIX_CACHE_QUERIES = _m(
    "moe_prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache at admission.", "counter"
)
PREFIX_CACHE_HITS = _m(
    "moe_prefix_cache_hits_total",
    "Prompt tokens found in the prefix cache (not prefilled again); hit rate = this / queries.",
    "counter",
)
PADDING_RATIO = _m(
    "moe_padding_ratio",
    "Padded token slots / all token slots over recent forward passes (prefill attention padding and "
    "CUDA-graph batch-bucket padding).",
    "gauge",
)
REQUESTS_REJECTED = _m(
    "moe_requests_rejected_total", "Requests refused before admission, by reason.", "counter", (LABEL_REASON,)
)
REQUEST_SUCCESS = _m(
    "moe_request_success_total",
    "Finished generation sequences by finish reason.",
    "counter",
    (LABEL_FINISH_REASON,),
)
REQUEST_ERRORS = _m(
    "moe_request_errors_total",
    "Requests that failed on the server side (HTTP 5xx), by reason. Error rate = this / "
    "(this + moe_request_success_total).",
    "counter",
    (LABEL_REASON,),
)
EXPERT_LOAD_IMBALANCE = _m(
    "moe_expert_load_imbalance",
    "max/mean tokens per routed expert over the last window, per MoE layer (1 = balanced).",
    "gauge",
    (LABEL_LAYER,),
)
RISK_PREDICTIONS = _m("moe_risk_predictions_total", "Risk predictions served.", "counter")
FEEDBACK = _m("moe_feedback_total", "Ground-truth labels received on /v1/feedback.", "counter")
RISK_LABELLED = _m(
    "moe_risk_labelled_total",
    "Risk predictions joined to a ground-truth label by this replica. Fleet accuracy over a window = "
    "sum(increase(moe_risk_correct_total[w])) / sum(increase(this[w])).",
    "counter",
)
RISK_CORRECT = _m("moe_risk_correct_total", "Labelled risk predictions that were correct.", "counter")
RISK_RECORDS_PENDING = _m(
    "moe_risk_records_pending",
    "Prediction records waiting in memory for the store (it failed); retried in the background.",
    "gauge",
)
RISK_RECORDS_DROPPED = _m(
    "moe_risk_records_dropped_total",
    "Prediction records lost: the pending buffer was full, or the process ended before the store came back.",
    "counter",
)
ACCURACY_ROLLING = _m("moe_accuracy_rolling", "Accuracy of risk predictions over the last feedback window.", "gauge")
ACCURACY_BASELINE = _m("moe_accuracy_baseline", "Configured reference accuracy; drift = rolling - baseline.", "gauge")
GPU_UTILIZATION = _m("moe_gpu_utilization_perc", "GPU utilisation from NVML, 0-100, per device.", "gauge", (LABEL_GPU,))
GPU_MEMORY_USED = _m("moe_gpu_memory_used_bytes", "GPU memory in use from NVML.", "gauge", (LABEL_GPU,))
PROCESS_RESIDENT_MEMORY = _m(
    "moe_process_resident_memory_bytes",
    "Resident memory of the server process and its child processes (leak alert).",
    "gauge",
)
MODEL_READY = _m("moe_model_ready", "1 when the model is loaded, warmed up and admitting.", "gauge")

METRICS: tuple[MetricDef, ...] = (
    E2E_LATENCY,
    TIME_TO_FIRST_TOKEN,
    TIME_PER_OUTPUT_TOKEN,
    REQUEST_QUEUE_TIME,
    REQUEST_PREFILL_TIME,
    ITERATION_TOKENS,
    REQUESTS_RUNNING,
    REQUESTS_WAITING,
    QUEUE_CAPACITY,
    BATCH_SIZE,
    PROMPT_TOKENS,
    GENERATION_TOKENS,
    KV_CACHE_USAGE,
    KV_CACHE_BLOCKS,
    PREEMPTIONS,
    PACED_STEPS,
    PREFIX_CACHE_QUERIES,
    PREFIX_CACHE_HITS,
    PADDING_RATIO,
    REQUESTS_REJECTED,
    REQUEST_SUCCESS,
    REQUEST_ERRORS,
    EXPERT_LOAD_IMBALANCE,
    RISK_PREDICTIONS,
    FEEDBACK,
    RISK_LABELLED,
    RISK_CORRECT,
    RISK_RECORDS_PENDING,
    RISK_RECORDS_DROPPED,
    ACCURACY_ROLLING,
    ACCURACY_BASELINE,
    GPU_UTILIZATION,
    GPU_MEMORY_USED,
    PROCESS_RESIDENT_MEMORY,
    MODEL_READY,
)
METRICS_BY_NAME = {m.name: m for m in METRICS}
