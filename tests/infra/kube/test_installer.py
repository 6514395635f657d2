"""Installer: server-side apply, rollout wait, rollback and dry run, over real HTTP against the fake API
(tests/infra/kube/fake_api.py; no API server runs on these machines), through the `kubernetes` client."""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path

import pytest

from infra.catalog.environments import DEFAULT_ENVIRONMENTS_FILE
from infra.catalog.outputs import representative_outputs
from infra.catalog.prerequisites import BY_GROUP, PREREQUISITES
from infra.cli.main import main
from infra.kube.installer import FIELD_MANAGER, Installer, InstallError, object_path, plural
from infra.kube.render import render
from tests.infra.kube.fake_api import FakeKubeAPI
from tests.infra.kube.inputs import make_input


def _client(url: str):
    from kubernetes import client

    config = client.Configuration(host=url)
    config.api_key = {"BearerToken": "Bearer test-token"}
    return client.ApiClient(config)


class Clock:
    """Manual time: sleep advances it, so timeouts are tested without waiting."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def _installer(api: FakeKubeAPI, timeout: float = 60.0) -> tuple[Installer, io.StringIO]:
    out = io.StringIO()
    clock = Clock()
    return Installer(_client(api.url), out=out, timeout_s=timeout, poll_s=1.0, sleep=clock.sleep, clock=clock), out


def _image(api: FakeKubeAPI, obj: dict) -> str:
    stored = api.objects[object_path(obj)]
    spec = stored["spec"]
    template = spec["template"] if stored["kind"] == "Deployment" else spec["leaderWorkerTemplate"]["leaderTemplate"]
    return template["spec"]["containers"][0]["image"]


def test_first_install_applies_in_order_with_field_manager_and_is_idempotent(fake_api, environments):
    objs = render(make_input(environments["staging"]))
    installer, out = _installer(fake_api)
    installer.install(objs)
    applied = fake_api.applies(dry_run=False)
    # the API-key Secret is created by the installer, not rendered (tests/infra/kube/test_api_keys.py)
    assert [path for path, _, _ in applied if "/secrets/" not in path] == [object_path(o) for o in objs]
    assert all(q["fieldManager"] == [FIELD_MANAGER] and q["force"] == ["true"] for _, q, _ in applied)
    assert applied[0][0] == "/api/v1/namespaces/moe-fleet"  # namespace first
    assert "rolled out deployment/moe-runtime" in out.getvalue()
    generation = fake_api.objects[object_path(objs[-3])]["metadata"]["generation"]
    installer.install(objs)  # same objects again: nothing changes
    assert fake_api.objects[object_path(objs[-3])]["metadata"]["generation"] == generation


def test_missing_crd_stops_before_anything_is_applied(fake_api, environments):
    fake_api.crds.discard("leaderworkersets.leaderworkerset.x-k8s.io")
    installer, _ = _installer(fake_api)
    with pytest.raises(InstallError, match=r"leaderworkersets\.leaderworkerset\.x-k8s\.io.*LeaderWorkerSet"):
        installer.install(render(make_input(environments["prod"])))
    assert fake_api.applies() == []


@pytest.mark.parametrize("env", ["dev", "staging", "prod"])
def test_failed_rollout_restores_previous_template(fake_api, environments, env):
    v1 = render(make_input(environments[env], "v1"))
    v2 = render(make_input(environments[env], "v2-broken"))
    workload = next(
        o for o in v2 if o["kind"] in ("Deployment", "LeaderWorkerSet") and o["metadata"]["namespace"] == "moe-fleet"
    )
    installer, out = _installer(fake_api)
    installer.install(v1)
    assert _image(fake_api, workload).endswith(":v1")
    fake_api.outcome = lambda obj: "fail" if "broken" in json.dumps(obj["spec"]) else "ok"
    with pytest.raises(InstallError, match="previous revision restored"):
        installer.install(v2)
    assert _image(fake_api, workload).endswith(":v1")
    assert "restoring the previous template" in out.getvalue()


def test_failed_first_install_says_there_is_nothing_to_roll_back_to(fake_api, environments):
    fake_api.outcome = lambda obj: "fail"
    installer, _ = _installer(fake_api)
    with pytest.raises(InstallError, match="no previous revision"):
        installer.install(render(make_input(environments["dev"])))


def test_rollout_that_never_finishes_times_out(fake_api, environments):
    fake_api.outcome = lambda obj: "pending"
    installer, out = _installer(fake_api, timeout=30)
    with pytest.raises(InstallError, match="not done after 30 s"):
        installer.install(render(make_input(environments["dev"])))
    assert "0/1 updated, 0/1 available" in out.getvalue()


def test_dry_run_reports_changes_and_stores_nothing(fake_api, environments):
    installer, out = _installer(fake_api)
    first = installer.plan(render(make_input(environments["dev"], "v1")))
    assert {action for _, action, _ in first} == {"create"}
    assert fake_api.objects == {}
    installer.install(render(make_input(environments["dev"], "v1")))
    stored = json.dumps(fake_api.objects, sort_keys=True)
    same = installer.plan(render(make_input(environments["dev"], "v1")))
    assert {action for _, action, _ in same} == {"unchanged"}
    plan = {
        name: (action, paths) for name, action, paths in installer.plan(render(make_input(environments["dev"], "v2")))
    }
    assert json.dumps(fake_api.objects, sort_keys=True) == stored
    action, paths = plan["deployment/moe-runtime -n moe-fleet"]
    assert action == "change"
    assert "spec.template.spec.containers[0].image" in paths
    # Only the version label changes on the Service (its selector is version-free).
    assert plan["service/moe-runtime -n moe-fleet"] == ("change", ["metadata.labels.app.kubernetes.io/version"])
    assert "change    deployment/moe-runtime" in out.getvalue()
    assert all("dryRun" in q for _, q, _ in fake_api.applies(dry_run=True))


def test_cli_install_through_a_kubeconfig(fake_api, environments, tmp_path: Path, capsys):
    outputs = tmp_path / "outputs.json"
    outputs.write_text(json.dumps({k: {"value": v} for k, v in representative_outputs(environments["dev"]).items()}))
    kubeconfig = fake_api.kubeconfig(tmp_path)
    args = ["install", "dev", "--outputs", str(outputs), "--kubeconfig", str(kubeconfig), "--skip-weights-check"]
    args += ["--tag", "v7", "--poll", "0"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "install: dev is rolled out" in err and "deepseek-v2-lite@main not checked in the cold tier" in err
    assert any(path.endswith("/deployments/moe-runtime") for path, _, _ in fake_api.applies())
    fake_api.outcome = lambda obj: "fail" if ":v8" in json.dumps(obj["spec"]) else "ok"
    assert main([*args[:-4], "--tag", "v8", "--poll", "0", "--timeout", "1"]) == 1
    assert "previous revision restored" in capsys.readouterr().err


def test_cli_install_refuses_representative_outputs(environments, tmp_path, capsys):
    code = main(["install", "prod", "--stack-dir", str(tmp_path)])
    assert code == 2
    assert "no stack outputs for 'prod'" in capsys.readouterr().err


MODEL = 'model = { name = "deepseek-ai/DeepSeek-V2-Lite", revision = "r1" }\n'


def _environments_with_staging(tmp_path: Path, *extra: str) -> Path:
    """The shipped environments file with staging's `model` set (and `extra` lines in its table)."""
    text = DEFAULT_ENVIRONMENTS_FILE.read_text()
    header = "[environments.staging]\n"
    assert header in text
    path = tmp_path / "environments.toml"
    path.write_text(text.replace(header, header + MODEL + "".join(extra)))
    return path


