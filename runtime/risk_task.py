"""The risk task as configuration: the prompt, the two answer labels, the decision threshold and optional
few-shot examples of one risk-scoring task, read from a TOML or JSON file (or inline JSON).

The runtime reads it from ``--risk-task`` / ``$MOE_RISK_TASK``; the infrastructure validates the same model
when it loads ``environments.toml`` and renders the task, as JSON, into the pods' ConfigMap. It depends on
pydantic and the standard library only, so the infrastructure tooling can import it without torch.

A task is checked twice: here for its shape (every field named, with the value and what is allowed), and
at start-up against the served checkpoint's tokenizer (each label must be exactly one token, the two
different: the score is P(positive) / (P(positive) + P(negative)) over those two next tokens).
"""

from __future__ import annotations

import json
import string
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

FeatureValue = str | int | float | bool


class RiskTaskError(ValueError):
    """A task definition that cannot be used; the message names the source, the field and the value."""


def _fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]


class FewShotExample(BaseModel):
    """A solved case shown before the scored one: its features and whether it is the positive class."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    features: Annotated[dict[str, FeatureValue], Field(min_length=1)]
    positive: bool


class RiskTask(BaseModel):
    """One risk-scoring task. The defaults are the e-commerce fraud task of the source document."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")]
    #: The prompt; ``{features}`` is replaced by one ``feature_line`` per feature, in the caller's order.
    template: str = "Order features:\n{features}Is this transaction a fraud risk? Answer yes or no. The answer is"
    #: How one feature is written; ``{name}`` and ``{value}`` (booleans as true/false).
    feature_line: str = "{name}: {value}\n"
    #: The next token meaning "positive class" / "negative class" (each exactly one token of the tokenizer).
    positive_label: Annotated[str, Field(min_length=1)] = " yes"
    negative_label: Annotated[str, Field(min_length=1)] = " no"
    #: The label the API returns for a score at or above / below the threshold.
    positive_class: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,32}$")] = "fraud"
    negative_class: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,32}$")] = "legit"
    threshold: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.5
    #: Solved cases rendered before the scored one (the prompt, then the answer label), separated by
    #: ``example_separator``.
    examples: Annotated[list[FewShotExample], Field(max_length=16)] = []
    example_separator: str = "\n\n"

    @field_validator("template")
    @classmethod
    def _template(cls, value: str) -> str:
        try:
            names = _fields(value)
        except ValueError as err:
            raise ValueError(f"not a format string ({err})") from None
        if names != ["features"]:
            raise ValueError("expected exactly one '{features}' placeholder and no other (write '{{' for a brace)")
        return value

    @field_validator("feature_line")
    @classmethod
    def _feature_line(cls, value: str) -> str:
        try:
            names = _fields(value)
        except ValueError as err:
            raise ValueError(f"not a format string ({err})") from None
        if not set(names) <= {"name", "value"} or "value" not in names:
            raise ValueError("expected '{value}' and optionally '{name}', no other placeholder")
        return value

    @model_validator(mode="after")
    def _distinct(self) -> RiskTask:
        if self.positive_label == self.negative_label:
            raise ValueError(f"positive_label and negative_label are both {self.positive_label!r}; they must differ")
        if self.positive_class == self.negative_class:
            raise ValueError(f"positive_class and negative_class are both {self.positive_class!r}; they must differ")
        return self

    # ---- rendering ---------------------------------------------------------------------------------

    def render_features(self, features: Mapping[str, object]) -> str:
        return "".join(self.feature_line.format(name=k, value=_fmt(v)) for k, v in features.items())

    def render(self, features: Mapping[str, object]) -> str:
        """The scored prompt: the few-shot examples (each answered), then this case, ending where the model
        should say one of the two labels."""
        shots = "".join(
            self._one(ex.features)
            + (self.positive_label if ex.positive else self.negative_label)
            + self.example_separator
            for ex in self.examples
        )
        return shots + self._one(features)

    def _one(self, features: Mapping[str, object]) -> str:
        return self.template.format(features=self.render_features(features))

    def classify(self, score: float) -> str:
        return self.positive_class if score >= self.threshold else self.negative_class

    def to_json(self) -> str:
        """Compact JSON of the whole definition (what the ConfigMap carries)."""
        return self.model_dump_json()


def _fmt(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _problems(err: ValidationError) -> str:
    out = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e.get("loc", ())) or "task"
        shown = "" if isinstance(e.get("input"), dict | list) else f" = {e.get('input')!r}"
        out.append(f"{loc}{shown}: {e.get('msg')}")
    return "; ".join(out)


def parse_task(data: Any, source: str) -> RiskTask:
    """A validated task from already-parsed data; RiskTaskError naming every bad field otherwise."""
    if not isinstance(data, dict):
        raise RiskTaskError(f"{source}: expected a table/object with the task's fields, got {type(data).__name__}")
    try:
        return RiskTask.model_validate(data)
    except ValidationError as err:
        raise RiskTaskError(f"{source}: invalid risk task: {_problems(err)}") from None


def load_task(spec: str, base: Path | None = None) -> RiskTask:
    """``spec`` is inline JSON (starting with ``{``) or a path to a ``.toml`` / ``.json`` file (relative
    paths against ``base`` when given)."""
    text = spec.strip()
    if text.startswith("{"):
        try:
            return parse_task(json.loads(text), "inline risk task")
        except json.JSONDecodeError as err:
            raise RiskTaskError(f"inline risk task: not valid JSON ({err})") from None
    path = Path(text)
    if base is not None and not path.is_absolute():
        path = base / path
    if path.suffix not in (".toml", ".json"):
        raise RiskTaskError(f"risk task {spec!r}: expected a .toml or .json file, or inline JSON")
    try:
        raw = path.read_text()
    except FileNotFoundError:
        raise RiskTaskError(f"risk task {str(path)!r}: file not found") from None
    except OSError as err:
        raise RiskTaskError(f"risk task {str(path)!r}: cannot read ({err.strerror})") from None
    try:
        data = tomllib.loads(raw) if path.suffix == ".toml" else json.loads(raw)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
        raise RiskTaskError(f"{path}: not valid {path.suffix[1:].upper()} ({err})") from None
    return parse_task(data, str(path))
