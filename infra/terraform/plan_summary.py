"""Turn `terraform show -json` plan output into a summary a reviewer can act on in ten seconds.

A raw plan for an EKS + FSx + GPU stack runs to hundreds of lines, and the one line that replaces the
FSx file system (the hot tier is lost) or the GPU node group (every replica drains) hides among tag
updates. This module counts changes by resource type and lists, separately, every replace or destroy of
a stateful or disruptive resource together with the attribute that forces it.

Standard library only: the PR-comment job installs the project without extras (no cdktf, no boto3).
"""

from __future__ import annotations

import fnmatch
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

#: Resource types whose replacement or destruction loses data or disrupts serving. Defined once; the CLI,
#: the Markdown, `--fail-on-destroy` and the tests read it. Shell-style patterns (`aws_s3_bucket*` covers
#: the bucket and its versioning / encryption / lifecycle / policy resources).
STATEFUL_RESOURCE_TYPES: tuple[str, ...] = (
    "aws_s3_bucket*",
    "aws_fsx_lustre_file_system",
    "aws_fsx_data_repository_association",
    "aws_kms_key",
    "aws_eks_cluster",
    "aws_eks_node_group",
    "aws_prometheus_workspace",
    "aws_ecr_repository",
    "aws_dynamodb_table",  # the risk service's prediction records
)

#: The one marker the PR workflow searches for, so it updates a single comment instead of adding more.
MARKDOWN_MARKER = "<!-- moefleet-plan-summary -->"

Action = Literal["create", "update", "replace", "destroy"]
ACTIONS: tuple[Action, ...] = ("create", "update", "replace", "destroy")

_ACTIONS_BY_TERRAFORM: dict[tuple[str, ...], Action | None] = {
    ("no-op",): None,
    ("read",): None,
    ("create",): "create",
    ("update",): "update",
    ("delete",): "destroy",
    ("delete", "create"): "replace",
    ("create", "delete"): "replace",
}

_REASONS = {
    "replace_because_tainted": "the resource is tainted",
    "replace_because_cannot_update": "an attribute cannot be updated in place",
    "replace_by_request": "replacement was requested (-replace)",
    "replace_by_triggers": "replace_triggered_by changed",
    "delete_because_no_resource_config": "removed from the configuration",
    "delete_because_no_module": "its module was removed",
    "delete_because_wrong_repetition": "count/for_each changed shape",
    "delete_because_count_index": "count shrank",
    "delete_because_each_key": "its for_each key was removed",
}

_VALUE_WIDTH = 60


class PlanError(ValueError):
    """The input is not a usable Terraform plan; the message names the file and the problem."""


def is_stateful(resource_type: str) -> bool:
    """True when replacing or destroying this type loses data or disrupts serving."""
    return any(fnmatch.fnmatchcase(resource_type, pattern) for pattern in STATEFUL_RESOURCE_TYPES)


@dataclass(frozen=True)
class ResourceChange:
    """One resource that Terraform will change, reduced to what a reviewer needs."""

    address: str
    type: str
    action: Action
    #: Attributes that force a replacement (`replace_paths`), or those that change when Terraform gave none.
    forced_by: tuple[str, ...] = ()
    #: "attribute: before → after" for each of `forced_by`, values shortened.
    details: tuple[str, ...] = ()
    reason: str | None = None

    @property
    def stateful(self) -> bool:
        return is_stateful(self.type)

    @property
    def risky(self) -> bool:
        """A replace or destroy of a stateful type: what `--fail-on-destroy` refuses."""
        return self.stateful and self.action in ("replace", "destroy")


@dataclass
class PlanSummary:
    """One environment's plan: counts per type and action, and the risky changes."""

    environment: str
    changes: list[ResourceChange] = field(default_factory=list)

    def counts(self) -> dict[str, Counter[str]]:
        by_type: dict[str, Counter[str]] = {}
        for change in self.changes:
            by_type.setdefault(change.type, Counter())[change.action] += 1
        return dict(sorted(by_type.items()))

    def totals(self) -> Counter[str]:
        return Counter(change.action for change in self.changes)

    @property
    def risky(self) -> list[ResourceChange]:
        return [change for change in self.changes if change.risky]


# ---- reading ----------------------------------------------------------------------------------------


