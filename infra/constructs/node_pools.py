"""Managed node groups: one CPU pool for the system, one GPU pool sized by the deployment size."""

from __future__ import annotations

import base64
import textwrap
from dataclasses import dataclass, field

from cdktf import TerraformResourceLifecycle
from cdktf_cdktf_provider_aws.eks_node_group import (
    EksNodeGroup,
    EksNodeGroupLaunchTemplate,
    EksNodeGroupScalingConfig,
    EksNodeGroupTaint,
    EksNodeGroupUpdateConfig,
)
from cdktf_cdktf_provider_aws.iam_role import IamRole
from cdktf_cdktf_provider_aws.iam_role_policy_attachment import IamRolePolicyAttachment
from cdktf_cdktf_provider_aws.launch_template import (
    LaunchTemplate,
    LaunchTemplateBlockDeviceMappings,
    LaunchTemplateBlockDeviceMappingsEbs,
    LaunchTemplateCapacityReservationSpecification,
    LaunchTemplateCapacityReservationSpecificationCapacityReservationTarget,
    LaunchTemplateInstanceMarketOptions,
    LaunchTemplateMetadataOptions,
    LaunchTemplateMonitoring,
    LaunchTemplateNetworkInterfaces,
    LaunchTemplatePlacement,
    LaunchTemplateTagSpecifications,
)
from cdktf_cdktf_provider_aws.placement_group import PlacementGroup
from cdktf_cdktf_provider_aws.security_group import SecurityGroup, SecurityGroupEgress, SecurityGroupIngress
from constructs import Construct

from infra.catalog import node_autoscaling as na
from infra.catalog.names import (
    GPU_MODEL_LABEL,
    GPU_POOL,
    GPU_TAINT,
    LOCAL_NVME_LABEL,
    NODE_POOL_LABEL,
    SIZE_LABEL,
    Taint,
)
from infra.constructs.context import AwsContext
from infra.constructs.iam import managed_policy, service_trust
from infra.constructs.node_autoscaling import AutoScalingGroupTags, AutoScalingGroupTagsProps

#: Hop limit 1: pods must not reach the node's instance credentials through IMDS. Pods get their own
#: credentials from EKS Pod Identity (a link-local agent), which does not need IMDS at all.
IMDS_HOP_LIMIT = 1
ROOT_DEVICE = "/dev/xvda"  # AL2023 EKS AMIs

# AL2023 nodeadm: assemble the instance-store NVMe disks into one RAID0 volume mounted under
# /mnt/k8s-disks, which kubelet and containerd then use; the runtime's model cache lives there.
_NVME_RAID0_NODECONFIG = textwrap.dedent(
    """\
    MIME-Version: 1.0
    Content-Type: multipart/mixed; boundary="BOUNDARY"

    --BOUNDARY
    Content-Type: application/node.eks.aws

    apiVersion: node.eks.aws/v1alpha1
    kind: NodeConfig
    spec:
      instance:
        localStorage:
          strategy: RAID0

    --BOUNDARY--
    """
)


def node_role(scope: Construct, id_: str, name: str, aws: AwsContext) -> tuple[IamRole, list[IamRolePolicyAttachment]]:
    """The role every managed node assumes: join the cluster, pull images, run the CNI, be reachable by SSM."""
    role = IamRole(scope, id_, name=name, assume_role_policy=service_trust("ec2.amazonaws.com"))
    attachments = [
        IamRolePolicyAttachment(
            scope, f"{id_}-{policy}", role=role.name, policy_arn=managed_policy(policy, aws.partition)
        )
        for policy in (
            "AmazonEKSWorkerNodePolicy",
            "AmazonEKS_CNI_Policy",
            "AmazonEC2ContainerRegistryReadOnly",
            "AmazonSSMManagedInstanceCore",  # shell access without SSH keys or open ports
        )
    ]
    return role, attachments


@dataclass(frozen=True)
class NodePoolProps:
    """One managed node group: instance type, scaling bounds, root volume, labels, taints and networking."""

    cluster_name: str
    pool: str  # value of the node-pool label
    instance_type: str
    ami_type: str
    subnet_ids: list[str]
    min_size: int
    desired_size: int
    max_size: int
    root_volume_gib: int
    volume_kms_key_arn: str
    node_role_arn: str
    security_group_ids: list[str]
    labels: dict[str, str] = field(default_factory=dict)
    taints: list[Taint] = field(default_factory=list)
    instance_tags: dict[str, str] = field(default_factory=dict)
    efa_interfaces: int = 0
    placement_group: str | None = None
    capacity_reservation_id: str | None = None
    #: The reservation is a Capacity Block for ML: capacity type CAPACITY_BLOCK, market type capacity-block.
    capacity_block: bool = False
    local_nvme_raid0: bool = False
    max_unavailable: int = 1
    #: Extended resources a node offers once running (e.g. nvidia.com/gpu), for the autoscaler's template.
    node_template_resources: dict[str, int] = field(default_factory=dict)


