"""What the Kubernetes Cluster Autoscaler needs from AWS: tags on each node group's Auto Scaling group and
an IAM policy limited to the cluster's own groups. The autoscaler itself runs in the cluster
(`infra.kube.node_autoscaler`); the facts both sides share live in `infra.catalog.node_autoscaling`."""

from __future__ import annotations

from dataclasses import dataclass

from cdktf_cdktf_provider_aws.autoscaling_group_tag import AutoscalingGroupTagA, AutoscalingGroupTagTag
from constructs import Construct

from infra.catalog import node_autoscaling as na
from infra.constructs.context import AwsContext
from infra.constructs.iam import policy_document


@dataclass(frozen=True)
class AutoScalingGroupTagsProps:
    """The Auto Scaling group (a node group's) and the tags it must carry."""

    #: Name of the group; for a managed node group only known after apply (`resources[0].autoscaling_groups`).
    group_name: str
    tags: dict[str, str]


class AutoScalingGroupTags(Construct):
    """One `aws_autoscaling_group_tag` per tag, as the EKS Terraform module does.

    EKS managed node groups do not copy their own tags to the Auto Scaling group they create, and the
    autoscaler reads its scale-from-zero node templates from the group. The tags are not propagated to
    instances (the launch template tags those)."""

    def __init__(self, scope: Construct, id_: str, props: AutoScalingGroupTagsProps) -> None:
        super().__init__(scope, id_)
        self.tags = dict(props.tags)
        self.resources = [
            AutoscalingGroupTagA(
                self,
                f"tag-{i}",
                autoscaling_group_name=props.group_name,
                tag=AutoscalingGroupTagTag(key=key, value=value, propagate_at_launch=False),
            )
            for i, (key, value) in enumerate(sorted(props.tags.items()))
        ]


def cluster_autoscaler_policy(cluster_name: str, aws: AwsContext) -> str:
    """The autoscaler's documented minimum: describe calls on "*" (they take no resource scoping), node
    group descriptions of this cluster only, and size changes only on groups tagged as this cluster's."""
    return policy_document(
        {
            "Sid": "DescribeScalingInputs",
            "Effect": "Allow",
            "Action": list(na.DESCRIBE_ACTIONS),
            # These Describe/Get calls support no resource-level permissions; "*" is required.
            "Resource": "*",
        },
        {
            "Sid": "DescribeOwnNodeGroups",
            "Effect": "Allow",
            "Action": list(na.NODEGROUP_ACTIONS),
            "Resource": f"arn:{aws.partition}:eks:{aws.region}:{aws.account_id}:nodegroup/{cluster_name}/*",
        },
        {
            "Sid": "ScaleOwnGroups",
            "Effect": "Allow",
            "Action": list(na.SCALING_ACTIONS),
            "Resource": f"arn:{aws.partition}:autoscaling:{aws.region}:{aws.account_id}:autoScalingGroup:*",
            "Condition": {"StringEquals": {f"aws:ResourceTag/{na.owner_tag(cluster_name)}": "owned"}},
        },
    )
