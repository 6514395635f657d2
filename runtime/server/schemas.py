"""Request and response bodies (pydantic): the OpenAI subset we serve, the risk case, errors.

The bounds here are the first line of defence against bad input: anything outside them is a 400 that
names the field, before it reaches the engine. They also bound the OpenAPI schema that schemathesis
fuzzes. The generation requests refuse fields they do not know (OpenAI's answer to an unrecognized
argument), so a feature this server lacks - tools, structured output, penalties - is a 400 naming it,
never a 200 that silently ignored it; a field set to its no-op value (``tools: []``,
``response_format: {"type": "text"}``, ``presence_penalty: 0``, or null) is accepted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

Stop = str | Annotated[list[str], Field(max_length=4)] | None
FinishReason = Literal["stop", "length", "abort"]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorBody


class StreamOptions(BaseModel):
    include_usage: bool = False


def _off(*values: object) -> Callable[[object], bool]:
    return lambda v: v in values


def _empty(v: object) -> bool:
    return not v


def _text_format(v: object) -> bool:
    return isinstance(v, dict) and v.get("type") == "text" and set(v) == {"type"}


#: OpenAI request fields this server does not implement: why, and which values are no-ops it accepts.
UNSUPPORTED: dict[str, tuple[str, Callable[[object], bool]]] = {
    "tools": ("tool calling is not supported", _empty),
    "tool_choice": ("tool calling is not supported", _off("none")),
    "parallel_tool_calls": ("tool calling is not supported", _off(True, False)),
    "tool_calls": ("tool calling is not supported", _empty),
    "refusal": ("an assistant message's refusal is not supported", _empty),
    "functions": ("function calling is not supported", _empty),
    "function_call": ("function calling is not supported", _off("none")),
    "response_format": ("only plain text output is supported (response_format type 'text')", _text_format),
    "logit_bias": ("logit_bias is not supported", _empty),
    "frequency_penalty": ("penalties are not supported; only 0 is accepted", _off(0)),
    "presence_penalty": ("penalties are not supported; only 0 is accepted", _off(0)),
    "repetition_penalty": ("penalties are not supported; only 1 is accepted", _off(1)),
    "best_of": ("best_of is not supported; use n", _off(1)),
    "echo": ("echo is not supported", _off(False)),
    "suffix": ("suffix (insertion) is not supported", _off("")),
    "store": ("stored completions are not supported", _off(False)),
    "metadata": ("metadata is only stored with store, which is not supported", _empty),
    "modalities": ("only text output is supported", _off(["text"])),
    "audio": ("audio output is not supported", _empty),
    "prediction": ("predicted outputs are not supported", _empty),
    "reasoning_effort": ("reasoning_effort is not supported", _empty),
    "service_tier": ("service tiers are not supported", _off("auto", "default")),
    "web_search_options": ("web search is not supported", _empty),
}


def _no_op(field: str, value: object) -> bool:
    return value is None or UNSUPPORTED[field][1](value)


class _Strict(BaseModel):
    """Unknown fields are refused (400 naming them); :data:`UNSUPPORTED` fields that are null or hold their
    no-op value are dropped first."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _drop_no_ops(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        known = cls.model_fields
        return {k: v for k, v in data.items() if k in known or k not in UNSUPPORTED or not _no_op(k, v)}


class _SamplingFields(_Strict):
    model: str | None = Field(None, max_length=256, description="must be the served model's id if given")
    temperature: float | None = Field(1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=1_000_000, description="vLLM extension; 0 disables")
    n: int = Field(1, ge=1, le=8)
    stop: Stop = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(False, description="vLLM extension: keep generating past EOS")
    user: str | None = Field(None, max_length=256)


class CompletionRequest(_SamplingFields):
    prompt: (
        str
        | Annotated[list[str], Field(min_length=1, max_length=32)]
        | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
    )
    max_tokens: int | None = Field(16, ge=1, description="default 16; null: up to the context length")
    logprobs: int | None = Field(
        None,
        ge=0,
        le=5,
        description="log-probabilities of each generated token and of this many most likely tokens "
        "(the model's distribution before temperature, top-k and top-p)",
    )


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=256)]
    max_tokens: int | None = Field(None, ge=1, description="null: up to the context length")
    max_completion_tokens: int | None = Field(None, ge=1, description="preferred over max_tokens")
    logprobs: bool | None = Field(
        False,
        description="return each generated token's log-probability (the model's distribution before "
        "temperature, top-k and top-p)",
    )
    top_logprobs: int | None = Field(
        None, ge=0, le=20, description="with logprobs: also this many most likely tokens at each position"
    )


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason | None
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "moe-fleet"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