def test_render_serves_the_environments_model(tmp_path: Path, capsys):
    environments = _environments_with_staging(tmp_path)
    never_applied = tmp_path / "never-applied"
    base = ["render", "staging", "--stack-dir", str(never_applied), "--environments", str(environments), "--tag", "v1"]
    assert main(base) == 0
    rendered = capsys.readouterr().out
    assert "models/deepseek-ai/DeepSeek-V2-Lite/r1/" in rendered and "models/deepseek-v2/" not in rendered
    assert main([*base, "--revision", "r2"]) == 0
    assert "models/deepseek-ai/DeepSeek-V2-Lite/r2/" in capsys.readouterr().out


def test_cli_install_refuses_a_revision_that_is_not_in_the_cold_tier(fake_api, emulator, tmp_path: Path, capsys):
    """`install staging --dry-run` against moto (S3) and the fake API: refused, with the bucket, the prefix and
    the upload command, until `moefleet weights upload` of that revision; then an incomplete revision again."""
    from infra.catalog.environments import load_environments
    from infra.ops.aws import make_client

    environments = _environments_with_staging(tmp_path, 'aws_endpoint = "http://127.0.0.1:4566"\n')
    staging = load_environments(environments)["staging"]
    s3 = make_client("s3", staging.region, emulator)
    bucket = f"install-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    outputs = tmp_path / "outputs.json"
    outputs.write_text(
        json.dumps({k: {"value": v} for k, v in (representative_outputs(staging) | {"models_bucket": bucket}).items()})
    )
    where = ["--environments", str(environments), "--emulator-endpoint", emulator]
    install = ["install", "staging", "--dry-run", "--outputs", str(outputs), "--tag", "v1", *where]
    install += ["--kubeconfig", str(fake_api.kubeconfig(tmp_path))]

    assert main(install) == 4
    err = capsys.readouterr().err
    assert "model deepseek-ai/DeepSeek-V2-Lite@r1 is not complete in the cold tier" in err
    assert f"bucket {bucket}, prefix models/deepseek-ai/DeepSeek-V2-Lite/r1/" in err
    assert "no moefleet-manifest.json: never uploaded" in err
    assert "moefleet weights upload staging DIR --model deepseek-ai/DeepSeek-V2-Lite --revision r1" in err
    assert fake_api.applies() == []

    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps({"model_type": "deepseek_v2"}))
    (checkpoint / "model.safetensors").write_bytes(b"\0" * 4096)
    assert main(["weights", "upload", "staging", str(checkpoint), "--bucket", bucket, *where]) == 0
    assert f"s3://{bucket}/models/deepseek-ai/DeepSeek-V2-Lite/r1/" in capsys.readouterr().out

    assert main(install) == 0
    err = capsys.readouterr().err
    assert f"weights s3://{bucket}/models/deepseek-ai/DeepSeek-V2-Lite/r1/ complete" in err
    assert "create    deployment/moe-runtime" in err
    assert fake_api.applies() and fake_api.applies(dry_run=False) == []

    s3.delete_object(Bucket=bucket, Key="models/deepseek-ai/DeepSeek-V2-Lite/r1/model.safetensors")
    assert main(install) == 4
    assert "model.safetensors: missing" in capsys.readouterr().err


