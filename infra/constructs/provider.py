"""The AWS provider for an environment: real AWS, or the embedded emulator on loopback."""

from __future__ import annotations

from cdktf_cdktf_provider_aws.provider import AwsProvider, AwsProviderDefaultTags, AwsProviderEndpoints
from constructs import Construct

from infra.catalog.environments import Environment

#: Services the stacks call; in emulated mode each is pointed at the emulator.
EMULATED_SERVICES = (
    "amp", "autoscaling", "dynamodb", "ec2", "ecr", "eks", "fsx", "iam", "kms", "logs", "s3", "sns", "sts",
    "servicequotas",
)  # fmt: skip


#: Tags on every taggable resource (provider default_tags) and on instances (launch templates).
def standard_tags(env: Environment) -> dict[str, str]:
    return {
        "project": "moe-fleet",
        "environment": env.name,
        "deployment-size": env.size.value,
        "managed-by": "cdktf",
        **env.tags,
    }


def aws_provider(scope: Construct, env: Environment, endpoint_override: str | None = None) -> AwsProvider:
    endpoint = endpoint_override or env.aws_endpoint
    kwargs = {}
    if endpoint:
        # The emulator accepts any credentials; these never reach AWS (loopback only, validated).
        kwargs = dict(
            access_key="emulated",
            secret_key="emulated",
            skip_credentials_validation=True,
            skip_metadata_api_check="true",
            skip_requesting_account_id=False,
            s3_use_path_style=True,
            max_retries=2,  # an emulator error is final; do not retry it for minutes
            endpoints=[AwsProviderEndpoints(**{service: endpoint for service in EMULATED_SERVICES})],
        )
    return AwsProvider(
        scope,
        "aws",
        region=env.region,
        default_tags=[AwsProviderDefaultTags(tags=standard_tags(env))],
        **kwargs,
    )
