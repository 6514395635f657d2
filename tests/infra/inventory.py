"""What one environment has in (emulated) AWS, by Terraform resource type, read back through boto3.

`inventory(emulator, cluster)` lists, for every resource type a stack creates, the live objects that
belong to the environment whose resources are named `moefleet-<env>` (= the cluster name) and tagged
`environment = <env>`. Sub-resources (routes, bucket settings, role policies, add-ons) are found through
their parent. `LISTERS` must cover every type a stack emits (a test checks), so a new resource type needs
a row here before the fault tests can vouch that destroy removes it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from botocore.exceptions import ClientError

from tests.infra.lifecycle import aws


class Inventory:
    def __init__(self, emulator: str, cluster: str) -> None:
        self.emulator, self.cluster = emulator, cluster
        self.env = cluster.removeprefix("moefleet-")
        self._clients: dict[str, Any] = {}

    def c(self, service: str):  # type: ignore[no-untyped-def]
        if service not in self._clients:
            self._clients[service] = aws(service, self.emulator)
        return self._clients[service]

    # ---- EC2, by the environment tag ---------------------------------------------------------------
    @property
    def tag(self) -> list[dict]:
        return [{"Name": "tag:environment", "Values": [self.env]}]

    def vpcs(self) -> list[str]:
        return [v["VpcId"] for v in self.c("ec2").describe_vpcs(Filters=self.tag)["Vpcs"]]

    def route_tables(self) -> list[dict]:
        return self.c("ec2").describe_route_tables(Filters=self.tag)["RouteTables"]

    def buckets(self) -> list[str]:
        return [b["Name"] for b in self.c("s3").list_buckets()["Buckets"] if b["Name"].startswith(self.cluster + "-")]

    def roles(self) -> list[str]:
        roles = self.c("iam").get_paginator("list_roles").paginate()
        return [r["RoleName"] for page in roles for r in page["Roles"] if r["RoleName"].startswith(self.cluster + "-")]

    def clusters(self) -> list[str]:
        return [n for n in self.c("eks").list_clusters()["clusters"] if n == self.cluster]

    def workspaces(self) -> list[str]:
        spaces = self.c("amp").list_workspaces(alias=self.cluster)["workspaces"]
        return [w["workspaceId"] for w in spaces if w.get("alias") == self.cluster]

    def topics(self) -> list[str]:
        arns = [t["TopicArn"] for t in self.c("sns").list_topics()["Topics"]]
        return [a for a in arns if a.rsplit(":", 1)[-1].startswith(self.cluster + "-")]

    def repositories(self) -> list[str]:
        repos = self.c("ecr").describe_repositories()["repositories"]
        return [r["repositoryName"] for r in repos if r["repositoryName"].startswith(self.cluster + "/")]

    def _bucket_has(self, call: str, missing: tuple[str, ...]) -> list[str]:
        out = []
        for b in self.buckets():
            try:
                got = getattr(self.c("s3"), call)(Bucket=b)
            except ClientError as err:
                if err.response["Error"]["Code"] in missing:
                    continue
                raise
            empty = (call == "get_bucket_versioning" and not got.get("Status")) or (
                call == "get_bucket_logging" and not got.get("LoggingEnabled")
            )
            if not empty:
                out.append(b)
        return out

    def kms_keys(self) -> list[str]:
        """By the environment tag: a description need not name the cluster as a word (the prediction store's
        key names its table, `moefleet-<env>-risk-predictions`)."""
        kms, out = self.c("kms"), []
        for page in kms.get_paginator("list_keys").paginate():
            for k in page["Keys"]:
                if kms.describe_key(KeyId=k["KeyId"])["KeyMetadata"]["KeyState"] == "PendingDeletion":
                    continue
                tags = kms.list_resource_tags(KeyId=k["KeyId"])["Tags"]
                if {"TagKey": "environment", "TagValue": self.env} in tags:
                    out.append(k["KeyId"])
        return out


def _ec2(call: str, key: str, alive: Callable[[dict], bool] = lambda _: True):
    def lister(inv: Inventory) -> list[str]:
        items = getattr(inv.c("ec2"), call)(Filters=inv.tag)[key]
        return [str(i) for i in items if alive(i)]

    return lister


def _routes(inv: Inventory) -> list[str]:
    return [
        f"{t['RouteTableId']}:{r.get('DestinationCidrBlock')}"
        for t in inv.route_tables()
        for r in t["Routes"]
        # the VPC's own route, and the S3 gateway endpoint's routes (they belong to aws_vpc_endpoint)
        if r.get("GatewayId") != "local" and not str(r.get("GatewayId", "")).startswith("vpce-")
    ]


def _associations(inv: Inventory) -> list[str]:
    return [
        a["RouteTableAssociationId"] for t in inv.route_tables() for a in t.get("Associations", []) if not a.get("Main")
    ]


def _default_sgs(inv: Inventory) -> list[str]:
    vpcs = inv.vpcs()
    if not vpcs:
        return []
    groups = inv.c("ec2").describe_security_groups(
        Filters=[{"Name": "vpc-id", "Values": vpcs}, {"Name": "group-name", "Values": ["default"]}]
    )["SecurityGroups"]
    return [g["GroupId"] for g in groups]


def _flow_logs(inv: Inventory) -> list[str]:
    vpcs = inv.vpcs()
    if not vpcs:
        return []
    logs = inv.c("ec2").describe_flow_logs(Filters=[{"Name": "resource-id", "Values": vpcs}])["FlowLogs"]
    return [f["FlowLogId"] for f in logs]


def _role_policies(inv: Inventory) -> list[str]:
    return [f"{r}/{p}" for r in inv.roles() for p in inv.c("iam").list_role_policies(RoleName=r)["PolicyNames"]]


def _attachments(inv: Inventory) -> list[str]:
    iam = inv.c("iam")
    return [
        f"{r}/{p['PolicyArn']}"
        for r in inv.roles()
        for p in iam.list_attached_role_policies(RoleName=r)["AttachedPolicies"]
    ]


def _eks(call: str, key: str):
    def lister(inv: Inventory) -> list[str]:
        return [str(x) for c in inv.clusters() for x in getattr(inv.c("eks"), call)(clusterName=c)[key]]

    return lister


def _node_template_tags(inv: Inventory) -> list[str]:
    """The autoscaler's node-template tags on the Auto Scaling groups of the cluster's node groups (the
    tags EKS itself puts there are not the stack's)."""
    eks = inv.c("eks")
    groups = [
        g["name"]
        for c in inv.clusters()
        for ng in eks.list_nodegroups(clusterName=c)["nodegroups"]
        for g in eks.describe_nodegroup(clusterName=c, nodegroupName=ng)["nodegroup"]["resources"]["autoScalingGroups"]
    ]
    if not groups:
        return []
    tags = inv.c("autoscaling").describe_tags(Filters=[{"Name": "auto-scaling-group", "Values": groups}])["Tags"]
    return [f"{t['ResourceId']}/{t['Key']}" for t in tags if "/node-template/" in t["Key"]]


def _log_groups(inv: Inventory) -> list[str]:
    logs = inv.c("logs")
    names = []
    for prefix in (f"/aws/eks/{inv.cluster}/", f"/moefleet/{inv.cluster}/"):
        names += [g["logGroupName"] for g in logs.describe_log_groups(logGroupNamePrefix=prefix)["logGroups"]]
    return names


def _aliases(inv: Inventory) -> list[str]:
    aliases = inv.c("kms").list_aliases()["Aliases"]
    return [a["AliasName"] for a in aliases if a["AliasName"].startswith(f"alias/{inv.cluster}-")]


def _launch_templates(inv: Inventory) -> list[str]:
    templates = inv.c("ec2").describe_launch_templates()["LaunchTemplates"]
    return [t["LaunchTemplateName"] for t in templates if t["LaunchTemplateName"].startswith(inv.cluster + "-")]


def _lifecycle_policies(inv: Inventory) -> list[str]:
    out = []
    for repo in inv.repositories():
        try:
            inv.c("ecr").get_lifecycle_policy(repositoryName=repo)
            out.append(repo)
        except ClientError as err:
            if err.response["Error"]["Code"] != "LifecyclePolicyNotFoundException":
                raise
    return out


def _amp(call: str, key: str):
    def lister(inv: Inventory) -> list[str]:
        out = []
        for w in inv.workspaces():
            try:
                got = getattr(inv.c("amp"), call)(workspaceId=w)
            except ClientError as err:
                if err.response["Error"]["Code"] == "ResourceNotFoundException":
                    continue
                raise
            out += [str(x) for x in got.get(key, [])] if isinstance(got.get(key), list) else [w]
        return out

    return lister


def _topic_policies(inv: Inventory) -> list[str]:
    sns = inv.c("sns")
    return [t for t in inv.topics() if sns.get_topic_attributes(TopicArn=t)["Attributes"].get("Policy")]


def _bucket_policies(inv: Inventory) -> list[str]:
    return inv._bucket_has("get_bucket_policy", ("NoSuchBucketPolicy",))


def _file_systems(inv: Inventory) -> list[str]:
    systems = inv.c("fsx").describe_file_systems()["FileSystems"]
    tagged = [f for f in systems if {"Key": "environment", "Value": inv.env} in f.get("Tags", [])]
    return [f["FileSystemId"] for f in tagged if f["Lifecycle"] != "DELETING"]


def _associations_fsx(inv: Inventory) -> list[str]:
    ours = set(_file_systems(inv))
    found = inv.c("fsx").describe_data_repository_associations()["Associations"]
    return [a["AssociationId"] for a in found if a["FileSystemId"] in ours]


def _placement_groups(inv: Inventory) -> list[str]:
    groups = inv.c("ec2").describe_placement_groups()["PlacementGroups"]
    return [g["GroupName"] for g in groups if g["GroupName"].startswith(inv.cluster + "-")]


def _subscriptions(inv: Inventory) -> list[str]:
    sns = inv.c("sns")
    return [
        s["SubscriptionArn"] for t in inv.topics() for s in sns.list_subscriptions_by_topic(TopicArn=t)["Subscriptions"]
    ]


def _nat_gateways(inv: Inventory) -> list[str]:
    """Live, and this environment's: the emulator's DescribeNatGateways ignores tag filters (every stack's
    gateways come back), so the environment tag is checked here too."""
    out = []
    for n in inv.c("ec2").describe_nat_gateways(Filters=inv.tag)["NatGateways"]:
        tags = {t["Key"]: t["Value"] for t in n.get("Tags", [])}
        if n["State"] not in ("deleted", "deleting") and tags.get("environment") == inv.env:
            out.append(str(n))
    return out


#: Terraform resource type → lister of the live objects of one environment.
LISTERS: dict[str, Callable[[Inventory], list[str]]] = {
    "aws_vpc": lambda inv: inv.vpcs(),
    "aws_subnet": _ec2("describe_subnets", "Subnets"),
    "aws_internet_gateway": _ec2("describe_internet_gateways", "InternetGateways"),
    "aws_nat_gateway": _nat_gateways,
    "aws_eip": _ec2("describe_addresses", "Addresses"),
    "aws_route_table": lambda inv: [t["RouteTableId"] for t in inv.route_tables()],
    "aws_route": _routes,
    "aws_route_table_association": _associations,
    "aws_default_security_group": _default_sgs,
    "aws_security_group": _ec2("describe_security_groups", "SecurityGroups", lambda g: g["GroupName"] != "default"),
    "aws_placement_group": _placement_groups,
    "aws_fsx_lustre_file_system": _file_systems,
    "aws_fsx_data_repository_association": _associations_fsx,
    "aws_sns_topic_subscription": _subscriptions,
    "aws_vpc_endpoint": _ec2("describe_vpc_endpoints", "VpcEndpoints", lambda e: e["State"] != "deleted"),
    "aws_flow_log": _flow_logs,
    "aws_launch_template": _launch_templates,
    "aws_iam_role": lambda inv: inv.roles(),
    "aws_iam_role_policy": _role_policies,
    "aws_iam_role_policy_attachment": _attachments,
    "aws_kms_key": lambda inv: inv.kms_keys(),
    "aws_kms_alias": _aliases,
    "aws_cloudwatch_log_group": _log_groups,
    "aws_s3_bucket": lambda inv: inv.buckets(),
    "aws_s3_bucket_versioning": lambda inv: inv._bucket_has("get_bucket_versioning", ()),
    "aws_s3_bucket_server_side_encryption_configuration": lambda inv: inv._bucket_has(
        "get_bucket_encryption", ("ServerSideEncryptionConfigurationNotFoundError",)
    ),
    "aws_s3_bucket_public_access_block": lambda inv: inv._bucket_has(
        "get_public_access_block", ("NoSuchPublicAccessBlockConfiguration",)
    ),
    "aws_s3_bucket_ownership_controls": lambda inv: inv._bucket_has(
        "get_bucket_ownership_controls", ("OwnershipControlsNotFoundError",)
    ),
    "aws_s3_bucket_lifecycle_configuration": lambda inv: inv._bucket_has(
        "get_bucket_lifecycle_configuration", ("NoSuchLifecycleConfiguration",)
    ),
    "aws_s3_bucket_logging": lambda inv: inv._bucket_has("get_bucket_logging", ()),
    "aws_s3_bucket_policy": _bucket_policies,
    "aws_sns_topic": lambda inv: inv.topics(),
    "aws_sns_topic_policy": _topic_policies,
    "aws_ecr_repository": lambda inv: inv.repositories(),
    "aws_ecr_lifecycle_policy": _lifecycle_policies,
    "aws_eks_cluster": lambda inv: inv.clusters(),
    "aws_eks_node_group": _eks("list_nodegroups", "nodegroups"),
    "aws_autoscaling_group_tag": _node_template_tags,
    "aws_dynamodb_table": lambda inv: [
        t for t in inv.c("dynamodb").list_tables()["TableNames"] if t.startswith(inv.cluster + "-")
    ],
    "aws_eks_addon": _eks("list_addons", "addons"),
    "aws_eks_pod_identity_association": _eks("list_pod_identity_associations", "associations"),
    "aws_prometheus_workspace": lambda inv: inv.workspaces(),
    "aws_prometheus_rule_group_namespace": _amp("list_rule_groups_namespaces", "ruleGroupsNamespaces"),
    "aws_prometheus_alert_manager_definition": _amp("describe_alert_manager_definition", "alertManagerDefinition"),
}


def inventory(emulator: str, cluster: str, types: set[str]) -> dict[str, list[str]]:
    """Live objects per type (only `types`); a type without a lister is a KeyError on purpose."""
    inv = Inventory(emulator, cluster)
    return {t: LISTERS[t](inv) for t in sorted(types)}
