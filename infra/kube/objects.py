"""One function per Kubernetes object of the runtime, as plain dicts (what the API server takes as JSON).

Every value that another part of the project also knows is read from its one source: ports, paths,
environment variable names and metric names from `runtime.contract`; node labels, the GPU taint, the
namespace and the service account from `infra.catalog.names` (the node pools set the labels; the stack's
Pod Identity association binds the runtime's IAM role to exactly that namespace + service account, so no
annotation is needed); GPUs, CPU, memory, the pod profile and the hot tier from `infra.catalog.sizes`;
bucket, keys and endpoints from the stack outputs contract (`infra.catalog.outputs`).

The failures GPU serving deployments commonly hit are made impossible here by construction: /dev/shm is a
memory-backed volume sized per deployment size (NCCL breaks on Docker's 64 MB), GPU pods tolerate exactly
the pool's taint and select exactly its labels (no Pending pods), the startup probe allows for the model
load, and multi-node groups restart as a whole (LeaderWorkerSet `RecreateGroupOnPodRestart`) instead of
hanging.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from infra.catalog.environments import RuntimeSettings
from infra.catalog.names import (
    API_KEYS_SECRET,
    API_KEYS_SECRET_KEY,
    GPU_POOL,
    GPU_TAINT,
    NODE_POOL_LABEL,
    RUNTIME_NAMESPACE,
    RUNTIME_SERVICE_ACCOUNT,
    SIZE_LABEL,
)
from infra.catalog.outputs import StackOutputs
from infra.catalog.sizes import HotTierKind, InstanceType, ModelRef, PodProfile, Size
from runtime import contract as c

Obj = dict[str, Any]

#: The image's non-root user (images/runtime/Dockerfile creates it; a test keeps the two equal).
RUNTIME_UID = 10001
#: Where the hot tier is mounted; it mirrors the cold tier's layout (`models/<name>/<revision>/`), which is
#: also what the FSx data repository association exposes (infra.constructs.storage.FSX_MODELS_PATH).
HOT_TIER_MOUNT = "/mnt/hot"
TMP_MOUNT = "/tmp"
#: torch.distributed rendezvous port (torchrun --master-port on the group leader).
DISTRIBUTED_PORT = c.DISTRIBUTED_PORT
DISTRIBUTED_PORT_NAME = "dist"
#: Queue depth that KEDA keeps per replica (requests waiting; the runtime rejects at --max-queue).
QUEUE_TARGET_PER_REPLICA = 8
FIELD_MANAGER = "moefleet"
PART_OF = "moe-fleet"
LWS_API = "leaderworkerset.x-k8s.io/v1"
KEDA_API = "keda.sh/v1alpha1"
ROLE_LABEL = "moefleet.io/role"  # leader | worker (LeaderWorkerSet) or server


@dataclass(frozen=True)
class RenderInput:
    """Everything the objects depend on: stack outputs, size, GPU instance, image and model."""

    env: str
    outputs: StackOutputs
    size: Size
    instance: InstanceType
    image: str
    model: ModelRef
    max_gpu_nodes: int
    #: The cluster's Kubernetes minor version (the node autoscaler's image follows it).
    kubernetes_version: str
    version: str = "dev"
    #: The environment's `runtime` table (log level, accuracy baseline and window).
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)

    @property
    def gpus_per_pod(self) -> int:
        return self.size.requirements.gpus_per_node

    @property
    def world_size(self) -> int:
        return self.size.requirements.gpus_per_replica

    @property
    def multi_node(self) -> bool:
        return self.size.requirements.nodes_per_replica > 1

    @property
    def profile(self) -> PodProfile:
        return self.size.pod

    @property
    def model_prefix(self) -> str:
        return f"{self.outputs.models_prefix}{self.model.name}/{self.model.revision}/"

    @property
    def model_path(self) -> str:
        return f"{HOT_TIER_MOUNT}/{self.model_prefix}".rstrip("/")

    @property
    def replicas_bounds(self) -> tuple[int, int]:
        """(min, max) replicas: the size's replicas, up to what the GPU pool's maximum nodes can hold.

        A per-pod EBS volume (ReadWriteOnce) cannot be shared, so the EBS hot tier serves one replica."""
        req = self.size.requirements
        low = req.replicas
        if self.outputs.hot_tier is HotTierKind.EBS_GP3:
            return low, low
        if req.nodes_per_replica > 1:
            high = self.max_gpu_nodes // req.nodes_per_replica
        else:
            high = self.max_gpu_nodes * (self.instance.gpus // req.gpus_per_replica)
        return low, max(low, high)

    @property
    def autoscaled(self) -> bool:
        low, high = self.replicas_bounds
        return high > low


# ---- names and labels ------------------------------------------------------------------------------


def name(inp: RenderInput) -> str:
    return c.APP_NAME


def selector_labels(inp: RenderInput) -> dict[str, str]:
    """Stable across versions: Services, PDBs, NetworkPolicies and the workload select on these."""
    return {
        c.POD_LABEL_KEYS["name"]: c.APP_NAME,
        "app.kubernetes.io/instance": inp.env,
        c.POD_LABEL_KEYS["component"]: "server",
    }


def labels(inp: RenderInput) -> dict[str, str]:
    return {
        **selector_labels(inp),
        "app.kubernetes.io/part-of": PART_OF,
        "app.kubernetes.io/version": _label_value(inp.version),
        "app.kubernetes.io/managed-by": FIELD_MANAGER,
        SIZE_LABEL: inp.size.name.value,
    }


def _label_value(value: str) -> str:
    cleaned = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in value)[:63].strip("-_.")
    return cleaned or "unknown"


def _meta(inp: RenderInput, obj_name: str, namespaced: bool = True, **extra: Any) -> Obj:
    meta: Obj = {"name": obj_name, "labels": labels(inp)}
    if namespaced:
        meta["namespace"] = RUNTIME_NAMESPACE
    meta.update(extra)
    return meta


# ---- namespace, identity, config ---------------------------------------------------------------------


def namespace(inp: RenderInput) -> Obj:
    """Pod Security 'restricted' enforced: every pod here must be non-root, without privilege escalation."""
    pss = {f"pod-security.kubernetes.io/{mode}": "restricted" for mode in ("enforce", "audit", "warn")}
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": RUNTIME_NAMESPACE, "labels": {**labels(inp), **pss}},
    }


def service_account(inp: RenderInput) -> Obj:
    """No role annotation: EKS Pod Identity binds by namespace + name (infra.workloads, the stack's association)."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _meta(inp, RUNTIME_SERVICE_ACCOUNT),
        "automountServiceAccountToken": False,
    }


