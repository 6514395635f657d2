"""Observability, generated from the runtime's contract and the catalog's thresholds.

`alerts` (the alert rules, rendered for AMP, a local Prometheus and the Prometheus Operator), `dashboard`
(the Grafana dashboard in docs/), `prometheus_config` (scrape configs), `monitoring_objects` (the
Kubernetes objects for GPU metrics and scraping). Pure data in, YAML/JSON/dicts out: no AWS calls.
"""
