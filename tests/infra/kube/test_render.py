"""Rendered objects: schema-valid for the cluster's Kubernetes version (and the CRDs), consistent with each
other, with the runtime's contract, with the sizes catalog and with the synthesized stacks' node pools."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from infra.catalog.names import GPU_TAINT, RUNTIME_NAMESPACE
from infra.catalog.outputs import OutputsError, StackOutputs, representative_outputs
from infra.cli.main import main
from infra.kube import objects as o
from infra.kube.render import render, runtime_objects
from infra.kube.schema import DEFAULT_CRD_DIR, crd_schemas, is_core, schema_version, validate_all, validate_object
from runtime import contract as c
from tests.infra.helpers import gpu_node_group, resources
from tests.infra.kube.inputs import STANDARD_ENVIRONMENTS

KUBERNETES_VERSION = "1.33"


def _kind(objs: list[dict], kind: str) -> list[dict]:
    return [obj for obj in objs if obj["kind"] == kind]


def _workload(objs: list[dict]) -> dict:
    (w,) = [
        obj
        for obj in objs
        if obj["kind"] in ("Deployment", "LeaderWorkerSet") and obj["metadata"]["namespace"] == RUNTIME_NAMESPACE
    ]
    return w


def _templates(workload: dict) -> list[dict]:
    if workload["kind"] == "Deployment":
        return [workload["spec"]["template"]]
    lwt = workload["spec"]["leaderWorkerTemplate"]
    return [lwt["leaderTemplate"], lwt["workerTemplate"]]


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# ---- schemas -------------------------------------------------------------------------------------------


def test_schema_version_is_the_newest_bundled_not_newer_than_the_cluster(environments):
    assert {env.kubernetes_version for env in environments.values()} == {KUBERNETES_VERSION}
    assert schema_version(KUBERNETES_VERSION) == "1.33.0"
    assert schema_version("1.40") >= "1.37"  # newest bundled for a newer cluster


@pytest.mark.parametrize("env", STANDARD_ENVIRONMENTS)
def test_every_object_validates(inputs, env):
    objs = render(inputs[env])
    assert validate_all(objs, KUBERNETES_VERSION) == []
    custom = {(obj["apiVersion"], obj["kind"]) for obj in objs if "." in obj["apiVersion"].split("/")[0]}
    custom = {(api, kind) for api, kind in custom if not is_core({"apiVersion": api, "kind": kind}, KUBERNETES_VERSION)}
    assert custom <= set(crd_schemas(DEFAULT_CRD_DIR))  # every custom kind has a schema here


def test_autoscaled_large_size_validates_with_a_scaled_object_on_the_leader_worker_set(inputs):
    inp = replace(inputs["prod"], max_gpu_nodes=6)  # room for 3 groups of 2 nodes
    objs = render(inp)
    (so,) = _kind(objs, "ScaledObject")
    assert so["spec"]["scaleTargetRef"] == {"apiVersion": o.LWS_API, "kind": "LeaderWorkerSet", "name": c.APP_NAME}
    assert (so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"]) == (1, 3)
    assert "replicas" not in _workload(objs)["spec"]  # the HPA owns it
    assert validate_all(objs, KUBERNETES_VERSION) == []


def test_schema_check_catches_typos_the_api_server_would_silently_drop(inputs):
    objs = render(inputs["staging"])
    deployment = copy.deepcopy(_workload(objs))
    deployment["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    problems = validate_object(deployment, KUBERNETES_VERSION)
    assert problems and "resource" in problems[0].message

    scaled = copy.deepcopy(_kind(objs, "ScaledObject")[0])
    scaled["spec"]["minReplicas"] = 1
    assert any("minReplicas" in p.message for p in validate_object(scaled, KUBERNETES_VERSION))

    lws = copy.deepcopy(_workload(render(inputs["prod"])))
    lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]["imagePullPolicy"] = 3
    (problem,) = validate_object(lws, KUBERNETES_VERSION)
    assert problem.path.startswith("spec.leaderWorkerTemplate.workerTemplate.spec.containers.0")
    lws["spec"]["leaderWorkerTemplate"]["restartPolicy"] = "Always"
    assert any("Always" in p.message for p in validate_object(lws, KUBERNETES_VERSION))


def test_crd_schema_files_name_their_source_and_version():
    for path in sorted(DEFAULT_CRD_DIR.glob("*.schema.json")):
        meta = json.loads(path.read_text())["x-moefleet"]
        assert meta["source"].startswith("https://") and meta["crdVersion"] and "transcribed" in meta, path


def test_render_cli_writes_yaml_that_kubernetes_validate_accepts(tmp_path: Path, capsys):
    out = tmp_path / "prod"
    assert main(["render", "prod", "--out", str(out), "--tag", "v1.2.3"]) == 0
    assert "representative outputs" in capsys.readouterr().err
    files = sorted(out.glob("*.yaml"))
    docs = [yaml.safe_load(f.read_text()) for f in files]
    assert [d["kind"] for d in docs][:1] == ["Namespace"]
    assert _workload(docs)["kind"] == "LeaderWorkerSet"
    # The real kubernetes-validate command line, strict, against the cluster's version; custom kinds warn.
    proc = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", "1.33.0", *map(str, files)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("INFO") == sum(1 for d in docs if d["kind"] not in _CUSTOM_KINDS)
    assert validate_all(docs, KUBERNETES_VERSION) == []


_CUSTOM_KINDS = {
    "LeaderWorkerSet",
    "ScaledObject",
    "TriggerAuthentication",
    "ServiceMonitor",
    "PodMonitor",
    "PrometheusRule",
}


def test_render_cli_rejects_unknown_environment_and_bad_outputs(tmp_path: Path, capsys, environments):
    assert main(["render", "qa"]) == 2
    assert "unknown environment 'qa'" in capsys.readouterr().err
    bad = representative_outputs(environments["staging"]) | {"deployment_size": "huge"}
    del bad["fsx_dns_name"]
    path = tmp_path / "outputs.json"
    path.write_text(json.dumps(bad))
    assert main(["render", "staging", "--outputs", str(path)]) == 2
    err = capsys.readouterr().err
    assert "deployment_size = 'huge'" in err and "allowed: devtest, medium, large" in err
    assert "fsx_dns_name: missing" in err


def test_outputs_of_another_size_are_refused(environments):
    from infra.kube.render import render_input

    outputs = StackOutputs.from_mapping(representative_outputs(environments["dev"]))
    with pytest.raises(OutputsError, match="outputs of another environment"):
        render_input(environments["prod"], outputs, image="x/y:z", model=o.ModelRef("m", "r"))


# ---- cross-object checks -------------------------------------------------------------------------------


@pytest.mark.parametrize("env", STANDARD_ENVIRONMENTS)
def test_selectors_ports_and_probes_agree(inputs, env):
    objs = render(inputs[env])
    workload = _workload(objs)
    templates = _templates(workload)
    pod_labels = [t["metadata"]["labels"] for t in templates]
    selector = workload["spec"]["selector"]["matchLabels"] if workload["kind"] == "Deployment" else None
    if selector:
        assert all(_matches(selector, labels) for labels in pod_labels)
    service = next(s for s in _kind(objs, "Service") if s["metadata"]["namespace"] == "moe-fleet")
    serving = [t for t in templates if _matches(service["spec"]["selector"], t["metadata"]["labels"])]
    assert serving, "the Service selects no runtime pod"
    pdb = _kind(objs, "PodDisruptionBudget")[0]
    assert all(_matches(pdb["spec"]["selector"]["matchLabels"], labels) for labels in pod_labels)
    policy = _kind(objs, "NetworkPolicy")[0]
    assert all(_matches(policy["spec"]["podSelector"]["matchLabels"], labels) for labels in pod_labels)
    for template in serving:
        (container,) = template["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert service["spec"]["ports"][0]["targetPort"] in ports
        assert ports[c.PORT_NAME] == c.DEFAULT_PORT
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            get = container[probe]["httpGet"]
            assert get["path"] in c.ALL_PATHS and get["port"] in ports
        assert container["readinessProbe"]["httpGet"]["path"] == c.READY_PATH
        assert container["livenessProbe"]["httpGet"]["path"] == c.HEALTH_PATH
    assert {p["port"] for rule in policy["spec"]["ingress"] for p in rule.get("ports", [])} == {c.DEFAULT_PORT}
    monitors = [m for m in _kind(objs, "ServiceMonitor") if m["metadata"]["namespace"] == "moe-fleet"]
    for monitor in monitors:  # present once the monitoring module is in the tree
        assert _matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
        assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    config = _kind(objs, "ConfigMap")[0]
    assert all(e["configMapRef"]["name"] == config["metadata"]["name"] for e in container["envFrom"])
    assert config["data"][c.ENV_PORT] == str(c.DEFAULT_PORT)


@pytest.mark.parametrize("env", STANDARD_ENVIRONMENTS)
def test_pods_fit_their_node_and_carry_the_safeguards(inputs, env):
    inp = inputs[env]
    workload = _workload(render(inp))
    for template in _templates(workload):
        spec = template["spec"]
        (container,) = spec["containers"]
        req = container["resources"]["requests"]
        assert int(req["nvidia.com/gpu"]) * inp.size.requirements.nodes_per_replica == inp.world_size
        assert int(req["nvidia.com/gpu"]) <= inp.instance.gpus
        assert int(req["cpu"]) < inp.instance.vcpus
        memory_gib = int(req["memory"].removesuffix("Gi"))
        assert memory_gib < inp.instance.memory_gib
        assert ("vpc.amazonaws.com/efa" in req) == inp.size.uses_efa
        shm = next(v for v in spec["volumes"] if v["name"] == "shm")
        assert shm["emptyDir"]["medium"] == "Memory"
        shm_gib = int(shm["emptyDir"]["sizeLimit"].removesuffix("Gi"))
        assert shm_gib << 30 >= c.DEFAULT_SHM_MIN_BYTES and shm_gib < memory_gib  # shm counts against memory
        assert {"name": "shm", "mountPath": c.SHM_PATH} in container["volumeMounts"]
        for ctr in [*spec["initContainers"], container]:
            sc = ctr["securityContext"]
            assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
            assert sc["capabilities"] == {"drop": ["ALL"]}
        assert spec["tolerations"] == [GPU_TAINT.toleration()]


def test_startup_probe_allows_the_model_load(inputs):
    for inp in inputs.values():
        probe = o.probes(inp)["startupProbe"]
        budget = probe["periodSeconds"] * probe["failureThreshold"]
        load = inp.profile.model_gb * 1000 / inp.size.storage.hot_read_mb_s
        assert budget >= 3 * load + inp.profile.warmup_s


def test_multi_node_command_and_ports(inputs):
    inp = inputs["prod"]
    lws = _workload(render(inp))
    lwt = lws["spec"]["leaderWorkerTemplate"]
    assert lwt["size"] == 2 and lwt["restartPolicy"] == "RecreateGroupOnPodRestart"
    cmd = lwt["workerTemplate"]["spec"]["containers"][0]["command"]
    assert cmd[:6] == [
        "torchrun",
        "--nnodes=$(LWS_GROUP_SIZE)",
        "--nproc-per-node=8",
        "--node-rank=$(LWS_WORKER_INDEX)",
        "--master-addr=$(LWS_LEADER_ADDRESS)",
        f"--master-port={o.DISTRIBUTED_PORT}",
    ]
    assert cmd[cmd.index("--tp") + 1] == "8" and cmd[cmd.index("--ep") + 1] == "16"
    ports = lwt["leaderTemplate"]["spec"]["containers"][0]["ports"]
    assert {"name": o.DISTRIBUTED_PORT_NAME, "containerPort": o.DISTRIBUTED_PORT, "protocol": "TCP"} in ports
    config = next(obj for obj in render(inp) if obj["kind"] == "ConfigMap")["data"]
    assert {k: config[k] for k in o.EFA_NCCL_ENV} == o.EFA_NCCL_ENV, "NCCL must ride EFA between the nodes"
    assert config["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    staging_config = next(obj for obj in render(inputs["staging"]) if obj["kind"] == "ConfigMap")["data"]
    assert "FI_PROVIDER" not in staging_config and staging_config["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    medium = _workload(render(inputs["staging"]))["spec"]["template"]["spec"]["containers"][0]["command"]
    assert medium[:4] == ["torchrun", "--standalone", "--nnodes=1", "--nproc-per-node=4"]
    # the routed experts split over the replica's 4 GPUs: replicated (--ep 1), V2's do not fit one GPU
    assert medium[medium.index("--tp") + 1] == "4" and medium[medium.index("--ep") + 1] == "4"
    assert _workload(render(inputs["dev"]))["spec"]["template"]["spec"]["containers"][0]["command"] == [
        "moe-runtime",
        "serve",
    ]


def test_storage_per_hot_tier(inputs):
    dev = runtime_objects(inputs["dev"])
    (sc,) = _kind(dev, "StorageClass")
    assert sc["provisioner"] == "ebs.csi.aws.com"
    assert (sc["parameters"]["type"], sc["parameters"]["encrypted"]) == ("gp3", "true")
    assert sc["parameters"]["kmsKeyId"] == inputs["dev"].outputs.volume_kms_key_arn
    assert int(sc["parameters"]["iops"]) >= 4 * int(sc["parameters"]["throughput"])  # gp3's ratio
    (pvc,) = _kind(dev, "PersistentVolumeClaim")
    assert pvc["spec"]["storageClassName"] == sc["metadata"]["name"] and pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert _workload(dev)["spec"]["strategy"] == {"type": "Recreate"}  # one EBS volume, one node at a time
    for env in ("staging", "prod"):
        objs = runtime_objects(inputs[env])
        (pv,) = _kind(objs, "PersistentVolume")
        out = inputs[env].outputs
        assert pv["spec"]["csi"] == {
            "driver": "fsx.csi.aws.com",
            "volumeHandle": out.fsx_file_system_id,
            "volumeAttributes": {"dnsname": out.fsx_dns_name, "mountname": out.fsx_mount_name},
        }
        (pvc,) = _kind(objs, "PersistentVolumeClaim")
        assert pvc["spec"]["volumeName"] == pv["metadata"]["name"] and pvc["spec"]["storageClassName"] == ""
    init = _templates(_workload(dev))[0]["spec"]["initContainers"][0]
    cmd = init["command"]
    assert cmd[:4] == ["python", "-m", "infra.ops.weights", "pull"]
    assert cmd[cmd.index("--prefix") + 1] == "models/deepseek-v2-lite/main/"
    assert cmd[cmd.index("--dest") + 1] == inputs["dev"].model_path
    assert _kind(dev, "ConfigMap")[0]["data"][c.ENV_MODEL_PATH] == inputs["dev"].model_path


def test_keda_queries_the_workspace_on_the_contract_metric(inputs):
    objs = render(inputs["staging"])
    (so,) = _kind(objs, "ScaledObject")
    (trigger,) = so["spec"]["triggers"]
    assert c.REQUESTS_WAITING.name in trigger["metadata"]["query"]
    assert trigger["metadata"]["serverAddress"] + "api/v1/query" == inputs["staging"].outputs.amp_query_url
    (auth,) = _kind(objs, "TriggerAuthentication")
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    assert auth["spec"]["podIdentity"]["provider"] == "aws"
    assert (so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"]) == (1, 2)  # 1 node × 8 GPUs / 4
    assert not _kind(render(inputs["dev"]), "ScaledObject")  # one EBS volume: one replica


# ---- against the synthesized stacks ------------------------------------------------------------------


@pytest.mark.parametrize("env", STANDARD_ENVIRONMENTS)
def test_pods_tolerate_and_select_the_synthesized_gpu_pool(stacks, inputs, env):
    group = gpu_node_group(stacks[env])
    effects = {"NO_SCHEDULE": "NoSchedule", "PREFER_NO_SCHEDULE": "PreferNoSchedule", "NO_EXECUTE": "NoExecute"}
    taints = [
        {"key": t["key"], "operator": "Equal", "value": t["value"], "effect": effects[t["effect"]]}
        for t in group["taint"]
    ]
    for template in _templates(_workload(render(inputs[env]))):
        spec = template["spec"]
        assert spec["tolerations"] == taints
        assert _matches(spec["nodeSelector"], group["labels"]), (spec["nodeSelector"], group["labels"])


@pytest.mark.parametrize("env", STANDARD_ENVIRONMENTS)
def test_representative_outputs_have_the_stack_output_keys(stacks, environments, env):
    from infra.catalog.names import MODELS_PREFIX
    from infra.constructs.storage import FSX_MODELS_PATH

    synthesized = stacks[env]["output"]
    assert set(representative_outputs(environments[env])) == set(synthesized)
    # The stack emits exactly the contract's fields for its hot tier, each with its description.
    contract = StackOutputs.descriptions()
    assert set(synthesized) == set(StackOutputs.names_for(environments[env].size_spec.storage.hot_kind))
    assert {name: body.get("description") for name, body in synthesized.items()} == {
        name: contract[name] for name in synthesized
    }
    assert all(contract.values()), "every contract field has a description"
    assert representative_outputs(environments[env])["models_prefix"] == MODELS_PREFIX
    assert FSX_MODELS_PATH.strip("/") + "/" == MODELS_PREFIX  # the FSx mount mirrors the bucket layout
    clusters = resources(stacks[env], "aws_eks_cluster")
    assert [body["name"] for body in clusters.values()] == [representative_outputs(environments[env])["cluster_name"]]


def test_rendered_parallel_layouts_are_ones_the_runtime_accepts(inputs):
    from runtime.parallel.layout import ParallelLayout

    for env in ("staging", "prod"):
        inp = inputs[env]
        cmd = o.serve_command(inp)
        tp = int(cmd[cmd.index("--tp") + 1])
        ep = int(cmd[cmd.index("--ep") + 1]) if "--ep" in cmd else 1
        ParallelLayout(tp=tp, ep=ep, world_size=inp.world_size).validate()


# ---- the environment's runtime settings -----------------------------------------------------------------


def _runtime_env(objs: list[dict]) -> list[dict[str, str]]:
    """The environment each runtime container starts with: its ConfigMaps (`envFrom`), then its `env`."""
    config_maps = {obj["metadata"]["name"]: obj["data"] for obj in _kind(objs, "ConfigMap")}
    envs = []
    for template in _templates(_workload(objs)):
        (container,) = [ct for ct in template["spec"]["containers"] if ct["name"] == "runtime"]
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            env.update(config_maps[source["configMapRef"]["name"]])
        env.update({item["name"]: item["value"] for item in container.get("env", []) if "value" in item})
        envs.append(env)
    return envs


def _with_runtime(environment, **settings):
    from infra.catalog.environments import RuntimeSettings
    from tests.infra.kube.inputs import make_input

    return make_input(environment.model_copy(update={"runtime": RuntimeSettings(**settings)}))


@pytest.mark.parametrize("env", ["dev", "staging", "prod"])  # Deployment (1 and 4 GPUs), LeaderWorkerSet
def test_runtime_settings_reach_every_runtime_container(environments, inputs, env):
    objs = render(_with_runtime(environments[env], accuracy_baseline=0.85, accuracy_window=200, log_level="debug"))
    for pod_env in _runtime_env(objs):
        assert pod_env[c.ENV_ACCURACY_BASELINE] == "0.85"
        assert pod_env[c.ENV_ACCURACY_WINDOW] == "200"
        assert pod_env[c.ENV_LOG_LEVEL] == "debug"
    assert validate_all(objs, KUBERNETES_VERSION) == []
    defaults = render(inputs[env])  # the shipped staging, dev and prod set no runtime table
    for pod_env in _runtime_env(defaults):
        assert c.ENV_ACCURACY_BASELINE not in pod_env, "no baseline: the runtime publishes none"
        assert pod_env[c.ENV_ACCURACY_WINDOW] == str(c.DEFAULT_ACCURACY_WINDOW)
        assert pod_env[c.ENV_LOG_LEVEL] == c.DEFAULT_LOG_LEVEL
    hashes = {
        t["metadata"]["annotations"]["moefleet.io/config-hash"]
        for objs_ in (objs, defaults)
        for t in _templates(_workload(objs_))
    }
    assert len(hashes) == 2, "changed settings change the pod template, so the pods roll"


def test_shipped_local_environment_sets_the_demo_baseline(inputs):
    (pod_env,) = _runtime_env(render(inputs["local"]))
    assert pod_env[c.ENV_ACCURACY_BASELINE] == "0.9"