#: NCCL over EFA between the nodes of a LeaderWorkerSet group (docs/parallel.md, "NCCL on EFA").
EFA_NCCL_ENV = {
    "FI_PROVIDER": "efa",
    "FI_EFA_USE_DEVICE_RDMA": "1",  # GPUDirect RDMA (p4d/p5)
    "FI_EFA_FORK_SAFE": "1",  # the runtime forks (torchrun, compile workers)
    "NCCL_SOCKET_IFNAME": "eth0",  # bootstrap on the pod network
    "GLOO_SOCKET_IFNAME": "eth0",  # the control group too
}
#: Any multi-GPU replica: a timed-out NCCL collective raises instead of hanging the rank.
MULTI_GPU_ENV = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}


def runtime_config(inp: RenderInput) -> dict[str, str]:
    """The runtime's settings, by the environment variable names it reads (runtime.contract); the runtime
    container takes them all (`envFrom`), and their hash in the pod template rolls the pods when one changes."""
    return {
        **(MULTI_GPU_ENV if inp.world_size > 1 else {}),
        **(EFA_NCCL_ENV if inp.size.uses_efa and inp.multi_node else {}),
        c.ENV_MODEL_PATH: inp.model_path,
        c.ENV_MODEL_NAME: inp.model.name,
        c.ENV_MODEL_REVISION: inp.model.revision,
        c.ENV_RISK_STORE_TABLE: inp.outputs.prediction_table,
        c.ENV_HOST: c.DEFAULT_HOST,
        c.ENV_PORT: str(c.DEFAULT_PORT),
        c.ENV_SHM_MIN_BYTES: str(c.DEFAULT_SHM_MIN_BYTES),
        **inp.runtime.env(),
        c.ENV_AWS_REGION: inp.outputs.region,
        "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
        "HOME": TMP_MOUNT,
        "XDG_CACHE_HOME": f"{TMP_MOUNT}/.cache",
        "TORCHINDUCTOR_CACHE_DIR": f"{TMP_MOUNT}/inductor",
        "TRITON_CACHE_DIR": f"{TMP_MOUNT}/triton",
    }


