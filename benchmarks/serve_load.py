"""Closed-loop load test: our continuous-batching server vs the source document's design, same checkpoint, same run.

Both servers are started here as subprocesses on loopback over the same tiny checkpoint
(``moe-runtime serve`` and :mod:`benchmarks.serve_seed`), then driven in turn by the same closed loop:
C clients, each sending its next request as soon as the previous one answers, at C = 1, 8, 32, 64, with a
fixed prompt (token ids, so both see exactly the same length) and a fixed output length (``ignore_eos``).
A small raw HTTP/1.1 keep-alive client keeps the load generator's own CPU cost low and identical for
both (this box has 2 cores; client, server and model share them).

    .venv/bin/python -m benchmarks.serve_load [--duration 8] [--concurrency 1 8 32 64] [--json out.json]

Prints throughput (requests/s and generated tokens/s), P50/P99 latency and errors side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from infra.embedded.emulator.process import free_port

REPO = Path(__file__).resolve().parents[1]


@dataclass
class LevelResult:
    design: str
    concurrency: int
    requests: int = 0
    errors: int = 0
    tokens: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list, repr=False)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("latencies")
        return d | {
            "rps": round(self.rps, 2),
            "tok_s": round(self.tok_s, 1),
            "p50_ms": round(self.pct(0.50) * 1000, 1),
            "p99_ms": round(self.pct(0.99) * 1000, 1),
        }


# ---- a minimal keep-alive HTTP/1.1 client (Content-Length responses only) ------------------------
class Conn:
    def __init__(self, host: str, port: int, headers: dict[str, str] | None = None) -> None:
        self.host, self.port = host, port
        self.extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{self.extra}\r\n"
        ).encode()
        self.writer.write(head + body)
        await self.writer.drain()
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("server closed the connection")
        status = int(status_line.split()[1])
        length, close = 0, False
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            k, _, v = line.decode("latin-1").partition(":")
            k = k.strip().lower()
            if k == "content-length":
                length = int(v)
            elif k == "connection" and v.strip().lower() == "close":
                close = True
        data = await self.reader.readexactly(length)
        if close:
            await self.close()
        return status, data

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
        self.reader = self.writer = None


async def closed_loop(
    port: int, body: bytes, concurrency: int, duration: float, warmup: float, out_tokens: int
) -> LevelResult:
    res = LevelResult("", concurrency)
    t_start = time.perf_counter()
    t_measure, t_end = t_start + warmup, t_start + warmup + duration

    async def client() -> None:
        conn = Conn("127.0.0.1", port)
        try:
            while True:
                t0 = time.perf_counter()
                if t0 >= t_end:
                    return
                try:
                    status, data = await conn.post("/v1/completions", body)
                    ok = status == 200 and json.loads(data)["usage"]["completion_tokens"] == out_tokens
                except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError, KeyError):
                    ok = False
                    await conn.close()
                t1 = time.perf_counter()
                # completions inside the window count (a slow design's requests may start before it)
                if t_measure <= t1 <= t_end:
                    if ok:
                        res.requests += 1
                        res.tokens += out_tokens
                        res.latencies.append(t1 - t0)
                    else:
                        res.errors += 1
                if not ok:
                    await asyncio.sleep(0.05)
        finally:
            await conn.close()

    await asyncio.gather(*[client() for _ in range(concurrency)])
    res.seconds = duration
    return res


# ---- servers ------------------------------------------------------------------------------------


@contextlib.contextmanager
def server(cmd: list[str], port: int, log: Path, env: dict[str, str] | None = None):
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[2:4]} exited:\n{log.read_text()}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r,
            ):
                if r.status == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"not ready:\n{log.read_text()}")
            time.sleep(0.2)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def designs(model: str, threads: int, max_num_seqs: int) -> dict[str, list[str]]:
    py = sys.executable
    ours = [py, "-m", "runtime.cli", "serve", "--model", model, "--host", "127.0.0.1", "--log-level", "warning"]
    ours += ["--threads", str(threads), "--max-num-seqs", str(max_num_seqs), "--max-queue", "1024"]
    source = [py, "-m", "benchmarks.serve_seed", "--model", model, "--threads", str(threads)]
    return {"ours": ours, "source": source}


def run(args: argparse.Namespace) -> list[LevelResult]:
    model = args.model
    tmp = Path(tempfile.mkdtemp(prefix="serve-load-"))
    if model is None:
        from runtime.tiny import make_tiny

        model = str(make_tiny(tmp / "tiny", arch="v2", seed=0))
    prompt = [(7 + 13 * i) % 500 + 3 for i in range(args.prompt_len)]  # fixed token ids, no specials
    body = json.dumps({"prompt": prompt, "max_tokens": args.output_len, "temperature": 0, "ignore_eos": True}).encode()
    results = []
    # Both servers run side by side (an idle one costs no CPU) and each level drives ours, then the
    # source document's, back to back: on a shared machine, background load then drifts little between the two.
    with contextlib.ExitStack() as stack:
        ports = {}
        for name, cmd in designs(model, args.threads, args.max_num_seqs).items():
            if name in args.designs:
                ports[name] = free_port()
                stack.enter_context(server([*cmd, "--port", str(ports[name])], ports[name], tmp / f"{name}.log"))
        for conc in args.concurrency:
            for name, port in ports.items():
                r = asyncio.run(closed_loop(port, body, conc, args.duration, args.warmup, args.output_len))
                r.design = name
                results.append(r)
                s = r.summary()
                print(
                    f"  {name:6s} c={conc:<3d} {s['rps']:8.1f} req/s {s['tok_s']:8.0f} tok/s "
                    f"p50 {s['p50_ms']:7.1f} ms  p99 {s['p99_ms']:7.1f} ms  errors {r.errors}",
                    flush=True,
                )
    return results


def table(results: list[LevelResult]) -> str:
    by = {(r.design, r.concurrency): r for r in results}
    levels = sorted({r.concurrency for r in results})
    lines = [
        "| clients | ours req/s | source doc req/s | ratio | ours P50 ms | source doc P50 ms | ours P99 ms "
        "| source doc P99 ms | ours errors | source doc errors |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in levels:
        o, s = by.get(("ours", c)), by.get(("source", c))
        if o is None or s is None:
            continue
        ratio = o.rps / s.rps if s.rps else float("inf")
        lines.append(
            f"| {c} | {o.rps:.1f} | {s.rps:.1f} | {ratio:.1f}× | {o.pct(0.5) * 1e3:.0f} | {s.pct(0.5) * 1e3:.0f} "
            f"| {o.pct(0.99) * 1e3:.0f} | {s.pct(0.99) * 1e3:.0f} | {o.errors} | {s.errors} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=os.environ.get("MODEL_PATH"), help="checkpoint (default: a fresh tiny one)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--duration", type=float, default=8.0, help="measured seconds per level")
    p.add_argument("--warmup", type=float, default=1.5, help="unmeasured seconds before each level")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads in both servers")
    p.add_argument("--max-num-seqs", type=int, default=64, help="our running-batch cap")
    p.add_argument(
        "--designs", nargs="+", default=["ours", "source"], help="ours, source (the source document's design)"
    )
    p.add_argument("--json", type=Path, help="write the raw results here")
    args = p.parse_args(argv)
    print(
        f"closed loop, prompt {args.prompt_len} tokens, output {args.output_len} tokens, "
        f"{args.duration:.0f} s per level, torch threads {args.threads}, {os.cpu_count()} CPUs"
    )
    results = run(args)
    print()
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps([r.summary() for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
