"""Scrape configurations generated from the runtime's contract (the source document's "monitoring data
missing" row: no hand-written scrape config to drift from the service).

Two renderers: :func:`local_config` for a Prometheus on a laptop or in the demo (static targets, the
rules file from :mod:`infra.observability.alerts`), and :func:`amp_collector_config` for the AMP managed collector
(``aws_prometheus_scraper``), which discovers pods in the cluster. Job names are the ones the alert
rules select on (``up{job="moe-runtime"}``), so a renamed job breaks a test, not the metrics-missing alert.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from infra.observability.alerts import GPU_EXPORTER_JOB, RUNTIME_JOB
from runtime import contract

#: Port name of the DCGM exporter's container and Service (infra.observability.monitoring_objects uses it too).
DCGM_PORT_NAME = "metrics"
DCGM_PORT = 9400
DCGM_APP_NAME = "dcgm-exporter"


def local_config(
    targets: list[str],
    *,
    rule_files: list[str] | None = None,
    scrape_interval: str = "15s",
    evaluation_interval: str = "15s",
) -> dict:
    """Prometheus config scraping the runtime's ``/metrics`` at ``host:port`` targets."""
    for target in targets:
        host, _, port = target.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"scrape target {target!r}: expected 'host:port', like '127.0.0.1:8000'")
    return {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": evaluation_interval},
        "rule_files": list(rule_files or []),
        "scrape_configs": [
            {
                "job_name": RUNTIME_JOB,
                "metrics_path": contract.METRICS_PATH,
                "scrape_timeout": scrape_interval,
                "static_configs": [{"targets": list(targets)}],
            }
        ],
    }


def _pod_job(job: str, app_name: str, port_name: str, *, honor_labels: bool = False) -> dict:
    """A kubernetes_sd pod job: keep pods labelled ``app.kubernetes.io/name=<app_name>`` on the named
    container port, and carry namespace / pod / node into the series."""
    name_label = contract.POD_LABEL_KEYS["name"].replace(".", "_").replace("/", "_").replace("-", "_")
    job_config = {
        "job_name": job,
        "kubernetes_sd_configs": [{"role": "pod"}],
        "relabel_configs": [
            {
                "source_labels": [f"__meta_kubernetes_pod_label_{name_label}"],
                "regex": app_name,
                "action": "keep",
            },
            {"source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": port_name, "action": "keep"},
            {"source_labels": ["__meta_kubernetes_pod_phase"], "regex": "Running", "action": "keep"},
            {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
            {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
            {"source_labels": ["__meta_kubernetes_pod_node_name"], "target_label": "node"},
        ],
    }
    if honor_labels:
        job_config["honor_labels"] = True
    return job_config


def amp_collector_config(scrape_interval: str = "30s") -> dict:
    """Scrape configuration for the AMP managed collector (``aws_prometheus_scraper``'s
    ``scrape_configuration``): the runtime pods and the DCGM exporter, found by pod label.

    The DCGM job honours the exporter's own ``namespace``/``pod``/``container`` labels (it sets them to
    the pod *using* each GPU when ``DCGM_EXPORTER_KUBERNETES=true``); without ``honor_labels`` they would
    be overwritten with the exporter pod's own — the classic "GPU metrics without pod labels" failure.
    """
    runtime = _pod_job(RUNTIME_JOB, contract.APP_NAME, contract.PORT_NAME)
    runtime["metrics_path"] = contract.METRICS_PATH
    dcgm = _pod_job(GPU_EXPORTER_JOB, DCGM_APP_NAME, DCGM_PORT_NAME, honor_labels=True)
    # With honor_labels the exporter's namespace/pod win; keep ours only where the exporter has none.
    dcgm["relabel_configs"] = [r for r in dcgm["relabel_configs"] if r.get("target_label") not in ("namespace", "pod")]
    return {"global": {"scrape_interval": scrape_interval}, "scrape_configs": [runtime, dcgm]}


def to_yaml(config: dict) -> str:
    return yaml.safe_dump(config, sort_keys=False)


def write_local(
    directory: Path,
    targets: list[str],
    rules_yaml: str,
    *,
    scrape_interval: str = "15s",
    evaluation_interval: str = "15s",
    recording_rules_yaml: str | None = None,
) -> Path:
    """Write ``prometheus.yml`` and ``rules.yml`` (plus ``recording.yml`` with the review's recording rules,
    when given) into ``directory``; returns the config's path."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "rules.yml").write_text(rules_yaml)
    rule_files = ["rules.yml"]
    if recording_rules_yaml:
        (directory / "recording.yml").write_text(recording_rules_yaml)
        rule_files.append("recording.yml")
    config = local_config(
        targets, rule_files=rule_files, scrape_interval=scrape_interval, evaluation_interval=evaluation_interval
    )
    path = directory / "prometheus.yml"
    path.write_text(to_yaml(config))
    return path