def config_map(inp: RenderInput) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(inp, f"{name(inp)}-config"),
        "data": runtime_config(inp),
    }


# ---- storage ----------------------------------------------------------------------------------------


def storage_class(inp: RenderInput) -> Obj:
    """gp3 at the size's hot-tier read rate (gp3 needs ≥ 4 IOPS per MiB/s), encrypted with the volume key."""
    throughput = inp.size.storage.hot_read_mb_s
    return {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": _meta(inp, f"{inp.outputs.cluster_name}-models-gp3", namespaced=False),
        "provisioner": "ebs.csi.aws.com",
        "parameters": {
            "type": "gp3",
            "encrypted": "true",
            "kmsKeyId": inp.outputs.volume_kms_key_arn,
            "throughput": str(throughput),
            "iops": str(max(3000, throughput * 4)),
        },
        "reclaimPolicy": "Delete",
        "volumeBindingMode": "WaitForFirstConsumer",  # created in the zone where the GPU pod lands
        "allowVolumeExpansion": True,
    }


def persistent_volume(inp: RenderInput) -> Obj:
    """Static FSx for Lustre volume: the file system exists already (the stack made it)."""
    out = inp.outputs
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": _meta(inp, f"{out.cluster_name}-models-fsx", namespaced=False),
        "spec": {
            "capacity": {"storage": f"{inp.size.storage.hot_capacity_gib}Gi"},
            "volumeMode": "Filesystem",
            "accessModes": ["ReadWriteMany"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": "",
            "mountOptions": ["flock"],
            "csi": {
                "driver": "fsx.csi.aws.com",
                "volumeHandle": out.fsx_file_system_id,
                "volumeAttributes": {"dnsname": out.fsx_dns_name, "mountname": out.fsx_mount_name},
            },
        },
    }


def persistent_volume_claim(inp: RenderInput) -> Obj:
    size = inp.size.storage.hot_capacity_gib
    if inp.outputs.hot_tier is HotTierKind.EBS_GP3:
        spec: Obj = {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": storage_class(inp)["metadata"]["name"],
            "resources": {"requests": {"storage": f"{size}Gi"}},
        }
    else:
        spec = {
            "accessModes": ["ReadWriteMany"],
            "storageClassName": "",
            "volumeName": persistent_volume(inp)["metadata"]["name"],
            "resources": {"requests": {"storage": f"{size}Gi"}},
        }
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _meta(inp, f"{name(inp)}-models"),
        "spec": spec,
    }


# ---- the pod ----------------------------------------------------------------------------------------


def resources(inp: RenderInput) -> Obj:
    """Requests = limits for memory and devices (Guaranteed-like for what matters); CPU is not limited
    (CFS throttling of the scheduler thread costs latency). The source document's 8 CPU / 64 GiB per GPU."""
    req = inp.size.requirements
    gpus = inp.gpus_per_pod
    memory = f"{req.min_host_memory_gib_per_gpu * gpus}Gi"
    devices = {"nvidia.com/gpu": str(gpus)}
    if inp.size.uses_efa and inp.instance.efa_interfaces:
        devices["vpc.amazonaws.com/efa"] = str(inp.instance.efa_interfaces)
    return {
        "requests": {"cpu": str(req.min_host_vcpus_per_gpu * gpus), "memory": memory, **devices},
        "limits": {"memory": memory, **devices},
    }


