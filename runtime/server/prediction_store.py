"""Prediction records that outlive a pod and are shared by every replica.

Every risk prediction is written as one record (request id, task, score, predicted class, a digest of the
features, model and revision, time). Feedback joins a ground-truth label to it by request id from any
replica, exactly once: the label is set with a conditional write, so a second label for the same id is
refused (409) even when two replicas race, and an unknown id is a 404.

Two stores share one interface: DynamoDB (every replica of an environment, the table the stack creates)
and SQLite (one node: ``moe-runtime serve`` without AWS). A store that fails does not fail predictions:
:class:`RecordWriter` keeps the records in a bounded buffer and retries them in the background, counting
what waits (``moe_risk_records_pending``) and what it had to give up (``moe_risk_records_dropped_total``).
Feedback needs the store and answers 503 while it is down.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Protocol

from runtime import contract as c

log = logging.getLogger(__name__)


class StoreUnavailable(RuntimeError):
    """The store cannot be reached or refused the call for a reason other than the record's state."""


class RecordNotFound(LookupError):
    pass


class AlreadyLabelled(RuntimeError):
    pass


@dataclass(frozen=True)
class PredictionRecord:
    request_id: str
    task: str
    score: float
    predicted: str  # the task's class for this score
    positive: bool  # predicted the positive class
    features_digest: str  # sha256 of the features as canonical JSON
    model: str
    model_revision: str
    created_at: float
    label: bool | None = None  # ground truth once known: True = the positive class
    correct: bool | None = None
    labelled_at: float | None = None


def features_digest(features: Mapping[str, object]) -> str:
    """Identifies the scored input without storing it (features may be personal data)."""
    canon = json.dumps(features, sort_keys=True, separators=(",", ":"), default=str)
    return "sha256:" + hashlib.sha256(canon.encode()).hexdigest()


class PredictionStore(Protocol):
    kind: str

    def put(self, rec: PredictionRecord) -> None:
        """Store a new prediction; AlreadyLabelled when that id already carries a label; StoreUnavailable."""

    def label(self, request_id: str, label: bool) -> PredictionRecord:
        """Join the ground truth once; RecordNotFound, AlreadyLabelled or StoreUnavailable."""

    def close(self) -> None: ...


# ---- SQLite -----------------------------------------------------------------------------------------


class SqliteStore:
    """One file, one node. ``:memory:`` keeps records for the life of the process only."""

    kind = "sqlite"

    def __init__(self, path: str) -> None:
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=5)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS predictions (request_id TEXT PRIMARY KEY, task TEXT, score REAL, "
                "predicted TEXT, positive INTEGER, features_digest TEXT, model TEXT, model_revision TEXT, "
                "created_at REAL, label INTEGER, correct INTEGER, labelled_at REAL)"
            )

    def put(self, rec: PredictionRecord) -> None:
        row = asdict(rec)
        cols = [k for k in row if k not in ("label", "correct", "labelled_at")]
        sets = ", ".join(f"{k} = excluded.{k}" for k in cols if k != "request_id")
        try:
            with self._lock:
                cur = self._db.execute(
                    f"INSERT INTO predictions ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}) "
                    f"ON CONFLICT(request_id) DO UPDATE SET {sets} WHERE label IS NULL",
                    [row[k] for k in cols],
                )
        except sqlite3.Error as err:
            raise StoreUnavailable(f"sqlite {self.path}: {err}") from err
        if cur.rowcount == 0:
            raise AlreadyLabelled(rec.request_id)

    def label(self, request_id: str, label: bool) -> PredictionRecord:
        now = time.time()
        try:
            with self._lock:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    row = self._db.execute("SELECT * FROM predictions WHERE request_id = ?", (request_id,)).fetchone()
                    if row is None:
                        raise RecordNotFound(request_id)
                    rec = _from_row(row)
                    if rec.label is not None:
                        raise AlreadyLabelled(request_id)
                    correct = rec.positive == label
                    self._db.execute(
                        "UPDATE predictions SET label = ?, correct = ?, labelled_at = ? "
                        "WHERE request_id = ? AND label IS NULL",
                        (int(label), int(correct), now, request_id),
                    )
                finally:
                    self._db.execute("COMMIT")
        except sqlite3.Error as err:
            raise StoreUnavailable(f"sqlite {self.path}: {err}") from err
        return _replace(rec, label=label, correct=correct, labelled_at=now)

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _from_row(row: tuple) -> PredictionRecord:
    (rid, task, score, predicted, positive, digest, model, rev, created, label, correct, labelled_at) = row
    return PredictionRecord(
        rid,
        task,
        score,
        predicted,
        bool(positive),
        digest,
        model,
        rev,
        created,
        None if label is None else bool(label),
        None if correct is None else bool(correct),
        labelled_at,
    )


