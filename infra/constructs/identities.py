"""Workload identities: IAM roles bound to Kubernetes service accounts through EKS Pod Identity.

Every policy is a document in code; wildcards appear only where the API requires them, each commented.
"""

from __future__ import annotations

from dataclasses import dataclass

from cdktf_cdktf_provider_aws.eks_pod_identity_association import EksPodIdentityAssociation
from cdktf_cdktf_provider_aws.iam_role import IamRole
from cdktf_cdktf_provider_aws.iam_role_policy import IamRolePolicy
from cdktf_cdktf_provider_aws.iam_role_policy_attachment import IamRolePolicyAttachment
from constructs import Construct

from infra.catalog.names import MODELS_PREFIX
from infra.constructs.context import AwsContext
from infra.constructs.iam import POD_IDENTITY_TRUST, managed_policy, policy_document


@dataclass(frozen=True)
class WorkloadRoleProps:
    """One Kubernetes service account (namespace + name) and what its IAM role may do."""

    cluster_name: str
    role_name: str
    namespace: str
    service_account: str
    aws: AwsContext
    policy: str | None = None  # inline policy document
    managed_policies: tuple[str, ...] = ()


class WorkloadRole(Construct):
    """One IAM role, its policies, and the Pod Identity association that hands it to one service account."""

    def __init__(self, scope: Construct, id_: str, props: WorkloadRoleProps, depends_on: list | None = None) -> None:
        super().__init__(scope, id_)
        self.role = IamRole(self, "role", name=props.role_name, assume_role_policy=POD_IDENTITY_TRUST)
        if props.policy:
            IamRolePolicy(self, "policy", role=self.role.id, policy=props.policy)
        for name in props.managed_policies:
            policy_arn = managed_policy(name, props.aws.partition)
            IamRolePolicyAttachment(self, name, role=self.role.name, policy_arn=policy_arn)
        self.association = EksPodIdentityAssociation(
            self,
            "association",
            cluster_name=props.cluster_name,
            namespace=props.namespace,
            service_account=props.service_account,
            role_arn=self.role.arn,
            depends_on=depends_on or [],
        )

    @property
    def arn(self) -> str:
        return self.role.arn


def runtime_policy(bucket_arn: str, key_arn: str, *extra: dict) -> str:
    """Read models/ and decrypt them, plus `extra` statements (the prediction records' table). No write to
    the cold tier, no listing outside models/, nothing else."""
    return policy_document(
        {
            "Sid": "ReadModels",
            "Effect": "Allow",
            "Action": "s3:GetObject",
            "Resource": f"{bucket_arn}/{MODELS_PREFIX}*",
        },
        {
            "Sid": "ListModels",
            "Effect": "Allow",
            "Action": "s3:ListBucket",
            "Resource": bucket_arn,
            "Condition": {"StringLike": {"s3:prefix": [f"{MODELS_PREFIX}*"]}},
        },
        {"Sid": "DecryptModels", "Effect": "Allow", "Action": ["kms:Decrypt", "kms:DescribeKey"], "Resource": key_arn},
        *extra,
    )


def ebs_csi_key_policy(key_arn: str) -> str:
    """The EBS CSI driver's managed policy covers EC2; volumes encrypted with our key need these too."""
    return policy_document(
        {
            "Sid": "UseVolumeKey",
            "Effect": "Allow",
            "Action": ["kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:DescribeKey"],
            "Resource": key_arn,
        },
        {
            "Sid": "GrantVolumeKeyToEbs",
            "Effect": "Allow",
            "Action": "kms:CreateGrant",
            "Resource": key_arn,
            "Condition": {"Bool": {"kms:GrantIsForAWSResource": "true"}},
        },
    )


def fsx_csi_policy(file_system_arn: str) -> str:
    """Static provisioning: the driver only describes our file system."""
    return policy_document(
        {
            "Sid": "DescribeFileSystems",
            "Effect": "Allow",
            "Action": "fsx:DescribeFileSystems",
            # DescribeFileSystems does not support resource-level permissions; "*" is required.
            "Resource": "*",
        },
        {"Sid": "OurFileSystem", "Effect": "Allow", "Action": ["fsx:ListTagsForResource"], "Resource": file_system_arn},
    )
