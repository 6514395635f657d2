"""Cluster add-ons the runtime's objects need and that come from their own installs: one pinned version each.

`moefleet install` checks their CRDs before applying anything and prints, for each one missing, the exact
install command below; docs/install.md lists the same commands (a test keeps the two equal). The versions are
chosen for the Kubernetes versions the stacks support (`environments.SUPPORTED_KUBERNETES_VERSIONS`), and
match the CRD schemas the rendered objects are validated against (tests/data/crds/README.md).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Prerequisite:
    """One add-on: the API groups its CRDs serve, the CRDs the runtime's objects use, its pinned version."""

    name: str
    #: API groups of the custom kinds it provides (what the installer maps a missing CRD back to).
    groups: tuple[str, ...]
    #: CRDs (`<plural>.<group>`) of the kinds the rendered objects use.
    crds: tuple[str, ...]
    version: str
    #: Install commands, in order, with `{version}` in them; `install_commands` fills it in.
    command_templates: tuple[str, ...]
    docs_url: str
    #: Which sizes need it (for the docs; the installer checks what the rendered objects actually use).
    needed_by: str

    @property
    def install_commands(self) -> tuple[str, ...]:
        return tuple(template.format(version=self.version) for template in self.command_templates)


KEDA = Prerequisite(
    name="KEDA",
    groups=("keda.sh",),
    crds=("scaledobjects.keda.sh", "triggerauthentications.keda.sh"),
    version="2.18.0",
    command_templates=(
        "helm repo add kedacore https://kedacore.github.io/charts",
        "helm upgrade --install keda kedacore/keda --version {version} --namespace keda --create-namespace",
    ),
    docs_url="https://keda.sh/docs/2.18/deploy/",
    needed_by="medium; large with more than one group",
)
LEADER_WORKER_SET = Prerequisite(
    name="LeaderWorkerSet controller",
    groups=("leaderworkerset.x-k8s.io",),
    crds=("leaderworkersets.leaderworkerset.x-k8s.io",),
    version="0.6.2",
    command_templates=(
        "kubectl apply --server-side -f https://github.com/kubernetes-sigs/lws/releases/download/v{version}/manifests.yaml",
    ),
    docs_url="https://lws.sigs.k8s.io/docs/installation/",
    needed_by="large",
)
PROMETHEUS_OPERATOR = Prerequisite(
    name="Prometheus Operator (kube-prometheus-stack)",
    groups=("monitoring.coreos.com",),
    crds=(
        "servicemonitors.monitoring.coreos.com",
        "podmonitors.monitoring.coreos.com",
        "prometheusrules.monitoring.coreos.com",
    ),
    version="69.8.2",
    command_templates=(
        "helm repo add prometheus-community https://prometheus-community.github.io/helm-charts",
        "helm upgrade --install kube-prometheus-stack prometheus-community/kube-prometheus-stack "
        "--version {version} --namespace monitoring --create-namespace",
    ),
    docs_url="https://github.com/prometheus-community/helm-charts/tree/main/charts/kube-prometheus-stack",
    needed_by="every size (ServiceMonitor, PrometheusRule)",
)

PREREQUISITES: tuple[Prerequisite, ...] = (KEDA, LEADER_WORKER_SET, PROMETHEUS_OPERATOR)
#: API group → the add-on that provides it.
BY_GROUP: dict[str, Prerequisite] = {group: p for p in PREREQUISITES for group in p.groups}
