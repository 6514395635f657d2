"""The prediction records' table in every synthesized stack: its own KMS key, point-in-time recovery, the
TTL attribute the runtime writes, deletion protection outside the emulator, and a runtime role that reaches
this table's items (and nothing else of DynamoDB). The live half, against the embedded AWS after apply, is
`check_prediction_store` in tests/infra/lifecycle.py."""

from __future__ import annotations

import json

import pytest

from infra.catalog.names import prediction_table_name
from runtime import contract
from tests.conftest import STANDARD_ENVIRONMENTS
from tests.infra.helpers import one, resources


@pytest.mark.parametrize("env_name", STANDARD_ENVIRONMENTS)
def test_table_is_encrypted_recoverable_and_expiring(stacks: dict[str, dict], env_name: str) -> None:
    stack = stacks[env_name]
    table = one(stack, "aws_dynamodb_table")
    assert table["name"] == prediction_table_name(env_name)
    assert table["hash_key"] == contract.RISK_RECORD_KEY and table["billing_mode"] == "PAY_PER_REQUEST"
    sse = table["server_side_encryption"]
    key_name = next(n for n in resources(stack, "aws_kms_key") if "prediction-store" in n)
    assert sse["enabled"] is True and sse["kms_key_arn"] == f"${{aws_kms_key.{key_name}.arn}}"
    assert table["point_in_time_recovery"] == {"enabled": True}
    assert table["ttl"] == {"attribute_name": contract.RISK_RECORD_TTL_ATTRIBUTE, "enabled": True}
    assert table["deletion_protection_enabled"] is (env_name != "local")
    assert resources(stack, "aws_kms_key")[key_name]["enable_key_rotation"] is True
    assert (
        stack["output"]["prediction_table"]["value"]
        == f"${{aws_dynamodb_table.{next(iter(resources(stack, 'aws_dynamodb_table')))}.name}}"
    )


@pytest.mark.parametrize("env_name", STANDARD_ENVIRONMENTS)
def test_runtime_reaches_only_this_table(stacks: dict[str, dict], env_name: str) -> None:
    stack = stacks[env_name]
    table_ref = f"${{aws_dynamodb_table.{next(iter(resources(stack, 'aws_dynamodb_table')))}.arn}}"
    policy = json.loads(one(stack, "aws_iam_role_policy", "runtime")["policy"])
    ddb = [s for s in policy["Statement"] if any(a.startswith("dynamodb:") for a in s["Action"])]
    assert len(ddb) == 1 and ddb[0]["Resource"] == table_ref
    assert sorted(ddb[0]["Action"]) == sorted(contract.RISK_STORE_ACTIONS)
    key = next(s for s in policy["Statement"] if s["Sid"] == "PredictionRecordsKey")
    assert key["Condition"] == {"StringEquals": {"kms:ViaService": "dynamodb.us-east-1.amazonaws.com"}}
