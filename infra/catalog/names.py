"""Names that more than one part of the project must spell the same way, defined once.

The stack names the cluster and grants IAM roles to Kubernetes service accounts; the node pools set node
labels and taints; the installer selects and tolerates those labels and creates those service accounts;
the cold tier, the runtime's IAM policy and the FSx link share one key layout; `stacks.app` and every
command find the environments file the same way. A name that drifts between two of them fails at deploy
time (Pending pods, AccessDenied), so each lives here and nowhere else. Standard library only.
"""

from __future__ import annotations

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

# ---- resources ------------------------------------------------------------------------------------------

#: Prefix of every environment's resource names (cluster, buckets, roles, log groups).
NAME_PREFIX = "moefleet"


def cluster_name(environment: str) -> str:
    """The EKS cluster's name, which also prefixes every other resource name of the environment."""
    return f"{NAME_PREFIX}-{environment}"


#: Where checkpoints live in the cold tier: `models/<name>/<revision>/`. The runtime's IAM policy is scoped
#: to it and the FSx hot tier mirrors it, so the three cannot disagree.
MODELS_PREFIX = "models/"

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
EBS_CSI_SERVICE_ACCOUNT = ("kube-system", "ebs-csi-controller-sa")
FSX_CSI_SERVICE_ACCOUNT = ("kube-system", "fsx-csi-controller-sa")
