"""Deployment sizes: the source document's hardware tiers as *requirements*, mapped to AWS instance types.

The source document recommends 1×A100 40GB, 4×A100 80GB and 16×H100. AWS sells neither a single-A100 nor
a 4×A100-80GB instance, so a size here says what a replica needs (GPUs, GPU memory, interconnect, host
CPU and memory) and names the instance type that meets it by default, with the rationale and the priced
alternatives. Overrides in environments.toml are checked against the same requirements, so nobody can
deploy a GPU that cannot hold the model.

A size also carries everything else that varies with it: its storage tiers, what one runtime pod gets
(`PodProfile`) and the model it serves by default. This module is the one source of truth for sizes:
stacks, preflight, cost, the installer and the docs read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

#: Date and source of the prices below (us-east-1 on-demand, Linux). Used by `moefleet cost`.
PRICES_AS_OF = "2025-07, us-east-1 on-demand (AWS pricing pages)"


class Interconnect(StrEnum):
    """What a replica's GPUs need between them."""

    NONE = "none"  # one GPU per replica
    NVLINK = "nvlink"  # all GPUs of a replica in one node, NVLink/NVSwitch
    NVLINK_EFA = "nvlink+efa"  # replica spans nodes: NVLink inside, EFA between


@dataclass(frozen=True)
class InstanceType:
    """What the node pool and the cost table need to know about one EC2 instance type."""

    name: str
    gpu_model: str
    gpus: int
    gpu_memory_gib: int  # per GPU
    vcpus: int
    memory_gib: int
    usd_per_hour: float
    nvlink: bool
    efa_interfaces: int = 0  # EFA-capable network cards usable for NCCL
    nvme_gib: int = 0  # local instance-store capacity (the fastest model-cache tier)


#: GPU instance types we consider. Prices: the AWS pricing pages as of PRICES_AS_OF.
INSTANCE_TYPES: dict[str, InstanceType] = {
    it.name: it
    for it in (
        InstanceType("g5.xlarge", "A10G", 1, 24, 4, 16, 1.006, nvlink=False),
        InstanceType("g6e.xlarge", "L40S", 1, 48, 4, 32, 1.861, nvlink=False),
        InstanceType("g6e.2xlarge", "L40S", 1, 48, 8, 64, 2.242, nvlink=False),
        InstanceType("g6e.4xlarge", "L40S", 1, 48, 16, 128, 3.004, nvlink=False),
        InstanceType("g6e.12xlarge", "L40S", 4, 48, 48, 384, 10.493, nvlink=False),
        InstanceType("p4d.24xlarge", "A100", 8, 40, 96, 1152, 21.96, nvlink=True, efa_interfaces=4, nvme_gib=8000),
        InstanceType("p4de.24xlarge", "A100", 8, 80, 96, 1152, 27.45, nvlink=True, efa_interfaces=4, nvme_gib=8000),
        InstanceType("p5.4xlarge", "H100", 1, 80, 16, 256, 6.88, nvlink=False, nvme_gib=3840),
        InstanceType("p5.48xlarge", "H100", 8, 80, 192, 2048, 55.04, nvlink=True, efa_interfaces=32, nvme_gib=30720),
    )
}

#: CPU instance types for the system node pool (CoreDNS, controllers, exporters).
#: Instance types AWS sells Capacity Blocks for ML for (the EC2 user guide's list, 2026). Of the catalog's
#: types, the p4d/p4de/p5.48xlarge the medium and large sizes use; the rest are listed so an
#: `overrides.instance_type` outside the catalog still gets an accurate error message.
CAPACITY_BLOCK_INSTANCE_TYPES = (
    "p4d.24xlarge",
    "p4de.24xlarge",
    "p5.48xlarge",
    "p5e.48xlarge",
    "p5en.48xlarge",
    "p6-b200.48xlarge",
    "trn1.32xlarge",
    "trn2.48xlarge",
)

SYSTEM_INSTANCE_TYPES: dict[str, float] = {"m6i.large": 0.096, "m6i.xlarge": 0.192, "m6i.2xlarge": 0.384}


