"""The stack outputs contract: what an applied environment hands to everything that runs after it.

`stacks/environment_stack.py` emits exactly the fields of :class:`StackOutputs` as Terraform outputs,
each with its description from here; the installer, `make push`, the weights and status commands and the
demo read them back through :meth:`StackOutputs.from_terraform_json` (after `terraform output -json`, see
`infra.terraform.outputs`), which checks every field at once and names each missing or malformed one.
One definition on both sides, so a renamed or dropped output fails a test instead of an install.

Environments that were never applied get *representative* outputs built from their validated config
(:func:`representative_outputs`): same keys, values in the formats AWS returns, placeholder account and
IDs, so `moefleet render` and the tests work without an AWS account. Tests check that the representative
keys are exactly the synthesized stack's outputs.

Standard library only (plus the catalog): the `moefleet` CLI imports it without the `infra` extra.
"""

from __future__ import annotations

import json
import re
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_origin, get_type_hints

from infra.catalog.names import MODELS_PREFIX, cluster_name, prediction_table_name
from infra.catalog.sizes import HotTierKind, SizeName

if TYPE_CHECKING:
    from infra.catalog.environments import Environment

#: Placeholder account of representative outputs (the AWS documentation's example account).
EXAMPLE_ACCOUNT = "123456789012"


class OutputsError(ValueError):
    """Stack outputs are missing or malformed; the message names the output, the value and what is allowed."""


def _output(description: str, *, hot_tier: HotTierKind | None = None) -> Any:
    """A contract field. With `hot_tier`, the stack emits it only for sizes whose hot tier is that kind."""
    metadata = {"description": description, "hot_tier": hot_tier}
    if hot_tier is None:
        return field(metadata=metadata)
    return field(default=None, metadata=metadata)


_FSX = HotTierKind.FSX_LUSTRE


