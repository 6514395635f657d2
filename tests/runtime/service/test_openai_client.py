"""The official ``openai`` client against the real server: the compatibility check."""

from __future__ import annotations

import httpx
import openai
import pytest

from runtime import contract as c


@pytest.fixture(scope="module")
def client(keyed_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=keyed_server.url + "/v1", api_key=keyed_server.api_keys[0], max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model_id(client) -> str:
    models = client.models.list().data
    assert len(models) == 1
    return models[0].id


def test_models_lists_the_checkpoint(model_id):
    assert model_id == "v2_greedy"  # the checkpoint folder's name


def test_completion_greedy_is_deterministic_with_usage(client, model_id):
    kw = dict(
        model=model_id,
        prompt="The order was placed",
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert a.object == "text_completion"
    assert a.choices[0].text == b.choices[0].text and a.choices[0].text
    assert a.choices[0].finish_reason == "length"
    assert a.usage.completion_tokens == 12
    assert a.usage.prompt_tokens > 0
    assert a.usage.total_tokens == a.usage.prompt_tokens + 12


def test_completion_n_and_seed(client, model_id):
    kw = dict(
        model=model_id,
        prompt="Hello world",
        max_tokens=8,
        temperature=1.0,
        seed=7,
        n=3,
        extra_body={"ignore_eos": True},
    )
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [ch.index for ch in a.choices] == [0, 1, 2]
    assert [ch.text for ch in a.choices] == [ch.text for ch in b.choices]  # seeded: reproducible
    assert len({ch.text for ch in a.choices}) > 1  # choices use distinct seeds
    assert a.usage.completion_tokens == 3 * 8


def test_stop_string_cuts_the_output(client, model_id):
    full = (
        client.completions.create(
            model=model_id, prompt="The order", max_tokens=16, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
    )
    stop = full[4:6]
    assert stop
    cut = client.completions.create(
        model=model_id,
        prompt="The order",
        max_tokens=16,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    ).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full[: full.find(stop)]


def test_completion_stream_matches_non_stream(client, model_id):
    kw = dict(model=model_id, prompt="Risk score:", max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == whole
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].usage.completion_tokens == 10


def test_chat_uses_the_template_and_streams(client, model_id, shared_server):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Is the order risky?"}]
    r = client.chat.completions.create(model=model_id, messages=msgs, max_tokens=6, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    # the prompt is the rendered template: "<bos>Be brief.\n\nUser: Is the order risky?\n\nAssistant:"
    from runtime.loader import load_tokenizer

    tok = load_tokenizer(shared_server.proc.args[shared_server.proc.args.index("--model") + 1])
    assert r.usage.prompt_tokens == len(tok.encode_chat(msgs))
    stream = client.chat.completions.create(model=model_id, messages=msgs, max_tokens=6, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == r.choices[0].message.content


def test_unknown_model_is_404_in_openai_shape(client):
    with pytest.raises(openai.NotFoundError) as exc:
        client.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    assert exc.value.body["code"] == "model_not_found"


def test_context_too_long_is_400_naming_the_limit(client, model_id):
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=model_id, prompt="x", max_tokens=10_000)
    assert "maximum context length is 512" in exc.value.message


def test_schema_error_is_400_naming_the_field(shared_server):
    r = httpx.post(shared_server.url + c.COMPLETIONS_PATH, json={"prompt": "x", "temperature": 5}, timeout=10)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "temperature" and err["type"] == "invalid_request_error"
    r = httpx.post(shared_server.url + c.CHAT_COMPLETIONS_PATH, json={"messages": []}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(shared_server.url + c.COMPLETIONS_PATH, content=b"{not json", timeout=10)
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_out_of_vocab_token_prompt_is_400(shared_server):
    r = httpx.post(shared_server.url + c.COMPLETIONS_PATH, json={"prompt": [1, 99999], "max_tokens": 1}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_probes_and_metrics_names_come_from_the_contract(shared_server):
    assert httpx.get(shared_server.url + c.HEALTH_PATH).json() == {"status": "ok"}
    assert httpx.get(shared_server.url + c.READY_PATH).status_code == 200
    text = httpx.get(shared_server.url + c.METRICS_PATH).text
    for m in c.METRICS:
        if m.name in (c.GPU_UTILIZATION.name, c.GPU_MEMORY_USED.name, c.EXPERT_LOAD_IMBALANCE.name):
            continue  # labelled per GPU / layer: present only once there is a GPU / routed traffic
        assert f"# TYPE {m.name} {m.type}" in text or f"# TYPE {m.name[:-6]} counter" in text, m.name
        sample = m.name + ("_count" if m.type == "histogram" else "")
        assert any(line.startswith((sample + " ", sample + "{")) for line in text.splitlines()), m.name
    assert shared_server.metrics()["moe_model_ready"] == 1.0


def test_every_series_carries_the_model_name(shared_server, model_id):
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(shared_server.url + c.METRICS_PATH).text
    samples = [s for fam in text_string_to_metric_families(text) for s in fam.samples]
    assert {s.name for s in samples} >= {c.MODEL_READY.name, c.REQUEST_SUCCESS.name, c.E2E_LATENCY.name + "_bucket"}
    assert all(s.labels.get(c.LABEL_MODEL_NAME) == model_id for s in samples), samples