class WeightFormat(StrEnum):
    """How a default model's checkpoint stores its linear layers (what its GPU memory is planned for)."""

    BF16 = "bf16"
    FP8 = "fp8"  # block-wise FP8 (e4m3, one scale per 128×128 block), DeepSeek-V3's published format


class HotTierKind(StrEnum):
    EBS_GP3 = "ebs-gp3"  # per-pod volume, devtest
    FSX_LUSTRE = "fsx-lustre"  # shared file system linked to the cold tier, medium and large


@dataclass(frozen=True)
class StorageTiers:
    """Where a size keeps its weights between S3 (cold) and GPU memory, and how fast each tier reads.

    Read bandwidths are the documented ceilings the model-load time is bounded by."""

    hot_kind: HotTierKind
    hot_capacity_gib: int
    hot_read_mb_s: int
    #: FSx for Lustre PERSISTENT_2 throughput per TiB (125, 250, 500 or 1000 MB/s/TiB).
    fsx_throughput_per_tib: int | None = None
    #: Third, fastest tier: node-local NVMe RAID0 (large only).
    nvme_read_mb_s: int | None = None
    cold_noncurrent_days: int = 30


class SizeName(StrEnum):
    DEVTEST = "devtest"
    MEDIUM = "medium"
    LARGE = "large"


@dataclass(frozen=True)
class Requirements:
    """What one serving replica of this size needs, independent of any cloud."""

    gpus_per_replica: int
    min_gpu_memory_gib: int  # per GPU
    total_gpus: int
    nodes_per_replica: int
    interconnect: Interconnect
    min_host_vcpus_per_gpu: int  # source document: 8 CPU per GPU pod
    min_host_memory_gib_per_gpu: int  # source document: 64 GiB per GPU pod

    @property
    def replicas(self) -> int:
        return self.total_gpus // self.gpus_per_replica

    @property
    def gpus_per_node(self) -> int:
        return self.gpus_per_replica // self.nodes_per_replica

    @property
    def tensor_parallel(self) -> int:
        """The runtime's ``--tp``: a node's GPUs, so the per-layer all-reduces stay on NVLink."""
        return self.gpus_per_node

    @property
    def expert_parallel(self) -> int:
        """The runtime's ``--ep``: every GPU of the replica holds a different slice of the routed experts."""
        return self.gpus_per_replica


@dataclass(frozen=True)
class PodProfile:
    """What one runtime pod of a size gets beyond its GPUs and host ratios (those come from `Requirements`).

    Written once per size with its reason, so the installer, the cost table and the probes agree."""

    shm_gib: int  # memory-backed /dev/shm; counts against the pod's memory limit
    model_gb: int  # checkpoint size on disk, bounds the load time from the hot tier
    warmup_s: int  # CUDA graphs + compiled regions after the load


@dataclass(frozen=True)
class ModelRef:
    """Which checkpoint to serve: `s3://<bucket>/<models_prefix><name>/<revision>/` in the cold tier."""

    name: str
    revision: str


