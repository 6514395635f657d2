"""``moe-runtime`` command line. Each subcommand is a function registered in :data:`COMMANDS`; the
service adds ``serve`` the same way. Heavy imports happen inside the handlers, so ``--help`` is instant."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import NoReturn


def _add_make_tiny(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-tiny", help="write a tiny random DeepSeek checkpoint (HF format)")
    p.add_argument("out_dir", help="output folder (created if missing)")
    p.add_argument("--arch", choices=["v2", "v3"], default="v2", help="DeepSeek-V2 or -V3 layout")
    p.add_argument("--seed", type=int, default=0, help="random seed for the weights")
    p.add_argument("--fp8", action="store_true", help="DeepSeek-V3's block-scaled FP8 layout (e4m3, 128×128 scales)")
    p.set_defaults(handler=_make_tiny)


def _make_tiny(args: argparse.Namespace) -> int:
    from runtime.tiny import make_tiny

    t0 = time.perf_counter()
    out = make_tiny(args.out_dir, arch=args.arch, seed=args.seed, fp8=args.fp8)
    kind = " fp8" if args.fp8 else ""
    print(f"wrote tiny {args.arch}{kind} checkpoint to {out} in {time.perf_counter() - t0:.1f} s")
    return 0


def _add_quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize", help="bf16/fp32 checkpoint → DeepSeek-V3's block-scaled FP8 layout (e4m3, 128×128 scales)"
    )
    p.add_argument("in_dir", metavar="IN", help="Hugging Face checkpoint folder (bf16 or fp32)")
    p.add_argument("out_dir", metavar="OUT", help="output folder (created if missing)")
    p.set_defaults(handler=_quantize)


def _quantize(args: argparse.Namespace) -> int:
    from runtime.quant.convert import QuantizeError, quantize_checkpoint

    t0 = time.perf_counter()
    try:
        counts = quantize_checkpoint(args.in_dir, args.out_dir)
    except (QuantizeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.out_dir}: {counts['quantized']} FP8 weights with block scales, {counts['kept']} tensors kept"
        f" in bf16/fp32, in {time.perf_counter() - t0:.1f} s"
    )
    return 0


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    return int(v) if v else None


def _number_above(text: str, bound: float, also: str = "") -> float:
    """A float above ``bound`` (NaN and non-numbers fail the comparison), else an argparse error."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > bound:
        raise argparse.ArgumentTypeError(f"expected a number > {bound:g}{also}, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    return _number_above(text, 0)


def _stall_factor(text: str) -> float | None:
    """``--max-decode-stall``: a factor above 1, or ``off``."""
    if text.strip().lower() == "off":
        return None
    return _number_above(text, 1, " or 'off'")


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from runtime import contract as c
    from runtime.engine.config import CUDA_BATCHED_TOKENS, EngineConfig

    p = sub.add_parser("serve", help="serve the model over HTTP (OpenAI API, risk score, metrics)")
    p.add_argument(
        "--model",
        default=os.environ.get(c.ENV_MODEL_PATH),
        help=f"checkpoint folder, or a Hugging Face repo id in the local cache (default: ${c.ENV_MODEL_PATH})",
    )
    p.add_argument(
        "--served-model-name",
        default=os.environ.get(c.ENV_MODEL_NAME),
        help="id in /v1/models (default: the repo id, or the folder name)",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer folder or cached Hugging Face repo id (default: the model's)",
    )
    p.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE",
        help="Jinja chat template file replacing tokenizer_config.json's (or the template text itself)",
    )
    p.add_argument("--host", default=os.environ.get(c.ENV_HOST, c.DEFAULT_HOST))
    p.add_argument("--port", type=int, default=_env_int(c.ENV_PORT) or c.DEFAULT_PORT)
    p.add_argument("--device", default=os.environ.get(c.ENV_DEVICE, "auto"), help="auto, cpu, cuda, cuda:N")
    p.add_argument(
        "--dtype",
        default=os.environ.get(c.ENV_DTYPE) or c.DTYPE_AUTO,
        choices=(c.DTYPE_AUTO, *c.DTYPES),
        help=f"{c.DTYPE_AUTO}: bf16 on CUDA, fp32 on CPU (default: ${c.ENV_DTYPE} or {c.DTYPE_AUTO})",
    )
    p.add_argument(
        "--kv-blocks",
        type=int,
        default=_env_int(c.ENV_KV_BLOCKS),
        help="KV pool size in blocks (default: --kv-memory-fraction of free GPU memory; on CPU room for a full batch)",
    )
    p.add_argument("--kv-memory-fraction", type=float, default=0.5)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=64, help="largest running batch")
    p.add_argument(
        "--max-queue", type=int, default=_env_int(c.ENV_MAX_QUEUE) or 256, help="waiting requests before 429"
    )
    p.add_argument(
        "--max-num-batched-tokens",
        "--max-prefill-tokens",
        dest="max_num_batched_tokens",
        type=int,
        default=None,
        help="tokens per engine step: one per running decode, prompt chunks fill the rest (default: "
        f"{CUDA_BATCHED_TOKENS} on GPU, 512 on CPU)",
    )
    p.add_argument(
        "--max-decode-stall",
        type=_stall_factor,
        default=EngineConfig.max_decode_stall,
        metavar="FACTOR",
        help="a step that prefills beside running decodes takes at most FACTOR times a decode-only step, learned "
        "from the engine's step times (> 1; 'off': prompts fill the whole token budget; default: %(default)s)",
    )
    p.add_argument(
        "--no-prefix-caching", action="store_true", help="do not share cached KV blocks of equal prompt prefixes"
    )
    p.add_argument(
        "--no-mixed-steps",
        action="store_true",
        help="prefill prompt chunks in a forward of their own, then decode (default: one forward for both)",
    )
    p.add_argument("--max-model-len", type=int, default=None, help="prompt + max_tokens limit")
    p.add_argument("--no-cuda-graphs", action="store_true", help="CUDA: run decode eagerly")
    p.add_argument("--no-overlap", action="store_true", help="read each decode step's tokens before launching the next")
    p.add_argument("--no-compile", action="store_true", help="CUDA: skip the compiled layer regions")
    p.add_argument("--grace-period", type=float, default=30.0, help="seconds to drain on SIGTERM")
    p.add_argument(
        "--accuracy-baseline",
        type=float,
        default=float(os.environ[c.ENV_ACCURACY_BASELINE]) if os.environ.get(c.ENV_ACCURACY_BASELINE) else None,
        help="reference accuracy for the drift alert",
    )
    p.add_argument(
        "--accuracy-window",
        type=int,
        default=_env_int(c.ENV_ACCURACY_WINDOW) or c.DEFAULT_ACCURACY_WINDOW,
        help=f"labels in the rolling accuracy (default: ${c.ENV_ACCURACY_WINDOW} or {c.DEFAULT_ACCURACY_WINDOW})",
    )
    p.add_argument(
        "--risk-task",
        default=os.environ.get(c.ENV_RISK_TASK) or None,
        help=f"risk task: a .toml/.json file or inline JSON (default: ${c.ENV_RISK_TASK}; none: risk routes off)",
    )
    p.add_argument(
        "--risk-store-table",
        default=os.environ.get(c.ENV_RISK_STORE_TABLE) or None,
        help=f"DynamoDB table of prediction records, region from ${c.ENV_AWS_REGION} "
        f"(default: ${c.ENV_RISK_STORE_TABLE})",
    )
    p.add_argument(
        "--risk-store-endpoint",
        default=os.environ.get(c.ENV_RISK_STORE_ENDPOINT) or None,
        help=f"DynamoDB endpoint override (default: ${c.ENV_RISK_STORE_ENDPOINT})",
    )
    p.add_argument(
        "--risk-store-path",
        default=os.environ.get(c.ENV_RISK_STORE_PATH) or None,
        help=f"SQLite file of prediction records when no table is given (default: ${c.ENV_RISK_STORE_PATH}; "
        "none: in memory, lost at exit)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument(
        "--engine-process",
        choices=("auto", "on", "off"),
        default="auto",
        help="run the engine in a child process, so HTTP and the engine loop do not share one interpreter "
        "lock (auto: on for one CUDA device, off on the CPU and for multi-GPU replicas)",
    )
    p.add_argument(
        "--gil-switch-interval-ms",
        type=_positive_float,
        default=None,
        metavar="MS",
        help="longest hold of the interpreter lock while another thread waits: short, so an engine thread "
        "driving a GPU gets it back quickly from the HTTP event loop (default: "
        f"{c.DEFAULT_GIL_SWITCH_INTERVAL_S * 1000:g} with a CUDA engine in this process, else CPython's own 5)",
    )
    p.add_argument("--world-size", type=int, default=_env_int(c.ENV_WORLD_SIZE) or 1, help="default: $WORLD_SIZE")
    p.add_argument(
        "--tp", type=int, default=_env_int(c.ENV_TP) or 1, help="tensor-parallel ranks: attention, dense MLPs"
    )
    p.add_argument("--ep", type=int, default=_env_int(c.ENV_EP) or 1, help="expert-parallel ranks: routed experts")
    p.add_argument(
        "--dist-timeout",
        type=float,
        default=float(os.environ.get(c.ENV_DIST_TIMEOUT) or c.DEFAULT_DIST_TIMEOUT_S),
        help="seconds before a collective or a silent rank counts as failed (multi-GPU)",
    )
    p.add_argument("--shm-min-bytes", type=int, default=_env_int(c.ENV_SHM_MIN_BYTES) or c.DEFAULT_SHM_MIN_BYTES)
    p.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help=f"bearer key the API accepts (repeatable; prefer --api-key-file or ${c.ENV_API_KEYS}: "
        "arguments show in the process list)",
    )
    p.add_argument(
        "--api-key-file",
        action="append",
        default=[],
        metavar="FILE",
        help="file of accepted keys, one per line (repeatable)",
    )
    p.add_argument(
        "--max-request-bytes",
        type=int,
        default=_env_int(c.ENV_MAX_REQUEST_BYTES) or c.DEFAULT_MAX_REQUEST_BYTES,
        help=f"request bodies above this get 413 (default: ${c.ENV_MAX_REQUEST_BYTES} or "
        f"{c.DEFAULT_MAX_REQUEST_BYTES})",
    )
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument(
        "--log-level",
        default=(os.environ.get(c.ENV_LOG_LEVEL) or c.DEFAULT_LOG_LEVEL).lower(),
        choices=c.LOG_LEVELS,
        help=f"default: ${c.ENV_LOG_LEVEL} or {c.DEFAULT_LOG_LEVEL}",
    )
    p.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    import logging
    from pathlib import Path

    from runtime import contract as c
    from runtime.server.lifecycle import ShmError, check_shm

    if args.log_level not in c.LOG_LEVELS:  # argparse checks choices given on the command line, not defaults
        print(f"error: {c.ENV_LOG_LEVEL}={args.log_level!r}: allowed: {', '.join(c.LOG_LEVELS)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.dtype not in (c.DTYPE_AUTO, *c.DTYPES):  # like --log-level: a default from the environment
        allowed = ", ".join((c.DTYPE_AUTO, *c.DTYPES))
        print(f"error: {c.ENV_DTYPE}={args.dtype!r}: allowed: {allowed}", file=sys.stderr)
        return 2
    if not args.model:
        print("error: --model PATH (or MODEL_PATH) is required", file=sys.stderr)
        return 2
    from runtime import hub

    try:
        model_src = hub.checkpoint(args.model)
        tok_src = hub.tokenizer(args.tokenizer) if args.tokenizer else None
        chat_template = _read_chat_template(args.chat_template) if args.chat_template else None
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.model = str(model_src.path)
    served_name = args.served_model_name or model_src.repo_id
    if args.world_size > 1:
        try:
            check_shm(min_bytes=args.shm_min_bytes)
        except ShmError as exc:
            print(f"error: world size {args.world_size}: {exc}", file=sys.stderr)
            return 2
    from runtime.server.auth import KeyFileError, collect_keys

    try:
        api_keys = collect_keys(args.api_key, args.api_key_file)
    except KeyFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.max_request_bytes < 1:
        print(f"error: --max-request-bytes {args.max_request_bytes}: must be at least 1", file=sys.stderr)
        return 2
    from runtime.config import ConfigError, ModelConfig
    from runtime.parallel.layout import LayoutError, ParallelLayout

    layout = ParallelLayout(args.tp, args.ep, args.world_size)
    if args.engine_process == "on" and layout.distributed:
        print("error: --engine-process on: multi-GPU replicas run the engine in the leader's process", file=sys.stderr)
        return 2
    try:
        config = ModelConfig.from_json_file(Path(args.model) / "config.json")
        layout.validate(config)
        from runtime.registry import architecture  # imports torch

        architecture(config)
    except (LayoutError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import torch

    from runtime.server.lifecycle import serve
    from runtime.server.state import Settings

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    if args.threads:
        torch.set_num_threads(args.threads)
    engine_process = args.engine_process == "on" or (
        args.engine_process == "auto" and device.startswith("cuda") and not layout.distributed
    )
    if layout.distributed and device == "cuda":
        from runtime.parallel.dist import world_from_env

        device = f"cuda:{world_from_env()[2]}"  # one GPU per rank: LOCAL_RANK
    try:
        settings = Settings(
            model_path=args.model,
            served_model_name=served_name,
            tokenizer_path=str(tok_src.path) if tok_src else None,
            chat_template=chat_template,
            device=device,
            dtype=dtype,
            kv_blocks=args.kv_blocks,
            kv_memory_fraction=args.kv_memory_fraction,
            block_size=args.block_size,
            max_num_seqs=args.max_num_seqs,
            max_queue=args.max_queue,
            max_num_batched_tokens=args.max_num_batched_tokens,
            prefix_caching=not args.no_prefix_caching,
            mixed_steps=not args.no_mixed_steps,
            max_decode_stall=args.max_decode_stall,
            max_model_len=args.max_model_len,
            cuda_graphs=not args.no_cuda_graphs,
            overlap=not args.no_overlap,
            compile=not args.no_compile,
            gil_switch_interval_s=None if args.gil_switch_interval_ms is None else args.gil_switch_interval_ms / 1000,
            engine_process=engine_process,
            threads=args.threads,
            grace_period_s=args.grace_period,
            accuracy_baseline=args.accuracy_baseline,
            accuracy_window=args.accuracy_window,
            risk_task=args.risk_task,
            model_revision=os.environ.get(c.ENV_MODEL_REVISION) or "unknown",
            risk_store_table=args.risk_store_table,
            risk_store_region=os.environ.get(c.ENV_AWS_REGION) or None,
            risk_store_endpoint=args.risk_store_endpoint,
            risk_store_path=args.risk_store_path,
            warmup=not args.no_warmup,
            api_keys=api_keys,
            max_request_bytes=args.max_request_bytes,
        )
        settings.engine_config()  # validate the engine's limits before loading anything
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not layout.distributed:
        return serve(settings, args.host, args.port, args.log_level)
    from runtime.parallel.dist import init_distributed
    from runtime.server.lifecycle import serve_worker

    try:
        parallel = settings.parallel = init_distributed(layout, device, args.dist_timeout)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    try:
        code = serve(settings, args.host, args.port, args.log_level) if parallel.is_leader else None
        code = serve_worker(settings, parallel) if code is None else code
    except Exception as exc:  # e.g. a worker's load failed: never leave the group waiting on us
        logging.getLogger("runtime").error("rank %d failed: %s: %s", parallel.rank, type(exc).__name__, exc)
        code = 1
    _leave_group(code)


def _read_chat_template(spec: str) -> str:
    """The template in file ``spec`` (or ``spec`` itself when it is template text), checked to compile."""
    from pathlib import Path

    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    path = Path(spec).expanduser()
    if path.is_file():
        text, where = path.read_text(), str(path)
    elif "{{" in spec or "{%" in spec:
        text, where = spec, "the template text"
    else:
        raise ValueError(f"--chat-template {spec}: no such file")
    try:
        ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).parse(text)
    except TemplateSyntaxError as exc:
        raise ValueError(f"--chat-template {where}: line {exc.lineno}: {exc.message}") from exc
    return text


def _leave_group(code: int) -> NoReturn:
    """Normal exit: tear the process group down. Failure: exit now, without waiting on a dead peer.

    Either way the process ends with ``os._exit``: interpreter teardown after a distributed run can destroy
    a native thread torch.distributed still holds and abort (SIGABRT, "terminate called without an active
    exception"), which torchrun and a LeaderWorkerSet would read as a crash of a clean shutdown."""
    import logging

    import torch.distributed as dist

    if code == 0:
        dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _add_plan(sub: argparse._SubParsersAction) -> None:
    from runtime.engine.config import EngineConfig

    d = EngineConfig()
    p = sub.add_parser(
        "plan",
        help="per-GPU memory plan of a layout: weights, activations, CUDA graphs, KV cache left",
        description="Per-GPU memory of one replica and the paged latent KV cache it leaves; exits 1 naming what "
        "does not fit, 2 for an invalid layout. Reads only config.json.",
    )
    p.add_argument("--model", required=True, help="checkpoint folder or its config.json")
    p.add_argument("--gpus", type=int, required=True, help="GPUs of one replica (the world size)")
    p.add_argument("--gpu-memory", type=float, required=True, help="GiB per GPU (an H100 80GB reports 79.2)")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel ranks (default: GPUs per node)")
    p.add_argument("--ep", type=int, default=None, help="expert-parallel ranks (default: --gpus)")
    p.add_argument("--nodes", type=int, default=1, help="nodes the replica spans")
    p.add_argument("--dtype", default="bfloat16", help="model dtype: bfloat16, float16, float32")
    p.add_argument("--max-model-len", type=int, default=None, help="default: the model's max_position_embeddings")
    p.add_argument("--seq-len", type=int, default=None, help="also count sequences of this length (default 4096)")
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs, help="as serve")
    p.add_argument(
        "--max-num-batched-tokens", type=int, default=d.batched_tokens("cuda"), help="as serve (GPU default)"
    )
    p.add_argument("--block-size", type=int, default=d.block_size, help="as serve")
    p.add_argument("--no-cuda-graphs", action="store_true", help="as serve")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(handler=_plan)


def _plan(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from runtime.config import ConfigError
    from runtime.engine.config import EngineConfig
    from runtime.plan import PlanError, load_config, plan

    try:
        engine = EngineConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            block_size=args.block_size,
            cuda_graphs=not args.no_cuda_graphs,
        )
        config, quant = load_config(args.model)
        path = Path(args.model).resolve()
        name = path.name if path.is_dir() else (path.parent.name if path.stem == "config" else path.stem)
        p = plan(
            config,
            quant,
            gpus=args.gpus,
            gpu_memory_gib=args.gpu_memory,
            tp=args.tp,
            ep=args.ep,
            nodes=args.nodes,
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            seq_len=args.seq_len,
            engine=engine,
            name=name,
        )
    except (PlanError, ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(p.to_dict(), indent=2) if args.json else p.table())
    if not p.fits:
        print(f"error: does not fit: {p.problem}", file=sys.stderr)
        return 1
    return 0


# name → function adding the subparser; append to extend the CLI.
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_make_tiny, _add_quantize, _add_serve, _add_plan]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-runtime", description="MoE Fleet runtime")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
