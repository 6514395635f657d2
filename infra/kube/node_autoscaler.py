"""The Kubernetes Cluster Autoscaler for the environment's managed node groups, as plain objects.

It finds the node groups by the discovery tags EKS puts on their Auto Scaling groups, plans nodes of a
group at zero from the node-template tags the stack adds (`infra.constructs.node_autoscaling`), and
scales the GPU pool up when runtime pods are Pending and back down to zero when its nodes have been idle
(`infra.catalog.node_autoscaling` holds the timings; docs/install.md explains them). Its AWS credentials
come from EKS Pod Identity: the stack binds its IAM role to this service account, so no annotation.

RBAC follows the upstream AWS example: read what scheduling depends on, write nodes (taints while
draining), evictions, its status ConfigMap and its leader-election lease.
"""

from __future__ import annotations

from typing import Any

from infra.catalog import node_autoscaling as na
from infra.catalog.names import CLUSTER_AUTOSCALER_SERVICE_ACCOUNT, NODE_POOL_LABEL, SYSTEM_POOL

Obj = dict[str, Any]

NAMESPACE, NAME = CLUSTER_AUTOSCALER_SERVICE_ACCOUNT
STATUS_CONFIG_MAP = f"{NAME}-status"
#: The autoscaler's pod is the one thing that must not be evicted by itself while it drains a node.
SAFE_TO_EVICT = "cluster-autoscaler.kubernetes.io/safe-to-evict"
_READ = ["get", "list", "watch"]


def labels(kubernetes_version: str, part_of: str, managed_by: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": NAME,
        "app.kubernetes.io/version": f"v{na.VERSIONS[_minor(kubernetes_version)]}",
        "app.kubernetes.io/part-of": part_of,
        "app.kubernetes.io/managed-by": managed_by,
    }


def _minor(kubernetes_version: str) -> str:
    return ".".join(kubernetes_version.split(".")[:2])


def _rule(groups: list[str], resources: list[str], verbs: list[str], names: list[str] | None = None) -> Obj:
    rule: Obj = {"apiGroups": groups, "resources": resources, "verbs": verbs}
    if names:
        rule["resourceNames"] = names
    return rule


def flags(cluster_name: str) -> list[str]:
    """Scale-down is tuned for GPU nodes: removal after 10 idle minutes, never within 10 minutes of a
    scale-up (a new node's pod is still loading weights), local-storage pods (the runtime's /dev/shm and
    model cache) do not pin a node."""
    return [
        "./cluster-autoscaler",
        "--cloud-provider=aws",
        na.discovery_flag(cluster_name),
        f"--expander={na.EXPANDER}",
        "--balance-similar-node-groups",
        "--skip-nodes-with-system-pods=false",
        "--skip-nodes-with-local-storage=false",
        f"--scale-down-utilization-threshold={na.SCALE_DOWN_UTILIZATION_THRESHOLD}",
        f"--scale-down-unneeded-time={na.SCALE_DOWN_UNNEEDED_TIME}",
        f"--scale-down-delay-after-add={na.SCALE_DOWN_DELAY_AFTER_ADD}",
        f"--max-node-provision-time={na.MAX_NODE_PROVISION_TIME}",
        f"--status-config-map-name={STATUS_CONFIG_MAP}",
        "--stderrthreshold=info",
        "--v=2",
    ]


def objects(*, cluster_name: str, region: str, kubernetes_version: str, part_of: str, managed_by: str) -> list[Obj]:
    """ServiceAccount, RBAC and the Deployment, all in kube-system (the autoscaler runs on the system pool)."""
    meta_labels = labels(kubernetes_version, part_of, managed_by)

    def meta(name: str, namespaced: bool = True) -> Obj:
        return {"name": name, "labels": meta_labels, **({"namespace": NAMESPACE} if namespaced else {})}

    cluster_rules = [
        _rule([""], ["events", "endpoints"], ["create", "patch"]),
        _rule([""], ["pods/eviction"], ["create"]),
        _rule([""], ["pods/status"], ["update"]),
        _rule([""], ["endpoints"], ["get", "update"], [NAME]),
        _rule([""], ["nodes"], ["get", "list", "watch", "update"]),
        _rule(
            [""],
            ["namespaces", "pods", "services", "replicationcontrollers", "persistentvolumeclaims", "persistentvolumes"],
            _READ,
        ),
        _rule(["extensions"], ["replicasets", "daemonsets"], _READ),
        _rule(["policy"], ["poddisruptionbudgets"], ["list", "watch"]),
        _rule(["apps"], ["statefulsets", "replicasets", "daemonsets"], _READ),
        _rule(["storage.k8s.io"], ["storageclasses", "csinodes", "csidrivers", "csistoragecapacities"], _READ),
        _rule(["batch"], ["jobs", "cronjobs"], _READ),
        _rule(["coordination.k8s.io"], ["leases"], ["create"]),
        _rule(["coordination.k8s.io"], ["leases"], ["get", "update"], [NAME]),
        # Dynamic resource allocation objects, which the autoscaler reads from Kubernetes 1.32 on.
        _rule(["resource.k8s.io"], ["resourceclaims", "resourceslices", "deviceclasses"], _READ),
    ]
    namespace_rules = [
        _rule([""], ["configmaps"], ["create", "list", "watch"]),
        _rule([""], ["configmaps"], ["delete", "get", "update", "watch"], [STATUS_CONFIG_MAP]),
    ]
    subject = [{"kind": "ServiceAccount", "name": NAME, "namespace": NAMESPACE}]
    selector = {"app.kubernetes.io/name": NAME}
    container = {
        "name": NAME,
        "image": na.image(kubernetes_version),
        "command": flags(cluster_name),
        "env": [{"name": "AWS_REGION", "value": region}],
        "ports": [{"name": "metrics", "containerPort": na.METRICS_PORT, "protocol": "TCP"}],
        "resources": {
            "requests": {"cpu": "100m", "memory": "600Mi"},
            "limits": {"memory": "600Mi"},
        },
        "livenessProbe": {"httpGet": {"path": "/health-check", "port": "metrics"}, "periodSeconds": 10},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta(NAME),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": {**meta_labels, **selector}, "annotations": {SAFE_TO_EVICT: "false"}},
                "spec": {
                    "serviceAccountName": NAME,
                    "priorityClassName": "system-cluster-critical",
                    "nodeSelector": {NODE_POOL_LABEL: SYSTEM_POOL},
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": 65534,
                        "fsGroup": 65534,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [container],
                },
            },
        },
    }
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(NAME)},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": meta(NAME, namespaced=False),
            "rules": cluster_rules,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": meta(NAME, namespaced=False),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": NAME},
            "subjects": subject,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": meta(NAME),
            "rules": namespace_rules,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": meta(NAME),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": NAME},
            "subjects": subject,
        },
        deployment,
    ]
