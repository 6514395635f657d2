"""Prediction records: both stores join a label exactly once (404 unknown, 409 twice), and the writer
buffers through a store outage, counts what waits and what is lost, and catches up when the store is back.
DynamoDB runs against the shared embedded AWS (moto server)."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import boto3
import pytest

from runtime import contract as c
from runtime.metrics import ServiceMetrics
from runtime.server.prediction_store import (
    AlreadyLabelled,
    DynamoStore,
    PredictionRecord,
    RecordNotFound,
    RecordWriter,
    SqliteStore,
    StoreUnavailable,
    features_digest,
)

REGION = "us-east-1"


def record(rid: str, positive: bool = True) -> PredictionRecord:
    return PredictionRecord(
        request_id=rid,
        task="fraud",
        score=0.8 if positive else 0.2,
        predicted="fraud" if positive else "legit",
        positive=positive,
        features_digest=features_digest({"amount": 1}),
        model="tiny",
        model_revision="demo",
        created_at=time.time(),
    )


def make_table(endpoint: str) -> str:
    name = f"risk-test-{uuid.uuid4().hex[:8]}"
    ddb = boto3.client("dynamodb", region_name=REGION, endpoint_url=endpoint)
    ddb.create_table(
        TableName=name,
        KeySchema=[{"AttributeName": c.RISK_RECORD_KEY, "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": c.RISK_RECORD_KEY, "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    return name


@pytest.fixture(params=["sqlite", "dynamodb"])
def store(request, tmp_path, monkeypatch):
    if request.param == "sqlite":
        s = SqliteStore(str(tmp_path / "records.db"))
    else:
        endpoint = request.getfixturevalue("emulator")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        s = DynamoStore(make_table(endpoint), region=REGION, endpoint=endpoint)
    yield s
    s.close()


def test_label_joins_exactly_once(store):
    store.put(record("a", positive=True))
    store.put(record("b", positive=False))
    got = store.label("a", True)
    assert got.correct is True and got.label is True and got.task == "fraud" and got.model_revision == "demo"
    assert store.label("b", True).correct is False
    with pytest.raises(AlreadyLabelled):
        store.label("a", False)
    with pytest.raises(RecordNotFound):
        store.label("nope", True)
    with pytest.raises(AlreadyLabelled):  # a labelled record is final
        store.put(record("a"))
    store.put(record("c"))
    store.put(record("c", positive=False))  # an unlabelled one may be scored again
    assert store.label("c", False).correct is True


def test_racing_labels_one_wins(store):
    store.put(record("race"))

    def try_label(_: int) -> str:
        try:
            store.label("race", True)
            return "ok"
        except AlreadyLabelled:
            return "409"

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(try_label, range(8)))
    assert outcomes.count("ok") == 1 and outcomes.count("409") == 7


class FlakyStore:
    """A real SQLite store behind a switch that makes every call fail like an unreachable service."""

    kind = "flaky"

    def __init__(self, inner: SqliteStore) -> None:
        self.inner, self.down = inner, False

    def put(self, rec):
        if self.down:
            raise StoreUnavailable("down")
        self.inner.put(rec)

    def label(self, rid, label):
        if self.down:
            raise StoreUnavailable("down")
        return self.inner.label(rid, label)

    def close(self):
        self.inner.close()


def test_writer_buffers_through_an_outage(tmp_path):
    metrics = ServiceMetrics()
    flaky = FlakyStore(SqliteStore(str(tmp_path / "r.db")))
    w = RecordWriter(flaky, metrics, capacity=3, retry_s=0.05)
    flaky.down = True
    for i in range(5):
        w.write(record(f"r{i}"))
    assert w.pending == 3 and w.is_pending("r4") and not w.is_pending("r0")
    assert metrics.records_pending._value.get() == 3
    assert metrics.records_dropped._value.get() == 2  # the buffer is bounded, and the loss is counted
    flaky.down = False
    deadline = time.monotonic() + 5
    while w.pending and time.monotonic() < deadline:
        time.sleep(0.05)
    assert w.pending == 0 and metrics.records_pending._value.get() == 0
    assert flaky.label("r4", True).correct is True
    with pytest.raises(RecordNotFound):
        flaky.label("r0", True)
    flaky.down = True
    w.write(record("late"))
    w.close()  # the store is still down at shutdown: counted as lost, not silently
    assert metrics.records_dropped._value.get() == 3


def test_unreachable_dynamodb_is_unavailable(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    from infra.embedded.emulator.process import free_port

    s = DynamoStore("t", region=REGION, endpoint=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StoreUnavailable):
        s.put(record("x"))
    with pytest.raises(StoreUnavailable):
        s.label("x", True)
