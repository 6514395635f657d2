"""Request and response bodies (pydantic): the OpenAI subset we serve, the risk case, errors.

The bounds here are the first line of defence against bad input: anything outside them is a 422 that
names the field, before it reaches the engine. They also bound the OpenAPI schema that schemathesis
fuzzes.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

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


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

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


class ChatMessage(BaseModel):
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


class RiskRequest(BaseModel):
    features: Annotated[dict[FeatureName, FeatureValue], Field(min_length=1, max_length=32)]
    request_id: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = None


class RiskFactor(BaseModel):
    name: str
    value: FeatureValue
    impact: float = Field(description="risk_score minus the score without this feature")


class RiskResponse(BaseModel):
    request_id: str
    model: str
    risk_score: float = Field(ge=0.0, le=1.0)
    label: Literal["fraud", "legit"]
    factors: list[RiskFactor]


class FeedbackRequest(BaseModel):
    request_id: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    label: bool | Literal[0, 1] = Field(description="ground truth: true/1 = fraud")


class FeedbackResponse(BaseModel):
    request_id: str
    correct: bool
    rolling_accuracy: float
    labelled: int
    baseline: float | None


class Health(BaseModel):
    status: str
