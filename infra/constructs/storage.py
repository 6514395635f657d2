"""Storage tiers for model weights: cold (S3, every size) and hot (FSx for Lustre linked to S3, or the
KMS key for per-pod gp3 volumes). docs/storage.md explains how a model moves cold → hot → GPU."""

from __future__ import annotations

from dataclasses import dataclass

from cdktf_cdktf_provider_aws.fsx_data_repository_association import (
    FsxDataRepositoryAssociation,
    FsxDataRepositoryAssociationS3,
    FsxDataRepositoryAssociationS3AutoImportPolicy,
)
from cdktf_cdktf_provider_aws.fsx_lustre_file_system import FsxLustreFileSystem
from cdktf_cdktf_provider_aws.s3_bucket import S3Bucket
from cdktf_cdktf_provider_aws.s3_bucket_lifecycle_configuration import (
    S3BucketLifecycleConfiguration,
    S3BucketLifecycleConfigurationRule,
    S3BucketLifecycleConfigurationRuleAbortIncompleteMultipartUpload,
    S3BucketLifecycleConfigurationRuleExpiration,
    S3BucketLifecycleConfigurationRuleFilter,
    S3BucketLifecycleConfigurationRuleNoncurrentVersionExpiration,
    S3BucketLifecycleConfigurationRuleNoncurrentVersionTransition,
)
from cdktf_cdktf_provider_aws.s3_bucket_logging import S3BucketLoggingA
from cdktf_cdktf_provider_aws.s3_bucket_ownership_controls import (
    S3BucketOwnershipControls,
    S3BucketOwnershipControlsRule,
)
from cdktf_cdktf_provider_aws.s3_bucket_policy import S3BucketPolicy
from cdktf_cdktf_provider_aws.s3_bucket_public_access_block import S3BucketPublicAccessBlock
from cdktf_cdktf_provider_aws.s3_bucket_server_side_encryption_configuration import (
    S3BucketServerSideEncryptionConfigurationA,
    S3BucketServerSideEncryptionConfigurationRuleA,
    S3BucketServerSideEncryptionConfigurationRuleApplyServerSideEncryptionByDefaultA,
)
from cdktf_cdktf_provider_aws.s3_bucket_versioning import S3BucketVersioningA, S3BucketVersioningVersioningConfiguration
from cdktf_cdktf_provider_aws.security_group import SecurityGroup, SecurityGroupEgress, SecurityGroupIngress
from constructs import Construct

from infra.catalog.names import MODELS_PREFIX
from infra.constructs.checks import skip_check
from infra.constructs.context import AwsContext
from infra.constructs.iam import policy_document
from infra.constructs.kms import EncryptionKey, EncryptionKeyProps

# Layout of the cold tier: MODELS_PREFIX<name>/<revision>/<files>, manifest written last (docs/storage.md).
#: Where the FSx data repository association exposes the cold tier's models/ inside the file system.
FSX_MODELS_PATH = "/models"
#: Lustre's ports: 988 for the LNet service, 1018-1023 for the client side.
LUSTRE_PORTS = ((988, 988), (1018, 1023))


def _private_bucket(scope: Construct, id_: str, bucket: S3Bucket) -> None:
    S3BucketPublicAccessBlock(
        scope,
        f"{id_}-public-access-block",
        bucket=bucket.id,
        block_public_acls=True,
        block_public_policy=True,
        ignore_public_acls=True,
        restrict_public_buckets=True,
    )
    S3BucketOwnershipControls(
        scope,
        f"{id_}-ownership",
        bucket=bucket.id,
        rule=S3BucketOwnershipControlsRule(object_ownership="BucketOwnerEnforced"),
    )


def _deny_insecure_transport(bucket: S3Bucket, extra: list[dict] | None = None) -> str:
    return policy_document(
        {
            "Sid": "DenyInsecureTransport",
            "Effect": "Deny",
            "Principal": {"AWS": "*"},  # same as "*"; moto's bucket-logging check crashes on the string form
            "Action": "s3:*",
            "Resource": [bucket.arn, f"{bucket.arn}/*"],
            "Condition": {"Bool": {"aws:SecureTransport": "false"}},
        },
        *(extra or []),
    )


@dataclass(frozen=True)
class ColdTierProps:
    """The bucket's name prefix and how long noncurrent revisions and access logs are kept."""

    name: str
    aws: AwsContext
    noncurrent_days: int = 30
    noncurrent_expire_days: int = 365
    access_log_days: int = 365
    #: Let `terraform destroy` empty the buckets. Only for emulated environments, whose teardown must leave
    #: nothing; a real environment keeps its weights and logs unless someone empties them on purpose.
    force_destroy: bool = False