def load_plan(path: Path | str) -> dict[str, Any]:
    """Read and check a `terraform show -json <planfile>` document; PlanError says what is wrong with it."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise PlanError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise PlanError(f"{path}: cannot read: {err}") from None
    return parse_plan(text, source=str(path))


def parse_plan(text: str, source: str = "<plan>") -> dict[str, Any]:
    """Parse plan JSON text and check it is a plan (not a state, not some other JSON)."""
    if not text.strip():
        raise PlanError(f"{source}: empty file; expected the output of `terraform show -json <planfile>`")
    try:
        plan = json.loads(text)
    except json.JSONDecodeError as err:
        raise PlanError(f"{source}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    if not isinstance(plan, dict):
        raise PlanError(f"{source}: expected a JSON object at the top level, found {type(plan).__name__}")
    if "format_version" not in plan:
        raise PlanError(f"{source}: no 'format_version'; this is not `terraform show -json` output")
    if "resource_changes" not in plan and "planned_values" not in plan:
        hint = " (this is a state; pass a saved plan: `terraform show -json tfplan`)" if "values" in plan else ""
        raise PlanError(f"{source}: no 'resource_changes' or 'planned_values': not a Terraform plan{hint}")
    changes = plan.get("resource_changes", [])
    if not isinstance(changes, list):
        raise PlanError(f"{source}: 'resource_changes' must be a list, found {type(changes).__name__}")
    return plan


def environment_name(plan: dict[str, Any], fallback: str) -> str:
    """The stack's environment from the AWS provider's default tags (every stack sets `environment`)."""
    try:
        aws = plan["configuration"]["provider_config"]["aws"]["expressions"]
        tags = aws["default_tags"][0]["tags"]["constant_value"]
        name = tags["environment"]
    except (KeyError, IndexError, TypeError):
        return fallback
    return name if isinstance(name, str) and name else fallback


def summarize(plan: dict[str, Any], environment: str, source: str = "<plan>") -> PlanSummary:
    """Reduce a checked plan to its changes; no-ops and data-source reads are left out."""
    summary = PlanSummary(environment)
    for index, raw in enumerate(plan.get("resource_changes") or []):
        change = _resource_change(raw, f"{source}: resource_changes[{index}]")
        if change is not None:
            summary.changes.append(change)
    return summary


def _resource_change(raw: Any, where: str) -> ResourceChange | None:
    if not isinstance(raw, dict) or not isinstance(raw.get("change"), dict):
        raise PlanError(f"{where}: expected an object with a 'change' object")
    if raw.get("mode", "managed") != "managed":
        return None
    address, rtype = raw.get("address"), raw.get("type")
    actions = raw["change"].get("actions")
    if not isinstance(address, str) or not isinstance(rtype, str) or not isinstance(actions, list):
        raise PlanError(f"{where}: needs string 'address' and 'type' and a list 'change.actions'")
    try:
        action = _ACTIONS_BY_TERRAFORM[tuple(actions)]
    except (KeyError, TypeError):
        raise PlanError(f"{where} ({address}): unknown actions {actions!r}") from None
    if action is None:
        return None
    forced_by, details = _forcing_attributes(raw["change"], action)
    reason = _REASONS.get(raw.get("action_reason", ""), raw.get("action_reason"))
    return ResourceChange(address, rtype, action, forced_by, details, reason)


def _forcing_attributes(change: dict[str, Any], action: Action) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """For a replace, the paths Terraform says force it; when it gives none, the top-level attributes
    that differ (what a reviewer would look for anyway). Nothing for creates and destroys."""
    if action not in ("replace", "update"):
        return (), ()
    paths = [p for p in change.get("replace_paths") or [] if isinstance(p, list) and p]
    if not paths or action == "update":
        paths = [[key] for key in _changed_keys(change)]
    names = tuple(_path_name(p) for p in paths)
    details = tuple(
        f"{name}: {_value_at(change, path, 'before')} → {_value_at(change, path, 'after')}"
        for name, path in zip(names, paths, strict=True)
    )
    return names, details


def _changed_keys(change: dict[str, Any]) -> list[str]:
    before = change.get("before") if isinstance(change.get("before"), dict) else {}
    after = change.get("after") if isinstance(change.get("after"), dict) else {}
    unknown = change.get("after_unknown") if isinstance(change.get("after_unknown"), dict) else {}
    keys = sorted(set(before) | set(after))
    # Attributes that become "known after apply" are mostly computed ids; list them only if they were set.
    return [k for k in keys if before.get(k) != after.get(k) and not (unknown.get(k) and before.get(k) is None)]


def _path_name(path: list[Any]) -> str:
    name = ""
    for step in path:
        name += f"[{step}]" if isinstance(step, int) else (f".{step}" if name else str(step))
    return name


def _value_at(change: dict[str, Any], path: list[Any], side: Literal["before", "after"]) -> str:
    """The value at `path`, shortened; masked when sensitive; '(known after apply)' when unknown."""
    if _lookup(change.get(f"{side}_sensitive"), path) is True:
        return "(sensitive)"
    if side == "after" and _lookup(change.get("after_unknown"), path) is True:
        return "(known after apply)"
    value = _lookup(change.get(side), path)
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= _VALUE_WIDTH else text[: _VALUE_WIDTH - 1] + "…"


def _lookup(value: Any, path: list[Any]) -> Any:
    for step in path:
        if isinstance(value, dict) and isinstance(step, str):
            value = value.get(step)
        elif isinstance(value, list) and isinstance(step, int) and 0 <= step < len(value):
            value = value[step]
        else:
            return None
    return value


# ---- rendering ----------------------------------------------------------------------------------------


def _headline(summary: PlanSummary) -> str:
    totals = summary.totals()
    return ", ".join(f"{totals[a]} to {a}" for a in ACTIONS)


def render_text(summaries: list[PlanSummary]) -> str:
    """Plain text for a terminal or a CI log."""
    lines: list[str] = []
    for summary in summaries:
        lines.append(f"Environment {summary.environment}: {_headline(summary)}")
        counts = summary.counts()
        if not counts:
            lines.append("  No changes.")
        else:
            width = max(len("resource type"), *(len(t) for t in counts))
            lines.append(f"  {'resource type':<{width}}  " + " ".join(f"{a:>7}" for a in ACTIONS))
            for rtype, counter in counts.items():
                lines.append(f"  {rtype:<{width}}  " + " ".join(f"{counter[a]:>7}" for a in ACTIONS))
        risky = summary.risky
        if risky:
            lines.append(f"  !! {len(risky)} stateful or disruptive resource(s) replaced or destroyed:")
            for change in risky:
                lines.append(f"  !! {change.action.upper()} {change.address}{_why_text(change)}")
                lines.extend(f"       {detail}" for detail in change.details)
        elif counts:
            lines.append("  No stateful or disruptive resource is replaced or destroyed.")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _why_text(change: ResourceChange) -> str:
    parts = []
    if change.forced_by:
        parts.append("forced by " + ", ".join(change.forced_by))
    if change.reason:
        parts.append(change.reason)
    return f" ({'; '.join(parts)})" if parts else ""


def render_markdown(summaries: list[PlanSummary]) -> str:
    """Markdown for one PR comment; starts with MARKDOWN_MARKER so the workflow can find and update it."""
    risky_total = sum(len(s.risky) for s in summaries)
    lines = [MARKDOWN_MARKER, "## Terraform plan summary", ""]
    if risky_total:
        lines += [
            f"> [!CAUTION]\n> **{risky_total} stateful or disruptive resource(s) will be replaced or destroyed.** "
            "Check the attributes that force it before merging.",
            "",
        ]
    for summary in summaries:
        lines += _markdown_environment(summary)
    return "\n".join(lines).rstrip() + "\n"


def _markdown_environment(summary: PlanSummary) -> list[str]:
    totals = summary.totals()
    headline = " · ".join(
        f"**{totals[a]} {a}**" if a in ("replace", "destroy") and totals[a] else f"{totals[a]} {a}" for a in ACTIONS
    )
    lines = [f"### `{summary.environment}`: {headline}", ""]
    risky = summary.risky
    if risky:
        lines += ["| action | resource | forced by |", "|---|---|---|"]
        for change in risky:
            why = "<br>".join(f"`{_md_escape(d)}`" for d in change.details) or _md_escape(change.reason or "")
            if change.details and change.reason:
                why += f"<br>{_md_escape(change.reason)}"
            lines.append(f"| :warning: **{change.action}** | `{change.address}` | {why} |")
        lines.append("")
    counts = summary.counts()
    if not counts:
        return [*lines, "No changes.", ""]
    if not risky:
        lines += ["No stateful or disruptive resource is replaced or destroyed.", ""]
    lines += [
        "<details><summary>Changes by resource type</summary>",
        "",
        "| resource type | " + " | ".join(ACTIONS) + " |",
        "|---|" + "---:|" * len(ACTIONS),
    ]
    for rtype, counter in counts.items():
        lines.append(f"| `{rtype}` | " + " | ".join(str(counter[a] or "") for a in ACTIONS) + " |")
    return [*lines, "", "</details>", ""]


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("`", "'")


def render(summaries: list[PlanSummary], fmt: Literal["text", "markdown"]) -> str:
    return render_markdown(summaries) if fmt == "markdown" else render_text(summaries)
