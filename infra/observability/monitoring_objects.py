"""Kubernetes objects for GPU metrics and for scraping the runtime, as plain dicts (the installer applies
them; its tests validate them against the schemas).

- :func:`gpu_monitoring_objects` — the NVIDIA device plugin (GPUs become schedulable
  ``nvidia.com/gpu``), the DCGM exporter (DaemonSet + Service + its counters ConfigMap) and a
  ServiceMonitor for it. Both DaemonSets run only on the GPU pool (nodeSelector on the pool label) and
  tolerate its taint, from :mod:`infra.catalog.names`; the exporter keeps the *workload* pod/namespace labels
  on GPU series (``DCGM_EXPORTER_KUBERNETES=true`` + the kubelet pod-resources socket, and
  ``honorLabels`` on the monitor) — the most reported DCGM pitfall.
- :func:`runtime_service_monitor` / :func:`runtime_pod_monitor` — Prometheus Operator monitors whose
  job label is ``moe-runtime``, the job the alert rules watch.
- :func:`prometheus_rule` — the alert rules of :mod:`infra.observability.alerts` as a ``PrometheusRule``.
- :func:`prometheus_recording_rule` — the review's recording rules (:mod:`infra.observability.recording`), likewise.

Images are pinned (the tag is the version; never ``latest``).
"""

from __future__ import annotations

from infra.catalog.names import GPU_POOL, GPU_TAINT, NODE_POOL_LABEL
from infra.catalog.thresholds import Thresholds
from infra.observability import alerts, recording
from infra.observability.alerts import GPU_EXPORTER_JOB
from infra.observability.prometheus_config import DCGM_APP_NAME, DCGM_PORT, DCGM_PORT_NAME
from runtime import contract

DEVICE_PLUGIN_IMAGE = "nvcr.io/nvidia/k8s-device-plugin:v0.17.1"
DCGM_EXPORTER_IMAGE = "nvcr.io/nvidia/k8s/dcgm-exporter:4.2.3-4.1.3-ubuntu22.04"
DEVICE_PLUGIN_NAME = "nvidia-device-plugin"
POD_RESOURCES_PATH = "/var/lib/kubelet/pod-resources"  # kubelet's socket: which pod holds which GPU
DCGM_COUNTERS_FILE = "moe-fleet-counters.csv"
DCGM_CONFIG_DIR = "/etc/dcgm-exporter/moe-fleet"
SCRAPE_INTERVAL = "15s"

NAME_KEY = contract.POD_LABEL_KEYS["name"]
COMPONENT_KEY = contract.POD_LABEL_KEYS["component"]
MONITORING_API = "monitoring.coreos.com/v1"


def _meta(name: str, namespace: str, labels: dict[str, str] | None = None) -> dict:
    return {"name": name, "namespace": namespace, "labels": {NAME_KEY: name, **(labels or {})}}


def _gpu_daemonset(name: str, namespace: str, container: dict, volumes: list[dict]) -> dict:
    """A DaemonSet on every GPU node and nowhere else (pool selector, GPU taint toleration, node-critical)."""
    labels = {NAME_KEY: name}
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": _meta(name, namespace),
        "spec": {
            "selector": {"matchLabels": labels},
            "updateStrategy": {"type": "RollingUpdate"},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "nodeSelector": {NODE_POOL_LABEL: GPU_POOL},
                    "tolerations": [GPU_TAINT.toleration(), {"key": "CriticalAddonsOnly", "operator": "Exists"}],
                    "priorityClassName": "system-node-critical",
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }


def dcgm_counters_csv() -> str:
    """The exporter's counters file: exactly the DCGM fields the rules and the dashboard use."""
    lines = ["# DCGM field, Prometheus type, help — generated from infra.observability.alerts.DCGM_METRICS"]
    lines += [f"{name}, {kind}, {help_}" for name, (kind, help_) in alerts.DCGM_METRICS.items()]
    return "\n".join(lines) + "\n"


