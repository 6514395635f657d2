"""Environments: `stacks/environments.toml` loaded and validated before anything touches AWS.

Every problem is reported in one error that names the environment, the field, the value and what is
allowed, so a typo in a pull request fails in `cdktf synth` rather than halfway through an apply.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from infra.catalog import names
from infra.catalog.names import (
    DEFAULT_ENVIRONMENTS_FILE,
    DEFAULT_REVISION,
    DEFAULT_RISK_TASK_FILE,
    REPOSITORY_ROOT,
    model_name_problem,
    model_revision_problem,
)
from infra.catalog.sizes import (
    CAPACITY_BLOCK_INSTANCE_TYPES,
    INSTANCE_TYPES,
    SIZES,
    InstanceType,
    ModelRef,
    Size,
    SizeName,
    SizeRequirementError,
    allowed_instance_types,
    check_instance_type,
)
from infra.catalog.thresholds import Thresholds
from runtime import contract
from runtime.risk_task import RiskTask, RiskTaskError, load_task

#: EKS versions the stacks are written and tested for (standard support as of 2026-11).
SUPPORTED_KUBERNETES_VERSIONS = ("1.31", "1.32", "1.33", "1.34")
_REGION = re.compile(r"^[a-z]{2}(-gov)?-[a-z]+-\d$")
_CAPACITY_RESERVATION = re.compile(r"^cr-[0-9a-f]{8,17}$")
_CAPACITY_BLOCK = re.compile(r"^cr-[0-9a-f]{8}([0-9a-f]{9})?$")
_TAG_KEY = re.compile(r"^[\w .:/=+\-@]{1,128}$")


class ConfigError(ValueError):
    """environments.toml is invalid; the message lists every problem found."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class StateBackend(Strict):
    """Where terraform keeps this environment's state."""

    kind: Literal["local", "s3"]
    bucket: str | None = None
    key: str | None = None
    region: str | None = None

    @model_validator(mode="after")
    def _s3_needs_bucket(self) -> StateBackend:
        if self.kind == "s3" and not (self.bucket and self.key):
            raise ValueError("backend kind 's3' needs 'bucket' and 'key'")
        return self


class NodeCounts(Strict):
    """GPU node group scaling. min 0 allows scale-to-zero; desired is what the first apply creates."""

    min: int = Field(0, ge=0, le=64)
    desired: int | None = Field(None, ge=0, le=64)
    max: int | None = Field(None, ge=1, le=64)


class Overrides(Strict):
    instance_type: str | None = None
    gpu_nodes: NodeCounts = NodeCounts()
    capacity_reservation_id: str | None = None
    #: A Capacity Block for ML (a capacity reservation of type `capacity-block`): the GPU node group becomes
    #: `capacity_type = "CAPACITY_BLOCK"` and its launch template targets the block.
    capacity_block_id: str | None = None
    #: Cluster placement group for the GPU pool. Default: on for the large size, except with a capacity
    #: reservation or block (a forced placement group meeting reserved capacity gives insufficient-capacity errors).
    placement_group: bool | None = None
    single_nat_gateway: bool | None = None

    @field_validator("capacity_reservation_id")
    @classmethod
    def _cr_id(cls, value: str | None) -> str | None:
        if value is not None and not _CAPACITY_RESERVATION.match(value):
            raise ValueError("expected an EC2 capacity reservation id like 'cr-0123456789abcdef0'")
        return value

    @field_validator("capacity_block_id")
    @classmethod
    def _cb_id(cls, value: str | None) -> str | None:
        if value is not None and not _CAPACITY_BLOCK.match(value):
            raise ValueError(
                f"expected a capacity block id matching {_CAPACITY_BLOCK.pattern} like 'cr-0123456789abcdef0'"
            )
        return value


