"""EKS cluster: envelope-encrypted secrets, control-plane logs, API access entries, managed add-ons."""

from __future__ import annotations

from dataclasses import dataclass, field

from cdktf_cdktf_provider_aws.cloudwatch_log_group import CloudwatchLogGroup
from cdktf_cdktf_provider_aws.eks_access_entry import EksAccessEntry
from cdktf_cdktf_provider_aws.eks_access_policy_association import (
    EksAccessPolicyAssociation,
    EksAccessPolicyAssociationAccessScope,
)
from cdktf_cdktf_provider_aws.eks_addon import EksAddon
from cdktf_cdktf_provider_aws.eks_cluster import (
    EksCluster,
    EksClusterAccessConfig,
    EksClusterEncryptionConfig,
    EksClusterEncryptionConfigProvider,
    EksClusterVpcConfig,
)
from cdktf_cdktf_provider_aws.iam_role import IamRole
from cdktf_cdktf_provider_aws.iam_role_policy_attachment import IamRolePolicyAttachment
from constructs import Construct

from infra.constructs.checks import skip_check
from infra.constructs.context import AwsContext
from infra.constructs.iam import managed_policy, service_trust
from infra.constructs.kms import EncryptionKey, EncryptionKeyProps

#: Every control-plane log type: audit and authenticator logs are what an incident review needs.
CONTROL_PLANE_LOG_TYPES = ["api", "audit", "authenticator", "controllerManager", "scheduler"]

#: Managed add-ons every environment runs. Versions float with the cluster's default for its version;
#: pin one in `addon_versions` when an upgrade must be reviewed on its own.
CORE_ADDONS = ["vpc-cni", "kube-proxy", "coredns", "eks-pod-identity-agent", "aws-ebs-csi-driver"]


@dataclass(frozen=True)
class ClusterProps:
    """What the control plane needs: where it lives, who administers it, which logs and add-ons it keeps."""

    name: str
    kubernetes_version: str
    aws: AwsContext
    subnet_ids: list[str]
    logs_key_arn: str
    public_endpoint: bool = False
    public_access_cidrs: list[str] = field(default_factory=list)
    log_retention_days: int = 365
    #: IAM principals (role ARNs) granted cluster-admin through access entries.
    admin_principal_arns: list[str] = field(default_factory=list)
    addon_versions: dict[str, str] = field(default_factory=dict)


class Cluster(Construct):
    """The EKS control plane. Add-ons are attached separately (`add_core_addons`) because some of them
    (CoreDNS, EBS CSI) only become healthy once nodes exist."""

    def __init__(self, scope: Construct, id_: str, props: ClusterProps) -> None:
        super().__init__(scope, id_)
        self.props = props
        self.secrets_key = EncryptionKey(
            self,
            "secrets-key",
            EncryptionKeyProps(
                alias=f"{props.name}-eks-secrets",
                description=f"EKS secrets envelope encryption for {props.name}",
                aws=props.aws,
            ),
        )
        # Created before the cluster so its retention and key apply from the first log line.
        self.log_group = CloudwatchLogGroup(
            self,
            "control-plane-logs",
            name=f"/aws/eks/{props.name}/cluster",
            retention_in_days=props.log_retention_days,
            kms_key_id=props.logs_key_arn,
        )
        self.role = IamRole(
            self, "role", name=f"{props.name}-cluster", assume_role_policy=service_trust("eks.amazonaws.com")
        )
        attachment = IamRolePolicyAttachment(
            self,
            "cluster-policy",
            role=self.role.name,
            policy_arn=managed_policy("AmazonEKSClusterPolicy", props.aws.partition),
        )
        self.cluster = EksCluster(
            self,
            "cluster",
            name=props.name,
            version=props.kubernetes_version,
            role_arn=self.role.arn,
            vpc_config=EksClusterVpcConfig(
                subnet_ids=props.subnet_ids,
                endpoint_private_access=True,
                endpoint_public_access=props.public_endpoint,
                public_access_cidrs=props.public_access_cidrs if props.public_endpoint else None,
            ),
            access_config=EksClusterAccessConfig(
                authentication_mode="API", bootstrap_cluster_creator_admin_permissions=True
            ),
            encryption_config=EksClusterEncryptionConfig(
                resources=["secrets"],
                provider=EksClusterEncryptionConfigProvider(key_arn=self.secrets_key.arn),
            ),
            enabled_cluster_log_types=CONTROL_PLANE_LOG_TYPES,
            depends_on=[attachment, self.log_group],
        )
        if props.public_endpoint:
            skip_check(
                self.cluster,
                "CKV_AWS_39",
                "public endpoint only where the environment enables it, restricted to its api_access_cidrs",
            )
        for i, principal in enumerate(props.admin_principal_arns):
            entry = EksAccessEntry(
                self, f"admin-{i}", cluster_name=self.cluster.name, principal_arn=principal, type="STANDARD"
            )
            EksAccessPolicyAssociation(
                self,
                f"admin-{i}-policy",
                cluster_name=self.cluster.name,
                principal_arn=entry.principal_arn,
                policy_arn=f"arn:{props.aws.partition}:eks::aws:cluster-access-policy/AmazonEKSClusterAdminPolicy",
                access_scope=EksAccessPolicyAssociationAccessScope(type="cluster"),
            )
        self.addons: dict[str, EksAddon] = {}

    def add_core_addons(self, after: list) -> dict[str, EksAddon]:
        """Install the managed add-ons once `after` (the system node group) exists."""
        for name in CORE_ADDONS:
            self.add_addon(name, after=after)
        return self.addons

    def add_addon(self, name: str, after: list | None = None, **kwargs) -> EksAddon:
        self.addons[name] = EksAddon(
            self,
            f"addon-{name}",
            cluster_name=self.cluster.name,
            addon_name=name,
            addon_version=self.props.addon_versions.get(name),
            resolve_conflicts_on_create="OVERWRITE",
            resolve_conflicts_on_update="PRESERVE",
            depends_on=after or [],
            **kwargs,
        )
        return self.addons[name]

    @property
    def name(self) -> str:
        return self.cluster.name

    @property
    def security_group_id(self) -> str:
        """The cluster security group EKS creates; managed nodes join it."""
        return self.cluster.vpc_config.cluster_security_group_id
