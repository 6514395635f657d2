"""Serving benchmark on one GPU: ``moe-runtime serve`` over real HTTP on the DeepSeek-V2-Lite shape.

    python -m benchmarks.serving_gpu [--quick] [--out DIR]

One run, each section on its own (a failing section prints its error and the rest still run):

1. writes a V2-Lite-shaped checkpoint of random bf16 weights to disk, with a word-level tokenizer that
   covers the whole vocabulary (every id decodes to one word, so every generated token is one streamed
   chunk); prompts are distinct random 128-token id lists (no prefix-cache hits between them); a complete
   checkpoint of the same config already in ``--out`` is reused, so runs that differ in ``--serve-args``
   compare on the same weights;
2. starts the server (``--max-num-seqs 512``) and sends a 2,048-token prompt alone: time to first token the
   first time (compiled prefill shapes were warmed at start-up, so no compile at request time) and warm;
3. streamed requests at 1 / 8 / 64 / 256 / 512 concurrent streams: output tok/s, TTFT P50/P99, inter-token
   P50/P99, and the decode rate (streams / inter-token P50) against the HBM roofline at that batch (every
   non-expert weight, the distinct experts the batch picks, the KV cache; measured copy bandwidth). The
   streams of a level are spread over client processes (64 streams each, at most 8 and half the CPUs;
   ``--clients`` overrides) started together, so the client's own JSON parsing does not set the figures;
   the server's CPU over each level (cores in all, its busiest thread's, µs per output token) tells an
   interpreter-bound server from a GPU-bound one, and ``--profile`` runs it under ``py-spy record --gil``
   (which thread holds the interpreter lock, and where: ``server-gil.txt`` under ``--out``);
4. batch-1 decode with ``--max-num-seqs 64`` against the 512 server's (a second server start): a larger
   batch cap must not slow small batches down;
5. the engine loop in-process (no HTTP) on the same checkpoint: decode tok/s at batch 1 / 64 / 256, then
   decode steps at the largest batch under torch's profiler: wall time per step against the kernels' busy
   time per step, and the kernels that take it.

The table is printed last (and written as JSON under ``--out``). Fits an 80 GB card (31 GB of weights,
half the rest for the KV pool); about 5 minutes, ``--quick`` (8 layers, fewer levels) about 2.
``--cpu-smoke`` runs every section on the CPU with a tiny model (exercises the script, no figures).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import queue
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.model_gpu import V2_LITE, prefill_flops, roofline_step_bytes
from runtime import contract as c
from runtime.config import ModelConfig
from runtime.tiny import BOS, CHAT_TEMPLATE, EOS, PAD, tiny_config

REPO = Path(__file__).resolve().parents[1]
PROMPT_LEN = 128


def log(*a) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


# ---- checkpoint ---------------------------------------------------------------------------------
def write_checkpoint(raw: dict, out: Path, device: str, shard_bytes: int = 4 << 30) -> Path:
    """config.json, random bf16 safetensors shards (generated on ``device``), a word-level tokenizer."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    from runtime.registry import build_model

    out.mkdir(parents=True, exist_ok=True)
    config = ModelConfig.from_dict(raw)
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    shapes = {k: v.shape for k, v in build_model(config, torch.bfloat16, "meta").state_dict().items()}
    g = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shard: dict[str, torch.Tensor] = {}
    size, files, weight_map = 0, [], {}

    def flush() -> None:
        nonlocal shard, size
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        files.append(name)
        weight_map.update(dict.fromkeys(shard, name))
        shard, size = {}, 0

    for name, shape in shapes.items():
        t = torch.randn(shape, generator=g, device=device, dtype=dtype)
        if name.endswith("norm.weight") or "layernorm" in name:
            t = 1.0 + 0.1 * t
        elif name == "lm_head.weight":
            t = t * (2.0 / math.sqrt(shape[1]))
        elif not name.endswith("embed_tokens.weight"):
            t = t / math.sqrt(shape[-1])
        shard[name] = t.to(torch.bfloat16).cpu().contiguous()
        size += shard[name].numel() * 2
        if size >= shard_bytes:
            flush()
    if shard:
        flush()
    index = {"metadata": {"total_size": sum(math.prod(s) * 2 for s in shapes.values())}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))

    # the risk endpoint needs " yes" / " no" as single tokens (the service refuses to start otherwise)
    special = {raw["bos_token_id"]: BOS, raw["eos_token_id"]: EOS, raw["eos_token_id"] + 1: PAD, 3: "yes", 4: "no"}
    vocab = {special.get(i, f"w{i}"): i for i in range(raw["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([BOS, EOS, PAD])
    tok.save(str(out / "tokenizer.json"))
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": False,
        "model_max_length": raw["max_position_embeddings"],
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, ensure_ascii=False))
    return out


def checkpoint_written(raw: dict, out: Path) -> bool:
    """Whether ``out`` holds a complete checkpoint of this config (the index is written after every shard,
    the tokenizer last): a second run with the same ``--out`` and other server flags skips the write."""
    try:
        same = json.loads((out / "config.json").read_text()) == raw
        shards = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError):
        return False
    return same and (out / "tokenizer_config.json").exists() and all((out / f).exists() for f in shards)