class ModelSetting(Strict):
    """The checkpoint the environment serves: `models/<name>/<revision>/` in its cold tier. `name` defaults
    to the size's `default_model`; the same names `moefleet weights upload` accepts."""

    name: str | None = None
    revision: str = DEFAULT_REVISION

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and (problem := model_name_problem(value)):
            raise ValueError(problem)
        return value

    @field_validator("revision")
    @classmethod
    def _revision(cls, value: str) -> str:
        if problem := model_revision_problem(value):
            raise ValueError(problem)
        return value


class RuntimeSettings(Strict):
    """`runtime = { accuracy_baseline, accuracy_window, log_level, risk_task }`: what the runtime's pods are
    started with, rendered into their environment by the names in `runtime.contract`. Without
    `accuracy_baseline` the runtime publishes no baseline and the accuracy-drift alert cannot fire.

    `risk_task` is a task file (TOML or JSON, relative paths from the repository root; default: the shipped
    fraud task) or "" for none (the risk routes then answer 503). It is validated here with the runtime's own
    model and rendered into the ConfigMap as JSON, so the image needs no task file."""

    accuracy_baseline: float | None = None
    accuracy_window: int = contract.DEFAULT_ACCURACY_WINDOW
    log_level: str = contract.DEFAULT_LOG_LEVEL
    risk_task: str = str(DEFAULT_RISK_TASK_FILE.relative_to(REPOSITORY_ROOT))

    @field_validator("risk_task")
    @classmethod
    def _risk_task(cls, value: str) -> str:
        if value:
            try:
                load_task(value, base=REPOSITORY_ROOT)
            except RiskTaskError as err:
                raise ValueError(str(err)) from None
        return value

    def task(self) -> RiskTask | None:
        """The validated risk task, or None when the environment turns it off."""
        return load_task(self.risk_task, base=REPOSITORY_ROOT) if self.risk_task else None

    @field_validator("accuracy_baseline", mode="before")
    @classmethod
    def _baseline(cls, value: Any) -> Any:
        if value is None:
            return value
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
            raise ValueError("expected a number in (0, 1]: the reference accuracy, e.g. 0.9")
        return value

    @field_validator("accuracy_window", mode="before")
    @classmethod
    def _window(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 100_000:
            raise ValueError("expected a whole number of labelled predictions in [1, 100000], e.g. 500")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _log_level(cls, value: Any) -> Any:
        if value not in contract.LOG_LEVELS:
            raise ValueError(f"allowed: {', '.join(contract.LOG_LEVELS)}")
        return value

    def env(self) -> dict[str, str]:
        """The runtime's environment variables for these settings (the baseline only when set)."""
        out = {
            contract.ENV_LOG_LEVEL: self.log_level,
            contract.ENV_ACCURACY_WINDOW: str(self.accuracy_window),
        }
        if self.accuracy_baseline is not None:
            out[contract.ENV_ACCURACY_BASELINE] = repr(float(self.accuracy_baseline))
        if (task := self.task()) is not None:
            out[contract.ENV_RISK_TASK] = task.to_json()
        return out


Cidr = Annotated[str, Field(min_length=9)]


class Environment(Strict):
    """One deployment target: which size, where, and how it is reached."""

    name: str
    size: SizeName
    region: str
    azs: list[str] = Field(min_length=2, max_length=4)
    vpc_cidr: Cidr
    #: Optional explicit subnets (one per AZ each); derived from vpc_cidr when absent.
    public_subnets: list[Cidr] | None = None
    private_subnets: list[Cidr] | None = None
    kubernetes_version: str
    api_access_cidrs: list[Cidr] = Field(default_factory=list)
    public_api_endpoint: bool = False
    tags: dict[str, str] = Field(default_factory=dict)
    state: StateBackend
    overrides: Overrides = Overrides()
    #: `model = { name, revision }` in the file; read it through `model` (a ModelRef with the defaults filled in).
    model_setting: ModelSetting = Field(ModelSetting(), alias="model")
    #: Only for the embedded default: the emulated AWS endpoint (moto server on loopback).
    aws_endpoint: str | None = None
    alarm_email: str | None = None
    #: Per-environment overrides of infra.catalog.thresholds.Thresholds, e.g. { p99_latency_seconds = 0.8 }.
    alert_thresholds: dict[str, float | str] = Field(default_factory=dict)
    #: `runtime = { accuracy_baseline = 0.9, log_level = "info" }`: settings the runtime's pods start with.
    runtime: RuntimeSettings = RuntimeSettings()

    @field_validator("alert_thresholds")
    @classmethod
    def _alert_thresholds(cls, value: dict[str, float | str]) -> dict[str, float | str]:
        Thresholds().with_overrides(value)  # raises naming the threshold, the value and the allowed names
        return value

    @field_validator("region")
    @classmethod
    def _region(cls, value: str) -> str:
        if not _REGION.match(value):
            raise ValueError("expected an AWS region like 'us-east-1'")
        return value

    @field_validator("vpc_cidr")
    @classmethod
    def _vpc_cidr(cls, value: str) -> str:
        net = _network(value)
        if net.prefixlen > 20 or net.prefixlen < 16:
            raise ValueError("the VPC needs a /16 to /20 IPv4 range (room for public and private subnets in each AZ)")
        if not net.is_private:
            raise ValueError("the VPC range must be private (RFC 1918)")
        return value

    @field_validator("api_access_cidrs")
    @classmethod
    def _api_cidrs(cls, values: list[str]) -> list[str]:
        for value in values:
            net = _network(value)
            if net.prefixlen == 0:
                raise ValueError("0.0.0.0/0 would open the cluster API to the internet; list the CIDRs that need it")
        return values

    @field_validator("kubernetes_version")
    @classmethod
    def _k8s(cls, value: str) -> str:
        if value not in SUPPORTED_KUBERNETES_VERSIONS:
            raise ValueError(f"allowed: {', '.join(SUPPORTED_KUBERNETES_VERSIONS)}")
        return value

    @field_validator("tags")
    @classmethod
    def _tags(cls, values: dict[str, str]) -> dict[str, str]:
        for key, value in values.items():
            if not _TAG_KEY.match(key) or key.lower().startswith("aws:") or len(value) > 256:
                raise ValueError(f"tag {key!r}: keys are 1-128 chars, not starting with 'aws:'; values ≤ 256 chars")
        return values

    @model_validator(mode="after")
    def _cross_field(self) -> Environment:
        for az in self.azs:
            if not az.startswith(self.region) or len(az) != len(self.region) + 1:
                raise ValueError(f"azs: {az!r} is not an availability zone of region {self.region!r}")
        if len(set(self.azs)) != len(self.azs):
            raise ValueError(f"azs: duplicates in {self.azs}")
        if self.public_api_endpoint and not self.api_access_cidrs:
            raise ValueError("api_access_cidrs: a public API endpoint needs at least one allowed CIDR")
        if self.overrides.instance_type:
            try:
                check_instance_type(SIZES[self.size], self.overrides.instance_type)
            except SizeRequirementError as err:
                allowed = ", ".join(allowed_instance_types(SIZES[self.size]))
                raise ValueError(f"overrides.instance_type: {err}; allowed for {self.size}: {allowed}") from None
        self._check_capacity()
        counts = self.overrides.gpu_nodes
        if counts.max is not None and counts.min > counts.max:
            raise ValueError(f"overrides.gpu_nodes: min {counts.min} > max {counts.max}")
        if counts.desired is not None and not counts.min <= counts.desired <= (counts.max or 64):
            raise ValueError(f"overrides.gpu_nodes: desired {counts.desired} outside [min, max]")
        vpc = _network(self.vpc_cidr)
        for field_name in ("public_subnets", "private_subnets"):
            explicit = getattr(self, field_name)
            if explicit is None:
                continue
            if len(explicit) != len(self.azs):
                raise ValueError(f"{field_name}: {len(explicit)} CIDRs for {len(self.azs)} AZs; give one per AZ")
            for cidr in explicit:
                if not _network(cidr).subnet_of(vpc):
                    raise ValueError(f"{field_name}: {cidr} is not inside vpc_cidr {self.vpc_cidr}")
        if self.aws_endpoint is not None and not re.match(r"^http://(127\.0\.0\.1|localhost):\d+$", self.aws_endpoint):
            raise ValueError("aws_endpoint: only an emulator on loopback is allowed, like 'http://127.0.0.1:4566'")
        return self

    def _check_capacity(self) -> None:
        block, reservation = self.overrides.capacity_block_id, self.overrides.capacity_reservation_id
        if block and reservation:
            raise ValueError(
                f"overrides.capacity_block_id = {block!r}: cannot be combined with overrides.capacity_reservation_id"
                f" = {reservation!r}; allowed: one of the two (a capacity block is a reservation of its own)"
            )
        if block and self.gpu_instance_type not in CAPACITY_BLOCK_INSTANCE_TYPES:
            raise ValueError(
                f"overrides.capacity_block_id = {block!r}: AWS sells no capacity blocks for {self.gpu_instance_type}"
                f" (size {self.size.value}); allowed instance types: {', '.join(CAPACITY_BLOCK_INSTANCE_TYPES)}"
            )
        if self.overrides.placement_group and not self.size_spec.uses_placement_group:
            multi_node = ", ".join(s.value for s, spec in SIZES.items() if spec.uses_placement_group)
            raise ValueError(
                f"overrides.placement_group = true: size {self.size.value} runs single-node replicas; "
                f"allowed only for sizes with multi-node replicas ({multi_node})"
            )

    # Derived values: one place computes them, every construct reads them.
    @property
    def cluster_name(self) -> str:
        """The EKS cluster's name; it prefixes every other resource name of the environment."""
        return names.cluster_name(self.name)

    @property
    def size_spec(self) -> Size:
        return SIZES[self.size]

    @property
    def model(self) -> ModelRef:
        """The model revision this environment serves, the default of every command that needs one."""
        return ModelRef(self.model_setting.name or self.size_spec.default_model, self.model_setting.revision)

    @property
    def thresholds(self) -> Thresholds:
        return Thresholds().with_overrides(self.alert_thresholds)

    @property
    def emulated(self) -> bool:
        return self.aws_endpoint is not None

    @property
    def gpu_instance_type(self) -> str:
        return self.overrides.instance_type or self.size_spec.default_instance_type

    @property
    def gpu_instance_spec(self) -> InstanceType:
        return INSTANCE_TYPES[self.gpu_instance_type]

    @property
    def gpu_node_counts(self) -> tuple[int, int, int]:
        """(min, desired, max) GPU nodes. Desired defaults to 0: GPU nodes cost money from the first minute,
        the workload scales them up (and the emulator cannot start real instances anyway)."""
        needed = self.size_spec.gpu_nodes(self.gpu_instance_type)
        counts = self.overrides.gpu_nodes
        maximum = counts.max if counts.max is not None else max(needed, 1)
        desired = counts.desired if counts.desired is not None else counts.min
        return counts.min, desired, maximum

    @property
    def gpu_capacity_reservation_id(self) -> str | None:
        """The reservation the GPU launch template targets: a capacity block or an On-Demand reservation."""
        return self.overrides.capacity_block_id or self.overrides.capacity_reservation_id

    @property
    def gpu_capacity_block(self) -> bool:
        return self.overrides.capacity_block_id is not None

    @property
    def gpu_placement_group(self) -> bool:
        """A cluster placement group for the GPU pool: the override, else the size's default unless reserved
        capacity is targeted (AWS places a reservation's instances itself; forcing a group on top of it
        gives insufficient-capacity errors)."""
        if self.overrides.placement_group is not None:
            return self.overrides.placement_group
        return self.size_spec.uses_placement_group and self.gpu_capacity_reservation_id is None

    @property
    def gpu_pool_single_az(self) -> bool:
        """The GPU pool lives in the first AZ only: a placement group and a reservation are each in one AZ."""
        return self.gpu_placement_group or self.gpu_capacity_reservation_id is not None

    @property
    def single_nat_gateway(self) -> bool:
        if self.overrides.single_nat_gateway is not None:
            return self.overrides.single_nat_gateway
        return self.size != SizeName.LARGE

    def subnets(self) -> tuple[list[str], list[str]]:
        """(public, private) subnet CIDRs, one of each per AZ. Private subnets are 4× larger: pods get
        VPC IPs from the CNI and need room; public subnets hold only NAT gateways and load balancers."""
        vpc = _network(self.vpc_cidr)
        quarters = list(vpc.subnets(prefixlen_diff=2))  # 4 quarters of the VPC
        private_pool = list(quarters[0].subnets(prefixlen_diff=1)) + list(quarters[1].subnets(prefixlen_diff=1))
        public_pool = list(quarters[3].subnets(prefixlen_diff=3))
        private = self.private_subnets or [str(net) for net in private_pool[: len(self.azs)]]
        public = self.public_subnets or [str(net) for net in public_pool[: len(self.azs)]]
        return public, private


def _network(value: str) -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Network(value, strict=True)
    except ValueError as err:
        raise ValueError(f"not a valid IPv4 CIDR ({err}); expected e.g. '10.0.0.0/16'") from None


def _check_disjoint(envs: dict[str, Environment]) -> list[str]:
    """Subnets inside one VPC must not overlap (explicit ones by mistake, derived ones never)."""
    problems = []
    for env in envs.values():
        public, private = env.subnets()
        nets = [ipaddress.IPv4Network(c) for c in public + private]
        for i, a in enumerate(nets):
            for b in nets[i + 1 :]:
                if a.overlaps(b):
                    problems.append(f"environment {env.name!r}: subnets {a} and {b} overlap")
    return problems


def _format_error(env_name: str, err: ValidationError, raw: dict[str, Any]) -> list[str]:
    lines = []
    for item in err.errors():
        loc = [str(part) for part in item["loc"]]
        field = ".".join(loc) or "(environment)"
        value: Any = raw
        for part in item["loc"]:
            value = value.get(part) if isinstance(value, dict) else None
        msg = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            msg = "unknown key"
        if item["type"] == "enum":
            msg = f"allowed: {', '.join(s.value for s in SizeName)}"
        shown = f" = {value!r}" if value is not None and not isinstance(value, dict) else ""
        lines.append(f"environment {env_name!r}: field '{field}'{shown}: {msg}")
    return lines


def load_environments(path: Path | str = DEFAULT_ENVIRONMENTS_FILE) -> dict[str, Environment]:
    """Parse and validate every environment; raise one ConfigError listing all problems."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    unknown_top = set(data) - {"environments"}
    problems = [f"unknown top-level key {key!r} (allowed: 'environments')" for key in sorted(unknown_top)]
    raw_envs = data.get("environments")
    if not isinstance(raw_envs, dict) or not raw_envs:
        problems.append("no [environments.<name>] tables found")
        raw_envs = {}
    envs: dict[str, Environment] = {}
    for name, raw in raw_envs.items():
        if not re.match(r"^[a-z][a-z0-9-]{1,20}$", name):
            problems.append(f"environment {name!r}: name must be 2-21 chars of a-z, 0-9, '-', starting with a letter")
            continue
        if not isinstance(raw, dict):
            problems.append(f"environment {name!r}: expected a table")
            continue
        try:
            envs[name] = Environment(name=name, **raw)
        except ValidationError as err:
            problems.extend(_format_error(name, err, raw))
        except TypeError as err:
            problems.append(f"environment {name!r}: {err}")
    problems.extend(_check_disjoint(envs))
    if problems:
        raise ConfigError(f"{path}: {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))
    return envs