FeatureName = Annotated[str, StringConstraints(min_length=1, max_length=64)]
FeatureValue = Annotated[str, StringConstraints(max_length=128)] | int | float | bool
RequestId = Annotated[str, StringConstraints(min_length=1, max_length=128)]

_EXAMPLE_FEATURES = {
    "amount": 1250.0,
    "device_age_days": 1,
    "ip_country": "US",
    "card_country": "NG",
    "new_email": True,
}

RISK_DESCRIPTION = """Scores one transaction with the configured risk task: its features are rendered into the
task's prompt and the score is P(positive label) / (P(positive) + P(negative)) of the model's next token.
`label` is the task's positive class at or above its threshold, else its negative class. Factors are the
features ranked by leave-one-out impact. Each prediction is stored under `request_id` (give your own to join
feedback later, or use the one returned) in a store shared by every replica.

503 `risk_disabled`: no usable risk task is configured (the message says why); the OpenAI routes still serve.
409 `already_labelled`: that `request_id` already carries a ground-truth label."""

FEEDBACK_DESCRIPTION = """Joins the ground truth to a stored prediction by `request_id`, on any replica,
exactly once. Each labelled prediction counts in `moe_risk_labelled_total` / `moe_risk_correct_total`, from
which the fleet's accuracy over a window is computed and compared with the baseline (the accuracy-drift
alert).

404 `not_found`: no prediction with that id. 409 `already_labelled`: labels are final. 503
`store_unavailable`: the prediction store cannot be reached; nothing was recorded, retry later."""


class RiskRequest(BaseModel):
    """A transaction to score."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"features": _EXAMPLE_FEATURES, "request_id": "order-20261206-0042"}]}
    )

    features: Annotated[dict[FeatureName, FeatureValue], Field(min_length=1, max_length=32)] = Field(
        description="1-32 named features (string ≤ 128 chars, number or boolean), rendered in this order",
        examples=[_EXAMPLE_FEATURES],
    )
    request_id: RequestId | None = Field(
        None,
        description="your id for this prediction (1-128 chars), the key feedback joins on; default: a new one",
        examples=["order-20261206-0042"],
    )


class RiskFactor(BaseModel):
    name: str = Field(description="the feature's name", examples=["card_country"])
    value: FeatureValue = Field(description="the feature's value as sent", examples=["NG"])
    impact: float = Field(description="risk_score minus the score without this feature (> 0: raises the risk)")


class RiskResponse(BaseModel):
    """A risk score, its class and the features that drove it."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "request_id": "order-20261206-0042",
                    "model": "deepseek-v2-lite",
                    "task": "fraud",
                    "risk_score": 0.83,
                    "label": "fraud",
                    "threshold": 0.5,
                    "factors": [
                        {"name": "card_country", "value": "NG", "impact": 0.21},
                        {"name": "device_age_days", "value": 1, "impact": 0.12},
                    ],
                }
            ]
        }
    )

    request_id: str = Field(description="the key to send feedback with")
    model: str = Field(description="the served model's id")
    task: str = Field(description="the risk task's name", examples=["fraud"])
    risk_score: float = Field(ge=0.0, le=1.0, description="P(positive class), in [0, 1]")
    label: str = Field(
        description="the task's positive class (score ≥ threshold) or negative class", examples=["fraud"]
    )
    threshold: float = Field(description="the task's decision threshold", examples=[0.5])
    factors: list[RiskFactor] = Field(description="every input feature, largest |impact| first")


class FeedbackRequest(BaseModel):
    """The ground truth for an earlier prediction."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"request_id": "order-20261206-0042", "label": True}]})

    request_id: RequestId = Field(description="the prediction's request_id", examples=["order-20261206-0042"])
    label: bool | Literal[0, 1] = Field(
        description="ground truth: true/1 = the task's positive class (fraud), false/0 = negative", examples=[True]
    )


class FeedbackResponse(BaseModel):
    """Whether the prediction was right, and this replica's rolling accuracy."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "request_id": "order-20261206-0042",
                    "correct": True,
                    "rolling_accuracy": 0.92,
                    "labelled": 500,
                    "baseline": 0.9,
                }
            ]
        }
    )

    request_id: str = Field(description="the labelled prediction's request_id")
    correct: bool = Field(description="the predicted class matched the ground truth")
    rolling_accuracy: float = Field(
        description="this replica's accuracy over its last labels (the fleet's is computed in Prometheus)"
    )
    labelled: int = Field(description="labels in this replica's rolling window")
    baseline: float | None = Field(description="the configured reference accuracy, if any")


class Health(BaseModel):
    status: str
