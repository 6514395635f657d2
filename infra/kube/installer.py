"""Apply the rendered objects to a cluster with the `kubernetes` client, wait for the rollout, roll back.

Server-side apply (PATCH `application/apply-patch+yaml`, `fieldManager=moefleet`, `force=true`) in the
order `render.sort_for_apply` gives: the server merges our fields and keeps other managers' (the HPA's
replicas, controllers' annotations), and a re-run with nothing changed is a no-op.

Before touching anything: the API answers, and the CRDs of every custom kind exist (LeaderWorkerSet,
KEDA, Prometheus Operator come from their own installs) — nothing is half-applied for want of a CRD, and
the error gives each missing add-on's pinned install command (`infra.catalog.prerequisites`).

Rollout: like `kubectl rollout status` — a Deployment is done when the controller has observed the new
generation and every replica is updated and available; it has failed on `ProgressDeadlineExceeded` or at
our timeout. A LeaderWorkerSet is done when every group is updated and ready. On failure the pod template
saved before the apply is applied again (`kubectl rollout undo` semantics) and waited for.

`dry_run=True` sends the same applies with `dryRun=All` and reports what the server says would change.
Only plain HTTP calls through `ApiClient` are used (no discovery), so the tests' loopback fake API can
stand in for a cluster.
"""

from __future__ import annotations

import base64
import json
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO
from urllib.parse import quote

from infra.catalog.exit_codes import ExitCode
from infra.catalog.prerequisites import BY_GROUP, Prerequisite

Obj = dict[str, Any]

FIELD_MANAGER = "moefleet"
APPLY_CONTENT_TYPE = "application/apply-patch+yaml"

CLUSTER_SCOPED = {
    "Namespace",
    "StorageClass",
    "PersistentVolume",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PriorityClass",
    "RuntimeClass",
    "CSIDriver",
}
#: Which add-on provides a custom API group (infra.catalog.prerequisites: name, pinned version, install command).
OPERATORS = {group: prerequisite.name for group, prerequisite in BY_GROUP.items()}
_BUILTIN_GROUPS = {
    "",
    "apps",
    "batch",
    "policy",
    "autoscaling",
    "networking.k8s.io",
    "storage.k8s.io",
    "rbac.authorization.k8s.io",
    "scheduling.k8s.io",
    "node.k8s.io",
    "apiextensions.k8s.io",
    "admissionregistration.k8s.io",
    "coordination.k8s.io",
    "discovery.k8s.io",
}
#: Fields the server owns; left out when comparing a dry run with what exists.
_SERVER_FIELDS = ("managedFields", "resourceVersion", "generation", "uid", "creationTimestamp")


class InstallError(RuntimeError):
    """The install stopped; `code` is the exit status (`ExitCode.FAILED`: cluster side, `BAD_INPUT`: ours)."""

    def __init__(self, message: str, code: int = ExitCode.FAILED) -> None:
        super().__init__(message)
        self.code = code


def plural(kind: str) -> str:
    lower = kind.lower()
    if lower.endswith("y"):
        return lower[:-1] + "ies"
    if lower.endswith(("s", "x")):
        return lower + "es"
    return lower + "s"


def split_api_version(api_version: str) -> tuple[str, str]:
    group, _, version = api_version.rpartition("/")
    return group, version


def object_path(obj: Obj, *, with_name: bool = True) -> str:
    group, version = split_api_version(obj["apiVersion"])
    base = f"/api/{version}" if not group else f"/apis/{group}/{version}"
    meta = obj["metadata"]
    if obj["kind"] not in CLUSTER_SCOPED:
        base += f"/namespaces/{quote(meta['namespace'])}"
    base += f"/{plural(obj['kind'])}"
    return f"{base}/{quote(meta['name'])}" if with_name else base


def describe(obj: Obj) -> str:
    meta = obj["metadata"]
    ns = meta.get("namespace")
    return f"{obj['kind'].lower()}/{meta['name']}" + (f" -n {ns}" if ns else "")


@dataclass
class RolloutState:
    done: bool
    failed: bool
    summary: str


