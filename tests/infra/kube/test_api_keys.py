"""The runtime's API key reaches the pods from a Secret only: rendered objects reference it (never hold
it), and the installer creates it, generated or from the operator's file, before any workload."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest

from infra.catalog.names import API_KEYS_SECRET, API_KEYS_SECRET_KEY, RUNTIME_NAMESPACE
from infra.catalog.outputs import representative_outputs
from infra.cli.main import main
from infra.kube.installer import Installer
from infra.kube.render import render
from infra.kube.schema import validate_all
from runtime import contract as c
from tests.infra.kube.fake_api import FakeKubeAPI
from tests.infra.kube.inputs import STANDARD_ENVIRONMENTS, make_input
from tests.infra.kube.test_installer import _client

SECRET_PATH = f"/api/v1/namespaces/{RUNTIME_NAMESPACE}/secrets/{API_KEYS_SECRET}"


def _containers(objs: list[dict]) -> list[tuple[str, dict]]:
    """(role, container) of every runtime container in the workload's pod templates."""
    out = []
    for obj in (o for o in objs if o["metadata"].get("namespace") == RUNTIME_NAMESPACE):
        if obj["kind"] == "Deployment":
            out += [("server", ct) for ct in obj["spec"]["template"]["spec"]["containers"]]
        elif obj["kind"] == "LeaderWorkerSet":
            lwt = obj["spec"]["leaderWorkerTemplate"]
            out += [("leader", ct) for ct in lwt["leaderTemplate"]["spec"]["containers"]]
            out += [("worker", ct) for ct in lwt["workerTemplate"]["spec"]["containers"]]
    return out


@pytest.mark.parametrize("env", STANDARD_ENVIRONMENTS)
def test_the_serving_container_reads_the_key_from_a_required_secret(environments, env):
    objs = render(make_input(environments[env]))
    assert validate_all(objs, environments[env].kubernetes_version) == []
    serving = [ct for role, ct in _containers(objs) if role != "worker"]
    assert serving, "no HTTP-serving container rendered"
    for ct in serving:
        (var,) = [e for e in ct.get("env", []) if e["name"] == c.ENV_API_KEYS]
        ref = var["valueFrom"]["secretKeyRef"]
        assert ref == {"name": API_KEYS_SECRET, "key": API_KEYS_SECRET_KEY, "optional": False}
    for role, ct in _containers(objs):
        if role == "worker":  # workers serve no HTTP: they never see the key
            assert c.ENV_API_KEYS not in json.dumps(ct)
    # never rendered: no Secret object, no ConfigMap value
    assert not [o for o in objs if o["kind"] == "Secret"]
    for cm in (o for o in objs if o["kind"] == "ConfigMap"):
        assert c.ENV_API_KEYS not in cm.get("data", {})


def _installer(api: FakeKubeAPI) -> tuple[Installer, io.StringIO]:
    out = io.StringIO()
    return Installer(_client(api.url), out=out, timeout_s=5, poll_s=0, sleep=lambda _: None), out


def _stored_key(api: FakeKubeAPI) -> str:
    return base64.b64decode(api.objects[SECRET_PATH]["data"][API_KEYS_SECRET_KEY]).decode()


def test_install_creates_a_generated_key_before_the_workload_and_keeps_it(fake_api, environments):
    objs = render(make_input(environments["dev"]))
    installer, out = _installer(fake_api)
    installer.install(objs)
    paths = [p for p, _, _ in fake_api.applies(dry_run=False)]
    deployment = f"/apis/apps/v1/namespaces/{RUNTIME_NAMESPACE}/deployments/moe-runtime"
    assert paths.index(SECRET_PATH) < paths.index(deployment)
    assert paths.index(SECRET_PATH) > paths.index(f"/api/v1/namespaces/{RUNTIME_NAMESPACE}")
    key = _stored_key(fake_api)
    assert len(key) >= 40 and key not in out.getvalue(), "the key is generated and never printed"
    assert f"kubectl get secret {API_KEYS_SECRET}" in out.getvalue()
    installer.install(objs)  # a re-install never rotates the key under running clients
    assert _stored_key(fake_api) == key
    assert f"kept      secret/{API_KEYS_SECRET}" in out.getvalue()


def test_install_uses_the_operators_key_file_and_dry_run_creates_nothing(fake_api, environments, tmp_path: Path):
    outputs = tmp_path / "outputs.json"
    outputs.write_text(json.dumps({k: {"value": v} for k, v in representative_outputs(environments["dev"]).items()}))
    kubeconfig = fake_api.kubeconfig(tmp_path)
    keys = tmp_path / "keys"
    keys.write_text("# current and next\nkey-one\nkey-two\n")
    base = ["install", "dev", "--outputs", str(outputs), "--kubeconfig", str(kubeconfig), "--skip-weights-check"]
    base += ["--poll", "0", "--api-key-file", str(keys)]
    assert main([*base, "--dry-run"]) == 0
    assert SECRET_PATH not in fake_api.objects
    assert main(base) == 0
    assert _stored_key(fake_api) == "key-one,key-two"  # $MOE_API_KEYS' comma list: both valid


def test_install_refuses_an_empty_key_file(environments, tmp_path: Path, capsys):
    keys = tmp_path / "keys"
    keys.write_text("# nothing\n")
    assert main(["install", "dev", "--api-key-file", str(keys)]) == 2
    assert f"--api-key-file {keys}: no key in it" in capsys.readouterr().err
