"""Managed monitoring: an Amazon Managed Service for Prometheus workspace with logging, alert rules and the
review's recording rules as rule-group namespaces, and an alertmanager routing to an encrypted SNS topic.

The construct takes the rules already rendered (Prometheus rule-groups YAML documents, which
`infra.observability.alerts.rules_yaml` and `infra.observability.recording.recording_rules_yaml`
produce), so it knows AWS, not what the rules say."""

from __future__ import annotations

from dataclasses import dataclass

import yaml
from cdktf_cdktf_provider_aws.cloudwatch_log_group import CloudwatchLogGroup
from cdktf_cdktf_provider_aws.prometheus_alert_manager_definition import PrometheusAlertManagerDefinition
from cdktf_cdktf_provider_aws.prometheus_rule_group_namespace import PrometheusRuleGroupNamespace
from cdktf_cdktf_provider_aws.prometheus_workspace import PrometheusWorkspace, PrometheusWorkspaceLoggingConfiguration
from cdktf_cdktf_provider_aws.sns_topic import SnsTopic
from cdktf_cdktf_provider_aws.sns_topic_policy import SnsTopicPolicy
from cdktf_cdktf_provider_aws.sns_topic_subscription import SnsTopicSubscription
from constructs import Construct

from infra.constructs.context import AwsContext
from infra.constructs.iam import policy_document
from infra.constructs.kms import EncryptionKey, EncryptionKeyProps


def alertmanager_config(topic_arn: str, region: str) -> str:
    """Every alert to SNS; grouped per alert name so a flapping target does not page once per pod."""
    return yaml.safe_dump(
        {
            "alertmanager_config": yaml.safe_dump(
                {
                    "route": {
                        "receiver": "sns",
                        "group_by": ["alertname", "severity"],
                        "group_wait": "30s",
                        "group_interval": "5m",
                        "repeat_interval": "4h",
                    },
                    "receivers": [
                        {
                            "name": "sns",
                            "sns_configs": [
                                {
                                    "topic_arn": topic_arn,
                                    "sigv4": {"region": region},
                                    "subject": "[{{ .Status | toUpper }}] {{ .CommonLabels.alertname }}",
                                }
                            ],
                        }
                    ],
                },
                sort_keys=False,
            )
        },
        sort_keys=False,
    )


@dataclass(frozen=True)
class MonitoringProps:
    """The workspace's name, its alert rules (rendered) and where alerts go besides the SNS topic."""

    name: str
    aws: AwsContext
    #: Prometheus rule groups as YAML (`groups: [...]`): the rule-group namespace's data.
    rules_yaml: str
    logs_key_arn: str
    alarm_email: str | None = None
    rule_namespace: str = "moe-fleet"
    #: Recording rules as YAML (`groups: [...]`), in a namespace of their own (`<rule_namespace>-recording`).
    recording_rules_yaml: str | None = None


class Monitoring(Construct):
    """An AMP workspace that evaluates the alert rules and routes firing alerts to an encrypted SNS topic.

    Attributes: `workspace`, `topic`, `remote_write_url` and `query_url` (what the stack outputs)."""

    def __init__(self, scope: Construct, id_: str, props: MonitoringProps) -> None:
        super().__init__(scope, id_)
        self.log_group = CloudwatchLogGroup(
            self,
            "amp-logs",
            name=f"/moefleet/{props.name}/prometheus",
            retention_in_days=365,
            kms_key_id=props.logs_key_arn,
        )
        self.key = EncryptionKey(
            self,
            "key",
            EncryptionKeyProps(
                alias=f"{props.name}-monitoring",
                description=f"Prometheus workspace and alert topic of {props.name}",
                aws=props.aws,
                service_principals=["aps", "sns"],
            ),
        )
        self.workspace = PrometheusWorkspace(
            self,
            "workspace",
            alias=props.name,
            kms_key_arn=self.key.arn,
            logging_configuration=PrometheusWorkspaceLoggingConfiguration(log_group_arn=f"{self.log_group.arn}:*"),
        )
        self.rules = PrometheusRuleGroupNamespace(
            self, "rules", name=props.rule_namespace, workspace_id=self.workspace.id, data=props.rules_yaml
        )
        self.recording_rules = None
        if props.recording_rules_yaml:
            self.recording_rules = PrometheusRuleGroupNamespace(
                self,
                "recording-rules",
                name=f"{props.rule_namespace}-recording",
                workspace_id=self.workspace.id,
                data=props.recording_rules_yaml,
            )
        self.topic = SnsTopic(self, "alerts", name=f"{props.name}-alerts", kms_master_key_id=self.key.arn)
        SnsTopicPolicy(
            self,
            "alerts-policy",
            arn=self.topic.arn,
            policy=policy_document(
                {
                    "Sid": "ManagedPrometheusPublishes",
                    "Effect": "Allow",
                    "Principal": {"Service": "aps.amazonaws.com"},
                    "Action": ["sns:Publish", "sns:GetTopicAttributes"],
                    "Resource": self.topic.arn,
                    "Condition": {
                        "ArnEquals": {"aws:SourceArn": self.workspace.arn},
                        "StringEquals": {"AWS:SourceAccount": props.aws.account_id},
                    },
                }
            ),
        )
        if props.alarm_email:
            SnsTopicSubscription(self, "email", topic_arn=self.topic.arn, protocol="email", endpoint=props.alarm_email)
        PrometheusAlertManagerDefinition(
            self,
            "alertmanager",
            workspace_id=self.workspace.id,
            definition=alertmanager_config(self.topic.arn, props.aws.region),
        )

    @property
    def remote_write_url(self) -> str:
        return f"{self.workspace.prometheus_endpoint}api/v1/remote_write"

    @property
    def query_url(self) -> str:
        return f"{self.workspace.prometheus_endpoint}api/v1/query"
