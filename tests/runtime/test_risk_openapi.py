"""The risk routes' OpenAPI: every request/response body and field is described, and each example is valid
against its own model (so the examples in /docs cannot rot)."""

from __future__ import annotations

import pytest

from runtime import contract as c
from runtime.server import schemas
from runtime.server.app import create_app
from runtime.server.state import ServiceState, Settings

BODIES = ("RiskRequest", "RiskResponse", "RiskFactor", "FeedbackRequest", "FeedbackResponse")


@pytest.fixture(scope="module")
def openapi() -> dict:
    return create_app(ServiceState(Settings(model_path="unused")), load=False).openapi()


def test_routes_are_described_with_their_errors(openapi: dict) -> None:
    for path in (c.RISK_PATH, c.RISK_ALIAS_PATH, c.FEEDBACK_PATH):
        op = openapi["paths"][path]["post"]
        assert op["summary"] and len(op["description"]) > 100, path
        assert {"400", "409", "503"} <= set(op["responses"]), path
    assert "404" in openapi["paths"][c.FEEDBACK_PATH]["post"]["responses"]


@pytest.mark.parametrize("name", BODIES)
def test_bodies_have_descriptions_and_valid_examples(openapi: dict, name: str) -> None:
    schema = openapi["components"]["schemas"][name]
    described = {k for k, v in schema["properties"].items() if v.get("description")}
    assert described == set(schema["properties"]), f"{name}: undescribed fields"
    model = getattr(schemas, name)
    for example in schema.get("examples", []):
        model.model_validate(example)
    for field, prop in schema["properties"].items():
        for example in prop.get("examples", []):
            model.__pydantic_validator__.validate_assignment(model.model_construct(), field, example)