def container_security_context() -> Obj:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUNTIME_UID,
        "runAsGroup": RUNTIME_UID,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def probes(inp: RenderInput) -> Obj:
    """Startup allows the load from the hot tier at its documented rate, 3× over, plus warm-up; only then do
    liveness (process answers) and readiness (loaded, not draining) take over."""
    period = 10
    load_s = inp.profile.model_gb * 1000 // inp.size.storage.hot_read_mb_s
    budget = 3 * load_s + inp.profile.warmup_s
    http = {"port": c.PORT_NAME, "scheme": "HTTP"}
    return {
        "startupProbe": {
            "httpGet": {"path": c.HEALTH_PATH, **http},
            "periodSeconds": period,
            "failureThreshold": -(-budget // period),
            "timeoutSeconds": 5,
        },
        "livenessProbe": {
            "httpGet": {"path": c.LIVENESS_PROBE_PATH, **http},
            "periodSeconds": 15,
            "failureThreshold": 4,
            "timeoutSeconds": 5,
        },
        "readinessProbe": {
            "httpGet": {"path": c.READINESS_PROBE_PATH, **http},
            "periodSeconds": 5,
            "failureThreshold": 3,
            "timeoutSeconds": 3,
        },
    }


def serve_command(inp: RenderInput) -> list[str]:
    """devtest: one process; medium: torchrun on one node; large: torchrun across the LeaderWorkerSet group
    (LWS injects LWS_GROUP_SIZE, LWS_WORKER_INDEX, LWS_LEADER_ADDRESS; Kubernetes expands $(VAR))."""
    gpus, req = inp.gpus_per_pod, inp.size.requirements
    if inp.world_size == 1:
        return ["moe-runtime", "serve"]
    serve = ["-m", "runtime.cli", "serve", "--tp", str(req.tensor_parallel), "--ep", str(req.expert_parallel)]
    if inp.multi_node:
        return [
            "torchrun",
            "--nnodes=$(LWS_GROUP_SIZE)",
            f"--nproc-per-node={gpus}",
            "--node-rank=$(LWS_WORKER_INDEX)",
            "--master-addr=$(LWS_LEADER_ADDRESS)",
            f"--master-port={DISTRIBUTED_PORT}",
            *serve,
        ]
    return ["torchrun", "--standalone", "--nnodes=1", f"--nproc-per-node={gpus}", *serve]


def _volumes(inp: RenderInput) -> list[Obj]:
    return [
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{inp.profile.shm_gib}Gi"}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "20Gi"}},
        {"name": "models", "persistentVolumeClaim": {"claimName": persistent_volume_claim(inp)["metadata"]["name"]}},
    ]


def model_sync_container(inp: RenderInput) -> Obj:
    """Fills the hot tier from the cold tier when the manifest differs (infra.ops.weights); a no-op otherwise."""
    return {
        "name": "model-sync",
        "image": inp.image,
        "imagePullPolicy": "IfNotPresent",
        "command": [
            "python",
            "-m",
            "infra.ops.weights",
            "pull",
            "--bucket",
            inp.outputs.models_bucket,
            "--prefix",
            inp.model_prefix,
            "--dest",
            inp.model_path,
            "--region",
            inp.outputs.region,
        ],
        "env": [{"name": "AWS_REGION", "value": inp.outputs.region}, {"name": "HOME", "value": TMP_MOUNT}],
        "resources": {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"memory": "4Gi"}},
        "securityContext": container_security_context(),
        "volumeMounts": [
            {"name": "models", "mountPath": HOT_TIER_MOUNT},
            {"name": "tmp", "mountPath": TMP_MOUNT},
        ],
    }


def api_keys_env() -> Obj:
    """$MOE_API_KEYS from the Secret `moefleet install` creates; `optional: false`, so a pod never starts
    without it (an open API is never the silent fallback). Only the HTTP-serving container gets it."""
    ref = {"name": API_KEYS_SECRET, "key": API_KEYS_SECRET_KEY, "optional": False}
    return {"name": c.ENV_API_KEYS, "valueFrom": {"secretKeyRef": ref}}


