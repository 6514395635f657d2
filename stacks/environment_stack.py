"""One environment's stack. Reads like the diagram: network → cluster → node pools → add-ons → outputs."""

from __future__ import annotations

from cdktf import LocalBackend, S3Backend, TerraformOutput, TerraformStack
from cdktf_cdktf_provider_aws.data_aws_caller_identity import DataAwsCallerIdentity
from cdktf_cdktf_provider_aws.data_aws_partition import DataAwsPartition
from constructs import Construct

from infra.alerts import alert_rules
from infra.cluster import Cluster, ClusterProps
from infra.config import Environment
from infra.identities import WorkloadRole, WorkloadRoleProps, ebs_csi_key_policy, fsx_csi_policy, runtime_policy
from infra.kms import EncryptionKey, EncryptionKeyProps
from infra.labels import SIZE_LABEL, SYSTEM_POOL
from infra.monitoring import Monitoring, MonitoringProps
from infra.network import Network, NetworkProps
from infra.node_pools import GpuNodePool, GpuPoolProps, NodePool, NodePoolProps, node_role
from infra.provider import aws_provider, standard_tags
from infra.registry import Registry, RegistryProps
from infra.sizes import HotTierKind
from infra.storage import MODELS_PREFIX, ColdTier, ColdTierProps, FsxHotTier, FsxHotTierProps
from infra.workloads import (
    EBS_CSI_SERVICE_ACCOUNT,
    FSX_CSI_SERVICE_ACCOUNT,
    RUNTIME_NAMESPACE,
    RUNTIME_SERVICE_ACCOUNT,
)


def cluster_name(env: Environment) -> str:
    return f"moefleet-{env.name}"


