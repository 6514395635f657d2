"""Soak test: steady load on the tiny model for N minutes, resident memory sampled as it goes, growth
reported in MB/h against the memory-growth alert's threshold.

A leak that adds a few kilobytes per request never shows in a unit test and takes a pod down after a
week; the alert (``memory_growth_bytes_per_hour`` in ``infra/catalog/thresholds.py``) pages on it in
production, this finds it before. ``moe-runtime serve`` runs as a subprocess on loopback; C clients
send, in turn, a completion, a chat completion, a risk score and the feedback that labels it (every
route that keeps per-request state), each waiting ``--pause`` seconds between requests so the load is
steady rather than saturating. The server's resident memory (``/proc/PID/status`` VmRSS, the same
figure ``moe_process_resident_memory_bytes`` exports) is sampled every ``--sample`` seconds; the slope
is a least-squares fit over the samples taken after warm-up. The baseline is the resident memory at the
end of warm-up, measured in the same run.

    nice -n 19 .venv/bin/python -m benchmarks.soak [--minutes 30] [--sample 60] [--clients 4]

Exit status 1 when the slope reaches the threshold (a leak), 0 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.serve_load import Conn, server
from infra.catalog.names import DEFAULT_RISK_TASK_FILE as DEFAULT_RISK_TASK
from infra.catalog.thresholds import Thresholds
from infra.embedded.emulator.process import free_port
from runtime import contract as c

MB = 1e6  # decimal, like the threshold's 1 GB = 1e9 bytes


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` from procfs (kB there)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def slope_per_hour(samples: list[tuple[float, int]]) -> float:
    """Least-squares slope of (seconds, bytes) samples, in bytes per hour."""
    n = len(samples)
    if n < 2:
        return 0.0
    mt = sum(t for t, _ in samples) / n
    mb = sum(b for _, b in samples) / n
    var = sum((t - mt) ** 2 for t, _ in samples)
    cov = sum((t - mt) * (b - mb) for t, b in samples)
    return cov / var * 3600.0 if var else 0.0


@dataclass
class SoakResult:
    minutes: float
    clients: int
    requests: int = 0
    errors: int = 0
    samples: list[tuple[float, int]] = field(default_factory=list)
    threshold_bytes_per_hour: float = Thresholds().memory_growth_bytes_per_hour

    @property
    def slope(self) -> float:
        return slope_per_hour(self.samples)

    @property
    def leaking(self) -> bool:
        return self.slope >= self.threshold_bytes_per_hour

    def summary(self) -> dict:
        return {
            "minutes": self.minutes,
            "clients": self.clients,
            "requests": self.requests,
            "errors": self.errors,
            "rss_start_mb": round(self.samples[0][1] / MB, 1) if self.samples else None,
            "rss_end_mb": round(self.samples[-1][1] / MB, 1) if self.samples else None,
            "slope_mb_per_h": round(self.slope / MB, 2),
            "threshold_mb_per_h": round(self.threshold_bytes_per_hour / MB, 1),
            "samples": [(round(t, 1), b) for t, b in self.samples],
        }


def _bodies(i: int) -> list[tuple[str, dict]]:
    prompt = [(7 + 13 * k + i) % 500 + 3 for k in range(24)]
    rid = f"soak-{i}"
    return [
        (c.COMPLETIONS_PATH, {"prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True}),
        (
            c.CHAT_COMPLETIONS_PATH,
            {"messages": [{"role": "user", "content": f"hello {i}"}], "max_tokens": 16, "temperature": 0.7},
        ),
        (c.RISK_PATH, {"features": {"amount": 100 + i % 900, "country": "FR", "hour": i % 24}, "request_id": rid}),
        (c.FEEDBACK_PATH, {"request_id": rid, "label": i % 7 == 0}),
    ]


async def _load(port: int, key: str, clients: int, pause: float, until: float, res: SoakResult) -> None:
    async def client(cid: int) -> None:
        conn = Conn("127.0.0.1", port, headers={"Authorization": f"Bearer {key}"})
        i = cid
        try:
            while time.monotonic() < until:
                for path, body in _bodies(i):
                    try:
                        status, _ = await conn.post(path, json.dumps(body).encode())
                        ok = status == 200
                    except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError):
                        ok = False
                        await conn.close()
                    res.requests += 1
                    res.errors += not ok
                    await asyncio.sleep(pause)
                i += clients
        finally:
            await conn.close()

    await asyncio.gather(*[client(k) for k in range(clients)])


async def _sampler(pid: int, t0: float, every: float, until: float, res: SoakResult) -> None:
    while True:
        now = time.monotonic()
        res.samples.append((now - t0, rss_bytes(pid)))
        rss = res.samples[-1][1] / MB
        print(f"  t={(now - t0) / 60:5.1f} min  rss {rss:8.1f} MB  requests {res.requests}", flush=True)
        if now >= until:
            return
        await asyncio.sleep(min(every, max(0.0, until - now)))


def run(args: argparse.Namespace) -> SoakResult:
    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    model = args.model
    if model is None:
        from runtime.tiny import make_tiny

        model = str(make_tiny(tmp / "tiny", arch="v2", seed=0))
    port, key = free_port(), secrets.token_urlsafe(24)
    cmd = [sys.executable, "-m", "runtime.cli", "serve", "--model", model, "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--log-level", "warning", "--threads", str(args.threads)]
    cmd += ["--risk-task", str(DEFAULT_RISK_TASK)]  # the risk and feedback routes are part of the load
    res = SoakResult(args.minutes, args.clients)
    with server(cmd, port, tmp / "server.log", env={**os.environ, c.ENV_API_KEYS: key}) as proc:

        async def main() -> None:
            start = time.monotonic()
            warm_end = start + args.warmup
            end = warm_end + args.minutes * 60
            load = asyncio.create_task(_load(port, key, args.clients, args.pause, end, res))
            await asyncio.sleep(args.warmup)
            await _sampler(proc.pid, warm_end, args.sample, end, res)
            await load

        asyncio.run(main())
    return res


def table(res: SoakResult) -> str:
    s = res.summary()
    verdict = "LEAK" if res.leaking else "ok"
    return "\n".join(
        [
            "| minutes | clients | requests | errors | RSS after warm-up MB | RSS at end MB | slope MB/h "
            "| alert threshold MB/h | verdict |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
            f"| {s['minutes']:g} | {s['clients']} | {s['requests']} | {s['errors']} | {s['rss_start_mb']} "
            f"| {s['rss_end_mb']} | {s['slope_mb_per_h']} | {s['threshold_mb_per_h']:g} | {verdict} |",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint (default: a fresh tiny one)")
    p.add_argument("--minutes", type=float, default=30.0, help="measured minutes after warm-up")
    p.add_argument("--sample", type=float, default=60.0, help="seconds between resident-memory samples")
    p.add_argument("--warmup", type=float, default=30.0, help="unmeasured seconds of load first")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--pause", type=float, default=0.05, help="seconds each client waits between requests")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads in the server")
    p.add_argument("--json", type=Path, help="write the raw result here")
    args = p.parse_args(argv)
    print(
        f"soak: {args.minutes:g} min after {args.warmup:g} s warm-up, {args.clients} clients, pause {args.pause} s, "
        f"sample every {args.sample:g} s, {os.cpu_count()} CPUs"
    )
    res = run(args)
    print()
    print(table(res))
    if args.json:
        args.json.write_text(json.dumps(res.summary(), indent=2))
    return 1 if res.leaking else 0


if __name__ == "__main__":
    sys.exit(main())