def runtime_container(inp: RenderInput, *, serves_http: bool = True) -> Obj:
    ports = [{"name": c.PORT_NAME, "containerPort": c.DEFAULT_PORT, "protocol": "TCP"}]
    if inp.world_size > 1:
        ports.append({"name": DISTRIBUTED_PORT_NAME, "containerPort": DISTRIBUTED_PORT, "protocol": "TCP"})
    container: Obj = {
        "name": "runtime",
        "image": inp.image,
        "imagePullPolicy": "IfNotPresent",
        "command": serve_command(inp),
        "envFrom": [{"configMapRef": {"name": config_map(inp)["metadata"]["name"]}}],
        "ports": ports,
        "resources": resources(inp),
        "securityContext": container_security_context(),
        "volumeMounts": [
            {"name": "shm", "mountPath": c.SHM_PATH},
            {"name": "tmp", "mountPath": TMP_MOUNT},
            {"name": "models", "mountPath": HOT_TIER_MOUNT, "readOnly": True},
        ],
    }
    if serves_http:
        container.update(probes(inp))
        container["env"] = [api_keys_env()]
    return container


def pod_spec(inp: RenderInput, *, serves_http: bool = True) -> Obj:
    return {
        "serviceAccountName": RUNTIME_SERVICE_ACCOUNT,
        "automountServiceAccountToken": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUNTIME_UID,
            "runAsGroup": RUNTIME_UID,
            "fsGroup": RUNTIME_UID,
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "nodeSelector": {NODE_POOL_LABEL: GPU_POOL, SIZE_LABEL: inp.size.name.value},
        "tolerations": [GPU_TAINT.toleration()],
        "topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": key,
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": selector_labels(inp)},
            }
            # Multi-node groups share a placement group (one subnet, one zone): spread over hosts only.
            for key in (("kubernetes.io/hostname",) if inp.multi_node else ("topology.kubernetes.io/zone",))
        ],
        "terminationGracePeriodSeconds": 60,  # the runtime drains for 30 s on SIGTERM (--grace-period)
        "initContainers": [model_sync_container(inp)],
        "containers": [runtime_container(inp, serves_http=serves_http)],
        "volumes": _volumes(inp),
    }


def _template(inp: RenderInput, role: str, *, serves_http: bool = True) -> Obj:
    config_hash = hashlib.sha256(json.dumps(runtime_config(inp), sort_keys=True).encode()).hexdigest()[:16]
    return {
        "metadata": {
            "labels": {**labels(inp), ROLE_LABEL: role},
            # A changed ConfigMap changes the template, so pods roll (and can be rolled back) with it.
            "annotations": {"moefleet.io/config-hash": config_hash},
        },
        "spec": pod_spec(inp, serves_http=serves_http),
    }


def deployment(inp: RenderInput) -> Obj:
    """devtest and medium. An EBS volume attaches to one node, so the EBS hot tier uses Recreate."""
    rwo = inp.outputs.hot_tier is HotTierKind.EBS_GP3
    # No surge: a surge pod needs GPUs the pool rarely has spare, and would stall the rollout until the deadline.
    rolling = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    strategy: Obj = {"type": "Recreate"} if rwo else rolling
    spec: Obj = {
        "selector": {"matchLabels": selector_labels(inp)},
        "strategy": strategy,
        "revisionHistoryLimit": 5,
        "progressDeadlineSeconds": probes(inp)["startupProbe"]["failureThreshold"] * 10 + 600,
        "template": _template(inp, "server"),
    }
    if not inp.autoscaled:  # with KEDA, the HPA owns replicas: leave the field out of the applied config
        spec = {"replicas": inp.replicas_bounds[0], **spec}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(inp, name(inp)), "spec": spec}


