"""Validation of rendered objects before anything reaches a cluster.

Built-in kinds: the Kubernetes OpenAPI schema of the cluster's version, from `kubernetes-validate`
(strict: an unknown field is an error, where the API server would silently drop it). Custom resources
(LeaderWorkerSet, KEDA, Prometheus Operator): JSON schemas transcribed from their published CRDs, kept
with version and source under `tests/data/crds/` (see its README), checked with `jsonschema`. The pod
templates inside a LeaderWorkerSet are checked again as core `PodTemplate`s, so the multi-node pods get
the same scrutiny as a Deployment's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CRD_DIR = PROJECT_ROOT / "tests" / "data" / "crds"

Obj = dict[str, Any]


@dataclass(frozen=True)
class SchemaProblem:
    key: str  # Kind/namespace/name
    path: str  # dotted path inside the object
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.path or '<root>'}: {self.message}"


def schema_version(kubernetes_version: str) -> str:
    """The newest schema kubernetes-validate bundles that is not newer than the cluster (e.g. 1.33 → 1.33.0)."""
    from kubernetes_validate import utils
    from packaging.version import Version

    want = Version(kubernetes_version)
    candidates = [v for v in utils.all_versions() if Version(utils.major_minor(v)) <= want]
    if not candidates:
        raise ValueError(f"kubernetes-validate has no schema for Kubernetes ≤ {kubernetes_version}")
    return candidates[-1]


@cache
def crd_schemas(crd_dir: Path = DEFAULT_CRD_DIR) -> dict[tuple[str, str], Obj]:
    """{(apiVersion, kind): schema} from every `*.schema.json` in crd_dir (each names its apiVersion/kind)."""
    out = {}
    for path in sorted(Path(crd_dir).glob("*.schema.json")):
        doc = json.loads(path.read_text())
        out[(doc["x-moefleet"]["apiVersion"], doc["x-moefleet"]["kind"])] = doc
    return out


def _key(obj: Obj) -> str:
    meta = obj.get("metadata", {})
    ns = meta.get("namespace")
    return f"{obj.get('kind')}/{ns + '/' if ns else ''}{meta.get('name')}"


def validate_core(obj: Obj, kubernetes_version: str) -> list[SchemaProblem]:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, schema_version(kubernetes_version), strict=True)
    except kubernetes_validate.ValidationError as err:
        path = ".".join(str(p) for p in err.absolute_path)  # it carries the jsonschema error's fields
        return [SchemaProblem(_key(obj), path, err.message)]
    return []


def is_core(obj: Obj, kubernetes_version: str) -> bool:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, schema_version(kubernetes_version), strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return False
    except kubernetes_validate.ValidationError:
        return True
    return True


def validate_custom(obj: Obj, crd_dir: Path = DEFAULT_CRD_DIR) -> list[SchemaProblem]:
    import jsonschema

    schema = crd_schemas(Path(crd_dir)).get((obj.get("apiVersion", ""), obj.get("kind", "")))
    if schema is None:
        return [SchemaProblem(_key(obj), "", f"no schema for {obj.get('apiVersion')} {obj.get('kind')} in {crd_dir}")]
    validator = jsonschema.Draft7Validator(schema)
    return [
        SchemaProblem(_key(obj), ".".join(str(p) for p in err.absolute_path), err.message)
        for err in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
    ]


def embedded_pod_templates(obj: Obj) -> list[tuple[str, Obj]]:
    """Pod templates that a custom resource carries (LeaderWorkerSet's leader and worker templates)."""
    if obj.get("kind") != "LeaderWorkerSet":
        return []
    lwt = obj.get("spec", {}).get("leaderWorkerTemplate", {})
    return [(f"spec.leaderWorkerTemplate.{k}", lwt[k]) for k in ("leaderTemplate", "workerTemplate") if k in lwt]


def validate_object(obj: Obj, kubernetes_version: str, crd_dir: Path = DEFAULT_CRD_DIR) -> list[SchemaProblem]:
    """Every problem of one object: core schema for built-in kinds, CRD schema (+ pod templates) otherwise."""
    if is_core(obj, kubernetes_version):
        return validate_core(obj, kubernetes_version)
    problems = validate_custom(obj, crd_dir)
    for path, template in embedded_pod_templates(obj):
        wrapped = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": obj["metadata"]["name"]},
            "template": template,
        }
        problems += [
            SchemaProblem(_key(obj), f"{path}.{p.path.removeprefix('template.')}", p.message)
            for p in validate_core(wrapped, kubernetes_version)
        ]
    return problems


def validate_all(objs: list[Obj], kubernetes_version: str, crd_dir: Path = DEFAULT_CRD_DIR) -> list[SchemaProblem]:
    return [problem for obj in objs for problem in validate_object(obj, kubernetes_version, crd_dir)]