def random_prompt(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(5, min(vocab, 100000)) for _ in range(n)]


# ---- the server ---------------------------------------------------------------------------------
def thread_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of ``pid`` and of its child processes (the engine process),
    from /proc: whether the server is held by one thread (the interpreter lock) or by the GPU shows in how
    these grow over a level."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    for proc in (pid, *_children(pid)):
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{proc}/task").iterdir():
                with contextlib.suppress(OSError):
                    fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                    out[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def server_cpu(before: dict[int, float], after: dict[int, float], wall_s: float, tokens: int) -> dict:
    """The server's CPU over one level: cores used in all, by its busiest thread, and µs per output token."""
    grown = sorted((after[t] - before.get(t, 0.0) for t in after), reverse=True)
    return {
        "server_cores": sum(grown) / wall_s,
        "server_busiest_thread_cores": (grown[0] if grown else 0.0) / wall_s,
        "server_cpu_us_per_token": 1e6 * sum(grown) / max(tokens, 1),
    }


def _only_child(pid: int, timeout: float = 10.0) -> int:
    """The process ``pid`` started (the server under a profiler)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            if kids:
                return int(kids[0])
        time.sleep(0.05)
    raise RuntimeError(f"process {pid} started no child in {timeout:.0f} s")


@contextlib.contextmanager
def server(model: Path, args: list[str], log_path: Path, timeout: float, profile: Path | None = None):
    """``profile``: run the server under ``py-spy record --gil`` (what holds the interpreter lock, by
    thread), its collapsed stacks written there when the server exits."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "runtime.cli", "serve", "--model", str(model), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--log-level", "info", *args]
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if profile is not None:
        spy = ["py-spy", "record", "--gil", "--threads", "--subprocesses", "--nonblocking", "-r", "50", "-f", "raw"]
        spy += ["-o", str(profile)]
        cmd = [*spy, "--", *cmd]
    with log_path.open("w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, env=env)
    served = _only_child(proc.pid) if profile is not None else proc.pid  # signals and CPU go to the server
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}: {log_path.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + c.READY_PATH, timeout=2).status_code == 200:
                    break
            if time.perf_counter() - t0 > timeout:
                raise RuntimeError(f"server not ready in {timeout:.0f} s: {log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        log(f"server {' '.join(args)} ready in {time.perf_counter() - t0:.1f} s")
        yield url, time.perf_counter() - t0, served
    finally:
        if proc.poll() is None:
            os.kill(served, signal.SIGTERM)  # a profiler writes its stacks once the server has exited
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                for pid in {served, proc.pid}:
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
                proc.wait()


async def stream_one(cl: httpx.AsyncClient, url: str, prompt: list[int], max_tokens: int) -> dict:
    """One streamed completion → send time, arrival time of each content chunk, completion tokens. Times are
    ``time.monotonic()``: one clock for every client process of the host (CLOCK_MONOTONIC on Linux)."""
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.monotonic()
    arrivals: list[float] = []
    tokens = None
    async with cl.stream("POST", url + c.COMPLETIONS_PATH, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                arrivals.append(time.monotonic())
    return {"t0": t0, "arrivals": arrivals, "tokens": tokens if tokens is not None else len(arrivals)}


def run_streams(url: str, prompts: list[list[int]], max_tokens: int, barrier=None) -> list[dict]:
    """Every prompt as its own stream, all at once from this process (after ``barrier``, when given)."""

    async def go() -> list[dict]:
        limits = httpx.Limits(max_connections=len(prompts) + 8, max_keepalive_connections=len(prompts) + 8)
        async with httpx.AsyncClient(timeout=600, limits=limits) as cl:
            if barrier is not None:
                await asyncio.to_thread(barrier.wait, 120)
            return await asyncio.gather(*(stream_one(cl, url, p, max_tokens) for p in prompts))

    return asyncio.run(go())


def _client_main(url: str, prompts: list[list[int]], max_tokens: int, barrier, results, slot: int) -> None:
    try:
        results.put((slot, run_streams(url, prompts, max_tokens, barrier)))
    except BaseException as exc:
        barrier.abort()  # the others stop waiting for this one
        results.put((slot, f"{type(exc).__name__}: {exc}"[:500]))


#: streams one client process drives, and the most client processes (also at most half the CPUs): one
#: Python process parsing every SSE line of hundreds of streams would measure the client, not the server
STREAMS_PER_CLIENT = 64
MAX_CLIENTS = 8


def client_procs(streams: int, per_client: int = STREAMS_PER_CLIENT, most: int | None = None) -> int:
    most = most if most is not None else min(MAX_CLIENTS, max(1, (os.cpu_count() or 2) // 2))
    return max(1, min(most, math.ceil(streams / per_client)))


def run_level(url: str, prompts: list[list[int]], max_tokens: int, procs: int = 1) -> list[dict]:
    """The streams of one level, spread over ``procs`` client processes that start together (a barrier);
    every record carries its own times on the shared monotonic clock, so ``summarize`` merges them."""
    if procs <= 1:
        return run_streams(url, prompts, max_tokens)
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(procs), ctx.Queue()
    workers = [
        ctx.Process(target=_client_main, args=(url, prompts[j::procs], max_tokens, barrier, results, j), daemon=True)
        for j in range(procs)
    ]
    for w in workers:
        w.start()
    got: dict[int, list[dict] | str] = {}
    try:
        while len(got) < procs:
            try:
                slot, res = results.get(timeout=5)
            except queue.Empty:
                dead = [w for w in workers if w.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"client process exited with {dead[0].exitcode}") from None
                continue
            got[slot] = res
    finally:
        for w in workers:
            w.join(10)
            if w.is_alive():
                w.kill()
    failed = [r for r in got.values() if isinstance(r, str)]
    if failed:
        raise RuntimeError(f"client process failed: {failed[0]}")
    return [r for j in range(procs) for r in got[j]]


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]


def summarize(results: list[dict]) -> dict:
    ttft = [r["arrivals"][0] - r["t0"] for r in results if r["arrivals"]]
    itl = [b - a for r in results for a, b in zip(r["arrivals"], r["arrivals"][1:], strict=False)]
    start = min(r["t0"] for r in results)
    end = max(r["arrivals"][-1] for r in results if r["arrivals"])
    tokens = sum(r["tokens"] for r in results)
    return {
        "streams": len(results),
        "output_tok_s": tokens / (end - start),
        "ttft_p50_ms": 1e3 * pct(ttft, 50),
        "ttft_p99_ms": 1e3 * pct(ttft, 99),
        "ttft_mean_ms": 1e3 * sum(ttft) / len(ttft),
        "itl_p50_ms": 1e3 * pct(itl, 50),
        "itl_p99_ms": 1e3 * pct(itl, 99),
        "decode_tok_s": len(results) / pct(itl, 50),
        "tokens": tokens,
        "wall_s": end - start,
    }


def batch1_rate(url: str, rng: random.Random, vocab: int, max_tokens: int) -> float:
    """Batch-1 decode tok/s over HTTP: tokens after the first / time from first to last, best of three."""
    rates = []
    for _ in range(3):
        r = run_level(url, [random_prompt(rng, PROMPT_LEN, vocab)], max_tokens)[0]
        a = r["arrivals"]
        rates.append((len(a) - 1) / (a[-1] - a[0]))
    return max(rates)


# ---- the engine in-process ----------------------------------------------------------------------
def engine_loop(model_path: Path, device: str, batches: list[int], max_tokens: int, vocab: int) -> dict:
    from runtime.engine import Engine, EngineConfig, Sequence
    from runtime.loader import load_model, load_tokenizer
    from runtime.sampling import SamplingParams

    dtype = "bfloat16" if device == "cuda" else "float32"
    model = load_model(model_path, dtype=dtype, device=device)
    engine = Engine(model, load_tokenizer(model_path), EngineConfig(max_num_seqs=max(batches)))
    engine.start()
    engine.warm_up()
    rng = random.Random(7)
    out = {}
    try:
        for b in batches:
            for measured in (False, True):  # the first run of a batch size warms its bucket
                done = threading.Semaphore(0)
                seqs = [
                    Sequence(
                        f"e{b}-{i}-{measured}",
                        random_prompt(rng, PROMPT_LEN, vocab),
                        SamplingParams(max_new_tokens=max_tokens, ignore_eos=True),
                        lambda ev, done=done: done.release() if ev.finish_reason else None,
                    )
                    for i in range(b)
                ]
                t0 = time.perf_counter()
                engine.submit(seqs)
                for _ in seqs:
                    if not done.acquire(timeout=600):
                        raise TimeoutError("engine did not finish")
                dt = time.perf_counter() - t0
            out[b] = b * max_tokens / dt
            log(f"engine loop batch {b}: {out[b]:.0f} tok/s (prefill included)")
        out["profile"] = profile_decode(engine, max(batches), max_tokens, vocab, rng)
    finally:
        engine.stop()
        del engine, model
        if device == "cuda":
            torch.cuda.empty_cache()
    return out


def profile_decode(engine, batch: int, max_tokens: int, vocab: int, rng: random.Random, steps: int = 24) -> dict:
    """Decode steps at ``batch`` under torch's profiler, once every sequence is past its prefill: wall time per
    step against the device's busy time per step (kernels summed), and the kernels that take it. A step whose
    wall time is well above its kernels' is held by the host."""
    from torch.profiler import ProfilerActivity, profile

    from runtime.engine import Sequence
    from runtime.sampling import SamplingParams

    started, done = threading.Semaphore(0), threading.Semaphore(0)

    def on_event(ev, seen: list[bool]) -> None:
        if not seen[0]:
            seen[0] = True
            started.release()
        if ev.finish_reason:
            done.release()

    seqs = [
        Sequence(
            f"profile-{i}",
            random_prompt(rng, PROMPT_LEN, vocab),
            SamplingParams(max_new_tokens=max(max_tokens, 2 * steps + 8), ignore_eos=True),
            lambda ev, seen=[False]: on_event(ev, seen),
        )
        for i in range(batch)
    ]
    engine.submit(seqs)
    for _ in seqs:
        started.acquire(timeout=600)
    cuda = engine.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        s0, t0 = engine.steps, time.perf_counter()
        while engine.steps < s0 + steps:
            time.sleep(0.001)
        s1, t1 = engine.steps, time.perf_counter()
    for _ in seqs:
        done.acquire(timeout=600)
    n = s1 - s0
    events = [e for e in prof.key_averages() if (e.self_device_time_total if cuda else e.self_cpu_time_total) > 0]
    busy = lambda e: (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e3 / n  # noqa: E731 (ms/step)
    events.sort(key=busy, reverse=True)
    res = {
        "batch": batch,
        "steps": n,
        "wall_ms_per_step": 1e3 * (t1 - t0) / n,
        "device_ms_per_step": sum(busy(e) for e in events),
        "top": [(e.key[:90], round(busy(e), 3), e.count // n) for e in events[:15]],
    }
    log(f"profiled decode at batch {batch}: {res['wall_ms_per_step']:.2f} ms/step wall, "
        f"{res['device_ms_per_step']:.2f} ms/step of kernels")  # fmt: skip
    for name, ms, calls in res["top"]:
        log(f"  {ms:8.3f} ms/step  {calls:4d}/step  {name}")
    return res


def scrape(url: str, names: tuple[str, ...]) -> dict[str, float]:
    """The server's /metrics samples of these metrics, by series (name and labels)."""
    text = httpx.get(url + c.METRICS_PATH, timeout=10).text
    return {
        series: float(value)
        for series, _, value in (line.rpartition(" ") for line in text.splitlines())
        if series.startswith(names)
    }


def counter(url: str, name: str) -> float:
    """A counter's value on the server's /metrics (its series summed)."""
    return sum(scrape(url, (name + "{",)).values())


#: histograms whose sum and count over a level split its time to first token, and give its steps
SERVER_SIDE = (c.REQUEST_QUEUE_TIME, c.REQUEST_PREFILL_TIME, c.TIME_TO_FIRST_TOKEN, c.ITERATION_TOKENS)


def server_side(url: str) -> dict[str, float]:
    """The sums and counts of :data:`SERVER_SIDE` now (subtract two readings for a level's share), from one
    /metrics fetch, each summed over its series."""
    keys = [f"{d.name}_{part}" for d in SERVER_SIDE for part in ("sum", "count")]
    samples = scrape(url, tuple(k + "{" for k in keys))
    return {k: sum(v for series, v in samples.items() if series.startswith(k + "{")) for k in keys}


def server_breakdown(before: dict[str, float], after: dict[str, float], wall_s: float) -> dict[str, float]:
    """What the server saw of a level: mean queue, prefill and first-token times (ms, from its own clock:
    HTTP parsing and the client are outside them), its steps, their mean tokens and mean wall time."""
    d = {k: after[k] - before.get(k, 0.0) for k in after}

    def mean_ms(m) -> float:
        n = d[f"{m.name}_count"]
        return 1e3 * d[f"{m.name}_sum"] / n if n else math.nan

    steps = d[f"{c.ITERATION_TOKENS.name}_count"]
    return {
        "server_queue_ms": mean_ms(c.REQUEST_QUEUE_TIME),
        "server_prefill_ms": mean_ms(c.REQUEST_PREFILL_TIME),
        "server_ttft_ms": mean_ms(c.TIME_TO_FIRST_TOKEN),
        "steps": steps,
        "tokens_per_step": d[f"{c.ITERATION_TOKENS.name}_sum"] / steps if steps else math.nan,
        "ms_per_step": 1e3 * wall_s / steps if steps else math.nan,
    }


# ---- main -----------------------------------------------------------------------------------------
def copy_bandwidth(device: str) -> float:
    n = (1 << 30) if device == "cuda" else (64 << 20)
    x = torch.empty(n // 2, dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)
    best = float("inf")
    for _ in range(6):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        y.copy_(x)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    del x, y
    return 2 * n / best


def section(name: str, results: dict, fn) -> None:
    t = time.perf_counter()
    log(f"== {name}")
    try:
        fn()
    except Exception as exc:
        traceback.print_exc()
        results.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"[:500]
    log(f"== {name} took {time.perf_counter() - t:.1f} s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8 layers, streams 1 8 64, shorter outputs")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU: exercises every section")
    ap.add_argument("--out", type=Path, default=None, help="folder for the checkpoint, logs and results.json")
    ap.add_argument("--levels", type=int, nargs="+", default=None, help="concurrent streams per level")
    ap.add_argument("--max-tokens", type=int, default=None, help="tokens per request (default 128; --quick 64)")
    ap.add_argument("--long-prompt", type=int, default=2048)
    ap.add_argument("--clients", type=int, default=None, help="client processes per level (default: by streams)")
    ap.add_argument(
        "--skip", nargs="+", default=[], choices=["small", "engine"], help="leave out section 4 or 5 (see above)"
    )
    ap.add_argument(
        "--profile", action="store_true", help="run the big server under py-spy (--gil): server-gil.txt in --out"
    )
    ap.add_argument(
        "--serve-args",
        default="",
        help="more `moe-runtime serve` arguments for every server, as one shell-quoted string "
        "(e.g. '--max-decode-stall off')",
    )
    a = ap.parse_args(argv)
    device = "cpu" if a.cpu_smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device (use --cpu-smoke to exercise the script on the CPU)")
    out = a.out or Path(tempfile.mkdtemp(prefix="serving-gpu-"))
    out.mkdir(parents=True, exist_ok=True)
    if a.cpu_smoke:
        raw = tiny_config("v2", max_position_embeddings=4096)
        levels, max_tokens, long_len, big, small = a.levels or [1, 4], a.max_tokens or 8, 300, 8, 4
        serve_extra = ["--device", "cpu", "--threads", "2", "--kv-blocks", "512"]
        per_client, most_clients = 2, 2  # the multi-process client is exercised too
    else:
        raw = dict(V2_LITE)
        if a.quick:
            raw["num_hidden_layers"] = 8
        levels = a.levels or ([1, 8, 64] if a.quick else [1, 8, 64, 256, 512])
        max_tokens, long_len, big, small = a.max_tokens or (64 if a.quick else 128), a.long_prompt, 512, 64
        serve_extra = []
        per_client, most_clients = STREAMS_PER_CLIENT, None
    serve_extra += shlex.split(a.serve_args)
    config = ModelConfig.from_dict(raw)
    vocab = config.vocab_size
    card = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    log(f"card {card}, torch {torch.__version__}, {config.num_hidden_layers} layers, out {out}")
    res: dict = {"card": card, "layers": config.num_hidden_layers, "levels": {}, "max_tokens": max_tokens}
    res["serve_args"] = serve_extra  # beside each server's own --max-num-seqs / --max-queue
    rng = random.Random(0)
    ckpt = out / "checkpoint"
    t_all = time.perf_counter()

    from runtime.registry import build_model

    meta = build_model(config, torch.bfloat16, "meta")
    bw = copy_bandwidth(device)
    res["copy_bandwidth_tb_s"] = bw / 1e12
    log(f"copy bandwidth {bw / 1e12:.2f} TB/s")

    def roofline(b: int) -> float:  # tok/s at batch b, mid-generation context
        return b / (roofline_step_bytes(meta, b, PROMPT_LEN + max_tokens // 2) / bw)

    def checkpoint() -> None:
        t = time.perf_counter()
        if checkpoint_written(raw, ckpt):
            log(f"checkpoint in {ckpt} already written (same config): reused")
            return
        write_checkpoint(raw, ckpt, device)
        res["checkpoint_s"] = time.perf_counter() - t
        log(f"checkpoint written in {res['checkpoint_s']:.1f} s")

    section("checkpoint", res, checkpoint)

    def serve_big() -> None:
        args = ["--max-num-seqs", str(big), "--max-queue", str(4 * big), *serve_extra]
        profile = out / "server-gil.txt" if a.profile else None
        with server(ckpt, args, out / "server-big.log", timeout=600, profile=profile) as (url, ready_s, pid):
            res["server_ready_s"] = ready_s
            long = {}
            for key in ("first", "warm", "warm2"):
                r = run_level(url, [random_prompt(rng, long_len, vocab)], 8)[0]
                long[key] = 1e3 * (r["arrivals"][0] - r["t0"])
                log(f"long prompt ({long_len} tokens) TTFT {key}: {long[key]:.0f} ms")
            long["ideal_ms"] = 1e3 * prefill_flops(config, 1, long_len) / 790e12 if device == "cuda" else float("nan")
            res["long_prompt"] = long
            for n in levels:
                try:
                    prompts = [random_prompt(rng, PROMPT_LEN, vocab) for _ in range(n)]
                    procs = a.clients or client_procs(n, per_client, most_clients)
                    paced0, side0 = counter(url, c.PACED_STEPS.name), server_side(url)
                    cpu0 = thread_cpu_s(pid)  # the server idles while the clients start: the level's wall is
                    s = summarize(run_level(url, prompts, max_tokens, procs))  # from its first send
                    s.update(server_cpu(cpu0, thread_cpu_s(pid), s["wall_s"], s["tokens"]))
                    s["paced_steps"] = counter(url, c.PACED_STEPS.name) - paced0
                    s.update(server_breakdown(side0, server_side(url), s["wall_s"]))
                    s["roofline_tok_s"] = roofline(n)
                    s["client_procs"] = procs
                    res["levels"][n] = s
                    log(f"{n} streams: {json.dumps({k: round(v, 1) for k, v in s.items()})}")
                except Exception as exc:
                    traceback.print_exc()
                    res.setdefault("errors", {})[f"streams {n}"] = f"{type(exc).__name__}: {exc}"[:300]
            res["batch1_big_tok_s"] = batch1_rate(url, rng, vocab, max_tokens)
            names = (c.PREEMPTIONS, c.PACED_STEPS, c.PREFIX_CACHE_QUERIES, c.PREFIX_CACHE_HITS, c.KV_CACHE_BLOCKS)
            res["server_metrics"] = scrape(url, tuple(m.name for m in names))

    section(f"server --max-num-seqs {big}", res, serve_big)

    def serve_small() -> None:
        args = ["--max-num-seqs", str(small), *serve_extra]
        with server(ckpt, args, out / "server-small.log", timeout=600) as (url, _, _pid):
            res["batch1_small_tok_s"] = batch1_rate(url, rng, vocab, max_tokens)
        log(f"batch 1: {res['batch1_small_tok_s']:.1f} tok/s (max-num-seqs {small})")

    if "small" not in a.skip:
        section(f"server --max-num-seqs {small}", res, serve_small)

    def in_process() -> None:
        batches = [1, 64, 256] if not a.cpu_smoke else [1, 4]
        res["engine_loop_tok_s"] = engine_loop(ckpt, device, batches, max_tokens, vocab)

    if "engine" not in a.skip:
        section("engine loop (in-process)", res, in_process)
    res["total_s"] = time.perf_counter() - t_all
    report(res, big, small)
    (out / "results.json").write_text(json.dumps(res, indent=2, default=str))
    return 1 if res.get("errors") else 0


def report(res: dict, big: int, small: int) -> None:
    print(f"\n## Serving on {res['card']} ({res['layers']} layers, random bf16 weights, {PROMPT_LEN}-token prompts, "
          f"{res['max_tokens']} new tokens, greedy, streamed)")  # fmt: skip
    print(
        "| streams | clients | output tok/s | TTFT P50 ms | TTFT P99 ms | ITL P50 ms | ITL P99 ms | decode tok/s "
        "| roofline | % | ITL P99/P50 | paced steps | server cores (busiest thread) | server CPU µs/token |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, s in res["levels"].items():
        print(
            f"| {n} | {s.get('client_procs', 1)} | {s['output_tok_s']:.0f} | "
            f"{s['ttft_p50_ms']:.0f} | {s['ttft_p99_ms']:.0f} | "
            f"{s['itl_p50_ms']:.1f} | {s['itl_p99_ms']:.1f} | {s['decode_tok_s']:.0f} | {s['roofline_tok_s']:.0f} | "
            f"{100 * s['decode_tok_s'] / s['roofline_tok_s']:.0f}% | "
            f"{s['itl_p99_ms'] / s['itl_p50_ms']:.2f} | {s.get('paced_steps', math.nan):.0f} | "
            f"{s.get('server_cores', math.nan):.2f} ({s.get('server_busiest_thread_cores', math.nan):.2f}) | "
            f"{s.get('server_cpu_us_per_token', math.nan):.0f} |"
        )
    print("\nWhat the server saw of each level (means over its requests, from admission; steps over the level's wall):")
    print(
        "| streams | TTFT mean ms (client) | server TTFT mean ms | queue ms | prefill ms | steps | tokens/step "
        "| ms/step |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, s in res["levels"].items():
        print(
            f"| {n} | {s.get('ttft_mean_ms', math.nan):.0f} | {s.get('server_ttft_ms', math.nan):.0f} | "
            f"{s.get('server_queue_ms', math.nan):.0f} | {s.get('server_prefill_ms', math.nan):.0f} | "
            f"{s.get('steps', math.nan):.0f} | {s.get('tokens_per_step', math.nan):.0f} | "
            f"{s.get('ms_per_step', math.nan):.1f} |"
        )
    if "long_prompt" in res:
        lp = res["long_prompt"]
        print(f"\nlong prompt alone: TTFT first {lp['first']:.0f} ms, warm {lp['warm']:.0f} / {lp['warm2']:.0f} ms "
              f"(compute floor {lp['ideal_ms']:.0f} ms at 790 TFLOP/s)")  # fmt: skip
    if "batch1_big_tok_s" in res and "batch1_small_tok_s" in res:
        b, s = res["batch1_big_tok_s"], res["batch1_small_tok_s"]
        print(f"batch-1 decode over HTTP: {s:.1f} tok/s (--max-num-seqs {small}) vs {b:.1f} tok/s "
              f"(--max-num-seqs {big}): {100 * (b / s - 1):+.1f}%")  # fmt: skip
    if "engine_loop_tok_s" in res:
        http = {n: s["output_tok_s"] for n, s in res["levels"].items()}
        for b, v in res["engine_loop_tok_s"].items():
            if b == "profile":
                print(f"decode at batch {v['batch']}: {v['wall_ms_per_step']:.2f} ms/step wall, "
                      f"{v['device_ms_per_step']:.2f} ms/step of kernels")  # fmt: skip
                continue
            extra = f", HTTP {http[b]:.0f} tok/s" if b in http else ""
            print(f"engine loop in-process, batch {b}: {v:.0f} tok/s (prefill included){extra}")
    if "server_metrics" in res:
        print("server counters:", json.dumps(res["server_metrics"]))
    print(f"total {res.get('total_s', 0):.0f} s; errors: {json.dumps(res.get('errors', {}))}")


if __name__ == "__main__":
    raise SystemExit(main())
