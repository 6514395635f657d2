"""`moefleet review` against the real Prometheus on 90 days of synthetic series with known answers.

The series are written as OpenMetrics and turned into TSDB blocks with ``promtool tsdb
create-blocks-from openmetrics``; Prometheus starts on them with our rules; the recording rules are
backfilled with ``promtool tsdb create-blocks-from rules`` (rules do not evaluate retroactively), and the
review runs as the operator runs it. Two datasets: one that trips every recommendation rule and one that
trips none. Every headline figure is checked against the answer computed here from the generating
formulas, within 1%.

Also here: the AMP client signs its queries (SigV4, service ``aps``), and the sparsity figures of
DeepSeek-V2-Lite and V3 match a hand calculation.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import ClassVar

import httpx
import pytest

from infra.catalog.environments import load_environments
from infra.catalog.review_thresholds import ReviewThresholds
from infra.catalog.thresholds import Thresholds
from infra.cli.main import main
from infra.embedded.emulator.process import free_port
from infra.observability import recording
from infra.observability.alerts import DCGM_FB_USED, DCGM_GPU_UTIL, RUNTIME_JOB, alert_rules, rules_yaml
from infra.observability.prometheus_config import write_local
from infra.ops.cost import estimate
from infra.review.prom import AmpClient
from infra.review.sparsity import count
from runtime import contract as c

DAYS = 90
HOURS = DAYS * 24
COUNTER_STEP = 150  # two counter samples in every 5 m rate window, whatever its alignment
GAUGE_STEP = 300
ENV = "local"
GPUS = ("0", "1")
SLO = Thresholds().p99_latency_seconds
RT = f'job="{RUNTIME_JOB}",instance="10.0.1.7:8000"'

# ---- the synthetic fleet ----------------------------------------------------------------------------


def idle(h: int) -> bool:
    """Three hours a night without traffic (GPUs stay up)."""
    return h % 24 in (2, 3, 4)


def prompt_rate(h: int) -> float:
    return 0.0 if idle(h) else 150.0 + 10 * (h % 7)


def gen_rate(h: int) -> float:
    return 0.0 if idle(h) else 60.0 + 5 * (h % 5)


def success_rate(h: int) -> float:
    return 0.0 if idle(h) else 2.0


def risk_rate(h: int) -> float:
    return 0.0 if idle(h) else 1.0


def feedback_rate(h: int) -> float:
    return risk_rate(h) / 2


def error_rate(h: int) -> float:
    return 0.0 if idle(h) else 0.01


def rejected_rate(h: int) -> float:
    return 0.0 if idle(h) else 0.02


@dataclass(frozen=True)
class Dataset:
    name: str
    gpu_util: Callable[[int], float]
    slow: Callable[[int], bool]  # hours whose requests all take 0.6-0.75 s (else 0.4-0.5 s)
    accuracy: Callable[[int], float]
    down: frozenset[int]  # hours the runtime target is down (up = 0)

    def slow_hours(self, hours: int = HOURS) -> list[int]:
        return [h for h in range(hours) if not idle(h) and self.slow(h)]


BASELINE = 0.9
TRIPS_ALL = Dataset(
    "trips-every-rule",
    gpu_util=lambda h: 0.0 if idle(h) else 20.0,
    slow=lambda h: h % 10 == 0,
    accuracy=lambda h: BASELINE - 0.05 if h >= HOURS - 21 * 24 else BASELINE,
    down=frozenset(range(1000, 1006)),
)
TRIPS_NONE = Dataset(
    "trips-no-rule",
    gpu_util=lambda h: 10.0 if idle(h) else (95.0 if h % 24 == 12 else 70.0),
    slow=lambda h: False,
    accuracy=lambda h: BASELINE + (0.01 if h % 2 else -0.01),
    down=frozenset(),
)
E2E_LE = ("0.4", "0.5", "0.6", "0.75", "+Inf")
TTFT_LE = ("0.1", "0.2", "+Inf")


#: Days per OpenMetrics document, and per TSDB block: promtool re-reads its whole input for every block it
#: writes, so one document for 90 days would take quadratic time, and one per day with the default 2 h
#: blocks writes (and Prometheus then opens) over a thousand blocks.
DAYS_PER_DOCUMENT = 10


def openmetrics_days(ds: Dataset, t0: int, days: int = DAYS) -> Iterator[str]:
    """One OpenMetrics document per ``DAYS_PER_DOCUMENT`` days (each family once, its samples in order)."""
    totals: dict[str, float] = {}
    families: dict[str, tuple[str, list[str]]] = {}

    def add(family: str, kind: str, line: str) -> None:
        families.setdefault(family, (kind, []))[1].append(line)

    for day in range(days):
        last = day == days - 1
        for i in range(24 * 3600 // COUNTER_STEP + (1 if last else 0)):
            t = t0 + day * 86400 + i * COUNTER_STEP
            h = (t - t0) // 3600
            for metric, rate in (
                (c.PROMPT_TOKENS, prompt_rate),
                (c.GENERATION_TOKENS, gen_rate),
                (c.RISK_PREDICTIONS, risk_rate),
                (c.FEEDBACK, feedback_rate),
            ):
                add(metric.name, "counter", _counter(totals, metric.name, RT, rate(h), t))
            add(
                c.REQUEST_SUCCESS.name,
                "counter",
                _counter(totals, "ok", f'{RT},finish_reason="stop"', success_rate(h), t),
            )
            add(c.REQUEST_ERRORS.name, "counter", _counter(totals, "err", f'{RT},reason="internal"', error_rate(h), t))
            add(
                c.REQUESTS_REJECTED.name,
                "counter",
                _counter(totals, "rej", f'{RT},reason="queue_full"', rejected_rate(h), t),
            )
            slow = ds.slow(h)
            for le in E2E_LE:
                in_le = success_rate(h) if (float(le) >= (0.75 if slow else 0.5)) else 0.0
                add(
                    c.E2E_LATENCY.name + "_bucket",
                    "histogram",
                    _counter(totals, f"e2e{le}", f'{RT},le="{le}"', in_le, t, suffix=""),
                )
            for le in TTFT_LE:
                in_le = success_rate(h) if float(le) >= 0.2 else 0.0
                add(
                    c.TIME_TO_FIRST_TOKEN.name + "_bucket",
                    "histogram",
                    _counter(totals, f"ttft{le}", f'{RT},le="{le}"', in_le, t, suffix=""),
                )
        for i in range(24 * 3600 // GAUGE_STEP):
            t = t0 + day * 86400 + i * GAUGE_STEP + GAUGE_STEP // 2  # mid-window: one sample per 5 m
            h = (t - t0) // 3600
            for gpu in GPUS:
                labels = f'job="dcgm-exporter",instance="10.0.1.7:9400",gpu="{gpu}",Hostname="gpu-node-a"'
                add(DCGM_GPU_UTIL, "gauge", f"{DCGM_GPU_UTIL}{{{labels}}} {ds.gpu_util(h):g} {t}")
                add(DCGM_FB_USED, "gauge", f"{DCGM_FB_USED}{{{labels}}} 30000 {t}")
            add(c.KV_CACHE_USAGE.name, "gauge", f"{c.KV_CACHE_USAGE.name}{{{RT}}} {0.0 if idle(h) else 0.3} {t}")
            add(
                c.EXPERT_LOAD_IMBALANCE.name,
                "gauge",
                f'{c.EXPERT_LOAD_IMBALANCE.name}{{{RT},layer="1"}} {1.0 if idle(h) else 1.5} {t}',
            )
            add(c.ACCURACY_ROLLING.name, "gauge", f"{c.ACCURACY_ROLLING.name}{{{RT}}} {ds.accuracy(h):g} {t}")
            add(c.ACCURACY_BASELINE.name, "gauge", f"{c.ACCURACY_BASELINE.name}{{{RT}}} {BASELINE} {t}")
            add("up", "gauge", f"up{{{RT}}} {0 if h in ds.down else 1} {t}")
            if not idle(h) and ds.slow(h):
                add(
                    "ALERTS",
                    "gauge",
                    f'ALERTS{{alertname="MoeP99LatencyHigh",alertstate="firing",severity="critical"}} 1 {t}',
                )
        if not last and (day + 1) % DAYS_PER_DOCUMENT:
            continue
        lines = []
        for family, (kind, samples) in families.items():
            name = family.removesuffix("_bucket")
            lines.append(f"# TYPE {name.removesuffix('_total') if kind == 'counter' else name} {kind}")
            lines += sorted(samples, key=lambda line: (line.rsplit(" ", 2)[0], float(line.rsplit(" ", 1)[1])))
        families.clear()
        yield "\n".join(lines) + "\n# EOF\n"


def _counter(totals: dict[str, float], key: str, labels: str, rate: float, t: int, suffix: str = "_total") -> str:
    """The counter's sample at t, then advance it by rate × COUNTER_STEP (constant rate within an hour)."""
    name = {"ok": c.REQUEST_SUCCESS.name, "err": c.REQUEST_ERRORS.name, "rej": c.REQUESTS_REJECTED.name}.get(key)
    if key.startswith("e2e"):
        name = c.E2E_LATENCY.name + "_bucket"
    elif key.startswith("ttft"):
        name = c.TIME_TO_FIRST_TOKEN.name + "_bucket"
    name = name or key
    value = totals.get(key, 0.0)
    totals[key] = value + rate * COUNTER_STEP
    return f"{name}{{{labels}}} {value:.1f} {t}"


