"""Prediction records through a real server: a SQLite file outlives a restart (the single-node store), and a
DynamoDB store that cannot be reached leaves predictions answering (records wait in memory, counted) while
feedback says 503 instead of losing the label."""

from __future__ import annotations

import httpx
import pytest

from runtime import contract as c
from tests.runtime.service.conftest import FRAUD_TASK, free_port

BODY = {"features": {"amount": 120, "new_email": True}, "request_id": "kept-1"}


@pytest.mark.slow  # two server starts
def test_sqlite_records_outlive_a_restart(server_factory, tmp_path):
    args = ("--risk-task", str(FRAUD_TASK), "--risk-store-path", str(tmp_path / "records.db"), "--no-warmup")
    with server_factory(*args) as srv:
        r = httpx.post(srv.url + c.RISK_PATH, json=BODY, timeout=30)
        assert r.status_code == 200, r.text
        fraud = r.json()["label"] == "fraud"
    with server_factory(*args) as srv:
        fb = httpx.post(srv.url + c.FEEDBACK_PATH, json={"request_id": "kept-1", "label": fraud}, timeout=10)
        assert fb.status_code == 200 and fb.json()["correct"] is True, fb.text
        again = httpx.post(srv.url + c.FEEDBACK_PATH, json={"request_id": "kept-1", "label": fraud}, timeout=10)
        assert again.status_code == 409


def test_store_outage_keeps_predictions_and_refuses_feedback(server_factory):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = {
        c.ENV_RISK_STORE_TABLE: "predictions",
        c.ENV_RISK_STORE_ENDPOINT: dead,
        c.ENV_AWS_REGION: "us-east-1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
    }
    with server_factory("--risk-task", str(FRAUD_TASK), "--no-warmup", env=env) as srv:
        for i in range(3):
            r = httpx.post(srv.url + c.RISK_PATH, json=BODY | {"request_id": f"out-{i}"}, timeout=60)
            assert r.status_code == 200, r.text
        m = srv.metrics()
        assert m[c.RISK_RECORDS_PENDING.name] == 3 and m[c.RISK_RECORDS_DROPPED.name] == 0
        fb = httpx.post(srv.url + c.FEEDBACK_PATH, json={"request_id": "out-0", "label": True}, timeout=60)
        assert fb.status_code == 503 and fb.json()["error"]["code"] == "store_unavailable"
        assert fb.headers["retry-after"] == "5"
