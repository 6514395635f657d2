"""IAM policy documents written as data, so tests can read exactly what a role may do."""

from __future__ import annotations

import json
from typing import Any


def policy_document(*statements: dict[str, Any]) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": list(statements)}, sort_keys=True)


def service_trust(*services: str, actions: tuple[str, ...] = ("sts:AssumeRole",)) -> str:
    """Trust policy letting AWS services assume a role."""
    return policy_document({"Effect": "Allow", "Principal": {"Service": list(services)}, "Action": list(actions)})


#: EKS Pod Identity needs both actions in the trust policy (the agent tags the session).
POD_IDENTITY_TRUST = service_trust("pods.eks.amazonaws.com", actions=("sts:AssumeRole", "sts:TagSession"))


def managed_policy(name: str, partition: str = "aws") -> str:
    return f"arn:{partition}:iam::aws:policy/{name}"