# ---- the real tools ---------------------------------------------------------------------------------


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not on the PATH: run scripts/setup.sh (installs Debian's prometheus package)")
    return path


class Prometheus:
    """The Debian prometheus binary on a data folder, with our alert and recording rules loaded."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.config = write_local(
            root / "config",
            ["127.0.0.1:1"],  # nothing to scrape: the data is backfilled
            rules_yaml(alert_rules(gpu_exporter=False)),
            recording_rules_yaml=recording.recording_rules_yaml(),
        )
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.root / "prometheus.log", "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [
                tool("prometheus"),
                f"--config.file={self.config}",
                f"--storage.tsdb.path={self.data}",
                "--storage.tsdb.retention.time=400d",  # the backfilled quarter must not be expired at start
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.root / "prometheus.log").read_text()[-3000:]
            try:
                if httpx.get(self.url + "/-/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError("prometheus not ready in 120 s:\n" + (self.root / "prometheus.log").read_text()[-3000:])

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def backfill(ds: Dataset, root: Path, t0: int, days: int = DAYS, record_from_day: int | None = None) -> Prometheus:
    """Raw series → blocks, and Prometheus started on them. With ``record_from_day``, the recording rules
    are backfilled from that day on with ``promtool tsdb create-blocks-from rules`` (as an operator does
    after deploying them), and Prometheus restarted on both.

    Only a short stretch is recorded: this promtool writes one block per rule per 2 hours (17 rules × 12
    blocks a day), so recording a whole quarter takes tens of minutes; the review reads the rules'
    expressions where nothing was recorded, and the 90-day tests exercise that path."""
    root.mkdir(parents=True)
    prom = Prometheus(root)

    def blocks(part: int, document: str) -> None:
        path = root / f"part-{part:02d}.om"
        path.write_text(document)
        proc = subprocess.run(
            [
                tool("promtool"),
                "tsdb",
                "create-blocks-from",
                "openmetrics",
                "-q",
                f"--max-block-duration={DAYS_PER_DOCUMENT * 24}h",
                str(path),
                str(prom.data),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        path.unlink()

    # Two promtools at a time: each spends much of its time writing its blocks.
    with ThreadPoolExecutor(max_workers=2) as pool:
        for done in [pool.submit(blocks, part, doc) for part, doc in enumerate(openmetrics_days(ds, t0, days))]:
            done.result()
    prom.start()
    if record_from_day is None:
        return prom
    rules_out = root / "recorded"
    proc = subprocess.run(
        [
            tool("promtool"),
            "tsdb",
            "create-blocks-from",
            "rules",
            "-q",
            f"--url={prom.url}",
            f"--start={t0 + record_from_day * 86400}",
            f"--end={t0 + days * 86400}",
            "--eval-interval=5m",
            f"--output-dir={rules_out}",
            str(prom.config.parent / "recording.yml"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    prom.stop()
    for block in rules_out.iterdir():
        if block.is_dir():
            shutil.move(str(block), prom.data / block.name)
    prom.start()
    return prom


# ---- the known answers ------------------------------------------------------------------------------


def percentile_linear(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def expected(ds: Dataset, days: int = DAYS) -> dict[str, float]:
    """Every headline figure (and the rules' inputs) from the generating formulas, not from the review."""
    hours = days * 24
    busy = [h for h in range(hours) if not idle(h)]
    tokens = sum((prompt_rate(h) + gen_rate(h)) * 3600 for h in range(hours))
    per_gpu = [(prompt_rate(h) + gen_rate(h)) / len(GPUS) for h in busy]
    # P99 over the period, as histogram_quantile interpolates inside the bucket holding rank 0.99 · N.
    slow = sum(success_rate(h) * 3600 for h in ds.slow_hours(hours))
    fast = sum(success_rate(h) * 3600 for h in busy) - slow
    rank = 0.99 * (fast + slow)
    p99 = 0.4 + 0.1 * rank / fast if rank <= fast else 0.6 + 0.15 * (rank - fast) / slow
    env = load_environments()[ENV]
    lines = estimate(env).lines
    gpus_priced = env.size_spec.gpu_nodes(env.gpu_instance_type) * env.gpu_instance_spec.gpus
    gpu_hours = len(GPUS) * hours
    cost = gpu_hours * sum(x.usd_per_hour for x in lines if x.scales_to_zero) / gpus_priced + hours * sum(
        x.usd_per_hour for x in lines if not x.scales_to_zero
    )
    util = [ds.gpu_util(h) for h in range(hours)]
    drifting = [h for h in range(hours) if abs(ds.accuracy(h) - BASELINE) > Thresholds().accuracy_drift]
    return {
        "tokens": tokens,
        "prompt_tokens": sum(prompt_rate(h) * 3600 for h in range(hours)),
        "tokens_per_s_per_gpu": sum(per_gpu) / len(per_gpu),
        "tokens_per_s_per_gpu_p95": percentile_linear(per_gpu, 95),
        "p99_latency_s": p99,
        "usd_per_million_tokens": cost / (tokens / 1e6),
        "compute_saved": V2_LITE_SAVED,
        "gpu_hours": gpu_hours,
        "gpu_utilization_mean": sum(util) / len(util),
        "gpu_time_below_low": sum(u < 30 for u in util) / hours,
        "gpu_time_above_high": sum(u > 90 for u in util) / hours,
        "idle_hours_with_gpus_up": hours - len(busy),
        "share_hours_p99_over_slo": len(ds.slow_hours(hours)) / len(busy),
        "share_hours_drifting": len(drifting) / hours,
        "availability": 1 - len([h for h in ds.down if h < hours]) / hours,
        "alert_minutes": 60.0 * len(ds.slow_hours(hours)),
        "error_rate": 0.01 / 3.01,
        "feedback_coverage": 0.5,
        "ttft_p99_s": 0.1 + 0.1 * 0.99,
    }


# ---- DeepSeek configs, and the sparsity worked out by hand --------------------------------------------

V2_LITE = {
    "vocab_size": 102400, "hidden_size": 2048, "num_hidden_layers": 27, "intermediate_size": 10944,
    "moe_intermediate_size": 1408, "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6,
    "first_k_dense_replace": 1, "moe_layer_freq": 1, "q_lora_rank": None, "kv_lora_rank": 512,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "num_attention_heads": 16,
    "topk_method": "greedy", "tie_word_embeddings": False,
}  # fmt: skip
V3 = {
    "vocab_size": 129280, "hidden_size": 7168, "num_hidden_layers": 61, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8,
    "first_k_dense_replace": 3, "moe_layer_freq": 1, "q_lora_rank": 1536, "kv_lora_rank": 512,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "num_attention_heads": 128,
    "topk_method": "noaux_tc", "tie_word_embeddings": False,
}  # fmt: skip

# V2-Lite by hand. Attention per layer (no q LoRA): q_proj 2048·16·192 = 6,291,456; kv_a 2048·(512+64) =
# 1,179,648; kv_a norm 512; kv_b 512·16·(128+128) = 2,097,152; o_proj 16·128·2048 = 4,194,304 → 13,763,072,
# plus two norms 2·2048 → 13,767,168. Dense MLP 3·2048·10944 = 67,239,936 (layer 0). Expert 3·2048·1408 =
# 8,650,752; router 64·2048 = 131,072. MoE layer: all 66 experts 570,949,632 + router; per token 8 experts.
V2_LITE_LAYERS = 27 * 13_767_168 + 67_239_936 + 26 * 131_072 + 26 * 2 * 8_650_752  # without routed experts
V2_LITE_TOTAL = 2 * 102_400 * 2048 + 2048 + V2_LITE_LAYERS + 26 * 64 * 8_650_752
V2_LITE_ACTIVE = 102_400 * 2048 + 2048 + V2_LITE_LAYERS + 26 * 6 * 8_650_752  # lm_head, no input embedding
V2_LITE_SAVED = 1 - V2_LITE_ACTIVE / (V2_LITE_TOTAL - 102_400 * 2048)
# V3 by hand. Attention per layer: q_a 7168·1536 = 11,010,048; q_a norm 1536; q_b 1536·128·192 = 37,748,736;
# kv_a 7168·576 = 4,128,768; kv_a norm 512; kv_b 512·128·256 = 16,777,216; o_proj 128·128·7168 =
# 117,440,512 → 187,107,328, plus norms 14,336. Dense MLP 3·7168·18432 = 396,361,728 (3 layers). Expert
# 3·7168·2048 = 44,040,192; router 256·7168 + 256 (noaux_tc bias) = 1,835,264; 58 MoE layers.
V3_LAYERS = 61 * (187_107_328 + 14_336) + 3 * 396_361_728 + 58 * (1_835_264 + 44_040_192)
V3_TOTAL = 2 * 129_280 * 7168 + 7168 + V3_LAYERS + 58 * 256 * 44_040_192
V3_ACTIVE = 129_280 * 7168 + 7168 + V3_LAYERS + 58 * 8 * 44_040_192


def test_sparsity_of_deepseek_v2_lite_and_v3_matches_the_hand_calculation() -> None:
    lite, v3 = count(V2_LITE), count(V3)
    assert (lite.total_params, lite.activated_params) == (V2_LITE_TOTAL, V2_LITE_ACTIVE)
    assert (v3.total_params, v3.activated_params) == (V3_TOTAL, V3_ACTIVE)
    # DeepSeek's published figures: V2-Lite 15.7B total, 2.4B activated; V3 671B total, 37B activated.
    assert round(lite.total_params / 1e9, 1) == 15.7 and 2.4e9 <= lite.activated_params < 2.5e9
    assert round(v3.total_params / 1e9) == 671 and 36e9 <= v3.activated_params <= 38e9
    assert lite.compute_saved == pytest.approx(V2_LITE_SAVED)
    assert v3.compute_saved == pytest.approx(1 - V3_ACTIVE / (V3_TOTAL - 129_280 * 7168))
    assert lite.compute_saved > 0.40 and v3.compute_saved > 0.90  # the source document's "> 40%" holds
    assert lite.experts_per_token == "2 shared + 6 of 64 routed"


def test_sparsity_names_a_missing_or_bad_field() -> None:
    from infra.review.sparsity import ModelConfigError

    with pytest.raises(ModelConfigError, match="missing kv_lora_rank"):
        count({k: v for k, v in V3.items() if k != "kv_lora_rank"})
    with pytest.raises(ModelConfigError, match=r"num_experts_per_tok = 300: expected 1\.\.n_routed_experts"):
        count(V3 | {"num_experts_per_tok": 300})


# ---- the AMP client signs its queries ----------------------------------------------------------------


class _Capture(BaseHTTPRequestHandler):
    seen: ClassVar[list[tuple[str, dict[str, str], bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        _Capture.seen.append((self.path, dict(self.headers.items()), body))
        payload = {"status": "success", "data": {"resultType": "vector", "result": [{"metric": {}, "value": [1, "1"]}]}}
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("token", ["FwoGZXIvYXdzEXAMPLETOKEN", None])
def test_amp_client_signs_queries_with_sigv4_for_aps(token: str | None) -> None:
    from botocore.credentials import Credentials

    server = HTTPServer(("127.0.0.1", 0), _Capture)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    _Capture.seen.clear()
    try:
        base = f"http://127.0.0.1:{server.server_port}/workspaces/ws-0000/"
        client = AmpClient(base, "eu-west-1", Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/EXAMPLEKEY", token))
        got = client.query("up", 1_700_000_000)
        assert got and got[0].points == {1.0: 1.0}
    finally:
        server.shutdown()
    path, headers, body = _Capture.seen[0]
    headers = {k.lower(): v for k, v in headers.items()}
    assert path == "/workspaces/ws-0000/api/v1/query" and b"query=up" in body
    auth = headers["authorization"]
    assert auth.startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")
    assert "/eu-west-1/aps/aws4_request" in auth and "Signature=" in auth
    assert len(headers["x-amz-date"]) == 16 and headers["x-amz-date"].endswith("Z")
    signed = auth.split("SignedHeaders=")[1].split(",")[0].split(";")
    assert {"host", "x-amz-date"} <= set(signed)
    if token:
        assert headers["x-amz-security-token"] == token and "x-amz-security-token" in signed
    else:
        assert "x-amz-security-token" not in headers


# ---- the review on 90 days -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def v2_lite_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "config.json"
    path.write_text(json.dumps(V2_LITE))
    return path


def run_review(ds: Dataset, root: Path, config: Path, days: int, record_from_day: int | None = None):
    """(dataset, review.json, out dir, stdout, stderr) of `moefleet review` on the backfilled dataset."""
    t0 = (int(time.time()) // 86400 - days - 2) * 86400
    prom = backfill(ds, root / "prometheus", t0, days, record_from_day)
    try:
        out = root / "review"
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "infra.cli",
                "review",
                ENV,
                "--since",
                f"{days}d",
                "--until",
                str(t0 + days * 86400),
                "--out",
                str(out),
                "--prometheus-url",
                prom.url,
                "--model-config",
                str(config),
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        prom.stop()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return ds, json.loads((out / "review.json").read_text()), out, proc.stdout, proc.stderr


@pytest.fixture(scope="module", params=[TRIPS_ALL, TRIPS_NONE], ids=lambda d: d.name)
def reviewed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, v2_lite_config: Path):
    return run_review(request.param, tmp_path_factory.mktemp(request.param.name), v2_lite_config, DAYS)


def check_known_answers(ds: Dataset, doc: dict, days: int) -> None:
    want = expected(ds, days)
    headline = doc["headline"]
    for key in ("tokens", "tokens_per_s_per_gpu", "p99_latency_s", "usd_per_million_tokens", "compute_saved"):
        assert headline[key] == pytest.approx(want[key], rel=0.01), key
    eff, hw, svc, q = doc["model_efficiency"], doc["hardware"], doc["service"], doc["quality"]
    assert eff["prompt_tokens"] == pytest.approx(want["prompt_tokens"], rel=0.01)
    assert eff["tokens_per_s_per_gpu_p95"] == pytest.approx(want["tokens_per_s_per_gpu_p95"], rel=0.01)
    assert eff["expert_load_imbalance_max"] == pytest.approx(1.5)
    assert eff["prefix_cache_hit_rate"] is None  # not in the runtime's contract: reported as no data
    assert hw["gpu_hours"] == pytest.approx(want["gpu_hours"], rel=0.01)
    assert hw["gpu_utilization_mean"] == pytest.approx(want["gpu_utilization_mean"], rel=0.01)
    assert hw["gpu_time_below_low"] == pytest.approx(want["gpu_time_below_low"], abs=0.005)
    assert hw["gpu_time_above_high"] == pytest.approx(want["gpu_time_above_high"], abs=0.005)
    assert hw["idle_hours_with_gpus_up"] == want["idle_hours_with_gpus_up"]
    assert hw["gpu_memory_used_mean_bytes"] == pytest.approx(30000 * 2**20)
    assert svc["share_hours_p99_over_slo"] == pytest.approx(want["share_hours_p99_over_slo"], abs=0.002)
    assert svc["ttft_p99_s"] == pytest.approx(want["ttft_p99_s"], rel=0.01)
    assert svc["error_rate"] == pytest.approx(want["error_rate"], rel=0.01)
    assert svc["availability"] == pytest.approx(want["availability"], abs=0.001)
    assert sum(svc["alert_minutes_firing"].values()) == pytest.approx(want["alert_minutes"], rel=0.01)
    assert q["share_hours_drifting"] == pytest.approx(want["share_hours_drifting"], abs=0.002)
    assert q["feedback_coverage"] == pytest.approx(want["feedback_coverage"], rel=0.01)
    assert len(doc["weekly"]["p99"]) == max(1, days // 7)


@pytest.mark.slow
def test_review_headline_figures_match_the_known_answers(reviewed) -> None:
    ds, doc, _, stdout, stderr = reviewed
    check_known_answers(ds, doc, DAYS)
    assert "review: querying" in stderr  # progress goes to stderr
    assert "compute saved by sparsity" in stdout


@pytest.mark.slow
def test_review_reads_recorded_series_and_the_raw_ones_before_them(tmp_path: Path, v2_lite_config: Path) -> None:
    """Two days, the recording rules backfilled for the second only (deployed mid-period): the review reads
    the recorded series where they exist and the rules' expressions before, and gets the period's figures.

    Recorded samples carry the rule group's evaluation phase (Prometheus offsets each group by a hash of
    its name), so a 5-minute rate window can straddle an hour boundary and lend a silent hour a sliver of
    traffic: per-hour figures blur by up to one window, totals and quantiles of the period do not."""
    ds, doc, _, _, stderr = run_review(TRIPS_ALL, tmp_path, v2_lite_config, days=2, record_from_day=1)
    want = expected(ds, days=2)
    flat = {**doc["model_efficiency"], **doc["hardware"], **doc["service"], **doc["quality"], **doc["headline"]}
    for key in ("tokens", "prompt_tokens", "p99_latency_s", "usd_per_million_tokens", "compute_saved", "gpu_hours",
                "gpu_utilization_mean", "error_rate", "feedback_coverage", "availability", "ttft_p99_s"):  # fmt: skip
        assert flat[key] == pytest.approx(want[key], rel=0.01), key
    # Busy hours take in the slivers (hours next to the silent ones): their mean moves by a few percent.
    assert flat["tokens_per_s_per_gpu"] == pytest.approx(want["tokens_per_s_per_gpu"], rel=0.05)
    assert f"{recording.PROMPT_TOKENS_RATE} not recorded before" in stderr
    assert f"{recording.PROMPT_TOKENS_RATE} not recorded in the period" not in stderr
    assert f"{recording.E2E_BUCKET_RATE} not recorded in the period" not in stderr


@pytest.mark.slow
def test_review_html_is_self_contained_with_plots(reviewed) -> None:
    _, _, out, _, _ = reviewed
    html = (out / "review.html").read_text()
    assert html.count("data:image/png;base64,") >= 4
    assert "<script" not in html and "http://" not in html and "https://" not in html
    md = (out / "review.md").read_text()
    for section in ("Model efficiency", "Hardware utilisation", "Service quality", "Quality", "ROI", "Recommendations"):
        assert f"## {section}" in md and f"<h2>{section}</h2>" in html


@pytest.mark.slow
def test_each_recommendation_fires_exactly_when_its_rule_says(reviewed) -> None:
    ds, doc, _, stdout, _ = reviewed
    want, t = expected(ds), ReviewThresholds()
    fired = {rec["rule"]: rec["fired"] for rec in doc["recommendations"]}
    assert fired == {
        "right-size": want["gpu_utilization_mean"] < t.gpu_busy_below_perc,
        "scale-out": want["share_hours_p99_over_slo"] > t.p99_over_slo_hours_share,
        "re-evaluate-model": want["share_hours_drifting"] > t.accuracy_drift_hours_share,
    }
    # The two datasets are built so that one trips every rule and the other none.
    assert set(fired.values()) == ({True} if ds is TRIPS_ALL else {False})
    for rec in doc["recommendations"]:
        assert (f"recommendation ({rec['rule']})" in stdout) == rec["fired"]


# ---- the recording rules, shipped as the alerts are ------------------------------------------------------


def test_recording_rules_pass_promtool_and_ship_three_ways(tmp_path: Path) -> None:
    import yaml

    from infra.observability.monitoring_objects import prometheus_recording_rule

    path = tmp_path / "recording.yml"
    path.write_text(recording.recording_rules_yaml())
    proc = subprocess.run([tool("promtool"), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    groups = yaml.safe_load(path.read_text())
    assert prometheus_recording_rule("moe-fleet")["spec"] == groups
    config = write_local(tmp_path / "local", ["127.0.0.1:8000"], "groups: []\n", recording_rules_yaml=path.read_text())
    assert yaml.safe_load(config.read_text())["rule_files"] == ["rules.yml", "recording.yml"]
    assert yaml.safe_load((config.parent / "recording.yml").read_text()) == groups
    records = {rule["record"] for rule in groups["groups"][0]["rules"]}
    assert {recording.PROMPT_TOKENS_RATE, recording.E2E_BUCKET_RATE, recording.GPU_UTILIZATION} <= records


def test_review_of_an_empty_prometheus_reports_no_data(tmp_path: Path, v2_lite_config: Path) -> None:
    prom = Prometheus(tmp_path)
    prom.start()
    try:
        out = tmp_path / "review"
        code = main(
            ["review", ENV, "--since", "2h", "--out", str(out), "--prometheus-url", prom.url,
             "--model-config", str(v2_lite_config)]
        )  # fmt: skip
    finally:
        prom.stop()
    assert code == 0
    doc = json.loads((out / "review.json").read_text())
    assert doc["headline"]["tokens"] is None and doc["headline"]["p99_latency_s"] is None
    assert doc["headline"]["compute_saved"] == pytest.approx(V2_LITE_SAVED)
    assert all(rec["fired"] is None for rec in doc["recommendations"])
    md = (out / "review.md").read_text()
    assert "no data" in md and f"no data: {recording.PROMPT_TOKENS_RATE}" in md


def test_review_rejects_bad_options_with_the_field_and_what_is_allowed(tmp_path: Path, capsys) -> None:
    assert main(["review", ENV, "--since", "90x", "--out", str(tmp_path)]) == 2
    assert "--since = '90x': expected a positive duration" in capsys.readouterr().err
    assert main(["review", ENV, "--until", "yesterday", "--out", str(tmp_path)]) == 2
    assert "--until = 'yesterday'" in capsys.readouterr().err
    assert main(["review", ENV, "--since", "1m", "--out", str(tmp_path)]) == 2
    assert "--step = '5m' is longer than --since = '1m'" in capsys.readouterr().err
    assert main(["review", "qa", "--out", str(tmp_path)]) == 2
    assert "unknown environment 'qa'" in capsys.readouterr().err