def device_plugin_daemonset(namespace: str) -> dict:
    """The NVIDIA device plugin: advertises ``nvidia.com/gpu`` on GPU nodes (EKS GPU AMIs ship the
    driver and container toolkit, not the plugin)."""
    container = {
        "name": "device-plugin",
        "image": DEVICE_PLUGIN_IMAGE,
        # Keep running on a node whose driver is still initialising; it retries.
        "env": [{"name": "FAIL_ON_INIT_ERROR", "value": "false"}],
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
        "volumeMounts": [{"name": "device-plugin", "mountPath": "/var/lib/kubelet/device-plugins"}],
    }
    volumes = [{"name": "device-plugin", "hostPath": {"path": "/var/lib/kubelet/device-plugins"}}]
    return _gpu_daemonset(DEVICE_PLUGIN_NAME, namespace, container, volumes)


def dcgm_exporter_objects(namespace: str) -> list[dict]:
    """ConfigMap (counters), DaemonSet and Service of the DCGM exporter."""
    labels = {NAME_KEY: DCGM_APP_NAME}
    config = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(f"{DCGM_APP_NAME}-counters", namespace),
        "data": {DCGM_COUNTERS_FILE: dcgm_counters_csv()},
    }
    container = {
        "name": "dcgm-exporter",
        "image": DCGM_EXPORTER_IMAGE,
        "ports": [{"name": DCGM_PORT_NAME, "containerPort": DCGM_PORT, "protocol": "TCP"}],
        "env": [
            {"name": "DCGM_EXPORTER_LISTEN", "value": f":{DCGM_PORT}"},
            # Map each GPU to the pod using it (pod-resources socket) and label its series with it.
            {"name": "DCGM_EXPORTER_KUBERNETES", "value": "true"},
            {"name": "DCGM_EXPORTER_COLLECTORS", "value": f"{DCGM_CONFIG_DIR}/{DCGM_COUNTERS_FILE}"},
            {"name": "NVIDIA_VISIBLE_DEVICES", "value": "all"},  # watch every GPU, allocate none
        ],
        "securityContext": {"runAsUser": 0, "runAsNonRoot": False, "capabilities": {"add": ["SYS_ADMIN"]}},
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
        "readinessProbe": {"httpGet": {"path": "/health", "port": DCGM_PORT}, "initialDelaySeconds": 15},
        "livenessProbe": {"httpGet": {"path": "/health", "port": DCGM_PORT}, "initialDelaySeconds": 45},
        "volumeMounts": [
            {"name": "pod-resources", "mountPath": POD_RESOURCES_PATH, "readOnly": True},
            {"name": "counters", "mountPath": DCGM_CONFIG_DIR, "readOnly": True},
        ],
    }
    volumes = [
        {"name": "pod-resources", "hostPath": {"path": POD_RESOURCES_PATH, "type": "Directory"}},
        {"name": "counters", "configMap": {"name": config["metadata"]["name"]}},
    ]
    daemonset = _gpu_daemonset(DCGM_APP_NAME, namespace, container, volumes)
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(DCGM_APP_NAME, namespace),
        "spec": {
            "selector": labels,
            "ports": [{"name": DCGM_PORT_NAME, "port": DCGM_PORT, "targetPort": DCGM_PORT_NAME, "protocol": "TCP"}],
        },
    }
    return [config, daemonset, service]


def dcgm_service_monitor(namespace: str, *, labels: dict[str, str] | None = None) -> dict:
    """Scrapes the exporter as job ``dcgm-exporter``; ``honorLabels`` keeps the workload's pod labels."""
    return {
        "apiVersion": MONITORING_API,
        "kind": "ServiceMonitor",
        "metadata": _meta(DCGM_APP_NAME, namespace, labels),
        "spec": {
            "jobLabel": NAME_KEY,  # the Service's app.kubernetes.io/name → job="dcgm-exporter"
            "selector": {"matchLabels": {NAME_KEY: GPU_EXPORTER_JOB}},
            "namespaceSelector": {"matchNames": [namespace]},
            "endpoints": [{"port": DCGM_PORT_NAME, "interval": SCRAPE_INTERVAL, "honorLabels": True}],
        },
    }