def deployment_rollout(obj: Obj) -> RolloutState:
    spec, status = obj.get("spec", {}), obj.get("status", {}) or {}
    want = spec.get("replicas", 1)
    if status.get("observedGeneration", 0) < obj["metadata"].get("generation", 0):
        return RolloutState(False, False, "waiting for the controller to observe the new generation")
    for cond in status.get("conditions", []) or []:
        if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
            return RolloutState(False, True, f"progress deadline exceeded: {cond.get('message', '')}".strip())
    updated = status.get("updatedReplicas", 0)
    total = status.get("replicas", 0)
    available = status.get("availableReplicas", 0)
    summary = f"{updated}/{want} updated, {available}/{want} available"
    if total > updated:
        summary += f", {total - updated} old pending termination"
    done = updated >= want and total <= updated and available >= updated
    return RolloutState(done, False, summary)


def leader_worker_set_rollout(obj: Obj) -> RolloutState:
    spec, status = obj.get("spec", {}), obj.get("status", {}) or {}
    want = spec.get("replicas", 1)
    conditions = {c.get("type"): c for c in status.get("conditions", []) or []}
    updating = conditions.get("UpdateInProgress", {}).get("status") == "True"
    updated, ready = status.get("updatedReplicas", 0), status.get("readyReplicas", 0)
    summary = f"{updated}/{want} groups updated, {ready}/{want} ready"
    if status.get("observedGeneration", obj["metadata"].get("generation", 0)) < obj["metadata"].get("generation", 0):
        return RolloutState(False, False, "waiting for the controller to observe the new generation")
    return RolloutState(updated >= want and ready >= want and not updating, False, summary)


ROLLOUT_CHECKS: dict[str, Callable[[Obj], RolloutState]] = {
    "Deployment": deployment_rollout,
    "LeaderWorkerSet": leader_worker_set_rollout,
}


def pod_template(obj: Obj) -> Obj | None:
    """The part `rollout undo` restores: a Deployment's template, a LeaderWorkerSet's group template."""
    spec = obj.get("spec", {})
    if obj["kind"] == "Deployment":
        return spec.get("template")
    if obj["kind"] == "LeaderWorkerSet":
        return spec.get("leaderWorkerTemplate")
    return None


def with_template(obj: Obj, template: Obj) -> Obj:
    out = json.loads(json.dumps(obj))
    key = "template" if obj["kind"] == "Deployment" else "leaderWorkerTemplate"
    out["spec"][key] = template
    return out


def _strip(obj: Obj | None) -> Obj | None:
    if obj is None:
        return None
    out = {k: v for k, v in obj.items() if k != "status"}
    out["metadata"] = {k: v for k, v in obj.get("metadata", {}).items() if k not in _SERVER_FIELDS}
    return out


def diff_paths(before: Any, after: Any, prefix: str = "") -> list[str]:
    """Dotted paths whose value differs (added, removed or changed)."""
    if isinstance(before, dict) and isinstance(after, dict):
        paths: list[str] = []
        for key in sorted(set(before) | set(after)):
            paths += diff_paths(before.get(key), after.get(key), f"{prefix}.{key}" if prefix else str(key))
        return paths
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        pairs = enumerate(zip(before, after, strict=True))
        return [p for i, (b, a) in pairs for p in diff_paths(b, a, f"{prefix}[{i}]")]
    return [] if before == after else [prefix or "<root>"]