class ColdTier(Construct):
    """S3 bucket for model artifacts (models/<name>/<revision>/…) plus the bucket its access logs go to."""

    def __init__(self, scope: Construct, id_: str, props: ColdTierProps) -> None:
        super().__init__(scope, id_)
        self.key = EncryptionKey(
            self,
            "key",
            EncryptionKeyProps(
                alias=f"{props.name}-models",
                description=f"Model artifacts of {props.name}",
                aws=props.aws,
            ),
        )
        # Server access logs cannot be delivered to an SSE-KMS bucket, hence SSE-S3 for this one.
        self.log_bucket = S3Bucket(
            self, "access-logs", bucket_prefix=f"{props.name}-access-logs-", force_destroy=props.force_destroy
        )
        _private_bucket(self, "access-logs", self.log_bucket)
        S3BucketVersioningA(
            self,
            "access-logs-versioning",
            bucket=self.log_bucket.id,
            versioning_configuration=S3BucketVersioningVersioningConfiguration(status="Enabled"),
        )
        S3BucketServerSideEncryptionConfigurationA(
            self,
            "access-logs-sse",
            bucket=self.log_bucket.id,
            rule=[
                S3BucketServerSideEncryptionConfigurationRuleA(
                    apply_server_side_encryption_by_default=S3BucketServerSideEncryptionConfigurationRuleApplyServerSideEncryptionByDefaultA(
                        sse_algorithm="AES256"
                    )
                )
            ],
        )
        S3BucketLifecycleConfiguration(
            self,
            "access-logs-lifecycle",
            bucket=self.log_bucket.id,
            rule=[
                S3BucketLifecycleConfigurationRule(
                    id="expire-access-logs",
                    status="Enabled",
                    filter=[S3BucketLifecycleConfigurationRuleFilter(prefix="")],
                    expiration=[S3BucketLifecycleConfigurationRuleExpiration(days=props.access_log_days)],
                    noncurrent_version_expiration=[
                        S3BucketLifecycleConfigurationRuleNoncurrentVersionExpiration(noncurrent_days=30)
                    ],
                    abort_incomplete_multipart_upload=[
                        S3BucketLifecycleConfigurationRuleAbortIncompleteMultipartUpload(days_after_initiation=7)
                    ],
                )
            ],
        )
        for check, reason in (
            ("CKV_AWS_18", "this is the access-log bucket; logging it into itself would loop"),
            ("CKV_AWS_145", "S3 server access logs can only be delivered to SSE-S3 buckets"),
            ("CKV_AWS_144", "access logs are reproducible audit data; cross-region copies add cost, not safety"),
            ("CKV2_AWS_62", "no consumer of events on access logs"),
        ):
            skip_check(self.log_bucket, check, reason)
        log_policy = S3BucketPolicy(
            self,
            "access-logs-policy",
            bucket=self.log_bucket.id,
            policy=_deny_insecure_transport(
                self.log_bucket,
                [
                    {
                        "Sid": "S3ServerAccessLogsDelivery",
                        "Effect": "Allow",
                        "Principal": {"Service": "logging.s3.amazonaws.com"},
                        "Action": "s3:PutObject",
                        "Resource": f"{self.log_bucket.arn}/*",
                        "Condition": {"StringEquals": {"aws:SourceAccount": props.aws.account_id}},
                    }
                ],
            ),
        )

        self.bucket = S3Bucket(self, "models", bucket_prefix=f"{props.name}-models-", force_destroy=props.force_destroy)
        _private_bucket(self, "models", self.bucket)
        S3BucketVersioningA(
            self,
            "models-versioning",
            bucket=self.bucket.id,
            versioning_configuration=S3BucketVersioningVersioningConfiguration(status="Enabled"),
        )
        S3BucketServerSideEncryptionConfigurationA(
            self,
            "models-sse",
            bucket=self.bucket.id,
            rule=[
                S3BucketServerSideEncryptionConfigurationRuleA(
                    apply_server_side_encryption_by_default=S3BucketServerSideEncryptionConfigurationRuleApplyServerSideEncryptionByDefaultA(
                        sse_algorithm="aws:kms", kms_master_key_id=self.key.arn
                    ),
                    bucket_key_enabled=True,  # one KMS call per object, not per part of 671 GB
                )
            ],
        )
        S3BucketLifecycleConfiguration(
            self,
            "models-lifecycle",
            bucket=self.bucket.id,
            rule=[
                S3BucketLifecycleConfigurationRule(
                    id="old-revisions-to-glacier-ir",
                    status="Enabled",
                    filter=[S3BucketLifecycleConfigurationRuleFilter(prefix=MODELS_PREFIX)],
                    noncurrent_version_transition=[
                        S3BucketLifecycleConfigurationRuleNoncurrentVersionTransition(
                            noncurrent_days=props.noncurrent_days, storage_class="GLACIER_IR"
                        )
                    ],
                    noncurrent_version_expiration=[
                        S3BucketLifecycleConfigurationRuleNoncurrentVersionExpiration(
                            noncurrent_days=props.noncurrent_expire_days
                        )
                    ],
                ),
                # Bucket-wide: an interrupted 671 GB upload anywhere otherwise bills its parts forever.
                S3BucketLifecycleConfigurationRule(
                    id="abort-incomplete-uploads",
                    status="Enabled",
                    filter=[S3BucketLifecycleConfigurationRuleFilter(prefix="")],
                    abort_incomplete_multipart_upload=[
                        S3BucketLifecycleConfigurationRuleAbortIncompleteMultipartUpload(days_after_initiation=7)
                    ],
                ),
            ],
        )
        S3BucketLoggingA(
            self,
            "models-logging",
            bucket=self.bucket.id,
            target_bucket=self.log_bucket.id,
            target_prefix="models/",
            depends_on=[log_policy],  # S3 checks the delivery permission when logging is turned on
        )
        S3BucketPolicy(self, "models-policy", bucket=self.bucket.id, policy=_deny_insecure_transport(self.bucket))
        for check, reason in (
            ("CKV_AWS_144", "weights are re-uploadable from the model source; replication doubles a 671 GB bill"),
            ("CKV2_AWS_62", "the hot tier imports changes through the FSx data repository association, not events"),
        ):
            skip_check(self.bucket, check, reason)

    @property
    def models_prefix_arn(self) -> str:
        return f"{self.bucket.arn}/{MODELS_PREFIX}*"


