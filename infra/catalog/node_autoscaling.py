"""The node autoscaler's facts, defined once: image per Kubernetes minor, ASG tags, IAM actions, timings.

The Kubernetes Cluster Autoscaler scales the managed node groups (the GPU pool from zero) when pods are
Pending for lack of a node, and removes nodes that have been idle. Three parts must agree on these facts:
the stack (tags on each node group's Auto Scaling group and the autoscaler's IAM role), the rendered
Kubernetes objects (the Deployment's flags and image) and the tests that check the two. Plain data only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from infra.catalog.names import Taint

#: The autoscaler's image; its minor version must equal the cluster's Kubernetes minor (the project's
#: compatibility rule: each autoscaler minor is built and tested against the same Kubernetes minor).
IMAGE_REPOSITORY = "registry.k8s.io/autoscaling/cluster-autoscaler"
#: Kubernetes minor → the autoscaler release pinned for it (newest patch of that minor we have checked).
#: Every entry of `environments.SUPPORTED_KUBERNETES_VERSIONS` needs one (a test keeps the two in step).
VERSIONS: dict[str, str] = {
    "1.31": "1.31.0",
    "1.32": "1.32.5",
    "1.33": "1.33.5",
    "1.34": "1.34.4",
}


def image(kubernetes_version: str) -> str:
    """The autoscaler image for a cluster of this Kubernetes minor ('1.33' or '1.33.4')."""
    minor = ".".join(kubernetes_version.split(".")[:2])
    if minor not in VERSIONS:
        raise ValueError(
            f"no Cluster Autoscaler release pinned for Kubernetes {kubernetes_version!r}; "
            f"pinned for: {', '.join(VERSIONS)}"
        )
    return f"{IMAGE_REPOSITORY}:v{VERSIONS[minor]}"


# ---- Auto Scaling group tags ------------------------------------------------------------------------------

TAG_PREFIX = "k8s.io/cluster-autoscaler"
#: Auto-discovery: the autoscaler manages the groups that carry both tags (EKS puts them on every managed
#: node group's Auto Scaling group itself).
ENABLED_TAG = f"{TAG_PREFIX}/enabled"


def owner_tag(cluster_name: str) -> str:
    """The tag that says a group belongs to this cluster; the IAM policy's condition key uses it too."""
    return f"{TAG_PREFIX}/{cluster_name}"


def discovery_flag(cluster_name: str) -> str:
    return f"--node-group-auto-discovery=asg:tag={ENABLED_TAG},{owner_tag(cluster_name)}"


def node_template_tags(
    labels: Mapping[str, str], taints: Iterable[Taint], resources: Mapping[str, int]
) -> dict[str, str]:
    """What a node of the group will look like, for a group at zero nodes the autoscaler has never seen.

    Without these the autoscaler cannot know that a g6e or p5 node offers `nvidia.com/gpu` (the device
    plugin adds it only once the node runs), nor that it carries the GPU taint and labels, so a Pending GPU
    pod never triggers a scale-up from zero."""
    tags = {f"{TAG_PREFIX}/node-template/label/{k}": v for k, v in labels.items()}
    tags |= {f"{TAG_PREFIX}/node-template/taint/{t.key}": f"{t.value}:{t.effect}" for t in taints}
    tags |= {f"{TAG_PREFIX}/node-template/resources/{k}": str(v) for k, v in resources.items() if v}
    return tags


#: Extended resources of a GPU node, as the NVIDIA and EFA device plugins name them.
GPU_RESOURCE = "nvidia.com/gpu"
EFA_RESOURCE = "vpc.amazonaws.com/efa"

# ---- IAM: the least privilege the autoscaler's AWS documentation lists ------------------------------------

#: Reads; AWS supports no resource-level scoping for these Describe calls, so they need "*".
DESCRIBE_ACTIONS: tuple[str, ...] = (
    "autoscaling:DescribeAutoScalingGroups",
    "autoscaling:DescribeAutoScalingInstances",
    "autoscaling:DescribeLaunchConfigurations",
    "autoscaling:DescribeScalingActivities",
    "ec2:DescribeImages",
    "ec2:DescribeInstanceTypes",
    "ec2:DescribeLaunchTemplateVersions",
    "ec2:GetInstanceTypesFromInstanceRequirements",
)
#: Managed node groups' labels and taints for scale-from-zero; scoped to the cluster's node groups.
NODEGROUP_ACTIONS: tuple[str, ...] = ("eks:DescribeNodegroup",)
#: The only writes: change a group's size, remove one instance. Scoped by the owner tag to this cluster.
SCALING_ACTIONS: tuple[str, ...] = (
    "autoscaling:SetDesiredCapacity",
    "autoscaling:TerminateInstanceInAutoScalingGroup",
)

# ---- scale-up and scale-down behaviour (the Deployment's flags; docs/install.md explains each) ------------

#: A node below this share of requested CPU/memory/GPU is a scale-down candidate.
SCALE_DOWN_UTILIZATION_THRESHOLD = 0.5
#: How long a node must stay unneeded before it is removed (GPU nodes bill by the second).
SCALE_DOWN_UNNEEDED_TIME = "10m"
#: No scale-down this long after a scale-up (a new GPU node's pod is still loading its model).
SCALE_DOWN_DELAY_AFTER_ADD = "10m"
#: A requested node that has not joined after this long counts as failed (p5 boots and the NVIDIA driver
#: initialises slower than the 15 min default allows for on a busy Capacity Block).
MAX_NODE_PROVISION_TIME = "25m"
#: Pick the node group that wastes the least CPU/memory after placing the pending pods.
EXPANDER = "least-waste"
METRICS_PORT = 8085
