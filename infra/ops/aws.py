"""boto3 clients for real AWS or the embedded emulator (boto3 + stdlib only: the init container uses it).

Emulated environments (an `aws_endpoint` on loopback) get dummy credentials, as the Terraform provider
does in infra/constructs/provider.py: the emulator accepts any, and a developer's real credentials must
never be sent to it, nor the emulator's to AWS.
"""

from __future__ import annotations

import os
from typing import Any

import boto3
from botocore.config import Config

#: Credentials for the emulator only (loopback; validated in infra/catalog/environments.py).
EMULATED_CREDENTIALS = {"aws_access_key_id": "emulated", "aws_secret_access_key": "emulated"}


def make_client(service: str, region: str, endpoint: str | None = None, *, max_pool: int = 10) -> Any:
    """A boto3 client. With `endpoint` (an emulator URL) every call goes there with dummy credentials and
    few retries: an emulator error is final, retrying it only hides the message for a minute."""
    retries = {"max_attempts": 2, "mode": "standard"} if endpoint else {"max_attempts": 8, "mode": "adaptive"}
    config = Config(
        retries=retries,
        max_pool_connections=max_pool,
        s3={"addressing_style": "path"} if endpoint else {},
        connect_timeout=10,
        read_timeout=120,
    )
    if endpoint:
        session = boto3.session.Session(region_name=region, **EMULATED_CREDENTIALS)
        return session.client(service, endpoint_url=endpoint, config=config)
    session = boto3.session.Session(region_name=region or os.environ.get("AWS_REGION"))
    return session.client(service, config=config)


def error_code(err: Exception) -> str:
    """The AWS error code of a botocore ClientError ('' for anything else)."""
    response = getattr(err, "response", None) or {}
    return str((response.get("Error") or {}).get("Code", ""))


#: AWS error codes that mean "your credentials are expired or not accepted", not "the call failed".
EXPIRED_CODES = frozenset(
    {
        "ExpiredToken",
        "ExpiredTokenException",
        "RequestExpired",
        "TokenRefreshRequired",
        "InvalidClientTokenId",
        "UnrecognizedClientException",
        "InvalidToken",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AuthFailure",
    }
)
#: botocore exceptions raised before any request when no usable credentials are found or refreshed.
_MISSING = frozenset(
    {
        "NoCredentialsError",
        "PartialCredentialsError",
        "ProfileNotFound",
        "CredentialRetrievalError",
        "TokenRetrievalError",
        "SSOTokenLoadError",
        "UnauthorizedSSOTokenError",
        "InvalidConfigError",
    }
)


def credential_problem(err: BaseException) -> str | None:
    """One line saying which credentials to fix and how, when `err` is a credential failure; else None.

    Names the profile in use ($AWS_PROFILE, or "default") and the variables that override it, so an
    operator with an expired SSO session or an unset profile knows what to do without reading a traceback."""
    name = type(err).__name__
    code = error_code(err)
    if name not in _MISSING and code not in EXPIRED_CODES:
        return None
    profile = os.environ.get("AWS_PROFILE") or os.environ.get("AWS_DEFAULT_PROFILE")
    using = f"profile {profile!r} (AWS_PROFILE)" if profile else "no AWS_PROFILE set (profile 'default')"
    state = f"expired or rejected ({code})" if code else f"missing ({name}: {err})"
    return (
        f"AWS credentials {state}; {using}. Set AWS_PROFILE to a configured profile (and run "
        "`aws sso login --profile <name>` if it uses SSO) or set AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY "
        "and, for temporary credentials, AWS_SESSION_TOKEN"
    )