def _replace(rec: PredictionRecord, **kw) -> PredictionRecord:
    return PredictionRecord(**(asdict(rec) | kw))


# ---- DynamoDB ---------------------------------------------------------------------------------------


class DynamoStore:
    """A table keyed by ``request_id``; the label is set once with ``attribute_not_exists(label)``.

    Uses GetItem, PutItem and UpdateItem only (``runtime.contract.RISK_STORE_ACTIONS``, what the IAM
    policy allows). Short timeouts and few retries: a slow store must not hold a prediction for long, the
    buffer takes over."""

    kind = "dynamodb"

    def __init__(
        self,
        table: str,
        region: str | None = None,
        endpoint: str | None = None,
        ttl_days: int = c.DEFAULT_RISK_RECORD_TTL_DAYS,
    ) -> None:
        import boto3
        from botocore.config import Config

        self.table, self.ttl_s = table, ttl_days * 86400
        cfg = Config(
            connect_timeout=2,
            read_timeout=3,
            retries={"max_attempts": 2, "mode": "standard"},
            max_pool_connections=32,  # one per thread of asyncio.to_thread's pool at most
        )
        self._client = boto3.client("dynamodb", region_name=region, endpoint_url=endpoint, config=cfg)

    def _call(self, op: str, **kw):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self._client, op)(TableName=self.table, **kw)
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException":
                raise
            raise StoreUnavailable(f"dynamodb {self.table}: {err}") from err
        except BotoCoreError as err:
            raise StoreUnavailable(f"dynamodb {self.table}: {err}") from err

    def put(self, rec: PredictionRecord) -> None:
        from botocore.exceptions import ClientError

        item = {
            c.RISK_RECORD_KEY: {"S": rec.request_id},
            "task": {"S": rec.task},
            "score": {"N": repr(float(rec.score))},
            "predicted": {"S": rec.predicted},
            "positive": {"BOOL": rec.positive},
            "features_digest": {"S": rec.features_digest},
            "model": {"S": rec.model},
            "model_revision": {"S": rec.model_revision},
            "created_at": {"N": repr(rec.created_at)},
            c.RISK_RECORD_TTL_ATTRIBUTE: {"N": str(int(rec.created_at + self.ttl_s))},
        }
        try:
            self._call(
                "put_item",
                Item=item,
                ConditionExpression="attribute_not_exists(#label)",
                ExpressionAttributeNames={"#label": "label"},
            )
        except ClientError:
            raise AlreadyLabelled(rec.request_id) from None

    def label(self, request_id: str, label: bool) -> PredictionRecord:
        from botocore.exceptions import ClientError

        key = {c.RISK_RECORD_KEY: {"S": request_id}}
        got = self._call("get_item", Key=key, ConsistentRead=True).get("Item")
        if got is None:
            raise RecordNotFound(request_id)
        rec = _from_item(got)
        if rec.label is not None:
            raise AlreadyLabelled(request_id)
        correct, now = rec.positive == label, time.time()
        try:
            self._call(
                "update_item",
                Key=key,
                UpdateExpression="SET #label = :label, correct = :correct, labelled_at = :now",
                # exactly once, even when two replicas race on the same id
                ConditionExpression="attribute_exists(#key) AND attribute_not_exists(#label)",
                ExpressionAttributeNames={"#label": "label", "#key": c.RISK_RECORD_KEY},
                ExpressionAttributeValues={
                    ":label": {"BOOL": label},
                    ":correct": {"BOOL": correct},
                    ":now": {"N": repr(now)},
                },
            )
        except ClientError:
            raise AlreadyLabelled(request_id) from None
        return _replace(rec, label=label, correct=correct, labelled_at=now)

    def close(self) -> None:
        self._client.close()


