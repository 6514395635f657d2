"""Amazon Managed Service for Prometheus: moto 5.2 has workspaces and rule groups but no alert manager
definition API. We serve Create/Describe/Put/Delete in memory (ACTIVE at once), checking the workspace
exists in moto."""

from __future__ import annotations

import re
import threading
import time
from typing import Any

ACCOUNT_ID = "123456789012"
PATH = re.compile(r"^/workspaces/(?P<workspace>[^/]+)/alertmanager/definition$")

_lock = threading.Lock()
_definitions: dict[tuple[str, str], dict[str, Any]] = {}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def reset() -> None:
    with _lock:
        _definitions.clear()


def match(path: str) -> tuple[str, dict[str, str]] | None:
    m = PATH.match(path)
    return ("alertmanager", m.groupdict()) if m else None


def handle(kind: str, params: dict[str, str], method: str, region: str, body: dict[str, Any]) -> tuple[int, dict]:
    from moto.amp.models import amp_backends

    workspace = params["workspace"]
    if workspace not in amp_backends[ACCOUNT_ID][region].workspaces:
        raise ApiError(404, "ResourceNotFoundException", f"Workspace {workspace} not found")
    key = (region, workspace)
    now = time.time()
    with _lock:
        if method in ("POST", "PUT"):
            if method == "POST" and key in _definitions:
                raise ApiError(409, "ConflictException", "An alert manager definition already exists")
            _definitions[key] = {
                "data": body["data"],
                "status": {"statusCode": "ACTIVE"},
                "createdAt": _definitions.get(key, {}).get("createdAt", now),
                "modifiedAt": now,
            }
            return 202, {"status": {"statusCode": "CREATING" if method == "POST" else "UPDATING"}}
        if key not in _definitions:
            raise ApiError(404, "ResourceNotFoundException", "No alert manager definition")
        if method == "DELETE":
            _definitions.pop(key)
            return 202, {}
        return 200, {"alertManagerDefinition": _definitions[key]}


def error_body(err: ApiError) -> tuple[int, list[tuple[str, str]], bytes]:
    import json

    headers = [("Content-Type", "application/json"), ("x-amzn-ErrorType", err.code)]
    return err.status, headers, json.dumps({"message": err.message}).encode()