# ---- prerequisites: each missing add-on is named with its pinned install command -------------------------

_NEEDS = {"KEDA": "staging", "LeaderWorkerSet controller": "prod"}


@pytest.mark.parametrize("prerequisite", PREREQUISITES, ids=lambda p: p.name.split()[0])
@pytest.mark.parametrize("dry_run", [False, True], ids=["install", "dry-run"])
def test_missing_prerequisite_stops_with_its_pinned_install_command(fake_api, environments, prerequisite, dry_run):
    objs = render(make_input(environments[_NEEDS.get(prerequisite.name, "dev")]))
    fake_api.crds -= set(prerequisite.crds)
    installer, _ = _installer(fake_api)
    with pytest.raises(InstallError) as info:
        installer.plan(objs) if dry_run else installer.install(objs)
    message = str(info.value)
    assert message.startswith("missing CRDs, nothing applied")
    assert all(command in message for command in prerequisite.install_commands) and prerequisite.version in message
    used = {f"{plural(o['kind'])}.{o['apiVersion'].split('/')[0]}" for o in objs}
    assert all(crd in message for crd in set(prerequisite.crds) & used)
    others = [p for p in PREREQUISITES if p is not prerequisite]
    assert not any(p.install_commands[-1] in message for p in others), "only what is missing is named"
    assert fake_api.applies() == [], "nothing applied, not even as a dry run"


@pytest.mark.parametrize("env", ["dev", "staging", "prod"])
def test_every_custom_kind_is_a_prerequisite_and_with_all_present_install_proceeds(fake_api, environments, env):
    objs = render(make_input(environments[env]))
    groups = {o["apiVersion"].rpartition("/")[0] for o in objs}
    assert groups - {"", "apps", "policy", "networking.k8s.io", "storage.k8s.io", "rbac.authorization.k8s.io"} <= set(
        BY_GROUP
    )
    custom = {f"{plural(o['kind'])}.{o['apiVersion'].rpartition('/')[0]}" for o in objs}
    assert {crd for crd in custom if crd.split(".", 1)[1] in BY_GROUP} <= {
        crd for p in PREREQUISITES for crd in p.crds
    }, "a custom kind whose CRD no prerequisite lists"
    installer, out = _installer(fake_api)
    installer.plan(objs)
    installer.install(objs)
    assert len(fake_api.applies(dry_run=False)) == len(objs) + 1  # + the API-key Secret
    assert "rolled out" in out.getvalue()


def test_install_doc_lists_each_prerequisite_with_its_pinned_command():
    doc = (Path(__file__).parents[3] / "docs" / "install.md").read_text()
    for prerequisite in PREREQUISITES:
        for command in prerequisite.install_commands:
            assert command in doc, f"docs/install.md lacks {prerequisite.name}'s pinned command {command!r}"
        assert prerequisite.docs_url in doc
