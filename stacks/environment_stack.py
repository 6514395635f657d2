"""One environment's stack. Reads like the diagram: network → cluster → node pools → add-ons → outputs.

Its outputs are the contract in `infra.catalog.outputs.StackOutputs`: the stack fills one instance of it
and emits each field as a Terraform output with the field's description, so what the installer, the
operator commands and the demo read back is exactly what is written here."""

from __future__ import annotations

from cdktf import LocalBackend, S3Backend, TerraformOutput, TerraformStack
from cdktf_cdktf_provider_aws.data_aws_caller_identity import DataAwsCallerIdentity
from cdktf_cdktf_provider_aws.data_aws_partition import DataAwsPartition
from constructs import Construct

from infra.catalog.environments import Environment
from infra.catalog.names import (
    CLUSTER_AUTOSCALER_SERVICE_ACCOUNT,
    EBS_CSI_SERVICE_ACCOUNT,
    FSX_CSI_SERVICE_ACCOUNT,
    MODELS_PREFIX,
    RUNTIME_NAMESPACE,
    RUNTIME_SERVICE_ACCOUNT,
    SIZE_LABEL,
    SYSTEM_POOL,
    prediction_table_name,
)
from infra.catalog.outputs import StackOutputs
from infra.catalog.sizes import HotTierKind
from infra.constructs.cluster import Cluster, ClusterProps
from infra.constructs.context import AwsContext
from infra.constructs.identities import (
    WorkloadRole,
    WorkloadRoleProps,
    ebs_csi_key_policy,
    fsx_csi_policy,
    runtime_policy,
)
from infra.constructs.kms import EncryptionKey, EncryptionKeyProps
from infra.constructs.monitoring import Monitoring, MonitoringProps
from infra.constructs.network import Network, NetworkProps
from infra.constructs.node_autoscaling import cluster_autoscaler_policy
from infra.constructs.node_pools import GpuNodePool, GpuPoolProps, NodePool, NodePoolProps, node_role
from infra.constructs.prediction_store import PredictionStore, PredictionStoreProps, prediction_store_statements
from infra.constructs.provider import aws_provider, standard_tags
from infra.constructs.registry import Registry, RegistryProps
from infra.constructs.storage import ColdTier, ColdTierProps, FsxHotTier, FsxHotTierProps
from infra.observability.alerts import alert_rules, rules_yaml
from infra.observability.recording import recording_rules_yaml


