"""Least privilege as data: for every IAM role the stacks create, who may assume it, what it must be
allowed and what it must be denied. tests/infra/test_least_privilege.py evaluates each row with moto's
IAM policy engine over the role's policies as synthesized (inline documents and the AWS managed
policies it attaches).

To add a role: add a `Role(...)` under the suffix of its name (`moefleet-<env>-<suffix>`). Resources are
ARNs in which `{name}` placeholders stand for resources of the same stack (see `PLACEHOLDERS` in the
test: `{models_bucket}`, `{models_key}`, `{volume_key}`, ...); a row's resource may be "*".
"""

from __future__ import annotations

from dataclasses import dataclass

Row = tuple[str, str]  # (action, resource)


@dataclass(frozen=True)
class Role:
    assumed_by: frozenset[str]  # service principals of the trust policy, exactly
    allow: tuple[Row, ...]
    deny: tuple[Row, ...]


POD_IDENTITY = frozenset({"pods.eks.amazonaws.com"})
OTHER_BUCKET = "arn:aws:s3:::someone-elses-bucket"
OTHER_KEY = "arn:aws:kms:us-east-1:123456789012:key/00000000-0000-0000-0000-000000000000"

#: Writes and admin actions no workload of ours may ever have, on anything.
NEVER = (
    ("iam:CreateUser", "*"),
    ("iam:AttachRolePolicy", "*"),
    ("iam:PassRole", "*"),
    ("sts:AssumeRole", "*"),
    ("s3:DeleteBucket", "{models_bucket}"),
    ("kms:ScheduleKeyDeletion", "{models_key}"),
    ("eks:DeleteCluster", "*"),
)

