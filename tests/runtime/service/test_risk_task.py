"""The risk task is configuration: a task whose labels the tokenizer cannot express turns the risk routes off
(503 naming the label), says so once in the log, and never keeps chat or completions from serving."""

from __future__ import annotations

import json

import httpx
import pytest

from runtime import contract as c
from runtime.risk_task import RiskTask, RiskTaskError, load_task
from tests.runtime.service.conftest import FRAUD_TASK

#: Valid as a task, but " perhaps" is several tokens of the tiny checkpoint's tokenizer.
UNFIT_TASK = json.dumps({"name": "unfit", "positive_label": " perhaps", "negative_label": " no"})


def test_unfit_task_turns_only_risk_off(server_factory):
    with server_factory("--risk-task", UNFIT_TASK) as srv:
        chat = httpx.post(
            srv.url + c.CHAT_COMPLETIONS_PATH,
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
            timeout=30,
        )
        assert chat.status_code == 200, chat.text
        for path in (c.RISK_PATH, c.RISK_ALIAS_PATH):
            r = httpx.post(srv.url + path, json={"features": {"amount": 1}}, timeout=10)
            assert r.status_code == 503 and r.json()["error"]["code"] == "risk_disabled"
            assert "positive_label ' perhaps'" in r.json()["error"]["message"]
        fb = httpx.post(srv.url + c.FEEDBACK_PATH, json={"request_id": "x", "label": 1}, timeout=10)
        assert fb.status_code == 503 and "exactly one token" in fb.json()["error"]["message"]
        assert srv.logs().count("risk routes off") == 1


def test_no_task_means_risk_off(server_factory):
    with server_factory() as srv:
        r = httpx.post(srv.url + c.RISK_PATH, json={"features": {"amount": 1}}, timeout=10)
        assert r.status_code == 503 and c.ENV_RISK_TASK in r.json()["error"]["message"]
        assert httpx.get(srv.url + c.READY_PATH, timeout=5).status_code == 200


def test_default_task_file_is_the_fraud_prompt():
    task = load_task(str(FRAUD_TASK))
    assert task == RiskTask(name="fraud")
    assert task.render({"amount": 10, "new_email": True}) == (
        "Order features:\namount: 10\nnew_email: true\n"
        "Is this transaction a fraud risk? Answer yes or no. The answer is"
    )
    assert load_task(task.to_json()) == task  # what the ConfigMap carries round-trips


def test_few_shot_examples_come_first():
    task = RiskTask(
        name="fs",
        template="{features}Fraud?",
        examples=[{"features": {"amount": 5}, "positive": False}, {"features": {"amount": 9e5}, "positive": True}],
    )
    assert task.render({"amount": 7}) == "amount: 5\nFraud? no\n\namount: 900000.0\nFraud? yes\n\namount: 7\nFraud?"


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"name": "x", "template": "no placeholder"}, "template = 'no placeholder'"),
        ({"name": "x", "threshold": 1.5}, "threshold = 1.5"),
        ({"name": "x", "positive_label": " no"}, "they must differ"),
        ({"name": "x", "colour": "red"}, "colour"),
        ({"name": "Bad Name"}, "name = 'Bad Name'"),
    ],
)
def test_bad_task_names_the_field(data, needle):
    with pytest.raises(RiskTaskError, match="invalid risk task") as err:
        load_task(json.dumps(data))
    assert needle in str(err.value)


def test_task_file_errors(tmp_path):
    with pytest.raises(RiskTaskError, match="file not found"):
        load_task(str(tmp_path / "missing.toml"))
    bad = tmp_path / "t.toml"
    bad.write_text("name = ")
    with pytest.raises(RiskTaskError, match="not valid TOML"):
        load_task(str(bad))
    with pytest.raises(RiskTaskError, match=r"expected a \.toml or \.json"):
        load_task(str(tmp_path / "t.yaml"))