@dataclass(frozen=True)
class FsxHotTierProps:
    """Where the file system lives (one subnet), who may mount it, its size and throughput, its S3 link."""

    name: str
    aws: AwsContext
    vpc_id: str
    subnet_id: str  # a Lustre file system lives in one subnet (one AZ)
    client_security_group_id: str  # the nodes' security group
    capacity_gib: int
    throughput_per_tib: int
    bucket_name: str


class FsxHotTier(Construct):
    """FSx for Lustre PERSISTENT_2 linked to the cold tier's models/ prefix: objects appear in the file
    system as soon as they land in S3 (auto import), and load at hundreds of MB/s per TiB."""

    def __init__(self, scope: Construct, id_: str, props: FsxHotTierProps) -> None:
        super().__init__(scope, id_)
        self.key = EncryptionKey(
            self,
            "key",
            EncryptionKeyProps(
                alias=f"{props.name}-fsx",
                description=f"FSx for Lustre hot tier of {props.name}",
                aws=props.aws,
            ),
        )
        self.security_group = SecurityGroup(
            self,
            "sg",
            name=f"{props.name}-fsx-lustre",
            description="FSx for Lustre: Lustre ports from the cluster nodes only",
            vpc_id=props.vpc_id,
            ingress=[
                SecurityGroupIngress(
                    description=f"Lustre {low}-{high} from the nodes and the file servers",
                    protocol="tcp",
                    from_port=low,
                    to_port=high,
                    security_groups=[props.client_security_group_id],
                    self_attribute=True,
                )
                for low, high in LUSTRE_PORTS
            ],
            egress=[
                SecurityGroupEgress(
                    description="Lustre file servers talk to each other",
                    protocol="tcp",
                    from_port=988,
                    to_port=1023,
                    self_attribute=True,
                )
            ],
            tags={"Name": f"{props.name}-fsx-lustre"},
        )
        self.file_system = FsxLustreFileSystem(
            self,
            "fs",
            storage_capacity=props.capacity_gib,
            subnet_ids=[props.subnet_id],
            security_group_ids=[self.security_group.id],
            deployment_type="PERSISTENT_2",
            per_unit_storage_throughput=props.throughput_per_tib,
            storage_type="SSD",
            data_compression_type="LZ4",  # safetensors compress little, metadata and tokenizers do
            kms_key_id=self.key.arn,
            file_system_type_version="2.15",
            tags={"Name": f"{props.name}-models"},
        )
        self.association = FsxDataRepositoryAssociation(
            self,
            "dra",
            file_system_id=self.file_system.id,
            data_repository_path=f"s3://{props.bucket_name}/{MODELS_PREFIX}",
            file_system_path=FSX_MODELS_PATH,
            batch_import_meta_data_on_create=True,
            s3=FsxDataRepositoryAssociationS3(
                auto_import_policy=FsxDataRepositoryAssociationS3AutoImportPolicy(events=["NEW", "CHANGED", "DELETED"])
            ),
            delete_data_in_filesystem=False,
        )