class EnvironmentStack(TerraformStack):
    def __init__(self, scope: Construct, env: Environment, *, endpoint_override: str | None = None) -> None:
        super().__init__(scope, env.name)
        self.env = env
        size = env.size_spec
        name = env.cluster_name
        aws_provider(self, env, endpoint_override)
        self._backend(env)
        self.aws = aws = AwsContext(
            account_id=DataAwsCallerIdentity(self, "account").account_id,
            partition=DataAwsPartition(self, "partition").partition,
            region=env.region,
        )

        # One key for every log group of the environment (control plane, flow logs, later the runtime).
        self.logs_key = EncryptionKey(
            self,
            "logs-key",
            EncryptionKeyProps(
                alias=f"{name}-logs",
                description=f"CloudWatch Logs encryption for {name}",
                aws=aws,
                service_principals=["logs"],
            ),
        )
        public_subnets, private_subnets = env.subnets()
        self.network = Network(
            self,
            "network",
            NetworkProps(
                name=name,
                aws=aws,
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
                aws=aws,
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
                aws=aws,
                autoscaling_may_use=True,
            ),
        )
        role, attachments = node_role(self, "node-role", f"{name}-node", aws)
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
                gpus_per_node=instance.gpus,
                instance_tags=standard_tags(env),
                efa_interfaces=instance.efa_interfaces if size.uses_efa else 0,
                placement_group=env.gpu_placement_group,
                capacity_reservation_id=env.gpu_capacity_reservation_id,
                capacity_block=env.gpu_capacity_block,
                single_az=env.gpu_pool_single_az,
                local_nvme_cache=size.uses_local_nvme_cache,
            ),
            depends_on=attachments,
        )
        self.cluster.add_core_addons(after=[self.system_pool.node_group])
        self._storage(env, name)
        self.registry = Registry(self, "registry", RegistryProps(name=name, aws=aws))
        self.monitoring = Monitoring(
            self,
            "monitoring",
            MonitoringProps(
                name=name,
                aws=aws,
                rules_yaml=rules_yaml(alert_rules(env.thresholds)),
                recording_rules_yaml=recording_rules_yaml(),
                logs_key_arn=self.logs_key.arn,
                alarm_email=env.alarm_email,
            ),
        )
        self._outputs()

    def _storage(self, env: Environment, name: str) -> None:
        """Cold tier everywhere; hot tier per size; the identities that read them."""
        size = env.size_spec
        self.cold = ColdTier(
            self,
            "cold-tier",
            ColdTierProps(
                name=name,
                aws=self.aws,
                noncurrent_days=size.storage.cold_noncurrent_days,
                force_destroy=env.emulated,
            ),
        )
        self.predictions = PredictionStore(
            self,
            "prediction-store",
            PredictionStoreProps(
                table_name=prediction_table_name(env.name), aws=self.aws, deletion_protection=not env.emulated
            ),
        )
        self.runtime_role = self._workload_role(
            "runtime",
            (RUNTIME_NAMESPACE, RUNTIME_SERVICE_ACCOUNT),
            runtime_policy(
                self.cold.bucket.arn,
                self.cold.key.arn,
                *prediction_store_statements(self.predictions.arn, self.predictions.key.arn, env.region),
            ),
        )
        self.ebs_csi_role = self._workload_role(
            "ebs-csi",
            EBS_CSI_SERVICE_ACCOUNT,
            ebs_csi_key_policy(self.volume_key.arn),
            managed_policies=("service-role/AmazonEBSCSIDriverPolicy",),
        )
        self.cluster_autoscaler_role = self._workload_role(
            "cluster-autoscaler",
            CLUSTER_AUTOSCALER_SERVICE_ACCOUNT,
            cluster_autoscaler_policy(self.env.cluster_name, self.aws),
        )
        self.hot: FsxHotTier | None = None
        if size.storage.hot_kind is HotTierKind.FSX_LUSTRE:
            self.hot = FsxHotTier(
                self,
                "hot-tier",
                FsxHotTierProps(
                    name=name,
                    aws=self.aws,
                    vpc_id=self.network.vpc.id,
                    # A single-AZ GPU pool (placement group or reservation) lives in the first private subnet.
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
                role_name=f"{self.env.cluster_name}-{role}",
                namespace=service_account[0],
                service_account=service_account[1],
                policy=policy,
                managed_policies=managed_policies,
                aws=self.aws,
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
        """Every field of the outputs contract, emitted with its description (FSx fields with the FSx hot tier)."""
        self.outputs = StackOutputs(
            cluster_name=self.cluster.name,
            cluster_endpoint=self.cluster.cluster.endpoint,
            cluster_arn=self.cluster.cluster.arn,
            cluster_oidc_issuer=self.cluster.cluster.identity.get(0).oidc.get(0).issuer,
            cluster_security_group_id=self.cluster.security_group_id,
            system_node_group=self.system_pool.name,
            gpu_node_group=self.gpu_pool.name,
            vpc_id=self.network.vpc.id,
            private_subnet_ids=tuple(self.network.private_subnet_ids),
            public_subnet_ids=tuple(self.network.public_subnet_ids),
            deployment_size=self.env.size.value,
            models_bucket=self.cold.bucket.bucket,
            models_prefix=MODELS_PREFIX,
            models_kms_key_arn=self.cold.key.arn,
            access_log_bucket=self.cold.log_bucket.bucket,
            volume_kms_key_arn=self.volume_key.arn,
            ecr_repository_url=self.registry.repository_url,
            amp_workspace_id=self.monitoring.workspace.id,
            amp_remote_write_url=self.monitoring.remote_write_url,
            amp_query_url=self.monitoring.query_url,
            alerts_topic_arn=self.monitoring.topic.arn,
            runtime_role_arn=self.runtime_role.arn,
            prediction_table=self.predictions.name,
            hot_tier_kind=self.env.size_spec.storage.hot_kind.value,
            region=self.env.region,
            fsx_file_system_id=self.hot.file_system.id if self.hot is not None else None,
            fsx_dns_name=self.hot.file_system.dns_name if self.hot is not None else None,
            fsx_mount_name=self.hot.file_system.mount_name if self.hot is not None else None,
            fsx_kms_key_arn=self.hot.key.arn if self.hot is not None else None,
        )
        descriptions = StackOutputs.descriptions()
        for key, value in self.outputs.to_mapping().items():
            TerraformOutput(self, key, value=value, description=descriptions[key])
