"""Node labels and taints: defined once here; the node pools set them, the installer selects and tolerates them."""

from __future__ import annotations

from dataclasses import dataclass

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