def leader_worker_set(inp: RenderInput) -> Obj:
    """large: one group = nodes_per_replica pods × gpus_per_node GPUs; a failed pod recreates the group."""
    req = inp.size.requirements
    spec: Obj = {
        "leaderWorkerTemplate": {
            "size": req.nodes_per_replica,
            "restartPolicy": "RecreateGroupOnPodRestart",
            "leaderTemplate": _template(inp, "leader"),
            "workerTemplate": _template(inp, "worker", serves_http=False),
        },
        "startupPolicy": "LeaderCreated",
        "rolloutStrategy": {
            "type": "RollingUpdate",
            "rollingUpdateConfiguration": {"maxUnavailable": 1, "maxSurge": 0},
        },
    }
    if not inp.autoscaled:
        spec = {"replicas": inp.replicas_bounds[0], **spec}
    return {"apiVersion": LWS_API, "kind": "LeaderWorkerSet", "metadata": _meta(inp, name(inp)), "spec": spec}


def workload(inp: RenderInput) -> Obj:
    return leader_worker_set(inp) if inp.multi_node else deployment(inp)


def serving_selector(inp: RenderInput) -> dict[str, str]:
    """Pods that answer HTTP: every server pod, or only the group leaders of a LeaderWorkerSet."""
    return {**selector_labels(inp), ROLE_LABEL: "leader" if inp.multi_node else "server"}


# ---- traffic and disruption --------------------------------------------------------------------------


def service(inp: RenderInput) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(inp, name(inp)),
        "spec": {
            "type": "ClusterIP",
            "selector": serving_selector(inp),
            "ports": [{"name": c.PORT_NAME, "port": c.DEFAULT_PORT, "targetPort": c.PORT_NAME, "protocol": "TCP"}],
        },
    }


def pod_disruption_budget(inp: RenderInput) -> Obj:
    """One pod at a time may be evicted voluntarily (a drain never takes two replicas, or a whole group)."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(inp, name(inp)),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(inp)}},
    }


def network_policy(inp: RenderInput) -> Obj:
    """Ingress: the API port from anywhere in the cluster (clients, Prometheus); any port between the
    runtime's own pods (torch.distributed rendezvous and NCCL sockets). Egress stays open (S3, ECR, AMP)."""
    own = {"podSelector": {"matchLabels": selector_labels(inp)}}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(inp, name(inp)),
        "spec": {
            "podSelector": {"matchLabels": selector_labels(inp)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [{"namespaceSelector": {}}],
                    "ports": [{"protocol": "TCP", "port": c.DEFAULT_PORT}],
                },
                {"from": [own]},
            ],
        },
    }


# ---- autoscaling --------------------------------------------------------------------------------------


def trigger_authentication(inp: RenderInput) -> Obj:
    """KEDA signs AMP queries (SigV4) with its operator's own Pod Identity (provider aws)."""
    return {
        "apiVersion": KEDA_API,
        "kind": "TriggerAuthentication",
        "metadata": _meta(inp, f"{name(inp)}-amp"),
        "spec": {"podIdentity": {"provider": "aws"}},
    }


def queue_depth_query(inp: RenderInput) -> str:
    return f'sum({c.REQUESTS_WAITING.name}{{namespace="{RUNTIME_NAMESPACE}"}})'


def scaled_object(inp: RenderInput) -> Obj:
    low, high = inp.replicas_bounds
    target = workload(inp)
    return {
        "apiVersion": KEDA_API,
        "kind": "ScaledObject",
        "metadata": _meta(inp, name(inp)),
        "spec": {
            "scaleTargetRef": {"apiVersion": target["apiVersion"], "kind": target["kind"], "name": name(inp)},
            "minReplicaCount": low,
            "maxReplicaCount": high,
            "pollingInterval": 15,
            "cooldownPeriod": 600,  # GPU replicas are slow to start: do not flap
            "triggers": [
                {
                    "type": "prometheus",
                    "name": "queue-depth",
                    "metricType": "AverageValue",
                    "metadata": {
                        "serverAddress": inp.outputs.amp_server_address,
                        "query": queue_depth_query(inp),
                        "threshold": str(QUEUE_TARGET_PER_REPLICA),
                        "activationThreshold": "1",
                        "awsRegion": inp.outputs.region,
                        "ignoreNullValues": "false",
                    },
                    "authenticationRef": {"name": trigger_authentication(inp)["metadata"]["name"]},
                }
            ],
        },
    }
