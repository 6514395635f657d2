"""EKS APIs moto 5.2 does not implement, served in memory: add-ons, access entries (and their access
policies), and Pod Identity associations.

Each handler mirrors the REST-JSON shape of the real API closely enough for the Terraform AWS provider
(5.100) to create, read, update and delete the resource and for boto3 to read it back. Resources are
ACTIVE at once, as moto does for clusters and node groups. The cluster must exist in moto (checked
through moto's own backend), so a wrong cluster name fails as it would on AWS.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from typing import Any
from urllib.parse import unquote

ACCOUNT_ID = "123456789012"  # moto's default account

_lock = threading.Lock()
_addons: dict[tuple[str, str, str], dict[str, Any]] = {}
_access_entries: dict[tuple[str, str, str], dict[str, Any]] = {}
_access_policies: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = {}
_pod_identities: dict[tuple[str, str, str], dict[str, Any]] = {}
#: Creates that carry an idempotency token (the SDKs fill ``clientRequestToken`` and keep it across their
#: retries): a retried request whose first answer was lost gets that answer again, as from EKS, not a 409.
_IDEMPOTENT = ("addons", "access_entries", "pod_identities")
_answered: dict[tuple[str, str, str, str], tuple[int, dict]] = {}
_updates: dict[str, dict[str, Any]] = {}

_ROUTES = [
    (re.compile(r"^/clusters/(?P<cluster>[^/]+)/addons$"), "addons"),
    (re.compile(r"^/clusters/(?P<cluster>[^/]+)/addons/(?P<name>[^/]+)$"), "addon"),
    (re.compile(r"^/clusters/(?P<cluster>[^/]+)/addons/(?P<name>[^/]+)/update$"), "addon_update"),
    (re.compile(r"^/clusters/(?P<cluster>[^/]+)/updates/(?P<update>[^/]+)$"), "update"),
    (re.compile(r"^/clusters/(?P<cluster>[^/]+)/access-entries$"), "access_entries"),
    (re.compile(r"^/clusters/(?P<cluster>[^/]+)/access-entries/(?P<principal>[^/]+)$"), "access_entry"),
    (
        re.compile(r"^/clusters/(?P<cluster>[^/]+)/access-entries/(?P<principal>[^/]+)/access-policies$"),
        "policies",
    ),
    (
        re.compile(
            r"^/clusters/(?P<cluster>[^/]+)/access-entries/(?P<principal>[^/]+)/access-policies/(?P<policy>.+)$"
        ),
        "policy",
    ),
    (re.compile(r"^/clusters/(?P<cluster>[^/]+)/pod-identity-associations$"), "pod_identities"),
    (
        re.compile(r"^/clusters/(?P<cluster>[^/]+)/pod-identity-associations/(?P<assoc>[^/]+)$"),
        "pod_identity",
    ),
]


def reset() -> None:
    with _lock:
        for store in (_addons, _access_entries, _access_policies, _pod_identities, _updates, _answered):
            store.clear()


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def match(path: str) -> tuple[str, dict[str, str]] | None:
    for pattern, kind in _ROUTES:
        m = pattern.match(path)
        if m:
            return kind, {k: unquote(v) for k, v in m.groupdict().items()}
    return None


def _cluster_exists(region: str, cluster: str) -> bool:
    from moto.eks.models import eks_backends

    return cluster in eks_backends[ACCOUNT_ID][region].clusters


def _not_found(what: str) -> ApiError:
    return ApiError(404, "ResourceNotFoundException", f"No {what} found.")


def handle(kind: str, params: dict[str, str], method: str, region: str, body: dict[str, Any]) -> tuple[int, dict]:
    cluster = params["cluster"]
    if not _cluster_exists(region, cluster):
        raise _not_found(f"cluster found for name: {cluster}")
    now = time.time()
    with _lock:
        token = body.get("clientRequestToken") if method == "POST" and kind in _IDEMPOTENT else None
        if token is not None and (kind, region, cluster, token) in _answered:
            return _answered[(kind, region, cluster, token)]
        answer = _dispatch(kind, params, method, region, body, cluster, now)
        if token is not None:
            _answered[(kind, region, cluster, token)] = answer
        return answer


def _dispatch(kind, params, method, region, body, cluster, now) -> tuple[int, dict]:
    arn_base = f"arn:aws:eks:{region}:{ACCOUNT_ID}"
    if kind == "addons" and method == "POST":
        key = (region, cluster, body["addonName"])
        if key in _addons:
            raise ApiError(409, "ResourceInUseException", f"Addon already exists: {body['addonName']}")
        _addons[key] = {
            "addonName": body["addonName"],
            "clusterName": cluster,
            "status": "ACTIVE",
            "addonVersion": body.get("addonVersion") or "v1.0.0-eksbuild.1",
            "health": {"issues": []},
            "addonArn": f"{arn_base}:addon/{cluster}/{body['addonName']}/{uuid.uuid4()}",
            "createdAt": now,
            "modifiedAt": now,
            "serviceAccountRoleArn": body.get("serviceAccountRoleArn"),
            "tags": body.get("tags") or {},
            "configurationValues": body.get("configurationValues"),
            "podIdentityAssociations": [
                f"{arn_base}:podidentityassociation/{cluster}/a-{uuid.uuid4().hex[:17]}"
                for _ in body.get("podIdentityAssociations") or []
            ],
        }
        return 200, {"addon": _addons[key]}
    if kind == "addons":
        return 200, {"addons": sorted(name for (r, c, name) in _addons if (r, c) == (region, cluster))}
    if kind == "addon":
        key = (region, cluster, params["name"])
        if key not in _addons:
            raise _not_found(f"addon: {params['name']}")
        if method == "DELETE":
            return 200, {"addon": {**_addons.pop(key), "status": "DELETING"}}
        return 200, {"addon": _addons[key]}
    if kind == "addon_update":
        key = (region, cluster, params["name"])
        if key not in _addons:
            raise _not_found(f"addon: {params['name']}")
        for field in ("addonVersion", "serviceAccountRoleArn", "configurationValues"):
            if field in body:
                _addons[key][field] = body[field]
        _addons[key]["modifiedAt"] = now
        return 200, {"update": _new_update("AddonUpdate", now)}
    if kind == "update":
        if params["update"] not in _updates:
            raise _not_found(f"update: {params['update']}")
        return 200, {"update": _updates[params["update"]]}
    if kind == "access_entries" and method == "POST":
        principal = body["principalArn"]
        key = (region, cluster, principal)
        if key in _access_entries:
            raise ApiError(409, "ResourceInUseException", f"Access entry already exists: {principal}")
        _access_entries[key] = {
            "clusterName": cluster,
            "principalArn": principal,
            "kubernetesGroups": body.get("kubernetesGroups") or [],
            "accessEntryArn": f"{arn_base}:access-entry/{cluster}/role/{ACCOUNT_ID}/{uuid.uuid4()}",
            "createdAt": now,
            "modifiedAt": now,
            "tags": body.get("tags") or {},
            "username": body.get("username") or principal,
            "type": body.get("type") or "STANDARD",
        }
        return 200, {"accessEntry": _access_entries[key]}
    if kind == "access_entries":
        return 200, {"accessEntries": sorted(p for (r, c, p) in _access_entries if (r, c) == (region, cluster))}
    if kind == "access_entry":
        key = (region, cluster, params["principal"])
        if key not in _access_entries:
            raise _not_found(f"access entry: {params['principal']}")
        if method == "DELETE":
            _access_entries.pop(key)
            _access_policies.pop(key, None)
            return 200, {}
        if method == "POST":  # UpdateAccessEntry
            for field in ("kubernetesGroups", "username"):
                if field in body:
                    _access_entries[key][field] = body[field]
        return 200, {"accessEntry": _access_entries[key]}
    if kind in ("policies", "policy"):
        key = (region, cluster, params["principal"])
        if key not in _access_entries:
            raise _not_found(f"access entry: {params['principal']}")
        policies = _access_policies.setdefault(key, {})
        if kind == "policies" and method == "POST":
            policies[body["policyArn"]] = {
                "policyArn": body["policyArn"],
                "accessScope": body.get("accessScope") or {"type": "cluster", "namespaces": []},
                "associatedAt": now,
                "modifiedAt": now,
            }
            return 200, {
                "clusterName": cluster,
                "principalArn": params["principal"],
                "associatedAccessPolicy": policies[body["policyArn"]],
            }
        if kind == "policies":
            return 200, {
                "clusterName": cluster,
                "principalArn": params["principal"],
                "associatedAccessPolicies": list(policies.values()),
            }
        if params["policy"] not in policies:
            raise _not_found(f"access policy: {params['policy']}")
        policies.pop(params["policy"])
        return 200, {}
    if kind == "pod_identities" and method == "POST":
        assoc_id = f"a-{uuid.uuid4().hex[:17]}"
        key = (region, cluster, assoc_id)
        for existing in _pod_identities.values():
            if (existing["clusterName"], existing["namespace"], existing["serviceAccount"]) == (
                cluster,
                body["namespace"],
                body["serviceAccount"],
            ):
                raise ApiError(409, "ResourceInUseException", "Association already exists for this service account")
        _pod_identities[key] = {
            "clusterName": cluster,
            "namespace": body["namespace"],
            "serviceAccount": body["serviceAccount"],
            "roleArn": body["roleArn"],
            "associationArn": f"{arn_base}:podidentityassociation/{cluster}/{assoc_id}",
            "associationId": assoc_id,
            "tags": body.get("tags") or {},
            "createdAt": now,
            "modifiedAt": now,
        }
        return 200, {"association": _pod_identities[key]}
    if kind == "pod_identities":
        summaries = [
            {k: a[k] for k in ("clusterName", "namespace", "serviceAccount", "associationArn", "associationId")}
            for (r, c, _), a in _pod_identities.items()
            if (r, c) == (region, cluster)
        ]
        return 200, {"associations": summaries}
    if kind == "pod_identity":
        key = (region, cluster, params["assoc"])
        if key not in _pod_identities:
            raise _not_found(f"pod identity association: {params['assoc']}")
        if method == "DELETE":
            return 200, {"association": _pod_identities.pop(key)}
        if method == "POST":  # UpdatePodIdentityAssociation
            if "roleArn" in body:
                _pod_identities[key]["roleArn"] = body["roleArn"]
            _pod_identities[key]["modifiedAt"] = now
        return 200, {"association": _pod_identities[key]}
    raise ApiError(405, "InvalidRequestException", f"{method} not supported on this path")


def _new_update(kind: str, now: float) -> dict[str, Any]:
    update = {
        "id": str(uuid.uuid4()),
        "status": "Successful",
        "type": kind,
        "params": [],
        "createdAt": now,
        "errors": [],
    }
    _updates[update["id"]] = update
    return update


def error_body(err: ApiError) -> tuple[int, list[tuple[str, str]], bytes]:
    headers = [("Content-Type", "application/json"), ("x-amzn-ErrorType", err.code)]
    return err.status, headers, json.dumps({"message": err.message}).encode()