class NodePool(Construct):
    """A managed node group behind its own launch template (IMDSv2, encrypted gp3 root, tags on instances)."""

    def __init__(self, scope: Construct, id_: str, props: NodePoolProps, depends_on: list | None = None) -> None:
        super().__init__(scope, id_)
        self.props = props
        interfaces = None
        security_group_ids = props.security_group_ids
        if props.efa_interfaces:
            # With EFA the interfaces are declared in the template; security groups move onto them.
            interfaces = [
                LaunchTemplateNetworkInterfaces(
                    network_card_index=i,
                    device_index=0 if i == 0 else 1,
                    interface_type="efa",
                    delete_on_termination="true",
                    security_groups=props.security_group_ids,
                )
                for i in range(props.efa_interfaces)
            ]
            security_group_ids = None
        capacity = None
        if props.capacity_reservation_id:
            capacity = LaunchTemplateCapacityReservationSpecification(
                capacity_reservation_target=LaunchTemplateCapacityReservationSpecificationCapacityReservationTarget(
                    capacity_reservation_id=props.capacity_reservation_id
                )
            )
        # A capacity block is bought, not on-demand: EKS and EC2 both need to be told (CAPACITY_BLOCK below).
        market = LaunchTemplateInstanceMarketOptions(market_type="capacity-block") if props.capacity_block else None
        tags = {"Name": f"{props.cluster_name}-{props.pool}", **props.instance_tags}
        self.launch_template = LaunchTemplate(
            self,
            "lt",
            name=f"{props.cluster_name}-{props.pool}",
            update_default_version=True,
            metadata_options=LaunchTemplateMetadataOptions(
                http_endpoint="enabled", http_tokens="required", http_put_response_hop_limit=IMDS_HOP_LIMIT
            ),
            block_device_mappings=[
                LaunchTemplateBlockDeviceMappings(
                    device_name=ROOT_DEVICE,
                    ebs=LaunchTemplateBlockDeviceMappingsEbs(
                        volume_size=props.root_volume_gib,
                        volume_type="gp3",
                        encrypted="true",
                        kms_key_id=props.volume_kms_key_arn,
                        delete_on_termination="true",
                    ),
                )
            ],
            vpc_security_group_ids=security_group_ids,
            network_interfaces=interfaces,
            placement=LaunchTemplatePlacement(group_name=props.placement_group) if props.placement_group else None,
            capacity_reservation_specification=capacity,
            instance_market_options=market,
            monitoring=LaunchTemplateMonitoring(enabled=True),
            user_data=base64.b64encode(_NVME_RAID0_NODECONFIG.encode()).decode() if props.local_nvme_raid0 else None,
            # Provider default_tags do not reach instances a node group launches; these do.
            tag_specifications=[
                LaunchTemplateTagSpecifications(resource_type=kind, tags=tags)
                for kind in ("instance", "volume", "network-interface")
            ],
        )
        self.node_group = EksNodeGroup(
            self,
            "ng",
            cluster_name=props.cluster_name,
            node_group_name=f"{props.cluster_name}-{props.pool}",
            node_role_arn=props.node_role_arn,
            subnet_ids=props.subnet_ids,
            ami_type=props.ami_type,
            capacity_type="CAPACITY_BLOCK" if props.capacity_block else "ON_DEMAND",
            instance_types=[props.instance_type],
            scaling_config=EksNodeGroupScalingConfig(
                min_size=props.min_size, desired_size=props.desired_size, max_size=props.max_size
            ),
            update_config=EksNodeGroupUpdateConfig(max_unavailable=props.max_unavailable),
            launch_template=EksNodeGroupLaunchTemplate(
                id=self.launch_template.id, version=str(self.launch_template.latest_version)
            ),
            labels={NODE_POOL_LABEL: props.pool, **props.labels},
            taint=[EksNodeGroupTaint(key=t.key, value=t.value, effect=t.eks_effect) for t in props.taints],
            # The autoscaler (or an operator) owns the desired size after the first apply.
            lifecycle=TerraformResourceLifecycle(ignore_changes=["scaling_config[0].desired_size"]),
            depends_on=depends_on or [],
        )
        # Scale from zero: the autoscaler plans a node of this group from these tags before it has seen one.
        self.autoscaler_tags = AutoScalingGroupTags(
            self,
            "asg-tags",
            AutoScalingGroupTagsProps(
                group_name=self.node_group.resources.get(0).autoscaling_groups.get(0).name,
                tags=na.node_template_tags(
                    {NODE_POOL_LABEL: props.pool, **props.labels}, props.taints, props.node_template_resources
                ),
            ),
        )

    @property
    def name(self) -> str:
        return self.node_group.node_group_name


