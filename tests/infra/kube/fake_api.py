"""A small Kubernetes API stand-in over real HTTP on loopback, for the installer's tests.

No API server runs on these machines (no kind, k3s or etcd-backed apiserver), so the installer's apply /
wait / rollback logic is tested against this fake. It implements only what the installer uses:

- `GET /version`; `GET` of one object by its REST path (404 with a `Status` body when absent);
- `PATCH` with `application/apply-patch+yaml` (server-side apply): `fieldManager` is required (400
  otherwise, like the real server), `dryRun=All` returns the merged object without storing it; the merge
  keeps fields the object already had and the applied config does not mention (other managers' fields),
  bumps `metadata.generation` when `spec` changes, and records the manager in `managedFields`;
- `GET` of CustomResourceDefinitions that a test registered.

Rollouts are scripted: `outcome(obj) -> "ok" | "fail" | "pending"` decides what status a Deployment or
LeaderWorkerSet reports on its next GET (a failed Deployment reports `ProgressDeadlineExceeded`).
Every request is logged (method, path, query, body) so tests can assert what was sent.
"""

from __future__ import annotations

import copy
import json
import threading
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

Obj = dict[str, Any]


def _merge(old: Any, new: Any) -> Any:
    if isinstance(old, dict) and isinstance(new, dict):
        out = dict(old)
        for key, value in new.items():
            out[key] = _merge(old.get(key), value)
        return out
    return copy.deepcopy(new)


class FakeKubeAPI:
    def __init__(self) -> None:
        self.objects: dict[str, Obj] = {}
        self.crds: set[str] = set()
        self.requests: list[tuple[str, str, dict[str, list[str]], Any]] = []
        self.outcome: Callable[[Obj], str] = lambda obj: "ok"
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        # shutdown() waits for the serving loop's next poll: 0.5 s by default, on every test's teardown
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def kubeconfig(self, folder: Path) -> Path:
        """A kubeconfig file in `folder` whose current context is this API (what `--kubeconfig` or
        $KUBECONFIG takes)."""
        path = folder / "kubeconfig"
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
                    "users": [{"name": "u", "user": {"token": "t"}}],
                    "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "u"}}],
                    "current-context": "fake",
                }
            )
        )
        return path

    def __enter__(self) -> FakeKubeAPI:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def applies(self, *, dry_run: bool | None = None) -> list[tuple[str, dict[str, list[str]], Any]]:
        return [
            (path, query, body)
            for method, path, query, body in self.requests
            if method == "PATCH" and (dry_run is None or ("dryRun" in query) == dry_run)
        ]

    # ---- behaviour -------------------------------------------------------------------------------

    def _status_for(self, obj: Obj) -> Obj:
        outcome = self.outcome(obj)
        gen = obj["metadata"]["generation"]
        want = obj["spec"].get("replicas", 1)
        if obj["kind"] == "Deployment":
            if outcome == "fail":
                return {
                    "observedGeneration": gen,
                    "replicas": want + 1,
                    "updatedReplicas": 1,
                    "availableReplicas": want,
                    "conditions": [
                        {
                            "type": "Progressing",
                            "status": "False",
                            "reason": "ProgressDeadlineExceeded",
                            "message": f'ReplicaSet "{obj["metadata"]["name"]}-x" has timed out progressing.',
                        }
                    ],
                }
            if outcome == "pending":
                return {"observedGeneration": gen, "replicas": want, "updatedReplicas": 0, "availableReplicas": 0}
            return {
                "observedGeneration": gen,
                "replicas": want,
                "updatedReplicas": want,
                "availableReplicas": want,
                "conditions": [{"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"}],
            }
        if obj["kind"] == "LeaderWorkerSet":
            if outcome == "ok":
                return {"replicas": want, "updatedReplicas": want, "readyReplicas": want, "conditions": []}
            return {
                "replicas": want,
                "updatedReplicas": 0,
                "readyReplicas": 0,
                "conditions": [{"type": "UpdateInProgress", "status": "True"}],
            }
        return {}

    def _get(self, path: str) -> tuple[int, Obj]:
        if path == "/version":
            return 200, {"major": "1", "minor": "33", "gitVersion": "v1.33.0-fake"}
        prefix = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/"
        if path.startswith(prefix):
            name = path.removeprefix(prefix)
            if name in self.crds:
                return 200, {"kind": "CustomResourceDefinition", "metadata": {"name": name}}
            return 404, _not_found(name)
        with self._lock:
            obj = self.objects.get(path)
            if obj is None:
                return 404, _not_found(path.rsplit("/", 1)[-1])
            if obj["kind"] in ("Deployment", "LeaderWorkerSet"):
                obj["status"] = self._status_for(obj)
            return 200, copy.deepcopy(obj)

    def _apply(self, path: str, query: dict[str, list[str]], body: Obj) -> tuple[int, Obj]:
        manager = (query.get("fieldManager") or [""])[0]
        if not manager:
            return 400, {"kind": "Status", "code": 400, "message": "PATCH apply requires fieldManager"}
        if path.rsplit("/", 1)[-1] != body.get("metadata", {}).get("name"):
            return 400, {"kind": "Status", "code": 400, "message": "name in path and body differ"}
        with self._lock:
            old = self.objects.get(path)
            if old is None:
                merged = copy.deepcopy(body)
                merged["metadata"] |= {"uid": str(uuid.uuid4()), "generation": 1, "resourceVersion": "1"}
            else:
                merged = _merge(old, body)
                meta = merged["metadata"]
                meta["resourceVersion"] = str(int(old["metadata"]["resourceVersion"]) + 1)
                if old.get("spec") != merged.get("spec"):
                    meta["generation"] = old["metadata"]["generation"] + 1
            merged["metadata"]["managedFields"] = [{"manager": manager, "operation": "Apply"}]
            if "dryRun" not in query:
                self.objects[path] = merged
            return (201 if old is None else 200), copy.deepcopy(merged)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep pytest output clean
                pass

            def _send(self, code: int, body: Obj) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                url = urlparse(self.path)
                api.requests.append(("GET", url.path, parse_qs(url.query), None))
                self._send(*api._get(url.path))

            def do_PATCH(self) -> None:
                url = urlparse(self.path)
                query = parse_qs(url.query)
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                content_type = self.headers.get("Content-Type", "")
                try:
                    body = json.loads(raw)
                except json.JSONDecodeError:
                    body = None
                api.requests.append(("PATCH", url.path, query, body))
                if content_type != "application/apply-patch+yaml" or not isinstance(body, dict):
                    self._send(415, {"kind": "Status", "code": 415, "message": f"unsupported {content_type}"})
                    return
                self._send(*api._apply(url.path, query, body))

        return Handler


def _not_found(name: str) -> Obj:
    return {"kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404, "message": f'"{name}" not found'}
