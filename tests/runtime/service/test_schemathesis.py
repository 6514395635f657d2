"""Property-based fuzzing of the service's own OpenAPI schema: no 5xx, responses match the schema,
invalid input is rejected with a 4xx. The server runs with a 64-token context so every generated
request is cheap (max_tokens and prompt sizes are bounded by it).

Driven through hypothesis directly rather than schemathesis' pytest plugin, which does not work with
pytest 9 (it reads a private ``_nodeid``)."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode, checks

from runtime import contract as c
from tests.runtime.service.conftest import FRAUD_TASK

CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.response_headers_conformance,
]
EXAMPLES = {GenerationMode.POSITIVE: 20, GenerationMode.NEGATIVE: 10}


@pytest.fixture(scope="module")
def fuzz_server(server_factory):
    with server_factory("--max-model-len", "64", "--max-queue", "64", "--risk-task", str(FRAUD_TASK)) as srv:
        yield srv


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    raw = httpx.get(fuzz_server.url + "/openapi.json", timeout=10).json()
    assert set(c.API_PATHS) <= set(raw["paths"])
    return schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")


def operations(schema):
    return [r.ok() for r in schema.get_all_operations()]


def fuzz(op, mode: GenerationMode, checks_: list, statuses: list[int]) -> None:
    """Run hypothesis over one operation, recording the status codes seen."""

    @given(case=op.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES[mode], deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def run(case) -> None:
        statuses.append(case.call_and_validate(checks=checks_, timeout=30).status_code)

    run()


@pytest.mark.parametrize("mode", list(EXAMPLES), ids=lambda m: m.value)
def test_api_conforms_to_its_schema(api_schema, fuzz_server, mode):
    ops = operations(api_schema)
    assert {op.path for op in ops} >= set(c.API_PATHS)
    negative = mode is GenerationMode.NEGATIVE
    extra = [checks.negative_data_rejection] if negative else []
    statuses: dict[str, list[int]] = {}
    for op in ops:
        if negative and op.method.upper() != "POST":
            continue  # nothing to invalidate in a parameterless GET
        fuzz(op, mode, [*CHECKS, *extra], statuses.setdefault(op.path, []))
    # the fuzzing really reached the handlers: valid bodies succeed, invalid ones are 4xx
    if negative:
        assert all(400 <= s < 500 for codes in statuses.values() for s in codes), statuses
    else:
        assert 200 in statuses[c.COMPLETIONS_PATH] and 200 in statuses[c.RISK_PATH], statuses
    assert httpx.get(fuzz_server.url + c.HEALTH_PATH).status_code == 200