ROLES: dict[str, Role] = {
    # The model server: read the models, decrypt them, nothing else.
    "runtime": Role(
        POD_IDENTITY,
        allow=(
            ("s3:GetObject", "{models_bucket}/models/deepseek/rev1/model.safetensors"),
            ("s3:ListBucket", "{models_bucket}"),
            ("kms:Decrypt", "{models_key}"),
            ("kms:DescribeKey", "{models_key}"),
            # prediction records of the risk service
            ("dynamodb:PutItem", "{prediction_table}"),
            ("dynamodb:GetItem", "{prediction_table}"),
            ("dynamodb:UpdateItem", "{prediction_table}"),
        ),
        deny=(
            *NEVER,
            ("dynamodb:DeleteItem", "{prediction_table}"),
            ("dynamodb:Scan", "{prediction_table}"),
            ("dynamodb:DeleteTable", "{prediction_table}"),
            ("dynamodb:PutItem", "arn:aws:dynamodb:us-east-1:123456789012:table/someone-elses-table"),
            ("s3:PutObject", "{models_bucket}/models/deepseek/rev1/model.safetensors"),
            ("s3:DeleteObject", "{models_bucket}/models/deepseek/rev1/model.safetensors"),
            ("s3:GetObject", "{models_bucket}/other/secret"),
            ("s3:GetObject", "{logs_bucket}/models/log"),
            ("s3:GetObject", f"{OTHER_BUCKET}/models/x"),
            ("kms:Encrypt", "{models_key}"),
            ("kms:Decrypt", "{volume_key}"),
            ("kms:Decrypt", OTHER_KEY),
            ("ec2:RunInstances", "*"),
            ("ecr:PutImage", "*"),
        ),
    ),
    # The Cluster Autoscaler: describe calls, its cluster's node groups, scaling its own groups. The tag
    # condition on scaling (groups of this cluster only) is checked with request context in
    # tests/infra/test_node_autoscaling.py; moto's engine here evaluates without one.
    "cluster-autoscaler": Role(
        POD_IDENTITY,
        allow=(
            ("autoscaling:DescribeAutoScalingGroups", "*"),
            ("ec2:DescribeInstanceTypes", "*"),
            ("ec2:DescribeLaunchTemplateVersions", "*"),
            ("eks:DescribeNodegroup", "{own_node_group}"),
            ("autoscaling:SetDesiredCapacity", "{own_auto_scaling_group}"),
            ("autoscaling:TerminateInstanceInAutoScalingGroup", "{own_auto_scaling_group}"),
        ),
        deny=(
            *NEVER,
            ("eks:DescribeNodegroup", "arn:aws:eks:us-east-1:123456789012:nodegroup/other-cluster/gpu/uuid-3"),
            ("autoscaling:UpdateAutoScalingGroup", "{own_auto_scaling_group}"),
            ("autoscaling:DeleteAutoScalingGroup", "{own_auto_scaling_group}"),
            ("ec2:TerminateInstances", "*"),
            ("ec2:RunInstances", "*"),
            ("s3:GetObject", "{models_bucket}/models/x"),
        ),
    ),
    # EBS CSI driver: EC2 volumes (AWS managed policy) and our volume key.
    "ebs-csi": Role(
        POD_IDENTITY,
        allow=(
            ("ec2:CreateVolume", "arn:aws:ec2:us-east-1:123456789012:volume/vol-0123"),
            ("ec2:AttachVolume", "arn:aws:ec2:us-east-1:123456789012:volume/vol-0123"),
            ("kms:GenerateDataKeyWithoutPlaintext", "{volume_key}"),
            ("kms:CreateGrant", "{volume_key}"),
        ),
        deny=(
            *NEVER,
            ("kms:Decrypt", "{models_key}"),
            ("kms:Decrypt", OTHER_KEY),
            ("s3:GetObject", "{models_bucket}/models/x"),
            ("ec2:RunInstances", "*"),
            ("ec2:TerminateInstances", "*"),
        ),
    ),
    # FSx CSI driver (static provisioning): describe only.
    "fsx-csi": Role(
        POD_IDENTITY,
        allow=(("fsx:DescribeFileSystems", "*"), ("fsx:ListTagsForResource", "{file_system}")),
        deny=(
            *NEVER,
            ("fsx:DeleteFileSystem", "{file_system}"),
            ("fsx:UpdateFileSystem", "{file_system}"),
            ("fsx:CreateFileSystem", "*"),
            ("s3:GetObject", "{models_bucket}/models/x"),
        ),
    ),
    # VPC flow logs delivery: write into its own log group only.
    "flow-logs": Role(
        frozenset({"vpc-flow-logs.amazonaws.com"}),
        allow=(
            ("logs:CreateLogStream", "{flow_log_group}:log-stream:eni-1"),
            ("logs:PutLogEvents", "{flow_log_group}:log-stream:eni-1"),
        ),
        deny=(
            *NEVER,
            ("logs:PutLogEvents", "{cluster_log_group}:log-stream:x"),
            ("logs:DeleteLogGroup", "{flow_log_group}"),
            ("s3:GetObject", "{models_bucket}/models/x"),
        ),
    ),
    # The EKS control plane (AmazonEKSClusterPolicy).
    "cluster": Role(
        frozenset({"eks.amazonaws.com"}),
        allow=(("ec2:DescribeInstances", "*"), ("ec2:CreateRoute", "*"), ("ec2:DescribeSubnets", "*")),
        deny=(
            *NEVER,
            ("s3:GetObject", "{models_bucket}/models/x"),
            ("kms:Decrypt", "{models_key}"),
            ("iam:CreateRole", "*"),
        ),
    ),
    # Nodes: join the cluster, pull images, the VPC CNI, SSM; no model data, no writes to the registry.
    "node": Role(
        frozenset({"ec2.amazonaws.com"}),
        allow=(
            ("ecr:BatchGetImage", "*"),
            ("ecr:GetAuthorizationToken", "*"),
            ("eks:DescribeCluster", "*"),
            ("ec2:AssignPrivateIpAddresses", "*"),
            ("ssm:UpdateInstanceInformation", "*"),
        ),
        deny=(
            *NEVER,
            ("s3:GetObject", "{models_bucket}/models/x"),
            ("kms:Decrypt", "{models_key}"),
            ("ecr:PutImage", "*"),
            ("ecr:DeleteRepository", "*"),
            ("ec2:TerminateInstances", "*"),
        ),
    ),
}
