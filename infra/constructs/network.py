"""Network: a VPC over the environment's AZs, public and private subnets, NAT, and an S3 gateway endpoint.

The S3 gateway endpoint matters for this product: model weights (hundreds of GB) move from the cold tier
to the hot tier, and through a NAT gateway that traffic would be billed per GB.
"""

from __future__ import annotations

from dataclasses import dataclass

from cdktf_cdktf_provider_aws.cloudwatch_log_group import CloudwatchLogGroup
from cdktf_cdktf_provider_aws.default_security_group import DefaultSecurityGroup
from cdktf_cdktf_provider_aws.eip import Eip
from cdktf_cdktf_provider_aws.flow_log import FlowLog
from cdktf_cdktf_provider_aws.iam_role import IamRole
from cdktf_cdktf_provider_aws.iam_role_policy import IamRolePolicy
from cdktf_cdktf_provider_aws.internet_gateway import InternetGateway
from cdktf_cdktf_provider_aws.nat_gateway import NatGateway
from cdktf_cdktf_provider_aws.route import Route
from cdktf_cdktf_provider_aws.route_table import RouteTable
from cdktf_cdktf_provider_aws.route_table_association import RouteTableAssociation
from cdktf_cdktf_provider_aws.subnet import Subnet
from cdktf_cdktf_provider_aws.vpc import Vpc
from cdktf_cdktf_provider_aws.vpc_endpoint import VpcEndpoint
from constructs import Construct

from infra.constructs.context import AwsContext
from infra.constructs.iam import policy_document, service_trust


@dataclass(frozen=True)
class NetworkProps:
    """The VPC's range, its subnets (one public and one private per AZ) and how egress leaves it."""

    name: str
    aws: AwsContext
    cidr: str
    azs: list[str]
    public_subnets: list[str]
    private_subnets: list[str]
    cluster_name: str
    #: KMS key for the flow-log group; None leaves the group unencrypted (never in our stacks).
    logs_key_arn: str | None = None
    flow_log_retention_days: int = 365
    #: One NAT gateway for all AZs (cheaper, one AZ's outage cuts egress) or one per AZ.
    single_nat_gateway: bool = True


class Network(Construct):
    """VPC with the subnet tags EKS and the AWS Load Balancer Controller look for."""

    def __init__(self, scope: Construct, id_: str, props: NetworkProps) -> None:
        super().__init__(scope, id_)
        self.props = props
        self.vpc = Vpc(
            self,
            "vpc",
            cidr_block=props.cidr,
            enable_dns_hostnames=True,  # EKS private endpoint and FSx DNS names need it
            enable_dns_support=True,
            tags={"Name": props.name},
        )
        igw = InternetGateway(self, "igw", vpc_id=self.vpc.id, tags={"Name": props.name})
        cluster_tag = {f"kubernetes.io/cluster/{props.cluster_name}": "shared"}

        public_rt = RouteTable(self, "public-rt", vpc_id=self.vpc.id, tags={"Name": f"{props.name}-public"})
        Route(
            self,
            "public-default",
            route_table_id=public_rt.id,
            destination_cidr_block="0.0.0.0/0",
            gateway_id=igw.id,
        )

        self.public_subnets: list[Subnet] = []
        self.private_subnets: list[Subnet] = []
        self.private_route_tables: list[RouteTable] = []
        self.nat_gateways: list[NatGateway] = []
        for i, az in enumerate(props.azs):
            public = Subnet(
                self,
                f"public-{az}",
                vpc_id=self.vpc.id,
                availability_zone=az,
                cidr_block=props.public_subnets[i],
                map_public_ip_on_launch=False,  # nothing but NAT and load balancers lives here
                tags={"Name": f"{props.name}-public-{az}", "kubernetes.io/role/elb": "1", **cluster_tag},
            )
            RouteTableAssociation(self, f"public-rta-{az}", subnet_id=public.id, route_table_id=public_rt.id)
            self.public_subnets.append(public)
            if i == 0 or not props.single_nat_gateway:
                eip = Eip(self, f"nat-eip-{az}", domain="vpc", tags={"Name": f"{props.name}-nat-{az}"})
                self.nat_gateways.append(
                    NatGateway(
                        self,
                        f"nat-{az}",
                        allocation_id=eip.id,
                        subnet_id=public.id,
                        tags={"Name": f"{props.name}-{az}"},
                        depends_on=[igw],
                    )
                )

        for i, az in enumerate(props.azs):
            private = Subnet(
                self,
                f"private-{az}",
                vpc_id=self.vpc.id,
                availability_zone=az,
                cidr_block=props.private_subnets[i],
                tags={
                    "Name": f"{props.name}-private-{az}",
                    "kubernetes.io/role/internal-elb": "1",
                    **cluster_tag,
                },
            )
            rt = RouteTable(self, f"private-rt-{az}", vpc_id=self.vpc.id, tags={"Name": f"{props.name}-private-{az}"})
            nat = self.nat_gateways[0 if props.single_nat_gateway else i]
            Route(
                self,
                f"private-default-{az}",
                route_table_id=rt.id,
                destination_cidr_block="0.0.0.0/0",
                nat_gateway_id=nat.id,
            )
            RouteTableAssociation(self, f"private-rta-{az}", subnet_id=private.id, route_table_id=rt.id)
            self.private_subnets.append(private)
            self.private_route_tables.append(rt)

        # Nothing may use the default security group: it is emptied so a forgotten SG fails closed.
        DefaultSecurityGroup(self, "default-sg", vpc_id=self.vpc.id, tags={"Name": f"{props.name}-default-deny"})
        self._flow_logs(props)

        self.s3_endpoint = VpcEndpoint(
            self,
            "s3-endpoint",
            vpc_id=self.vpc.id,
            service_name=f"com.amazonaws.{props.aws.region}.s3",
            vpc_endpoint_type="Gateway",
            route_table_ids=[rt.id for rt in self.private_route_tables],
            tags={"Name": f"{props.name}-s3"},
        )

    def _flow_logs(self, props: NetworkProps) -> None:
        """Rejected and accepted traffic to CloudWatch: the record an incident review needs."""
        group = CloudwatchLogGroup(
            self,
            "flow-logs",
            name=f"/moefleet/{props.name}/vpc-flow-logs",
            retention_in_days=props.flow_log_retention_days,
            kms_key_id=props.logs_key_arn,
        )
        role = IamRole(
            self,
            "flow-logs-role",
            name=f"{props.name}-flow-logs",
            assume_role_policy=service_trust("vpc-flow-logs.amazonaws.com"),
        )
        IamRolePolicy(
            self,
            "flow-logs-policy",
            role=role.id,
            policy=policy_document(
                {
                    "Effect": "Allow",
                    "Action": ["logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"],
                    "Resource": [group.arn, f"{group.arn}:*"],
                }
            ),
        )
        self.flow_log = FlowLog(
            self,
            "flow-log",
            vpc_id=self.vpc.id,
            traffic_type="ALL",
            log_destination_type="cloud-watch-logs",
            log_destination=group.arn,
            iam_role_arn=role.arn,
            max_aggregation_interval=60,
        )

    @property
    def private_subnet_ids(self) -> list[str]:
        return [s.id for s in self.private_subnets]

    @property
    def public_subnet_ids(self) -> list[str]:
        return [s.id for s in self.public_subnets]
