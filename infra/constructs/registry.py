"""ECR repository for the runtime image: scanned on push, immutable tags, KMS, lifecycle."""

from __future__ import annotations

import json
from dataclasses import dataclass

from cdktf_cdktf_provider_aws.ecr_lifecycle_policy import EcrLifecyclePolicy
from cdktf_cdktf_provider_aws.ecr_repository import (
    EcrRepository,
    EcrRepositoryEncryptionConfiguration,
    EcrRepositoryImageScanningConfiguration,
)
from constructs import Construct

from infra.constructs.context import AwsContext
from infra.constructs.kms import EncryptionKey, EncryptionKeyProps

RUNTIME_REPOSITORY = "moe-runtime"


@dataclass(frozen=True)
class RegistryProps:
    """The repository's prefix and how many images it keeps (tagged releases, untagged layers)."""

    name: str
    aws: AwsContext
    keep_tagged: int = 30
    untagged_days: int = 7


def lifecycle_policy(keep_tagged: int, untagged_days: int) -> str:
    """Expire untagged layers quickly (failed pushes, superseded builds), keep the last N releases."""
    return json.dumps(
        {
            "rules": [
                {
                    "rulePriority": 1,
                    "description": f"expire untagged images after {untagged_days} days",
                    "selection": {
                        "tagStatus": "untagged",
                        "countType": "sinceImagePushed",
                        "countUnit": "days",
                        "countNumber": untagged_days,
                    },
                    "action": {"type": "expire"},
                },
                {
                    "rulePriority": 2,
                    "description": f"keep the last {keep_tagged} tagged images",
                    "selection": {"tagStatus": "any", "countType": "imageCountMoreThan", "countNumber": keep_tagged},
                    "action": {"type": "expire"},
                },
            ]
        },
        sort_keys=True,
    )


class Registry(Construct):
    """The runtime image's ECR repository: tags immutable (a tag names one build forever, so rollbacks are
    exact), scanned on push, KMS-encrypted, old images expired. Attribute: `repository_url`."""

    def __init__(self, scope: Construct, id_: str, props: RegistryProps) -> None:
        super().__init__(scope, id_)
        self.key = EncryptionKey(
            self,
            "key",
            EncryptionKeyProps(
                alias=f"{props.name}-ecr",
                description=f"Runtime images of {props.name}",
                aws=props.aws,
            ),
        )
        self.repository = EcrRepository(
            self,
            "runtime",
            name=f"{props.name}/{RUNTIME_REPOSITORY}",
            image_tag_mutability="IMMUTABLE",  # a tag names one build forever; rollbacks stay exact
            image_scanning_configuration=EcrRepositoryImageScanningConfiguration(scan_on_push=True),
            encryption_configuration=[
                EcrRepositoryEncryptionConfiguration(encryption_type="KMS", kms_key=self.key.arn)
            ],
            force_delete=False,
        )
        EcrLifecyclePolicy(
            self,
            "lifecycle",
            repository=self.repository.name,
            policy=lifecycle_policy(props.keep_tagged, props.untagged_days),
        )

    @property
    def repository_url(self) -> str:
        return self.repository.repository_url
