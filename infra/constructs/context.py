"""The AWS context every construct builds in: which account, partition and region.

One object instead of the same three fields repeated in each construct's props: the stack resolves them
once (the account and partition from data sources, so they are Terraform references until apply) and hands
the same context to every construct that writes ARNs, key policies or service principals.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AwsContext:
    """Account, partition and region of the resources a construct creates."""

    account_id: str
    partition: str = "aws"
    region: str = "us-east-1"

    @property
    def account_root_arn(self) -> str:
        """The account's root principal: what a key policy names to let IAM policies decide."""
        return f"arn:{self.partition}:iam::{self.account_id}:root"

    def service_principal(self, service: str) -> str:
        """A regional service principal, e.g. `logs.us-east-1.amazonaws.com`."""
        return f"{service}.{self.region}.amazonaws.com"