@dataclass
class Installer:
    """One install run against one cluster. `api` is a configured `kubernetes.client.ApiClient`."""

    api: Any
    out: TextIO = field(default_factory=lambda: sys.stderr)
    timeout_s: float = 1800.0
    poll_s: float = 5.0
    field_manager: str = FIELD_MANAGER
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic

    # ---- HTTP ----------------------------------------------------------------------------------------

    def request(
        self, method: str, path: str, body: Any = None, query: dict[str, str] | None = None, content_type: str = ""
    ) -> tuple[int, Any]:
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        params = self.api.param_serialize(
            method,
            path,
            query_params=list((query or {}).items()),
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        try:
            response = self.api.call_api(*params)
        except Exception as err:  # urllib3 connection errors surface here
            raise InstallError(f"{method} {path}: cannot reach the Kubernetes API ({err})") from None
        raw = response.read()
        try:
            data = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            data = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        return response.status, data

    def get(self, obj: Obj) -> Obj | None:
        status, data = self.request("GET", object_path(obj))
        if status == 404:
            return None
        if status >= 300:
            raise InstallError(f"GET {describe(obj)}: HTTP {status}: {_message(data)}")
        return data

    def apply(self, obj: Obj, *, dry_run: bool = False) -> Obj:
        query = {"fieldManager": self.field_manager, "force": "true"}
        if dry_run:
            query["dryRun"] = "All"
        status, data = self.request("PATCH", object_path(obj), obj, query, APPLY_CONTENT_TYPE)
        if status >= 300:
            raise InstallError(f"apply {describe(obj)}: HTTP {status}: {_message(data)}")
        return data

    # ---- steps ---------------------------------------------------------------------------------------

    def preflight(self, objs: list[Obj]) -> None:
        status, data = self.request("GET", "/version")
        if status >= 300:
            raise InstallError(f"GET /version: HTTP {status}: {_message(data)}")
        missing: dict[str, list[str]] = {}
        for group, kinds in sorted(_custom_kinds(objs).items()):
            for kind in sorted(kinds):
                crd = f"{plural(kind)}.{group}"
                code, _ = self.request("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd}")
                if code == 404:
                    missing.setdefault(group, []).append(crd)
                elif code >= 300:
                    raise InstallError(f"GET customresourcedefinition {crd}: HTTP {code}")
        if missing:
            raise InstallError(
                "missing CRDs, nothing applied:\n" + "\n".join(_how_to_install(g, c) for g, c in missing.items())
            )

    def plan(self, objs: list[Obj]) -> list[tuple[str, str, list[str]]]:
        """Server-side dry run: (object, action, changed paths) with action create / change / unchanged."""
        self.preflight(objs)
        result = []
        new_namespaces = set()
        for obj in objs:
            current = self.get(obj)
            ns = obj["metadata"].get("namespace")
            if current is None and ns in new_namespaces:
                # The namespace would be created first; the server cannot dry-run into a namespace it lacks.
                result.append((describe(obj), "create", []))
                continue
            proposed = self.apply(obj, dry_run=True)
            if current is None:
                result.append((describe(obj), "create", []))
                if obj["kind"] == "Namespace":
                    new_namespaces.add(obj["metadata"]["name"])
                continue
            paths = diff_paths(_strip(current), _strip(proposed))
            result.append((describe(obj), "change" if paths else "unchanged", paths))
        for name, action, paths in result:
            print(f"{action:9} {name}" + (f"  ({', '.join(paths)})" if paths else ""), file=self.out)
        self.ensure_secrets(objs, dry_run=True)
        return result

    def wait(self, obj: Obj) -> RolloutState:
        check = ROLLOUT_CHECKS[obj["kind"]]
        deadline = self.clock() + self.timeout_s
        last = ""
        while True:
            current = self.get(obj)
            state = check(current) if current else RolloutState(False, True, "object disappeared")
            if state.summary != last:
                print(f"  {describe(obj)}: {state.summary}", file=self.out)
                last = state.summary
            if state.done or state.failed:
                return state
            if self.clock() >= deadline:
                return RolloutState(False, True, f"not done after {self.timeout_s:.0f} s ({state.summary})")
            self.sleep(self.poll_s)

    def ensure_secrets(self, objs: list[Obj], value: str | None = None, *, dry_run: bool = False) -> list[str]:
        """Create every Secret the workloads reference that does not exist yet, holding `value` (the
        operator's key) or a generated one; an existing Secret is left as it is (rotate keys there). The key
        is never printed: the message says how to read it from the cluster. Returns what was (or, with
        `dry_run`, would be) created."""
        created = []
        for ns, name, key in secret_refs(objs):
            obj = secret_object(ns, name, key, value or generate_key())
            if self.get(obj) is not None:
                print(f"kept      {describe(obj)} (exists; not changed)", file=self.out)
                continue
            created.append(describe(obj))
            if dry_run:
                print(f"create    {describe(obj)} ({'given' if value else 'generated'} key)", file=self.out)
                continue
            self.apply(obj)
            source = "the given key" if value else "a generated key"
            print(
                f"created   {describe(obj)} with {source}; read it with: kubectl get secret {name} -n {ns} "
                f"-o jsonpath='{{.data.{key}}}' | base64 -d",
                file=self.out,
            )
        return created

    def install(self, objs: list[Obj], api_key: str | None = None) -> None:
        """Apply everything, wait for each workload, roll a failed workload back to its previous template.
        The Secrets the pods read are created (from `api_key` or a generated key) before any workload."""
        self.preflight(objs)
        workloads = [obj for obj in objs if obj["kind"] in ROLLOUT_CHECKS]
        previous = {describe(w): (self.get(w) or None) for w in workloads}
        secrets_done = False
        for obj in objs:
            if obj["kind"] in ROLLOUT_CHECKS and not secrets_done:
                self.ensure_secrets(objs, api_key)
                secrets_done = True
            self.apply(obj)
            print(f"applied   {describe(obj)}", file=self.out)
        for w in workloads:
            print(f"waiting for {describe(w)} (timeout {self.timeout_s:.0f} s)", file=self.out)
            state = self.wait(w)
            if state.done:
                print(f"rolled out {describe(w)}", file=self.out)
                continue
            before = previous[describe(w)]
            template = pod_template(before) if before else None
            if template is None:
                raise InstallError(f"rollout of {describe(w)} failed: {state.summary}; no previous revision to restore")
            print(f"rollout of {describe(w)} failed ({state.summary}); restoring the previous template", file=self.out)
            self.apply(with_template(w, template))
            undo = self.wait(w)
            verdict = "previous revision restored" if undo.done else f"rollback did not finish either: {undo.summary}"
            raise InstallError(f"rollout of {describe(w)} failed: {state.summary}; {verdict}")


def secret_refs(objs: list[Obj]) -> list[tuple[str, str, str]]:
    """(namespace, secret, key) of every `secretKeyRef` in the workloads' containers, in order, once each."""
    refs: dict[tuple[str, str, str], None] = {}

    def walk(node: Any, ns: str) -> None:
        if isinstance(node, dict):
            ref = node.get("secretKeyRef")
            if isinstance(ref, dict):
                refs[(ns, ref["name"], ref["key"])] = None
            for value in node.values():
                walk(value, ns)
        elif isinstance(node, list):
            for value in node:
                walk(value, ns)

    for obj in objs:
        if obj["kind"] in ROLLOUT_CHECKS:
            walk(obj.get("spec", {}), obj["metadata"].get("namespace", ""))
    return list(refs)


def secret_object(namespace: str, name: str, key: str, value: str) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/managed-by": FIELD_MANAGER}},
        "data": {key: base64.b64encode(value.encode()).decode()},
    }


