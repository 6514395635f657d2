"""The risk service as a fleet: two real ``moe-runtime serve`` replicas behind a round-robin proxy, their
prediction records in DynamoDB (the embedded AWS), and a real Prometheus scraping both.

Predictions go through one replica, their feedback through the other; one replica restarts in between and
no record is lost; a second label is a 409 and an unknown id a 404 wherever they land; and the fleet
accuracy Prometheus computes from both replicas' counters is the known answer, although the two replicas
saw different accuracies.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import httpx
import pytest

from infra.catalog.names import DEFAULT_RISK_TASK_FILE
from infra.observability import alerts, prometheus_config
from infra.observability.alerts import alert_rules, fleet_accuracy
from runtime import contract as c
from tests.e2e.test_prometheus_loop import Prometheus
from tests.runtime.service.conftest import Server, free_port, run_server

pytestmark = pytest.mark.slow  # three server starts and a Prometheus: about a minute on the shared box

REGION = "us-east-1"
N = 12


class RoundRobinProxy:
    """Forwards each request to the next backend in turn, and says which one in ``X-Backend``."""

    def __init__(self, backends: list[str]) -> None:
        self.backends = backends
        self.next = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _forward(self) -> None:
                with proxy._lock:
                    index = proxy.next
                    proxy.next = (proxy.next + 1) % len(proxy.backends)
                    target = proxy.backends[index]
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                r = httpx.request(
                    self.command,
                    target + self.path,
                    content=body,
                    headers={"Content-Type": self.headers.get("Content-Type", "application/json")},
                    timeout=60,
                )
                self.send_response(r.status_code)
                self.send_header("Content-Type", r.headers.get("content-type", "application/json"))
                self.send_header("Content-Length", str(len(r.content)))
                self.send_header("X-Backend", str(index))
                self.end_headers()
                self.wfile.write(r.content)

            do_GET = do_POST = _forward

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def post(self, path: str, body: dict, avoid: int | None = None) -> tuple[httpx.Response, int]:
        """POST through the proxy; with ``avoid``, first skip that backend's turn (a health check takes it)."""
        if avoid is not None and self.next == avoid:
            httpx.get(self.url + c.HEALTH_PATH, timeout=10)
        r = httpx.post(self.url + path, json=body, timeout=60)
        return r, int(r.headers["X-Backend"])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def table(emulator: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    name = f"risk-fleet-{uuid.uuid4().hex[:8]}"
    ddb = boto3.client("dynamodb", region_name=REGION, endpoint_url=emulator)
    ddb.create_table(
        TableName=name,
        KeySchema=[{"AttributeName": c.RISK_RECORD_KEY, "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": c.RISK_RECORD_KEY, "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    return name


@contextlib.contextmanager
def replica(model: Path, log_dir: Path, env: dict) -> Iterator[Server]:
    args = ("--risk-task", str(DEFAULT_RISK_TASK_FILE), "--accuracy-baseline", "0.9", "--no-warmup")
    with run_server(model, *args, log_dir=log_dir, env=env) as srv:
        yield srv


def test_predict_on_one_replica_label_on_another_through_a_restart(
    emulator: str, table: str, tiny_v2: Path, tmp_path: Path
) -> None:
    model = tiny_v2
    env = {
        c.ENV_RISK_STORE_TABLE: table,
        c.ENV_RISK_STORE_ENDPOINT: emulator,
        c.ENV_AWS_REGION: REGION,
        c.ENV_MODEL_REVISION: "r1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
    }
    with contextlib.ExitStack() as stack:
        first_a = contextlib.ExitStack()
        stack.callback(first_a.close)
        with ThreadPoolExecutor(max_workers=2) as pool:  # the two replicas start side by side
            started = [pool.submit(s.enter_context, replica(model, tmp_path, env)) for s in (first_a, stack)]
        a, b = (f.result() for f in started)
        proxy = RoundRobinProxy([a.url, b.url])
        stack.callback(proxy.close)

        predicted: dict[str, tuple[bool, int]] = {}
        for i in range(N):
            rid = f"order-{uuid.uuid4().hex[:6]}-{i}"
            features = {"amount": 100 * (i + 1), "hour": i % 24, "new_email": i % 3 == 0}
            r, backend = proxy.post(c.RISK_PATH, {"features": features, "request_id": rid})
            assert r.status_code == 200, r.text
            predicted[rid] = (r.json()["label"] == "fraud", backend)
        assert {backend for _, backend in predicted.values()} == {0, 1}

        # Replica A restarts: whatever it predicted lives in the table, not in its memory.
        first_a.close()
        a = stack.enter_context(replica(model, tmp_path, env))
        proxy.backends[0] = a.url

        prom_dir = tmp_path / "prometheus"
        config = prometheus_config.write_local(
            prom_dir,
            [f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"],
            alerts.rules_yaml(alert_rules(gpu_exporter=False)),
            scrape_interval="1s",
            evaluation_interval="1s",
        )
        prom = Prometheus(prom_dir, config)
        stack.callback(prom.stop)
        prom.wait(lambda: prom.scalar(f'count(up{{job="{alerts.RUNTIME_JOB}"}} == 1)') == 2.0, 30, "scraping both")

        # The known answer: the first 9 labels agree with the prediction, the last 3 do not → 0.75.
        per_replica = {0: [0, 0], 1: [0, 0]}  # labelled, correct
        for i, (rid, (fraud, backend)) in enumerate(predicted.items()):
            truth = fraud if i < 9 else not fraud
            r, got = proxy.post(c.FEEDBACK_PATH, {"request_id": rid, "label": truth}, avoid=backend)
            assert got != backend and r.status_code == 200, r.text
            assert r.json()["correct"] is (i < 9)
            per_replica[got][0] += 1
            per_replica[got][1] += int(i < 9)
        rid = next(iter(predicted))
        for _ in range(2):  # a second label is refused on either replica
            r, _ = proxy.post(c.FEEDBACK_PATH, {"request_id": rid, "label": True})
            assert r.status_code == 409 and r.json()["error"]["code"] == "already_labelled"
        r, _ = proxy.post(c.FEEDBACK_PATH, {"request_id": "order-never-scored", "label": True})
        assert r.status_code == 404

        # Different accuracies per replica, one answer for the fleet.
        acc = {k: correct / labelled for k, (labelled, correct) in per_replica.items()}
        assert acc[0] != acc[1], per_replica
        labelled = f"sum({c.RISK_LABELLED.name})"
        prom.wait(lambda: prom.scalar(labelled) == N, 20, f"seeing all {N} labels")
        exact = prom.scalar(f"sum({c.RISK_CORRECT.name}) / sum({c.RISK_LABELLED.name})")
        assert exact == 0.75
        # The alert's own expression (a windowed increase, which Prometheus extrapolates per target).
        windowed = prom.scalar(fleet_accuracy("5m"))
        assert windowed == pytest.approx(0.75, abs=0.02)
        assert prom.scalar(f"max({c.ACCURACY_BASELINE.name})") == 0.9
        for srv in (a, b):
            m = srv.metrics()
            assert m[c.RISK_RECORDS_PENDING.name] == 0 and m[c.RISK_RECORDS_DROPPED.name] == 0