@dataclass(frozen=True)
class StackOutputs:
    """Every output of an environment's stack, typed, each with the description Terraform shows for it."""

    cluster_name: str = _output("Name of the EKS cluster (aws eks update-kubeconfig --name).")
    cluster_endpoint: str = _output("HTTPS endpoint of the cluster's Kubernetes API.")
    cluster_arn: str = _output("ARN of the EKS cluster.")
    cluster_oidc_issuer: str = _output("OIDC issuer URL of the cluster.")
    cluster_security_group_id: str = _output("Security group EKS created for the cluster; managed nodes join it.")
    system_node_group: str = _output("Node group for system workloads (CoreDNS, controllers, exporters).")
    gpu_node_group: str = _output("GPU node group the runtime's pods run on (starts at zero nodes).")
    vpc_id: str = _output("ID of the environment's VPC.")
    private_subnet_ids: tuple[str, ...] = _output("Private subnets, one per availability zone: nodes and pods.")
    public_subnet_ids: tuple[str, ...] = _output(
        "Public subnets, one per availability zone: NAT gateways and load balancers."
    )
    deployment_size: str = _output("Deployment size of the environment: devtest, medium or large.")
    models_bucket: str = _output("S3 bucket of the cold tier; checkpoints live under models_prefix.")
    models_prefix: str = _output("Key prefix of checkpoints in the cold tier: <prefix><model>/<revision>/.")
    models_kms_key_arn: str = _output("KMS key that encrypts the cold tier.")
    access_log_bucket: str = _output("S3 bucket that receives the cold tier's access logs.")
    volume_kms_key_arn: str = _output("KMS key of the nodes' EBS volumes and of the gp3 hot tier.")
    ecr_repository_url: str = _output("ECR repository of the runtime image (HOST/REPOSITORY, without a tag).")
    amp_workspace_id: str = _output("ID of the Amazon Managed Service for Prometheus workspace.")
    amp_remote_write_url: str = _output("Remote-write URL of the Prometheus workspace.")
    amp_query_url: str = _output("Query URL of the Prometheus workspace (ends in api/v1/query).")
    alerts_topic_arn: str = _output("SNS topic the workspace's alert manager publishes alerts to.")
    runtime_role_arn: str = _output("IAM role the runtime's service account gets through EKS Pod Identity.")
    prediction_table: str = _output("DynamoDB table of the risk service's prediction records (all replicas).")
    hot_tier_kind: str = _output("Hot tier of the environment's size: ebs-gp3 or fsx-lustre.")
    region: str = _output("AWS region of the environment.")
    fsx_file_system_id: str | None = _output("FSx for Lustre file system of the hot tier.", hot_tier=_FSX)
    fsx_dns_name: str | None = _output("DNS name of the hot tier's FSx file system.", hot_tier=_FSX)
    fsx_mount_name: str | None = _output("Lustre mount name of the hot tier's FSx file system.", hot_tier=_FSX)
    fsx_kms_key_arn: str | None = _output("KMS key of the hot tier's FSx file system.", hot_tier=_FSX)

    # ---- derived values ---------------------------------------------------------------------------------

    @property
    def size(self) -> SizeName:
        return SizeName(self.deployment_size)

    @property
    def hot_tier(self) -> HotTierKind:
        return HotTierKind(self.hot_tier_kind)

    @property
    def amp_server_address(self) -> str:
        """The workspace's Prometheus base URL: what PromQL clients (KEDA) append `api/v1/query` to."""
        return self.amp_query_url.removesuffix("api/v1/query")

    # ---- the contract's shape ------------------------------------------------------------------------

    @classmethod
    def descriptions(cls) -> dict[str, str]:
        """{output name: description} for every field, in the order the stack emits them."""
        return {f.name: f.metadata["description"] for f in fields(cls)}

    @classmethod
    def names_for(cls, hot_tier: HotTierKind) -> list[str]:
        """The outputs a stack whose size has this hot tier emits."""
        return [f.name for f in fields(cls) if f.metadata["hot_tier"] in (None, hot_tier)]

    def to_mapping(self) -> dict[str, Any]:
        """{name: value} of the outputs present, lists as JSON has them (what `terraform output` shows)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    # ---- reading -------------------------------------------------------------------------------------

    @classmethod
    def from_mapping(cls, data: dict[str, Any], source: str = "outputs") -> StackOutputs:
        """Validate every field at once and raise one OutputsError listing each problem."""
        problems: list[str] = []
        values: dict[str, Any] = {}
        hints = get_type_hints(cls)
        for f in fields(cls):
            value = data.get(f.name)
            if value is None:
                if _required(f):
                    problems.append(f"{f.name}: missing")
                continue
            if get_origin(hints[f.name]) is tuple:
                if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v for v in value):
                    problems.append(f"{f.name} = {value!r}: expected a list of non-empty strings")
                    continue
                value = tuple(value)
            elif not isinstance(value, str) or not value:
                problems.append(f"{f.name} = {value!r}: expected a non-empty string")
                continue
            values[f.name] = value
        size = values.get("deployment_size")
        if size is not None and size not in {s.value for s in SizeName}:
            problems.append(f"deployment_size = {size!r}: allowed: {', '.join(s.value for s in SizeName)}")
        kind = values.get("hot_tier_kind")
        if kind is not None and kind not in {k.value for k in HotTierKind}:
            problems.append(f"hot_tier_kind = {kind!r}: allowed: {', '.join(k.value for k in HotTierKind)}")
        elif kind is not None:
            problems += [
                f"{f.name}: missing (hot_tier_kind = {kind!r} needs it)"
                for f in fields(cls)
                if f.metadata["hot_tier"] == kind and f.name not in values and data.get(f.name) is None
            ]
        url = values.get("ecr_repository_url")
        if url is not None and not re.match(r"^[\w.-]+(:\d+)?/[\w./-]+$", url):
            problems.append(f"ecr_repository_url = {url!r}: expected HOST/REPOSITORY")
        for name in ("amp_query_url", "cluster_endpoint"):
            if name in values and not values[name].startswith(("https://", "http://")):
                problems.append(f"{name} = {values[name]!r}: expected an http(s) URL")
        if problems:
            raise OutputsError(f"{source}: invalid stack outputs: " + "; ".join(problems))
        return cls(**values)

    @classmethod
    def from_terraform_json(cls, raw: Any, source: str = "outputs") -> StackOutputs:
        """The typed outputs from `terraform output -json` (each value wrapped in {"value": ...}, with its
        type and sensitivity) or from a plain {name: value} object."""
        if not isinstance(raw, dict):
            raise OutputsError(f"{source}: expected a JSON object of outputs, got {type(raw).__name__}")
        flat = {k: (v["value"] if isinstance(v, dict) and "value" in v else v) for k, v in raw.items()}
        return cls.from_mapping(flat, source)

    @classmethod
    def from_file(cls, path: Path) -> StackOutputs:
        """Read a file holding `terraform output -json` (or a plain {name: value} object)."""
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise OutputsError(f"{path}: file not found") from None
        except json.JSONDecodeError as err:
            raise OutputsError(f"{path}: not JSON ({err})") from None
        return cls.from_terraform_json(raw, str(path))


def _required(f: Field[Any]) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


def representative_outputs(env: Environment) -> dict[str, Any]:
    """Outputs shaped like a real apply of `env`, for render and tests, as {name: value}.

    Resource IDs and the account are placeholders; names, region, size and hot tier follow the config
    exactly as the stack would. Keys are the contract's fields for the size's hot tier (a test keeps them
    equal to the synthesized stack's outputs).
    """
    name = cluster_name(env.name)
    region = env.region
    account = EXAMPLE_ACCOUNT
    workspace = "ws-00000000-0000-4000-8000-000000000000"
    amp = f"https://aps-workspaces.{region}.amazonaws.com/workspaces/{workspace}/"
    size = env.size_spec
    out: dict[str, Any] = {
        "cluster_name": name,
        "cluster_endpoint": f"https://{'0' * 32}.gr7.{region}.eks.amazonaws.com",
        "cluster_arn": f"arn:aws:eks:{region}:{account}:cluster/{name}",
        "cluster_oidc_issuer": f"https://oidc.eks.{region}.amazonaws.com/id/{'0' * 32}",
        "cluster_security_group_id": "sg-00000000000000000",
        "system_node_group": f"{name}-system",
        "gpu_node_group": f"{name}-gpu",
        "vpc_id": "vpc-00000000000000000",
        "private_subnet_ids": ["subnet-00000000000000001", "subnet-00000000000000002"],
        "public_subnet_ids": ["subnet-00000000000000003", "subnet-00000000000000004"],
        "deployment_size": env.size.value,
        "models_bucket": f"{name}-models-00000000000000000000000000",
        "models_prefix": MODELS_PREFIX,
        "models_kms_key_arn": f"arn:aws:kms:{region}:{account}:key/00000000-0000-4000-8000-000000000001",
        "access_log_bucket": f"{name}-access-logs-00000000000000000000000000",
        "volume_kms_key_arn": f"arn:aws:kms:{region}:{account}:key/00000000-0000-4000-8000-000000000002",
        "ecr_repository_url": f"{account}.dkr.ecr.{region}.amazonaws.com/{name}/moe-runtime",
        "amp_workspace_id": workspace,
        "amp_remote_write_url": f"{amp}api/v1/remote_write",
        "amp_query_url": f"{amp}api/v1/query",
        "alerts_topic_arn": f"arn:aws:sns:{region}:{account}:{name}-alerts",
        "runtime_role_arn": f"arn:aws:iam::{account}:role/{name}-runtime",
        "prediction_table": prediction_table_name(env.name),
        "hot_tier_kind": size.storage.hot_kind.value,
        "region": region,
    }
    if size.storage.hot_kind is HotTierKind.FSX_LUSTRE:
        out |= {
            "fsx_file_system_id": "fs-00000000000000000",
            "fsx_dns_name": f"fs-00000000000000000.fsx.{region}.amazonaws.com",
            "fsx_mount_name": "abcdefgh",
            "fsx_kms_key_arn": f"arn:aws:kms:{region}:{account}:key/00000000-0000-4000-8000-000000000003",
        }
    return out