def generate_key() -> str:
    """A fresh API key: 32 random bytes, URL-safe (fits a header and $MOE_API_KEYS' comma list)."""
    return secrets.token_urlsafe(32)


def _custom_kinds(objs: list[Obj]) -> dict[str, set[str]]:
    kinds: dict[str, set[str]] = {}
    for obj in objs:
        group, _ = split_api_version(obj["apiVersion"])
        if group in OPERATORS or (group not in _BUILTIN_GROUPS and not group.endswith(".k8s.io")):
            kinds.setdefault(group, set()).add(obj["kind"])
    return kinds


def _how_to_install(group: str, crds: list[str]) -> str:
    """Per missing add-on: its CRDs, its pinned install commands and its docs (or the group, if unknown)."""
    prerequisite: Prerequisite | None = BY_GROUP.get(group)
    if prerequisite is None:
        return f"  {', '.join(crds)}: install the operator that provides API group {group}"
    lines = [f"  {', '.join(crds)}: install {prerequisite.name} {prerequisite.version}:"]
    lines += [f"    {command}" for command in prerequisite.install_commands]
    lines.append(f"    ({prerequisite.docs_url})")
    return "\n".join(lines)


def _message(data: Any) -> str:
    if isinstance(data, dict):
        return str(data.get("message") or data)
    return str(data)[:500]


def api_client(kubeconfig: str | None = None, context: str | None = None) -> Any:
    """An ApiClient from a kubeconfig (`aws eks update-kubeconfig` writes one) or the in-cluster account."""
    from kubernetes import client, config

    try:
        config.load_kube_config(config_file=kubeconfig, context=context)
    except Exception as kube_err:
        try:
            config.load_incluster_config()
        except Exception:
            raise InstallError(
                f"no Kubernetes credentials: {kube_err}. Run `aws eks update-kubeconfig --name <cluster_name> "
                "--region <region>` or pass --kubeconfig",
                ExitCode.BAD_INPUT,
            ) from None
    return client.ApiClient()
