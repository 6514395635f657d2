"""The stack outputs the installer needs, checked before anything is rendered or applied.

After `cdktf deploy <env>` they come from `terraform output -json` in the stack's folder (or from a JSON
file, `--outputs`). Environments that were never applied get *representative* outputs built from their
validated config: same keys, values in the formats AWS returns, placeholder account and IDs. Tests
check that the representative keys are exactly the synthesized stack's outputs, so the two cannot drift.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from infra.sizes import HotTierKind, SizeName

#: Placeholder account of representative outputs (the AWS documentation's example account).
EXAMPLE_ACCOUNT = "123456789012"


class OutputsError(ValueError):
    """Stack outputs are missing or malformed; the message names the output, the value and what is allowed."""


@dataclass(frozen=True)
class StackOutputs:
    """The subset of `stacks/environment_stack.py` outputs that the Kubernetes objects use."""

    cluster_name: str
    cluster_endpoint: str
    cluster_arn: str
    region: str
    deployment_size: str
    models_bucket: str
    models_prefix: str
    models_kms_key_arn: str
    volume_kms_key_arn: str
    ecr_repository_url: str
    amp_workspace_id: str
    amp_remote_write_url: str
    amp_query_url: str
    alerts_topic_arn: str
    runtime_role_arn: str
    hot_tier_kind: str
    fsx_file_system_id: str | None = None
    fsx_dns_name: str | None = None
    fsx_mount_name: str | None = None

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

    @classmethod
    def from_mapping(cls, data: dict[str, Any], source: str = "outputs") -> StackOutputs:
        """Validate every field at once and raise one OutputsError listing each problem."""
        problems: list[str] = []
        values: dict[str, Any] = {}
        for f in fields(cls):
            value = data.get(f.name)
            required = not f.name.startswith("fsx_")  # FSx outputs exist for the FSx hot tier only
            if value is None:
                if required:
                    problems.append(f"{f.name}: missing")
                continue
            if not isinstance(value, str) or not value:
                problems.append(f"{f.name} = {value!r}: expected a non-empty string")
                continue
            values[f.name] = value
        size = values.get("deployment_size")
        if size is not None and size not in {s.value for s in SizeName}:
            problems.append(f"deployment_size = {size!r}: allowed: {', '.join(s.value for s in SizeName)}")
        kind = values.get("hot_tier_kind")
        if kind is not None and kind not in {k.value for k in HotTierKind}:
            problems.append(f"hot_tier_kind = {kind!r}: allowed: {', '.join(k.value for k in HotTierKind)}")
        if kind == HotTierKind.FSX_LUSTRE.value:
            problems += [
                f"{name}: missing (hot_tier_kind = {kind!r} needs it)"
                for name in ("fsx_file_system_id", "fsx_dns_name", "fsx_mount_name")
                if name not in values
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
    def from_file(cls, path: Path) -> StackOutputs:
        """Read `terraform output -json` (values wrapped in {"value": ...}) or a plain {name: value} file."""
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise OutputsError(f"{path}: file not found") from None
        except json.JSONDecodeError as err:
            raise OutputsError(f"{path}: not JSON ({err})") from None
        if not isinstance(raw, dict):
            raise OutputsError(f"{path}: expected a JSON object of outputs, got {type(raw).__name__}")
        flat = {k: (v["value"] if isinstance(v, dict) and "value" in v else v) for k, v in raw.items()}
        return cls.from_mapping(flat, str(path))


def representative_outputs(env: Any) -> dict[str, Any]:
    """Outputs shaped like a real apply of `env` (an `infra.config.Environment`), for render and tests.

    Resource IDs and the account are placeholders; names, region, size and hot tier follow the config
    exactly as the stack would. Keys match `EnvironmentStack._outputs` (a test keeps them equal).
    """
    # As stacks.environment_stack.cluster_name (not imported: that module loads the cdktf bindings, ~12 s);
    # tests compare this with the synthesized cluster name.
    name = f"moefleet-{env.name}"
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
        "models_prefix": "models/",  # infra.storage.MODELS_PREFIX (a test keeps them equal)
        "models_kms_key_arn": f"arn:aws:kms:{region}:{account}:key/00000000-0000-4000-8000-000000000001",
        "access_log_bucket": f"{name}-access-logs-00000000000000000000000000",
        "volume_kms_key_arn": f"arn:aws:kms:{region}:{account}:key/00000000-0000-4000-8000-000000000002",
        "ecr_repository_url": f"{account}.dkr.ecr.{region}.amazonaws.com/{name}/moe-runtime",
        "amp_workspace_id": workspace,
        "amp_remote_write_url": f"{amp}api/v1/remote_write",
        "amp_query_url": f"{amp}api/v1/query",
        "alerts_topic_arn": f"arn:aws:sns:{region}:{account}:{name}-alerts",
        "runtime_role_arn": f"arn:aws:iam::{account}:role/{name}-runtime",
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
