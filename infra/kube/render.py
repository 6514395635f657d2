"""The whole object set of one environment, in the order it must be applied, and its YAML form.

Order: cluster-scoped foundations (Namespace, StorageClass, PersistentVolume), then what pods reference
(ServiceAccount, ConfigMap, PVC), traffic and disruption objects, the workload, then the custom resources
that point at it (KEDA, monitoring). Custom resource *definitions* (LeaderWorkerSet, KEDA, Prometheus
Operator) come from their operators' own installs; the installer checks they exist before applying.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from infra.catalog.names import RUNTIME_NAMESPACE
from infra.catalog.outputs import OutputsError, StackOutputs
from infra.catalog.sizes import INSTANCE_TYPES, SIZES, HotTierKind, ModelRef, SizeName
from infra.kube import node_autoscaler
from infra.kube import objects as o
from infra.observability import monitoring_objects as mon

if TYPE_CHECKING:
    from infra.catalog.environments import Environment

Obj = dict[str, Any]

GPU_MONITORING_NAMESPACE = "kube-system"


def render_input(
    env: Environment,
    outputs: StackOutputs,
    *,
    image: str,
    model: ModelRef,
    version: str = "dev",
) -> o.RenderInput:
    """Combine an environment with its stack outputs; the outputs must be of the same size."""
    if outputs.deployment_size != env.size.value:
        raise OutputsError(
            f"deployment_size = {outputs.deployment_size!r} in the outputs, but environment {env.name!r} is "
            f"size {env.size.value!r}: outputs of another environment?"
        )
    return o.RenderInput(
        env=env.name,
        outputs=outputs,
        size=SIZES[SizeName(env.size.value)],
        instance=INSTANCE_TYPES[env.gpu_instance_type],
        image=image,
        model=model,
        max_gpu_nodes=env.gpu_node_counts[2],
        kubernetes_version=env.kubernetes_version,
        version=version,
        runtime=env.runtime,
    )


def node_autoscaler_objects(inp: o.RenderInput) -> list[Obj]:
    """The Cluster Autoscaler: without it the GPU pool, which starts at zero nodes, never gets one."""
    return node_autoscaler.objects(
        cluster_name=inp.outputs.cluster_name,
        region=inp.outputs.region,
        kubernetes_version=inp.kubernetes_version,
        part_of=o.PART_OF,
        managed_by=o.FIELD_MANAGER,
    )


def runtime_objects(inp: o.RenderInput) -> list[Obj]:
    objs: list[Obj] = [o.namespace(inp)]
    if inp.outputs.hot_tier is HotTierKind.EBS_GP3:
        objs.append(o.storage_class(inp))
    else:
        objs.append(o.persistent_volume(inp))
    objs += [
        o.service_account(inp),
        o.config_map(inp),
        o.persistent_volume_claim(inp),
        o.service(inp),
        o.network_policy(inp),
        o.pod_disruption_budget(inp),
        o.workload(inp),
    ]
    if inp.autoscaled:
        objs += [o.trigger_authentication(inp), o.scaled_object(inp)]
    return objs


def monitoring_objects(inp: o.RenderInput) -> list[Obj]:
    """GPU metrics (device plugin, DCGM exporter + its ServiceMonitor) in kube-system, the runtime's
    ServiceMonitor, the alert rules and the review's recording rules (PrometheusRules) in the runtime's
    namespace, from
    `infra.observability.monitoring_objects`.

    The GPU DaemonSets need host paths (the kubelet's pod-resources socket), which the runtime namespace's
    'restricted' Pod Security level forbids, hence kube-system. The runtime is scraped through its Service,
    which selects the serving pods (group leaders on the large size)."""
    return [
        *mon.gpu_monitoring_objects(GPU_MONITORING_NAMESPACE),
        mon.runtime_service_monitor(RUNTIME_NAMESPACE, o.selector_labels(inp)),
        mon.prometheus_rule(RUNTIME_NAMESPACE),
        mon.prometheus_recording_rule(RUNTIME_NAMESPACE),
    ]


def render(inp: o.RenderInput, *, monitoring: bool = True) -> list[Obj]:
    """Everything, the node autoscaler first (so within a kind it is applied, and waited for, before the
    runtime whose pods need the nodes it brings)."""
    objs = node_autoscaler_objects(inp) + runtime_objects(inp)
    if monitoring:
        objs += monitoring_objects(inp)
    return sort_for_apply(objs)


#: Apply order by kind; unknown kinds go after the workload, before the autoscaler.
KIND_ORDER = (
    "CustomResourceDefinition",
    "Namespace",
    "StorageClass",
    "PersistentVolume",
    "ClusterRole",
    "ClusterRoleBinding",
    "ServiceAccount",
    "Role",
    "RoleBinding",
    "ConfigMap",
    "Secret",
    "PersistentVolumeClaim",
    "Service",
    "NetworkPolicy",
    "PodDisruptionBudget",
    "DaemonSet",
    "Deployment",
    "StatefulSet",
    "LeaderWorkerSet",
    "*",
    "TriggerAuthentication",
    "ScaledObject",
    "ServiceMonitor",
    "PodMonitor",
    "PrometheusRule",
)


def sort_for_apply(objs: list[Obj]) -> list[Obj]:
    rank = {kind: i for i, kind in enumerate(KIND_ORDER)}
    return sorted(objs, key=lambda obj: rank.get(obj["kind"], rank["*"]))  # stable within a kind


def object_key(obj: Obj) -> str:
    meta = obj["metadata"]
    ns = meta.get("namespace")
    return f"{obj['kind']}/{ns + '/' if ns else ''}{meta['name']}"


def to_yaml(objs: list[Obj]) -> str:
    return yaml.safe_dump_all(objs, sort_keys=False, default_flow_style=False, width=120)


def write_dir(objs: list[Obj], out: Path) -> list[Path]:
    """One file per object, numbered in apply order (`kubectl apply -f DIR` and GitOps tools keep it)."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("[0-9][0-9]-*.yaml"):
        stale.unlink()
    paths = []
    for i, obj in enumerate(objs):
        meta = obj["metadata"]
        path = out / f"{i:02d}-{obj['kind'].lower()}-{meta['name']}.yaml"
        path.write_text(to_yaml([obj]))
        paths.append(path)
    return paths
