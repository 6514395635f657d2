"""Names that more than one part of the project must spell the same way, defined once.

The stack names the cluster and grants IAM roles to Kubernetes service accounts; the node pools set node
labels and taints; the installer selects and tolerates those labels and creates those service accounts;
the cold tier, the runtime's IAM policy and the FSx link share one key layout, whose model names and
revisions environments.toml, `moefleet weights` and the init container check alike; `stacks.app` and every
command find the environments file the same way. A name that drifts between two of them fails at deploy
time (Pending pods, AccessDenied), so each lives here and nowhere else. Standard library only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from runtime import contract

# ---- configuration ------------------------------------------------------------------------------------

#: The environments file `stacks.app` and every command read unless told otherwise.
DEFAULT_ENVIRONMENTS_FILE = Path(__file__).resolve().parents[2] / "stacks" / "environments.toml"
#: Environment variables that override, for every command and for `stacks.app`, which environments file is
#: read and where emulated environments (aws_endpoint) point (the tests and the demo pick free ports).
ENVIRONMENTS_VAR = "MOEFLEET_ENVIRONMENTS"
EMULATOR_ENDPOINT_VAR = "MOEFLEET_EMULATOR_ENDPOINT"
#: Where applied stacks live, one folder per environment (default `cdktf.out/stacks`, cdktf.json's output):
#: every command that reads stack outputs looks for `<dir>/<env>` unless given `--stack-dir`.
STACKS_DIR_VAR = "MOEFLEET_STACKS_DIR"
#: Relative `runtime.risk_task` paths in environments.toml are read from the repository root (tasks/...).
REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
#: The risk task shipped with the repository: the source document's fraud prompt, labels and threshold.
DEFAULT_RISK_TASK_FILE = REPOSITORY_ROOT / "tasks" / "fraud.toml"

# ---- resources ------------------------------------------------------------------------------------------

#: Prefix of every environment's resource names (cluster, buckets, roles, log groups).
NAME_PREFIX = "moefleet"


def cluster_name(environment: str) -> str:
    """The EKS cluster's name, which also prefixes every other resource name of the environment."""
    return f"{NAME_PREFIX}-{environment}"


def prediction_table_name(environment: str) -> str:
    """The DynamoDB table of the environment's risk prediction records (shared by every runtime replica)."""
    return f"{cluster_name(environment)}-risk-predictions"


#: Where checkpoints live in the cold tier: `models/<name>/<revision>/`. The runtime's IAM policy is scoped
#: to it and the FSx hot tier mirrors it, so the three cannot disagree.
MODELS_PREFIX = "models/"

#: Port of the local Prometheus on loopback: the demo starts it there, `moefleet review` reads an emulated
#: environment's metrics from it.
LOCAL_PROMETHEUS_PORT = 9090
LOCAL_PROMETHEUS_URL = f"http://127.0.0.1:{LOCAL_PROMETHEUS_PORT}"

# ---- node labels and taints -------------------------------------------------------------------------

LABEL_PREFIX = "moefleet.io"
NODE_POOL_LABEL = f"{LABEL_PREFIX}/node-pool"
SIZE_LABEL = f"{LABEL_PREFIX}/size"
GPU_MODEL_LABEL = f"{LABEL_PREFIX}/gpu-model"
LOCAL_NVME_LABEL = f"{LABEL_PREFIX}/local-nvme-cache"

SYSTEM_POOL = "system"
GPU_POOL = "gpu"


@dataclass(frozen=True)
class Taint:
    key: str
    value: str
    effect: str  # Kubernetes spelling: NoSchedule, PreferNoSchedule, NoExecute

    @property
    def eks_effect(self) -> str:
        """The EKS API spells effects as NO_SCHEDULE etc."""
        return {
            "NoSchedule": "NO_SCHEDULE",
            "PreferNoSchedule": "PREFER_NO_SCHEDULE",
            "NoExecute": "NO_EXECUTE",
        }[self.effect]

    def toleration(self) -> dict[str, str]:
        return {"key": self.key, "operator": "Equal", "value": self.value, "effect": self.effect}


#: Keeps everything but GPU workloads off the expensive nodes (the NVIDIA device plugin convention).
GPU_TAINT = Taint("nvidia.com/gpu", "true", "NoSchedule")

# ---- Kubernetes identities (EKS Pod Identity binds IAM roles to namespace + service account) -------------

RUNTIME_NAMESPACE = "moe-fleet"
RUNTIME_SERVICE_ACCOUNT = contract.APP_NAME
#: The Secret holding the runtime's API keys (comma-separated, as $MOE_API_KEYS reads them). `moefleet
#: install` creates it when missing; it is never rendered, so no key lands in Git, a ConfigMap or the image.
API_KEYS_SECRET = f"{contract.APP_NAME}-api-keys"
API_KEYS_SECRET_KEY = "api-keys"
EBS_CSI_SERVICE_ACCOUNT = ("kube-system", "ebs-csi-controller-sa")
FSX_CSI_SERVICE_ACCOUNT = ("kube-system", "fsx-csi-controller-sa")
#: The Kubernetes Cluster Autoscaler: its Deployment, service account and status ConfigMap share this name.
CLUSTER_AUTOSCALER_SERVICE_ACCOUNT = ("kube-system", "cluster-autoscaler")


# ---- model names -----------------------------------------------------------------------------------------

#: A model name and a revision become S3 key segments and folder names (cold tier, hot tier, init container).
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}(/[A-Za-z0-9][A-Za-z0-9._-]{0,99})?")
MODEL_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MODEL_NAME_ALLOWED = "NAME or ORG/NAME of letters, digits, '.', '_', '-' (e.g. 'deepseek-ai/DeepSeek-V2-Lite')"
MODEL_REVISION_ALLOWED = "letters, digits, '.', '_', '-' (e.g. 'main' or a sha)"
#: The revision served when an environment names none.
DEFAULT_REVISION = "main"


def model_name_problem(name: str) -> str | None:
    """Why `name` cannot be a model name (None when it can)."""
    return None if MODEL_NAME.fullmatch(name) else f"expected {MODEL_NAME_ALLOWED}"


def model_revision_problem(revision: str) -> str | None:
    """Why `revision` cannot be a model revision (None when it can)."""
    return None if MODEL_REVISION.fullmatch(revision) else f"expected {MODEL_REVISION_ALLOWED}"
