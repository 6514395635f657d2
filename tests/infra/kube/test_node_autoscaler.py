"""The Cluster Autoscaler's Kubernetes side: rendered for every environment, its image following the
cluster's Kubernetes minor, discovering exactly this cluster's node groups, applied (and rolled out)
before the runtime whose pods wait for the nodes it brings."""

from __future__ import annotations

import io
from dataclasses import replace

import pytest

from infra.catalog import node_autoscaling as na
from infra.catalog.names import CLUSTER_AUTOSCALER_SERVICE_ACCOUNT, NODE_POOL_LABEL, RUNTIME_NAMESPACE, SYSTEM_POOL
from infra.kube.installer import Installer
from infra.kube.render import render
from infra.kube.schema import validate_all
from tests.infra.kube.fake_api import FakeKubeAPI
from tests.infra.kube.inputs import STANDARD_ENVIRONMENTS, make_input

NAMESPACE, NAME = CLUSTER_AUTOSCALER_SERVICE_ACCOUNT


def autoscaler(objs: list[dict]) -> dict:
    (deployment,) = [o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == NAME]
    return deployment


@pytest.mark.parametrize("env", STANDARD_ENVIRONMENTS)
def test_rendered_for_every_environment_and_discovers_only_its_cluster(environments, env):
    inp = make_input(environments[env])
    objs = render(inp)
    deployment = autoscaler(objs)
    assert deployment["metadata"]["namespace"] == NAMESPACE
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == NAME
    assert pod["nodeSelector"] == {NODE_POOL_LABEL: SYSTEM_POOL}, "never on the GPU nodes it removes"
    (container,) = pod["containers"]
    cluster = inp.outputs.cluster_name
    assert (
        f"--node-group-auto-discovery=asg:tag=k8s.io/cluster-autoscaler/enabled,k8s.io/cluster-autoscaler/{cluster}"
        in container["command"]
    )
    assert f"--scale-down-unneeded-time={na.SCALE_DOWN_UNNEEDED_TIME}" in container["command"]
    assert {"name": "AWS_REGION", "value": inp.outputs.region} in container["env"]
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objs if o["metadata"].get("namespace", NAMESPACE) == NAMESPACE}
    assert {("ServiceAccount", NAME), ("ClusterRole", NAME), ("ClusterRoleBinding", NAME), ("Role", NAME)} <= kinds
    assert validate_all(objs, environments[env].kubernetes_version) == []


@pytest.mark.parametrize("minor", sorted(na.VERSIONS))
def test_image_follows_the_kubernetes_minor(environments, minor):
    objs = render(replace(make_input(environments["staging"]), kubernetes_version=minor))
    image = autoscaler(objs)["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == f"{na.IMAGE_REPOSITORY}:v{na.VERSIONS[minor]}"
    assert image.rsplit(":v", 1)[1].startswith(f"{minor}.")


def test_applied_and_rolled_out_before_the_runtime(environments, fake_api: FakeKubeAPI):
    from kubernetes import client

    objs = render(make_input(environments["staging"]))
    out = io.StringIO()
    Installer(client.ApiClient(client.Configuration(host=fake_api.url)), out=out, timeout_s=60, poll_s=0.01).install(
        objs
    )
    paths = [path for path, _, _ in fake_api.applies(dry_run=False)]
    deployments = [p for p in paths if "/deployments/" in p]
    assert deployments == [
        f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/{NAME}",
        f"/apis/apps/v1/namespaces/{RUNTIME_NAMESPACE}/deployments/moe-runtime",
    ]
    log = out.getvalue()
    assert log.index(f"rolled out deployment/{NAME}") < log.index("rolled out deployment/moe-runtime")
