"""API keys and request limits against a real server: every model route refuses a request without a valid
key, accepts either of two rotated keys, and the probes and /metrics stay open."""

from __future__ import annotations

import hmac

import httpx
import pytest

from runtime import contract as c
from runtime.server import auth

# (method, path, body) for every route that serves the model; the feedback row labels the risk row's id.
RISK_BODY = {"features": {"amount": 250, "country": "FR"}, "request_id": "auth-risk"}
MODEL_ROUTES = [
    ("GET", c.MODELS_PATH, None),
    ("POST", c.COMPLETIONS_PATH, {"prompt": "hello", "max_tokens": 2}),
    ("POST", c.CHAT_COMPLETIONS_PATH, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    ("POST", c.RISK_PATH, RISK_BODY),
    ("POST", c.RISK_ALIAS_PATH, RISK_BODY),
    ("POST", c.FEEDBACK_PATH, {"request_id": "auth-risk", "label": 1}),
]


def test_every_api_path_is_covered():
    assert {p for _, p, _ in MODEL_ROUTES} == set(c.API_PATHS)
    assert not set(c.API_PATHS) & set(c.OPEN_PATHS)


def _call(srv, method: str, path: str, body, headers: dict | None = None) -> httpx.Response:
    return httpx.request(method, srv.url + path, json=body, headers=headers or {}, timeout=60)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-key"}, {"Authorization": "Basic abc"}])
@pytest.mark.parametrize(("method", "path", "body"), MODEL_ROUTES, ids=[p for _, p, _ in MODEL_ROUTES])
def test_model_routes_refuse_a_missing_or_wrong_key(keyed_server, method, path, body, headers):
    r = _call(keyed_server, method, path, body, headers)
    assert r.status_code == 401, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error"
    assert "Authorization: Bearer" in err["message"]
    assert r.headers["www-authenticate"].startswith("Bearer")


def test_a_key_prefix_or_extension_is_refused(keyed_server):
    key = keyed_server.api_keys[0]
    for wrong in (key[:-1], key + "x", key.upper() if key.upper() != key else key.lower()):
        r = _call(keyed_server, "GET", c.MODELS_PATH, None, {"Authorization": f"Bearer {wrong}"})
        assert r.status_code == 401


@pytest.mark.parametrize("which", [0, 1], ids=["env-key", "file-key"])
def test_either_rotated_key_is_accepted_on_every_route(keyed_server, which):
    headers = {"Authorization": f"Bearer {keyed_server.api_keys[which]}"}
    for method, path, body in MODEL_ROUTES:
        if path == c.FEEDBACK_PATH:  # each prediction is labelled once: label the one just made
            rid = _call(keyed_server, "POST", c.RISK_PATH, {**RISK_BODY, "request_id": f"k{which}"}, headers)
            body = {"request_id": rid.json()["request_id"], "label": 1}
        r = _call(keyed_server, method, path, body, headers)
        assert r.status_code == 200, f"{path}: {r.status_code} {r.text}"


def test_probes_and_metrics_stay_open(keyed_server):
    for path in c.OPEN_PATHS:
        assert httpx.get(keyed_server.url + path, timeout=10).status_code == 200, path
    m = keyed_server.metrics()
    assert m['moe_requests_rejected_total{reason="unauthorized"}'] > 0


def test_an_open_server_warns_once(shared_server):
    assert shared_server.logs().count("no API key configured") == 1
    assert httpx.get(shared_server.url + c.MODELS_PATH, timeout=10).status_code == 200


def test_body_over_the_limit_is_413_before_parsing(keyed_server):
    big = b'{"prompt": "' + b"a" * (c.DEFAULT_MAX_REQUEST_BYTES + 10) + b'"}'
    h = {**keyed_server.auth, "Content-Type": "application/json"}
    r = httpx.post(keyed_server.url + c.COMPLETIONS_PATH, content=big, headers=h, timeout=30)
    assert r.status_code == 413
    err = r.json()["error"]
    assert err["code"] == "request_too_large" and str(c.DEFAULT_MAX_REQUEST_BYTES) in err["message"]

    def chunks():  # no Content-Length: the limit must hold on the bytes actually received
        for _ in range(40):
            yield b"a" * 65536

    r = httpx.post(keyed_server.url + c.COMPLETIONS_PATH, content=chunks(), headers=h, timeout=30)
    assert r.status_code == 413
    assert httpx.get(keyed_server.url + c.HEALTH_PATH).status_code == 200  # and the server lives on


def test_max_tokens_beyond_the_context_is_400_naming_it(keyed_server):
    r = _call(keyed_server, "POST", c.COMPLETIONS_PATH, {"prompt": "x", "max_tokens": 10**6}, keyed_server.auth)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "max_tokens" and "1000000" in err["message"]


def test_key_comparison_is_constant_time_over_all_keys(monkeypatch):
    """Every key is compared even after a match, so timing tells nothing about which key matched."""
    calls: list[bytes] = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append(b)
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    keys = ("first", "second", "third")
    assert auth.key_matches("first", keys)
    assert len(calls) == 3
    assert not auth.key_matches("fourth", keys) and len(calls) == 6


def test_keys_come_from_flags_files_and_env(tmp_path):
    f = tmp_path / "keys"
    f.write_text("# comment\nfile-a\n\nfile-b\n")
    assert auth.collect_keys(["flag"], [str(f)], env=" env-1 , env-2,,flag") == (
        "flag",
        "file-a",
        "file-b",
        "env-1",
        "env-2",
    )
    with pytest.raises(auth.KeyFileError, match="no key"):
        (tmp_path / "empty").write_text("# none\n")
        auth.collect_keys([], [str(tmp_path / "empty")], env="")
    with pytest.raises(auth.KeyFileError, match="cannot read"):
        auth.collect_keys([], [str(tmp_path / "missing")], env="")


def test_openapi_document_is_open_and_declares_the_bearer_scheme(keyed_server):
    doc = httpx.get(keyed_server.url + "/openapi.json", timeout=10).json()
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for path in c.API_PATHS:
        for op in doc["paths"][path].values():
            assert op["security"] == [{"bearer": []}], path
    assert "security" not in doc["paths"][c.HEALTH_PATH]["get"]
