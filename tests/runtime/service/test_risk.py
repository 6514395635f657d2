"""The risk score: scores in [0, 1], factors are the input features, feedback drives accuracy."""

from __future__ import annotations

import httpx
import pytest

from runtime import contract as c
from runtime.risk_task import RiskTask
from runtime.server.risk import RollingAccuracy, leave_one_out_prompts, rank_factors, score_from_logprobs

FEATURES = {
    "amount": 1250.0,
    "device_age_days": 1,
    "ip_country": "US",
    "card_country": "NG",
    "new_email": True,
}


def predict(server, features, request_id=None, path=c.RISK_PATH) -> httpx.Response:
    body = {"features": features} | ({"request_id": request_id} if request_id else {})
    return httpx.post(server.url + path, json=body, timeout=30)


def test_risk_score_and_factors(shared_server):
    r = predict(shared_server, FEATURES)
    assert r.status_code == 200, r.text
    out = r.json()
    assert 0.0 <= out["risk_score"] <= 1.0
    assert out["model"] == "v2_greedy" and out["request_id"].startswith("risk-")
    assert out["task"] == "fraud" and out["threshold"] == 0.5
    assert out["label"] == ("fraud" if out["risk_score"] >= 0.5 else "legit")
    names = [f["name"] for f in out["factors"]]
    assert sorted(names) == sorted(FEATURES)  # every input feature, nothing else
    impacts = [abs(f["impact"]) for f in out["factors"]]
    assert impacts == sorted(impacts, reverse=True)
    assert any(i > 0 for i in impacts)  # features really change the score
    # the alias is the same endpoint; scoring is deterministic
    alias = predict(shared_server, FEATURES, path=c.RISK_ALIAS_PATH).json()
    assert alias["risk_score"] == pytest.approx(out["risk_score"], abs=1e-6)


def test_risk_scores_differ_by_features(shared_server):
    a = predict(shared_server, {"amount": 10}).json()["risk_score"]
    b = predict(shared_server, {"amount": 99999, "attempts": 12, "hour": 3}).json()["risk_score"]
    assert a != b


def test_risk_bad_input(shared_server):
    r = httpx.post(shared_server.url + c.RISK_PATH, json={"features": {}}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "features"
    r = httpx.post(shared_server.url + c.RISK_PATH, json={"features": {"a": [1, 2]}}, timeout=10)
    assert r.status_code == 400
    big = {f"feature_{i:02d}": "x" * 120 for i in range(32)}
    r = predict(shared_server, big)
    assert r.status_code == 400 and "maximum context length" in r.json()["error"]["message"]


def test_feedback_moves_the_accuracy_gauge(shared_server):
    m = shared_server.metrics()
    assert m["moe_accuracy_baseline"] == 0.9
    preds = {}
    for i in range(4):
        rid = f"fb-{i}"
        preds[rid] = predict(shared_server, FEATURES | {"attempts": i}, request_id=rid).json()["label"] == "fraud"
    url = shared_server.url + c.FEEDBACK_PATH
    # two correct labels, then two wrong ones: the rolling accuracy falls from 1.0 to 0.5 at most
    for rid in ("fb-0", "fb-1"):
        r = httpx.post(url, json={"request_id": rid, "label": preds[rid]}, timeout=10)
        assert r.status_code == 200 and r.json()["correct"] is True
    high = shared_server.metrics()["moe_accuracy_rolling"]
    for rid in ("fb-2", "fb-3"):
        r = httpx.post(url, json={"request_id": rid, "label": int(not preds[rid])}, timeout=10)
        assert r.status_code == 200 and r.json()["correct"] is False
    low = shared_server.metrics()["moe_accuracy_rolling"]
    assert low < high
    assert r.json()["rolling_accuracy"] == low and r.json()["baseline"] == 0.9
    again = httpx.post(url, json={"request_id": "fb-3", "label": 1}, timeout=10)
    assert again.status_code == 409 and again.json()["error"]["code"] == "already_labelled"
    unknown = httpx.post(url, json={"request_id": "fb-never", "label": 1}, timeout=10)
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "request_id"
    # a labelled id cannot be predicted over (its record is final)
    assert predict(shared_server, FEATURES, request_id="fb-3").status_code == 409
    m = shared_server.metrics()
    assert m["moe_risk_labelled_total"] >= 4 and m["moe_risk_correct_total"] >= 2
    assert httpx.post(url, json={"request_id": "fb-x", "label": "maybe"}, timeout=10).status_code == 400


def test_risk_units():
    assert score_from_logprobs(-1000.0, 0.0) == pytest.approx(0.0, abs=1e-12)
    assert score_from_logprobs(0.0, 0.0) == 0.5
    prompts = leave_one_out_prompts(RiskTask(name="fraud"), {"a": 1, "b": True})
    assert len(prompts) == 3 and "a: 1" not in prompts[1] and "b: true" not in prompts[2]
    f = rank_factors({"a": 1, "b": 2}, [0.5, 0.45, 0.7])
    assert [(x.name, round(x.impact, 2)) for x in f] == [("b", -0.2), ("a", 0.05)]
    t = RollingAccuracy(window=2)
    assert t.add(True) == 1.0 and t.add(False) == 0.5 and t.add(False) == 0.0  # the first left the window