class EnvironmentStack(TerraformStack):
    def __init__(self, scope: Construct, env: Environment, *, endpoint_override: str | None = None) -> None:
        super().__init__(scope, env.name)
        self.env = env
        size = env.size_spec
        name = cluster_name(env)
        aws_provider(self, env, endpoint_override)
        self._backend(env)
        account_id = DataAwsCallerIdentity(self, "account").account_id
        partition = self.partition = DataAwsPartition(self, "partition").partition

        # One key for every log group of the environment (control plane, flow logs, later the runtime).
        self.logs_key = EncryptionKey(
            self,
            "logs-key",
            EncryptionKeyProps(
                alias=f"{name}-logs",
                description=f"CloudWatch Logs encryption for {name}",
                account_id=account_id,
                partition=partition,
                region=env.region,
                service_principals=["logs"],
            ),
        )
        public_subnets, private_subnets = env.subnets()
        self.network = Network(
            self,
            "network",
            NetworkProps(
                name=name,
                region=env.region,
                cidr=env.vpc_cidr,
                azs=env.azs,
                public_subnets=public_subnets,
                private_subnets=private_subnets,
                cluster_name=name,
                single_nat_gateway=env.single_nat_gateway,
                logs_key_arn=self.logs_key.arn,
            ),
        )
        self.cluster = Cluster(
            self,
            "eks",
            ClusterProps(
                name=name,
                kubernetes_version=env.kubernetes_version,
                account_id=account_id,
                partition=partition,
                region=env.region,
                subnet_ids=self.network.private_subnet_ids,
                logs_key_arn=self.logs_key.arn,
                public_endpoint=env.public_api_endpoint,
                public_access_cidrs=env.api_access_cidrs,
            ),
        )
        self.volume_key = EncryptionKey(
            self,
            "volume-key",
            EncryptionKeyProps(
                alias=f"{name}-ebs",
                description=f"EBS volumes of {name} nodes and model caches",
                account_id=account_id,
                partition=partition,
                region=env.region,
                autoscaling_may_use=True,
            ),
        )
        role, attachments = node_role(self, "node-role", f"{name}-node", partition)
        self.system_pool = NodePool(
            self,
            "system-pool",
            NodePoolProps(
                cluster_name=self.cluster.name,
                pool=SYSTEM_POOL,
                instance_type=size.system_instance_type,
                ami_type="AL2023_x86_64_STANDARD",
                subnet_ids=self.network.private_subnet_ids,
                min_size=size.system_nodes[0],
                desired_size=size.system_nodes[1],
                max_size=size.system_nodes[2],
                root_volume_gib=50,
                volume_kms_key_arn=self.volume_key.arn,
                node_role_arn=role.arn,
                security_group_ids=[self.cluster.security_group_id],
                labels={SIZE_LABEL: env.size.value},
                instance_tags=standard_tags(env),
            ),
            depends_on=attachments,
        )
        instance = env.gpu_instance_spec
        self.gpu_pool = GpuNodePool(
            self,
            "gpu-pool",
            GpuPoolProps(
                cluster_name=self.cluster.name,
                size=env.size.value,
                gpu_model=instance.gpu_model,
                instance_type=instance.name,
                subnet_ids=self.network.private_subnet_ids,
                vpc_id=self.network.vpc.id,
                counts=env.gpu_node_counts,
                root_volume_gib=size.root_volume_gib,
                volume_kms_key_arn=self.volume_key.arn,
                node_role_arn=role.arn,
                cluster_security_group_id=self.cluster.security_group_id,
                instance_tags=standard_tags(env),
                efa_interfaces=instance.efa_interfaces if size.uses_efa else 0,
                placement_group=size.uses_placement_group,
                capacity_reservation_id=env.overrides.capacity_reservation_id,
                local_nvme_cache=size.uses_local_nvme_cache,
            ),
            depends_on=attachments,
        )
        self.cluster.add_core_addons(after=[self.system_pool.node_group])
        self._storage(env, name, account_id, partition)
        self.registry = Registry(
            self, "registry", RegistryProps(name=name, account_id=account_id, partition=partition, region=env.region)
        )
        self.monitoring = Monitoring(
            self,
            "monitoring",
            MonitoringProps(
                name=name,
                account_id=account_id,
                partition=partition,
                region=env.region,
                rules=alert_rules(env.thresholds),
                logs_key_arn=self.logs_key.arn,
                alarm_email=env.alarm_email,
            ),
        )
        self._outputs()

    def _storage(self, env: Environment, name: str, account_id: str, partition: str) -> None:
        """Cold tier everywhere; hot tier per size; the identities that read them."""
        size = env.size_spec
        self.cold = ColdTier(
            self,
            "cold-tier",
            ColdTierProps(
                name=name,
                account_id=account_id,
                partition=partition,
                region=env.region,
                noncurrent_days=size.storage.cold_noncurrent_days,
                force_destroy=env.emulated,
            ),
        )
        self.runtime_role = self._workload_role(
            "runtime",
            (RUNTIME_NAMESPACE, RUNTIME_SERVICE_ACCOUNT),
            runtime_policy(self.cold.bucket.arn, self.cold.key.arn),
        )
        self.ebs_csi_role = self._workload_role(
            "ebs-csi",
            EBS_CSI_SERVICE_ACCOUNT,
            ebs_csi_key_policy(self.volume_key.arn),
            managed_policies=("service-role/AmazonEBSCSIDriverPolicy",),
        )
        self.hot: FsxHotTier | None = None
        if size.storage.hot_kind is HotTierKind.FSX_LUSTRE:
            self.hot = FsxHotTier(
                self,
                "hot-tier",
                FsxHotTierProps(
                    name=name,
                    account_id=account_id,
                    partition=partition,
                    region=env.region,
                    vpc_id=self.network.vpc.id,
                    # The GPU pool of the large size lives in the first private subnet (placement group).
                    subnet_id=self.network.private_subnet_ids[0],
                    client_security_group_id=self.cluster.security_group_id,
                    capacity_gib=size.storage.hot_capacity_gib,
                    throughput_per_tib=size.storage.fsx_throughput_per_tib or 250,
                    bucket_name=self.cold.bucket.bucket,
                ),
            )
            self.fsx_csi_role = self._workload_role(
                "fsx-csi", FSX_CSI_SERVICE_ACCOUNT, fsx_csi_policy(self.hot.file_system.arn)
            )
            self.cluster.add_addon("aws-fsx-csi-driver", after=[self.system_pool.node_group])

    def _workload_role(
        self, role: str, service_account: tuple[str, str], policy: str, managed_policies: tuple[str, ...] = ()
    ) -> WorkloadRole:
        """An IAM role for one Kubernetes service account (Pod Identity), after the agent add-on exists."""
        return WorkloadRole(
            self,
            f"{role}-identity",
            WorkloadRoleProps(
                cluster_name=self.cluster.name,
                role_name=f"{cluster_name(self.env)}-{role}",
                namespace=service_account[0],
                service_account=service_account[1],
                policy=policy,
                managed_policies=managed_policies,
                partition=self.partition,
            ),
            depends_on=[self.cluster.addons["eks-pod-identity-agent"]],
        )

    def _backend(self, env: Environment) -> None:
        if env.state.kind == "local":
            LocalBackend(self, path=f"terraform.{env.name}.tfstate")
            return
        S3Backend(
            self,
            bucket=env.state.bucket,
            key=env.state.key,
            region=env.state.region or env.region,
            encrypt=True,
        )
        # S3-native state locking (Terraform ≥ 1.10); the cdktf 0.21 binding predates the field.
        self.add_override("terraform.backend.s3.use_lockfile", True)

    def _outputs(self) -> None:
        outputs = {
            "cluster_name": self.cluster.name,
            "cluster_endpoint": self.cluster.cluster.endpoint,
            "cluster_arn": self.cluster.cluster.arn,
            "cluster_oidc_issuer": self.cluster.cluster.identity.get(0).oidc.get(0).issuer,
            "cluster_security_group_id": self.cluster.security_group_id,
            "system_node_group": self.system_pool.name,
            "gpu_node_group": self.gpu_pool.name,
            "vpc_id": self.network.vpc.id,
            "private_subnet_ids": self.network.private_subnet_ids,
            "public_subnet_ids": self.network.public_subnet_ids,
            "deployment_size": self.env.size.value,
            "models_bucket": self.cold.bucket.bucket,
            "models_prefix": MODELS_PREFIX,
            "models_kms_key_arn": self.cold.key.arn,
            "access_log_bucket": self.cold.log_bucket.bucket,
            "volume_kms_key_arn": self.volume_key.arn,
            "ecr_repository_url": self.registry.repository_url,
            "amp_workspace_id": self.monitoring.workspace.id,
            "amp_remote_write_url": self.monitoring.remote_write_url,
            "amp_query_url": self.monitoring.query_url,
            "alerts_topic_arn": self.monitoring.topic.arn,
            "runtime_role_arn": self.runtime_role.arn,
            "hot_tier_kind": self.env.size_spec.storage.hot_kind.value,
            "region": self.env.region,
        }
        if self.hot is not None:
            outputs |= {
                "fsx_file_system_id": self.hot.file_system.id,
                "fsx_dns_name": self.hot.file_system.dns_name,
                "fsx_mount_name": self.hot.file_system.mount_name,
                "fsx_kms_key_arn": self.hot.key.arn,
            }
        for key, value in outputs.items():
            TerraformOutput(self, key, value=value)
