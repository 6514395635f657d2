"""The risk service's prediction records: one DynamoDB table per environment, shared by every runtime replica.

Each prediction is an item keyed by request id; feedback sets its label once with a conditional write, so
any replica can join it and none can join it twice (docs/risk.md). On-demand capacity (traffic follows the
GPU fleet, which scales to zero), encrypted with a key of its own, point-in-time recovery on, and items
expire through the TTL attribute the runtime writes, so the table does not grow without bound.
"""

from __future__ import annotations

from dataclasses import dataclass

from cdktf_cdktf_provider_aws.dynamodb_table import (
    DynamodbTable,
    DynamodbTableAttribute,
    DynamodbTablePointInTimeRecovery,
    DynamodbTableServerSideEncryption,
    DynamodbTableTtl,
)
from constructs import Construct

from infra.constructs.context import AwsContext
from infra.constructs.kms import EncryptionKey, EncryptionKeyProps
from runtime import contract


@dataclass(frozen=True)
class PredictionStoreProps:
    table_name: str
    aws: AwsContext
    #: Emulated environments are destroyed with every test run; real tables refuse deletion.
    deletion_protection: bool = True


class PredictionStore(Construct):
    """The table and its key."""

    def __init__(self, scope: Construct, id_: str, props: PredictionStoreProps) -> None:
        super().__init__(scope, id_)
        self.key = EncryptionKey(
            self,
            "key",
            EncryptionKeyProps(
                alias=props.table_name,
                description=f"Risk prediction records in {props.table_name}",
                aws=props.aws,
            ),
        )
        self.table = DynamodbTable(
            self,
            "table",
            name=props.table_name,
            billing_mode="PAY_PER_REQUEST",
            hash_key=contract.RISK_RECORD_KEY,
            attribute=[DynamodbTableAttribute(name=contract.RISK_RECORD_KEY, type="S")],
            server_side_encryption=DynamodbTableServerSideEncryption(enabled=True, kms_key_arn=self.key.arn),
            point_in_time_recovery=DynamodbTablePointInTimeRecovery(enabled=True),
            ttl=DynamodbTableTtl(attribute_name=contract.RISK_RECORD_TTL_ATTRIBUTE, enabled=True),
            deletion_protection_enabled=props.deletion_protection,
            tags={"Name": props.table_name, "moefleet.io/purpose": "risk-predictions"},
        )

    @property
    def arn(self) -> str:
        return self.table.arn

    @property
    def name(self) -> str:
        return self.table.name


def prediction_store_statements(table_arn: str, key_arn: str, region: str) -> list[dict[str, object]]:
    """The runtime's access to the table, for its role's policy: the item actions it uses
    (runtime.contract.RISK_STORE_ACTIONS) on this table only, and the table's key only through DynamoDB."""
    return [
        {
            "Sid": "PredictionRecords",
            "Effect": "Allow",
            "Action": list(contract.RISK_STORE_ACTIONS),
            "Resource": table_arn,
        },
        {
            "Sid": "PredictionRecordsKey",
            "Effect": "Allow",
            "Action": ["kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey*", "kms:DescribeKey"],
            "Resource": key_arn,
            "Condition": {"StringEquals": {"kms:ViaService": f"dynamodb.{region}.amazonaws.com"}},
        },
    ]