def _from_item(item: dict) -> PredictionRecord:
    def s(k: str) -> str:
        return item.get(k, {}).get("S", "")

    def n(k: str) -> float | None:
        v = item.get(k, {}).get("N")
        return None if v is None else float(v)

    def b(k: str) -> bool | None:
        return item.get(k, {}).get("BOOL")

    return PredictionRecord(
        request_id=s(c.RISK_RECORD_KEY),
        task=s("task"),
        score=n("score") or 0.0,
        predicted=s("predicted"),
        positive=bool(b("positive")),
        features_digest=s("features_digest"),
        model=s("model"),
        model_revision=s("model_revision"),
        created_at=n("created_at") or 0.0,
        label=b("label"),
        correct=b("correct"),
        labelled_at=n("labelled_at"),
    )


def open_store(table: str | None, region: str | None, endpoint: str | None, path: str | None) -> PredictionStore:
    """DynamoDB when a table is named, else SQLite at ``path`` (``:memory:`` when none: not durable)."""
    if table:
        return DynamoStore(table, region=region, endpoint=endpoint)
    return SqliteStore(path or ":memory:")


# ---- the write path: never block a prediction on a failing store, never lose a record silently ---------


class RecordWriter:
    """Writes records now; when the store fails, keeps them (oldest first, at most ``capacity``) and
    retries every ``retry_s`` from a background thread."""

    def __init__(self, store: PredictionStore, metrics, capacity: int = 10_000, retry_s: float = 1.0) -> None:
        self.store, self.metrics, self.capacity, self.retry_s = store, metrics, capacity, retry_s
        self._pending: collections.OrderedDict[str, PredictionRecord] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._retry_loop, name="moe-risk-records", daemon=True)
        self._thread.start()

    def write(self, rec: PredictionRecord) -> None:
        """Store ``rec`` or buffer it; AlreadyLabelled passes through (the caller answers 409)."""
        with self._lock:
            backlog = bool(self._pending)
        if not backlog:
            try:
                self.store.put(rec)
                return
            except StoreUnavailable as err:
                log.warning("prediction store unavailable, buffering records: %s", err)
        self._buffer(rec)

    def _buffer(self, rec: PredictionRecord) -> None:
        with self._lock:
            self._pending[rec.request_id] = rec
            self._pending.move_to_end(rec.request_id)
            while len(self._pending) > self.capacity:
                lost, _ = self._pending.popitem(last=False)
                self.metrics.records_dropped.inc()
                log.error("prediction record %s dropped: %d records already wait for the store", lost, self.capacity)
            self.metrics.records_pending.set(len(self._pending))

    def is_pending(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._pending

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def flush(self) -> int:
        """Write what waits, oldest first, until the store fails again; returns how many are left."""
        while True:
            with self._lock:
                if not self._pending:
                    self.metrics.records_pending.set(0)
                    return 0
                rid, rec = next(iter(self._pending.items()))
            try:
                self.store.put(rec)
            except StoreUnavailable:
                return self.pending
            except AlreadyLabelled:
                log.warning("prediction record %s not rewritten: that id was labelled meanwhile", rid)
            with self._lock:
                if self._pending.get(rid) is rec:
                    del self._pending[rid]
                self.metrics.records_pending.set(len(self._pending))

    def _retry_loop(self) -> None:
        while not self._stop.wait(self.retry_s):
            if self.pending:
                left = self.flush()
                if not left:
                    log.info("prediction store is back: buffered records written")

    def close(self) -> None:
        """Last try on shutdown; whatever the store still refuses is counted and logged as dropped."""
        self._stop.set()
        self._thread.join(timeout=5)
        left = self.flush()
        if left:
            self.metrics.records_dropped.inc(left)
            log.error("%d prediction records lost at shutdown: the store is unavailable", left)
        self.store.close()
