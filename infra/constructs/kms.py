"""Customer-managed KMS keys: one per purpose, rotation on, a key policy written out in code."""

from __future__ import annotations

from dataclasses import dataclass, field

from cdktf_cdktf_provider_aws.kms_alias import KmsAlias
from cdktf_cdktf_provider_aws.kms_key import KmsKey
from constructs import Construct

from infra.constructs.context import AwsContext
from infra.constructs.iam import policy_document


@dataclass(frozen=True)
class EncryptionKeyProps:
    """One key per purpose: its alias, who may use it besides the account, how long deletion waits."""

    alias: str
    description: str
    aws: AwsContext
    #: AWS services (e.g. "logs") that encrypt with the key on the account's behalf.
    service_principals: list[str] = field(default_factory=list)
    deletion_window_days: int = 30
    #: EBS volumes that Auto Scaling launches (managed node groups) are encrypted by its service-linked role.
    autoscaling_may_use: bool = False


class EncryptionKey(Construct):
    """A KMS key administered by the account, optionally usable by named AWS services."""

    def __init__(self, scope: Construct, id_: str, props: EncryptionKeyProps) -> None:
        super().__init__(scope, id_)
        statements = [
            {
                # Without this the key can become unmanageable; IAM policies then decide who uses it.
                "Sid": "AccountAdministers",
                "Effect": "Allow",
                "Principal": {"AWS": props.aws.account_root_arn},
                "Action": "kms:*",
                "Resource": "*",  # in a key policy "*" means "this key"
            }
        ]
        for service in props.service_principals:
            statements.append(
                {
                    "Sid": f"Service{service.capitalize()}Uses",
                    "Effect": "Allow",
                    "Principal": {"Service": props.aws.service_principal(service)},
                    "Action": [
                        "kms:Encrypt*",
                        "kms:Decrypt*",
                        "kms:ReEncrypt*",
                        "kms:GenerateDataKey*",
                        "kms:Describe*",
                    ],
                    "Resource": "*",  # in a key policy "*" means "this key"
                }
            )
        if props.autoscaling_may_use:
            autoscaling = (
                f"arn:{props.aws.partition}:iam::{props.aws.account_id}:role/aws-service-role/"
                "autoscaling.amazonaws.com/AWSServiceRoleForAutoScaling"
            )
            statements += [
                {
                    "Sid": "AutoScalingUsesForVolumes",
                    "Effect": "Allow",
                    "Principal": {"AWS": autoscaling},
                    "Action": [
                        "kms:Encrypt",
                        "kms:Decrypt",
                        "kms:ReEncrypt*",
                        "kms:GenerateDataKey*",
                        "kms:DescribeKey",
                    ],
                    "Resource": "*",  # in a key policy "*" means "this key"
                },
                {
                    "Sid": "AutoScalingGrantsForVolumes",
                    "Effect": "Allow",
                    "Principal": {"AWS": autoscaling},
                    "Action": "kms:CreateGrant",
                    "Resource": "*",  # in a key policy "*" means "this key"
                    "Condition": {"Bool": {"kms:GrantIsForAWSResource": "true"}},
                },
            ]
        self.key = KmsKey(
            self,
            "key",
            description=props.description,
            enable_key_rotation=True,
            deletion_window_in_days=props.deletion_window_days,
            policy=policy_document(*statements),
        )
        KmsAlias(self, "alias", name=f"alias/{props.alias}", target_key_id=self.key.key_id)

    @property
    def arn(self) -> str:
        return self.key.arn