@dataclass(frozen=True)
class Size:
    """A deployment size: requirements, the default instance type and why, what it replaces, and what its
    storage tiers and runtime pods look like."""

    name: SizeName
    source_hardware: str
    source_capex_cny: int
    requirements: Requirements
    default_instance_type: str
    rationale: str
    alternatives: tuple[str, ...]
    model: str  # the model this size is meant to serve
    storage: StorageTiers
    pod: PodProfile
    #: Model folder served by default: models/<default_model>/<revision>/ in the cold tier.
    default_model: str
    #: The default model's checkpoint format; the memory planner's test checks that it fits the replica.
    default_model_weights: WeightFormat = WeightFormat.BF16
    system_instance_type: str = "m6i.xlarge"
    system_nodes: tuple[int, int, int] = (2, 2, 4)  # min, desired, max
    root_volume_gib: int = 200  # CUDA images are 10-20 GB; room for two versions during rollout
    uses_efa: bool = False
    uses_placement_group: bool = False
    uses_local_nvme_cache: bool = False
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def instance(self) -> InstanceType:
        return INSTANCE_TYPES[self.default_instance_type]

    def gpu_nodes(self, instance_type: str | None = None) -> int:
        """Nodes needed to hold every replica of this size on the given instance type."""
        it = INSTANCE_TYPES[instance_type or self.default_instance_type]
        req = self.requirements
        replicas_per_node = max(1, it.gpus // req.gpus_per_replica) if req.nodes_per_replica == 1 else 0
        if replicas_per_node:
            return -(-req.replicas // replicas_per_node)
        return req.replicas * req.nodes_per_replica


SIZES: dict[SizeName, Size] = {
    SizeName.DEVTEST: Size(
        name=SizeName.DEVTEST,
        source_hardware="1×A100 40GB + Xeon 8380",
        source_capex_cny=250_000,
        requirements=Requirements(
            gpus_per_replica=1,
            min_gpu_memory_gib=40,
            total_gpus=1,
            nodes_per_replica=1,
            interconnect=Interconnect.NONE,
            min_host_vcpus_per_gpu=8,
            min_host_memory_gib_per_gpu=64,
        ),
        default_instance_type="g6e.4xlarge",
        rationale=(
            "AWS has no single-A100 instance. One L40S (48 GB) holds DeepSeek-V2-Lite in bf16 (31 GB) with "
            "room for the KV cache, like the source document's A100 40GB. Its pod asks 8 CPU / 64 GiB, which does "
            "not fit the allocatable memory of g6e.2xlarge (64 GiB total), hence g6e.4xlarge."
        ),
        alternatives=("p5.4xlarge", "g6e.12xlarge"),
        model="deepseek-ai/DeepSeek-V2-Lite (bf16, 31 GB)",
        # gp3 with 1,000 MB/s provisioned: 31 GB of weights in ~35 s; no shared file system to pay for.
        storage=StorageTiers(hot_kind=HotTierKind.EBS_GP3, hot_capacity_gib=200, hot_read_mb_s=1000),
        # V2-Lite bf16 31 GB. One process, 8 GiB shm for loader workers.
        pod=PodProfile(shm_gib=8, model_gb=31, warmup_s=300),
        default_model="deepseek-v2-lite",
        system_instance_type="m6i.large",
        system_nodes=(1, 2, 3),
    ),
    SizeName.MEDIUM: Size(
        name=SizeName.MEDIUM,
        source_hardware="4×A100 80GB + 2×Xeon Platinum 8480",
        source_capex_cny=1_200_000,
        requirements=Requirements(
            gpus_per_replica=4,
            min_gpu_memory_gib=80,
            total_gpus=4,
            nodes_per_replica=1,
            interconnect=Interconnect.NVLINK,
            min_host_vcpus_per_gpu=8,
            min_host_memory_gib_per_gpu=64,
        ),
        default_instance_type="p4de.24xlarge",
        rationale=(
            "AWS has no 4×A100-80GB instance. p4de.24xlarge carries the source document's GPU (A100 80GB) with "
            "NVSwitch; one node holds the 4-GPU replica with room for a second. p5.48xlarge is the faster fallback "
            "where p4de is not offered (few regions)."
        ),
        alternatives=("p5.48xlarge",),
        model="DeepSeek-V2 class (236B, FP8/INT8) or several V2-Lite replicas",
        # 4.8 TiB × 500 MB/s/TiB ≈ 2.3 GB/s: a 240 GB checkpoint in under 2 minutes, shared by replicas.
        storage=StorageTiers(
            hot_kind=HotTierKind.FSX_LUSTRE, hot_capacity_gib=4800, hot_read_mb_s=2400, fsx_throughput_per_tib=500
        ),
        # 4 ranks on NVLink exchange over shm: EKS Blueprints give vLLM 15Gi for 8 GPUs; 32 GiB for 4 is generous.
        pod=PodProfile(shm_gib=32, model_gb=240, warmup_s=600),
        default_model="deepseek-v2",
        default_model_weights=WeightFormat.FP8,
    ),
    SizeName.LARGE: Size(
        name=SizeName.LARGE,
        source_hardware="16×H100 SXM5 + 4×AMD EPYC 9654",
        source_capex_cny=8_000_000,
        requirements=Requirements(
            gpus_per_replica=16,
            min_gpu_memory_gib=80,
            total_gpus=16,
            nodes_per_replica=2,
            interconnect=Interconnect.NVLINK_EFA,
            min_host_vcpus_per_gpu=8,
            min_host_memory_gib_per_gpu=64,
        ),
        default_instance_type="p5.48xlarge",
        rationale=(
            "16×H100 = 2× p5.48xlarge. DeepSeek-V3/R1 in FP8 (671 GB) does not fit one 8×H100 node, so a "
            "replica spans two nodes: EFA (3,200 Gbps) in a cluster placement group between them, NVSwitch "
            "inside, and the 8×3.84 TB instance NVMe as the fastest model-cache tier."
        ),
        alternatives=(),
        model="deepseek-ai/DeepSeek-V3 / R1 (671B, FP8)",
        # 9.6 TiB × 1,000 MB/s/TiB ≈ 9.4 GB/s from FSx (671 GB in ~70 s), then node NVMe RAID0 (8 disks,
        # ~16 GB/s) for restarts on the same node.
        storage=StorageTiers(
            hot_kind=HotTierKind.FSX_LUSTRE,
            hot_capacity_gib=9600,
            hot_read_mb_s=9400,
            fsx_throughput_per_tib=1000,
            nvme_read_mb_s=16000,
        ),
        # 8 ranks per node plus EFA bounce buffers: 64 GiB of the node's 2 TiB.
        pod=PodProfile(shm_gib=64, model_gb=671, warmup_s=900),
        default_model="deepseek-v3",
        default_model_weights=WeightFormat.FP8,
        system_instance_type="m6i.2xlarge",
        uses_efa=True,
        uses_placement_group=True,
        uses_local_nvme_cache=True,
    ),
}


class SizeRequirementError(ValueError):
    """An instance type cannot satisfy a size's requirements."""


def check_instance_type(size: Size, instance_type: str) -> InstanceType:
    """Return the instance type if it meets the size's requirements, else say exactly what fails."""
    if instance_type not in INSTANCE_TYPES:
        raise SizeRequirementError(
            f"instance type {instance_type!r} is not in the GPU catalog; allowed: {sorted(INSTANCE_TYPES)}"
        )
    it = INSTANCE_TYPES[instance_type]
    req = size.requirements
    problems = []
    if it.gpu_memory_gib < req.min_gpu_memory_gib:
        problems.append(
            f"{it.gpu_model} has {it.gpu_memory_gib} GB per GPU, size {size.name} needs ≥ {req.min_gpu_memory_gib} GB"
        )
    if it.gpus < req.gpus_per_node:
        problems.append(f"{it.gpus} GPU(s) per node, size {size.name} needs {req.gpus_per_node} per node")
    if req.interconnect is not Interconnect.NONE and req.gpus_per_node > 1 and not it.nvlink:
        problems.append(f"no NVLink, size {size.name} needs {req.interconnect} between a replica's GPUs")
    if req.interconnect is Interconnect.NVLINK_EFA and it.efa_interfaces == 0:
        problems.append(f"no EFA, size {size.name} spans {req.nodes_per_replica} nodes and needs EFA")
    gpus_used = min(it.gpus, req.gpus_per_node) if req.nodes_per_replica > 1 else req.gpus_per_replica
    if it.vcpus < req.min_host_vcpus_per_gpu * gpus_used:
        problems.append(f"{it.vcpus} vCPUs, needs ≥ {req.min_host_vcpus_per_gpu * gpus_used}")
    # Allocatable memory on an EKS node is below the instance's total; require strict headroom.
    if it.memory_gib <= req.min_host_memory_gib_per_gpu * gpus_used:
        problems.append(
            f"{it.memory_gib} GiB host memory, needs > {req.min_host_memory_gib_per_gpu * gpus_used} GiB "
            "(pods cannot use all of a node's memory)"
        )
    if problems:
        raise SizeRequirementError(f"instance type {instance_type!r} fails size {size.name}: " + "; ".join(problems))
    return it


def allowed_instance_types(size: Size) -> list[str]:
    """Instance types that satisfy the size: what an error message offers instead."""
    allowed = []
    for name in INSTANCE_TYPES:
        try:
            check_instance_type(size, name)
        except SizeRequirementError:
            continue
        allowed.append(name)
    return allowed
