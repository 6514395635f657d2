"""Requests the server cannot honour are 400s in OpenAI's JSON shape naming the field, over real HTTP:
unsupported OpenAI features (never a 200 that silently ignored them), unknown arguments, missing fields,
wrong types, malformed JSON. No-op values of unsupported fields, as clients send them, are accepted."""

from __future__ import annotations

import httpx
import openai
import pytest

from runtime import contract as c
from runtime.server.schemas import UNSUPPORTED

JSON = {"Content-Type": "application/json"}
MSGS = [{"role": "user", "content": "Hi"}]

# field → a value that asks for the feature
CHAT_FEATURES = {
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    "tool_choice": "auto",
    "functions": [{"name": "f", "parameters": {}}],
    "function_call": "auto",
    "response_format": {"type": "json_object"},
    "logit_bias": {"5": 10},
    "frequency_penalty": 0.5,
    "presence_penalty": -1.0,
    "store": True,
    "modalities": ["text", "audio"],
    "reasoning_effort": "high",
}
COMPLETION_FEATURES = {"echo": True, "best_of": 3, "suffix": "tail", "logit_bias": {"5": 10}}


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=30)


def assert_400(r: httpx.Response, param: str, *words: str) -> dict:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    for w in words:
        assert w in err["message"], err
    return err


@pytest.mark.parametrize("field", sorted(CHAT_FEATURES))
def test_unsupported_chat_feature_is_400_naming_it(shared_server, field):
    body = {"messages": MSGS, "max_tokens": 1, field: CHAT_FEATURES[field]}
    err = assert_400(post(shared_server.url, c.CHAT_COMPLETIONS_PATH, body), field, field, "not supported")
    assert err["code"] == "unsupported_parameter"
    assert UNSUPPORTED[field][0] in err["message"]


@pytest.mark.parametrize("field", sorted(COMPLETION_FEATURES))
def test_unsupported_completion_feature_is_400_naming_it(shared_server, field):
    body = {"prompt": "Hi", "max_tokens": 1, field: COMPLETION_FEATURES[field]}
    assert_400(post(shared_server.url, c.COMPLETIONS_PATH, body), field, field, "not supported")


def test_a_tool_call_in_the_history_is_refused(shared_server):
    msgs = [*MSGS, {"role": "assistant", "content": "", "tool_calls": [{"id": "1", "type": "function"}]}]
    r = post(shared_server.url, c.CHAT_COMPLETIONS_PATH, {"messages": msgs, "max_tokens": 1})
    assert_400(r, "messages.1.tool_calls", "tool calling")


def test_no_op_values_and_nulls_are_accepted(shared_server):
    client = openai.OpenAI(base_url=shared_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    r = client.chat.completions.create(
        model="v2_greedy",
        messages=[*MSGS, {"role": "assistant", "content": "Hello", "refusal": None, "tool_calls": []}, *MSGS],
        max_tokens=2,
        tools=[],
        tool_choice="none",
        response_format={"type": "text"},
        frequency_penalty=0,
        presence_penalty=0.0,
        logit_bias={},
        store=False,
        extra_body={"functions": None, "audio": None, "repetition_penalty": 1.0},
    )
    assert r.choices[0].finish_reason in ("stop", "length")
    r = client.completions.create(model="v2_greedy", prompt="Hi", max_tokens=2, echo=False, best_of=1, suffix=None)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_the_openai_client_sees_a_bad_request(shared_server):
    client = openai.OpenAI(base_url=shared_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="v2_greedy", messages=MSGS, tools=CHAT_FEATURES["tools"])
    assert exc.value.body["param"] == "tools"


def test_unknown_argument_is_400_naming_it(shared_server):
    r = post(shared_server.url, c.COMPLETIONS_PATH, {"prompt": "Hi", "max_tokens": 1, "min_tokenz": 3})
    assert_400(r, "min_tokenz", "Unrecognized request argument supplied: 'min_tokenz'")


def test_missing_field_wrong_type_and_bad_json_are_400(shared_server):
    url = shared_server.url
    err = assert_400(post(url, c.CHAT_COMPLETIONS_PATH, {"max_tokens": 1}), "messages", "Missing required parameter")
    assert err["code"] == "missing_required_parameter"
    assert_400(post(url, c.COMPLETIONS_PATH, {"max_tokens": 1}), "prompt", "Missing required parameter")
    assert_400(post(url, c.COMPLETIONS_PATH, {"prompt": "x", "max_tokens": "many"}), "max_tokens", "'many'")
    assert_400(post(url, c.CHAT_COMPLETIONS_PATH, {"messages": MSGS, "stream": "yes please"}), "stream")
    assert_400(post(url, c.CHAT_COMPLETIONS_PATH, {"messages": [{"role": "robot", "content": "x"}]}), "messages.0.role")
    r = httpx.post(url + c.CHAT_COMPLETIONS_PATH, content=b'{"messages": [', timeout=10)
    assert_400(r, "body", "not valid JSON")
    r = httpx.post(url + c.CHAT_COMPLETIONS_PATH, content=b'{"messages": [', headers=JSON, timeout=10)
    assert_400(r, "body", "not valid JSON")


def test_openapi_documents_400_not_422(shared_server):
    spec = httpx.get(shared_server.url + "/openapi.json", timeout=10).json()
    for path in (c.COMPLETIONS_PATH, c.CHAT_COMPLETIONS_PATH):
        responses = spec["paths"][path]["post"]["responses"]
        assert "400" in responses and "422" not in responses


def test_stream_options_without_stream_is_400(shared_server):
    body = {"prompt": "Hi", "max_tokens": 1, "stream_options": {"include_usage": True}}
    assert_400(post(shared_server.url, c.COMPLETIONS_PATH, body), "stream_options", "stream is true")