@dataclass(frozen=True)
class GpuPoolProps:
    """The GPU pool of a size: the node-group settings plus what multi-node replicas need (EFA, placement)."""

    cluster_name: str
    size: str
    gpu_model: str
    instance_type: str
    subnet_ids: list[str]
    vpc_id: str
    counts: tuple[int, int, int]
    root_volume_gib: int
    volume_kms_key_arn: str
    node_role_arn: str
    cluster_security_group_id: str
    #: GPUs per node (the autoscaler's node template advertises them before the device plugin runs).
    gpus_per_node: int = 1
    instance_tags: dict[str, str] = field(default_factory=dict)
    efa_interfaces: int = 0
    placement_group: bool = False
    capacity_reservation_id: str | None = None
    capacity_block: bool = False
    #: Only the first subnet (AZ): a placement group or a reservation lives in one AZ.
    single_az: bool = False
    local_nvme_cache: bool = False


class GpuNodePool(Construct):
    """GPU nodes: NVIDIA AL2023 AMI, tainted so only GPU workloads land there, labelled for selection.

    For multi-node replicas (large) adds EFA interfaces with the all-traffic self-referencing security group
    EFA requires and, unless reserved capacity is targeted, a cluster placement group; a single subnet when
    either a placement group or a reservation (On-Demand or a Capacity Block for ML) pins the pool to one AZ.
    """

    def __init__(self, scope: Construct, id_: str, props: GpuPoolProps, depends_on: list | None = None) -> None:
        super().__init__(scope, id_)
        security_groups = [props.cluster_security_group_id]
        subnet_ids = props.subnet_ids
        self.placement_group: PlacementGroup | None = None
        self.efa_security_group: SecurityGroup | None = None
        if props.efa_interfaces:
            self.efa_security_group = SecurityGroup(
                self,
                "efa-sg",
                name=f"{props.cluster_name}-efa",
                description="EFA: all traffic between the GPU nodes of this pool (required by EFA)",
                vpc_id=props.vpc_id,
                ingress=[
                    SecurityGroupIngress(
                        description="EFA traffic from pool members",
                        from_port=0,
                        to_port=0,
                        protocol="-1",
                        self_attribute=True,
                    )
                ],
                egress=[
                    SecurityGroupEgress(
                        description="EFA traffic to pool members",
                        from_port=0,
                        to_port=0,
                        protocol="-1",
                        self_attribute=True,
                    )
                ],
                tags={"Name": f"{props.cluster_name}-efa"},
            )
            security_groups = [*security_groups, self.efa_security_group.id]
        if props.placement_group:
            self.placement_group = PlacementGroup(self, "pg", name=f"{props.cluster_name}-gpu", strategy="cluster")
        if props.placement_group or props.single_az:
            subnet_ids = subnet_ids[:1]
        labels = {SIZE_LABEL: props.size, GPU_MODEL_LABEL: props.gpu_model}
        if props.local_nvme_cache:
            labels[LOCAL_NVME_LABEL] = "raid0"
        self.pool = NodePool(
            self,
            "pool",
            NodePoolProps(
                cluster_name=props.cluster_name,
                pool=GPU_POOL,
                instance_type=props.instance_type,
                ami_type="AL2023_x86_64_NVIDIA",
                subnet_ids=subnet_ids,
                min_size=props.counts[0],
                desired_size=props.counts[1],
                max_size=props.counts[2],
                root_volume_gib=props.root_volume_gib,
                volume_kms_key_arn=props.volume_kms_key_arn,
                node_role_arn=props.node_role_arn,
                security_group_ids=security_groups,
                labels=labels,
                taints=[GPU_TAINT],
                instance_tags=props.instance_tags,
                efa_interfaces=props.efa_interfaces,
                placement_group=self.placement_group.name if self.placement_group else None,
                capacity_reservation_id=props.capacity_reservation_id,
                capacity_block=props.capacity_block,
                local_nvme_raid0=props.local_nvme_cache,
                node_template_resources={na.GPU_RESOURCE: props.gpus_per_node, na.EFA_RESOURCE: props.efa_interfaces},
            ),
            depends_on=depends_on,
        )

    @property
    def name(self) -> str:
        return self.pool.name