def gpu_monitoring_objects(namespace: str, *, monitor_labels: dict[str, str] | None = None) -> list[dict]:
    """Everything for GPU metrics on the cluster, in apply order. ``monitor_labels`` go on the
    ServiceMonitor so the Prometheus's ``serviceMonitorSelector`` picks it up (e.g. ``release``)."""
    return [
        device_plugin_daemonset(namespace),
        *dcgm_exporter_objects(namespace),
        dcgm_service_monitor(namespace, labels=monitor_labels),
    ]


def _check_selector(selector_labels: dict[str, str]) -> None:
    if selector_labels.get(NAME_KEY) != contract.APP_NAME:
        raise ValueError(
            f"selector_labels must include {NAME_KEY}={contract.APP_NAME!r} (got {selector_labels!r}): the monitor "
            f"takes its job label from it and the alert rules watch job={alerts.RUNTIME_JOB!r}"
        )


def runtime_service_monitor(
    namespace: str, selector_labels: dict[str, str], *, labels: dict[str, str] | None = None
) -> dict:
    """Scrapes the runtime's Service (port ``http``, ``/metrics``) as job ``moe-runtime``."""
    _check_selector(selector_labels)
    return {
        "apiVersion": MONITORING_API,
        "kind": "ServiceMonitor",
        "metadata": _meta(contract.APP_NAME, namespace, labels),
        "spec": {
            "jobLabel": NAME_KEY,
            "selector": {"matchLabels": dict(selector_labels)},
            "namespaceSelector": {"matchNames": [namespace]},
            "endpoints": [{"port": contract.PORT_NAME, "path": contract.METRICS_PATH, "interval": SCRAPE_INTERVAL}],
        },
    }


def runtime_pod_monitor(
    namespace: str, selector_labels: dict[str, str], *, labels: dict[str, str] | None = None
) -> dict:
    """Scrapes runtime pods directly — for pods behind no Service (multi-node workers). Use it *instead of*
    the ServiceMonitor for the same pods, not with it, or every series is scraped twice."""
    _check_selector(selector_labels)
    return {
        "apiVersion": MONITORING_API,
        "kind": "PodMonitor",
        "metadata": _meta(contract.APP_NAME, namespace, labels),
        "spec": {
            "jobLabel": NAME_KEY,
            "selector": {"matchLabels": dict(selector_labels)},
            "namespaceSelector": {"matchNames": [namespace]},
            "podMetricsEndpoints": [
                {"port": contract.PORT_NAME, "path": contract.METRICS_PATH, "interval": SCRAPE_INTERVAL}
            ],
        },
    }


def prometheus_rule(
    namespace: str, thresholds: Thresholds | None = None, *, labels: dict[str, str] | None = None
) -> dict:
    """The alert rules as a ``PrometheusRule``; ``labels`` must match the Prometheus ``ruleSelector``."""
    return alerts.prometheus_rule_object(
        alerts.alert_rules(thresholds or Thresholds()),
        name=alerts.RULE_GROUP,
        namespace=namespace,
        labels={NAME_KEY: contract.APP_NAME, COMPONENT_KEY: "alerts", **(labels or {})},
    )


def prometheus_recording_rule(namespace: str, *, labels: dict[str, str] | None = None) -> dict:
    """The review's recording rules as a ``PrometheusRule``; ``labels`` as for :func:`prometheus_rule`."""
    return recording.prometheus_recording_rule_object(
        recording.recording_rules(),
        name=recording.RECORDING_GROUP,
        namespace=namespace,
        labels={NAME_KEY: contract.APP_NAME, COMPONENT_KEY: "recording-rules", **(labels or {})},
    )
