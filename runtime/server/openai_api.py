"""OpenAI-compatible ``/v1/completions``, ``/v1/chat/completions`` and ``/v1/models``.

One HTTP request becomes ``len(prompts) × n`` engine sequences, submitted atomically (all admitted or
a 429/503/400 for the whole request). Every sequence reports into one asyncio queue per request, so a
response (or an SSE stream) is assembled from a single consumer. When the client goes away - stream
closed, or a non-streaming client disconnecting - every unfinished sequence is aborted and its KV blocks
return to the pool on the next engine step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from runtime import contract as c
from runtime.detokenize import IncrementalText
from runtime.engine import QueueFullError, RequestTooLargeError, Sequence, ShuttingDownError
from runtime.engine.sequence import TokenLogprob
from runtime.sampling import SamplingParams
from runtime.server.errors import APIError
from runtime.server.logprobs import TextOffsets, TokenText, chat_content, completion_logprobs
from runtime.server.schemas import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from runtime.server.state import ServiceState

ERRORS = {s: {"model": ErrorResponse} for s in (400, 404, 429, 503)}
#: ``stream: true`` answers: server-sent events whose ``data`` is a JSON chunk or ``[DONE]``
SSE_EVENT = {
    "type": "object",
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}},
    "required": ["data"],
}
STREAM_200 = {200: {"content": {"text/event-stream": {"schema": SSE_EVENT}}}}
DISCONNECT_POLL_S = 0.5
MIN_TEMPERATURE = 1e-5  # as vLLM: anything lower is greedy
MIN_TOP_P = 1e-6  # keeps only the most likely token, like any top_p below its probability

router = APIRouter()


# ---- shared plumbing ----------------------------------------------------------------------------
def ready_state(request: Request) -> ServiceState:
    st: ServiceState = request.app.state.service
    if st.draining:
        st.metrics.rejected.labels("shutting_down").inc()
        raise APIError(503, "the server is shutting down", code="shutting_down")
    if not st.ready:
        raise APIError(503, "the model is not loaded yet", code="not_ready", headers={"Retry-After": "5"})
    return st


def check_model(st: ServiceState, model: str | None) -> None:
    name = st.settings.model_name
    if model is not None and model != name:
        raise APIError(
            404,
            f"the model '{model}' does not exist; this server serves '{name}'",
            "model",
            "model_not_found",
        )


def check_combination(body) -> None:
    """Fields valid alone that mean nothing together: a 400 rather than a silently ignored field."""
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", "stream_options", "invalid_value")
    requested_logprobs(body)


def submit(st: ServiceState, seqs: list[Sequence]) -> None:
    with engine_refusals(st):
        st.engine.submit(seqs)


@contextlib.contextmanager
def engine_refusals(st: ServiceState) -> Iterator[None]:
    """Engine refusals → HTTP status (429 with Retry-After, 503, 400 naming the limit)."""
    try:
        yield
    except QueueFullError as exc:
        st.metrics.rejected.labels("queue_full").inc()
        raise APIError(
            429, str(exc), code="queue_full", headers={"Retry-After": str(st.settings.retry_after_s)}
        ) from exc
    except ShuttingDownError as exc:
        st.metrics.rejected.labels("shutting_down").inc()
        raise APIError(503, str(exc), code="shutting_down") from exc
    except RequestTooLargeError as exc:
        st.metrics.rejected.labels("context_length").inc()
        raise APIError(400, str(exc), "max_tokens", "context_length_exceeded") from exc


@dataclass
class Choice:
    """One sequence's answer as it streams: text is only released once it can no longer be cut by a stop
    string or change with the next token (an incomplete UTF-8 character). The text comes from
    :class:`~runtime.detokenize.IncrementalText` (a window of recent tokens per event, not all of them)."""

    seq: Sequence
    tokenizer: object
    holdback: int
    sent: int = 0
    finish_reason: str | None = None

    stop_text: str | None = None
    error: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # when the request asked
    offsets: TextOffsets = field(default_factory=TextOffsets)  # completions: where each token starts
    detok: IncrementalText = field(init=False)

    def __post_init__(self) -> None:
        self.detok = IncrementalText(self.tokenizer)

    @property
    def tokens(self) -> list[int]:
        return self.detok.tokens

    def absorb(self, ev) -> None:
        """Non-streaming: keep tokens only; the text is decoded once at the end."""
        self.tokens.extend(ev.token_ids)
        if ev.logprobs:
            self.logprobs.extend(ev.logprobs)
        if ev.finish_reason:
            self.finish_reason, self.stop_text, self.error = ev.finish_reason, ev.text, ev.error

    def final_text(self) -> str:
        return self.stop_text if self.stop_text is not None else self.tokenizer.decode(self.tokens)

    def update(self, ev) -> str:
        full = self.detok.extend(ev.token_ids)
        if ev.text is not None:
            full = ev.text
        if ev.finish_reason:
            self.finish_reason = ev.finish_reason
            end = len(full)
        else:  # an incomplete character is no text yet; the last `holdback` characters may start a stop string
            end = len(full)
            while end > 0 and full[end - 1] == "\ufffd":
                end -= 1
            end -= self.holdback
        if end <= self.sent:
            return ""
        delta = full[self.sent : end]
        self.sent = end
        return delta


def requested_logprobs(body) -> int | None:
    """How many alternatives per token the request wants log-probabilities for; None: no log-probabilities."""
    if isinstance(body, CompletionRequest):
        return body.logprobs
    if not body.logprobs:
        if body.top_logprobs is not None:
            raise APIError(400, "top_logprobs requires logprobs to be true", "top_logprobs", "invalid_value")
        return None
    return body.top_logprobs or 0


def make_params(body, max_tokens: int, index: int) -> SamplingParams:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    seed = body.seed
    if seed is not None and body.n > 1:
        seed = (seed + index) % 2**63  # distinct but reproducible choices
    temperature = body.temperature if body.temperature is not None else 1.0
    top_p = body.top_p if body.top_p is not None else 1.0
    return SamplingParams(
        max_new_tokens=max_tokens,
        # below these, fp32 overflows (logits / T) or underflows (top_p): same meaning, safe values
        temperature=0.0 if temperature < MIN_TEMPERATURE else temperature,
        top_p=max(top_p, MIN_TOP_P),
        top_k=body.top_k,
        seed=seed,
        stop=[s for s in stop if s],
        ignore_eos=body.ignore_eos,
        logprobs=requested_logprobs(body),
    )


def build(st: ServiceState, body, prompts: list[list[int]], max_tokens: int | None, prefix: str):
    """Sequences for every (prompt, n) pair. Streaming: every event goes to one queue that the SSE
    generator consumes. Non-streaming: events are absorbed in place (on the loop thread) and one future
    resolves when the last choice finishes, so a request costs one wake-up, not one per token."""
    engine = st.engine
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue | None = asyncio.Queue() if body.stream else None
    done: asyncio.Future = loop.create_future()
    choices: list[Choice] = []
    rid = st.new_id(prefix)
    stops = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    holdback = max((len(s) for s in stops), default=1) - 1
    for p in prompts:
        mt = max_tokens if max_tokens is not None else engine.max_model_len - len(p)
        if mt < 1:
            st.metrics.rejected.labels("context_length").inc()
            raise APIError(
                400,
                f"the prompt has {len(p)} tokens; this model's maximum context length is {engine.max_model_len}",
                "messages" if prefix == "chatcmpl" else "prompt",
                "context_length_exceeded",
            )
        for _ in range(body.n):
            i = len(choices)
            seq = Sequence(f"{rid}-{i}", p, make_params(body, mt, i))
            choices.append(Choice(seq, st.tokenizer, holdback))
            if queue is not None:
                seq.on_event = lambda ev, i=i: queue.put_nowait((i, ev))
            else:
                seq.on_event = _absorber(choices[i], choices, done)
    return rid, queue if queue is not None else done, choices


def _absorber(ch: Choice, choices: list[Choice], done: asyncio.Future):
    def on_event(ev) -> None:
        ch.absorb(ev)
        if ev.finish_reason and not done.done() and all(c.finish_reason for c in choices):
            done.set_result(None)

    return on_event


def abort_unfinished(st: ServiceState, choices: list[Choice]) -> None:
    for ch in choices:
        if ch.finish_reason is None:
            st.engine.abort(ch.seq.id)


def usage(prompts: list[list[int]], choices: list[Choice]) -> dict:
    p = sum(len(x) for x in prompts)
    g = sum(len(ch.tokens) for ch in choices)
    return {"prompt_tokens": p, "completion_tokens": g, "total_tokens": p + g}


def public_reason(reason: str | None) -> str | None:
    if reason == "error":
        return None
    return reason


async def collect(st: ServiceState, request: Request, done: asyncio.Future, choices: list[Choice]) -> bool:
    """Wait for every choice to finish; False when the client disconnected first (all aborted)."""
    while True:
        finished, _ = await asyncio.wait({done}, timeout=DISCONNECT_POLL_S)
        if finished:
            break
        if await request.is_disconnected():
            abort_unfinished(st, choices)
            return False
    failed = [ch for ch in choices if ch.finish_reason == "error"]
    if failed:
        st.metrics.errors.labels("engine").inc()
        raise APIError(500, f"generation failed: {failed[0].error}")
    return True


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


class ChunkHead:
    """A stream's chunks share every field but ``choices``: rendered once, so a token costs the JSON of
    its choice alone (the bytes are those of ``sse(base | {"choices": [choice]})``)."""

    def __init__(self, base: dict) -> None:
        self.base = base
        self.head = "data: " + json.dumps(base, ensure_ascii=False, separators=(",", ":"))[:-1] + ',"choices":['

    def __call__(self, choice: dict) -> str:
        return f"{self.head}{json.dumps(choice, ensure_ascii=False, separators=(',', ':'))}]}}\n\n"


async def stream(st: ServiceState, queue, choices, prompts, body, chunk) -> AsyncIterator[str]:
    """SSE: ``chunk(i, delta, finish_reason, first, logprobs)`` renders one choice update as an SSE event, or
    returns None (``logprobs``: the event's tokens', when the request asked); ``i`` None: the usage chunk's
    base (a dict). ``data: [DONE]`` ends it.

    Each update is still its own ``data:`` event, but the events already queued when the generator wakes
    up go out as one string: when the loop runs behind the engine, a stream costs one send (one socket
    write) per wake-up rather than one per token."""
    left = len(choices)
    try:
        out = [x for x in (chunk(i, "", None, True, None) for i in range(len(choices))) if x is not None]
        if out:
            yield "".join(out)
        while left:
            out = []
            item = await queue.get()
            while item is not None:
                i, ev = item
                ch = choices[i]
                delta = ch.update(ev)
                if ev.finish_reason == "error":
                    st.metrics.errors.labels("engine").inc()
                    msg = f"generation failed: {ev.error}"
                    out.append(sse({"error": {"message": msg, "type": "server_error", "param": None, "code": None}}))
                    yield "".join(out)
                    return
                if delta or ev.finish_reason or ev.logprobs:
                    out.append(chunk(i, delta, public_reason(ev.finish_reason), False, ev.logprobs))
                if ev.finish_reason:
                    left -= 1
                item = queue.get_nowait() if left and not queue.empty() else None
            if out:
                yield "".join(out)
        tail = []
        if body.stream_options is not None and body.stream_options.include_usage:
            tail.append(sse(chunk(None, "", None, False, None) | {"choices": [], "usage": usage(prompts, choices)}))
        tail.append("data: [DONE]\n\n")
        yield "".join(tail)
    finally:
        abort_unfinished(st, choices)  # client went away (generator closed) or error


def sse_response(gen: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


def encode_prompts(st: ServiceState, prompt) -> list[list[int]]:
    tok = st.tokenizer
    if isinstance(prompt, str):
        return [tok.encode(prompt)]
    if prompt and isinstance(prompt[0], int):
        vocab = st.engine.vocab_size
        bad = [t for t in prompt if t >= vocab]
        if bad:
            raise APIError(
                400,
                f"token id {bad[0]} is out of range; the vocabulary has {vocab} tokens",
                "prompt",
                "invalid_value",
            )
        return [list(prompt)]
    return [tok.encode(p) for p in prompt]


# ---- routes --------------------------------------------------------------------------------------
@router.get(c.MODELS_PATH, response_model=ModelList, responses={503: {"model": ErrorResponse}})
async def list_models(request: Request) -> ModelList:
    st = ready_state(request)
    card = ModelCard(id=st.settings.model_name, created=st.created, max_model_len=st.engine.max_model_len)
    return ModelList(data=[card])


@router.post(c.COMPLETIONS_PATH, response_model=CompletionResponse, responses={**ERRORS, **STREAM_200})
async def completions(body: CompletionRequest, request: Request):
    st = ready_state(request)
    check_model(st, body.model)
    check_combination(body)
    prompts = encode_prompts(st, body.prompt)
    rid, queue, choices = build(st, body, prompts, body.max_tokens, "cmpl")
    submit(st, [ch.seq for ch in choices])
    created, model = int(time.time()), st.settings.model_name
    text_of = TokenText(st.tokenizer)

    if body.stream:
        head = ChunkHead({"id": rid, "object": "text_completion", "created": created, "model": model})

        def chunk(i, delta, reason, first, lps):
            if first:
                return None
            if i is None:
                return head.base
            lp = None
            if lps is not None:
                lp = completion_logprobs(text_of, lps, choices[i].offsets)
            return head({"index": i, "text": delta, "finish_reason": reason, "logprobs": lp})

        return sse_response(stream(st, queue, choices, prompts, body, chunk))

    if not await collect(st, request, queue, choices):
        raise APIError(400, "client disconnected", code="client_disconnected")
    return CompletionResponse(
        id=rid,
        created=created,
        model=model,
        choices=[
            {
                "index": i,
                "text": ch.final_text(),
                "finish_reason": public_reason(ch.finish_reason),
                "logprobs": None if body.logprobs is None else completion_logprobs(text_of, ch.logprobs, ch.offsets),
            }
            for i, ch in enumerate(choices)
        ],
        usage=usage(prompts, choices),
    )


@router.post(c.CHAT_COMPLETIONS_PATH, response_model=ChatCompletionResponse, responses={**ERRORS, **STREAM_200})
async def chat_completions(body: ChatCompletionRequest, request: Request):
    st = ready_state(request)
    check_model(st, body.model)
    check_combination(body)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    prompts = [st.tokenizer.encode_chat(messages, add_generation_prompt=True)]
    max_tokens = body.max_completion_tokens or body.max_tokens
    rid, queue, choices = build(st, body, prompts, max_tokens, "chatcmpl")
    submit(st, [ch.seq for ch in choices])
    created, model = int(time.time()), st.settings.model_name
    text_of, want = TokenText(st.tokenizer), requested_logprobs(body) is not None

    if body.stream:
        head = ChunkHead({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model})

        def chunk(i, delta, reason, first, lps):
            if i is None:
                return head.base
            d = {"role": "assistant", "content": ""} if first else ({"content": delta} if delta else {})
            lp = {"content": chat_content(text_of, lps)} if lps is not None else None
            return head({"index": i, "delta": d, "finish_reason": reason, "logprobs": lp})

        return sse_response(stream(st, queue, choices, prompts, body, chunk))

    if not await collect(st, request, queue, choices):
        raise APIError(400, "client disconnected", code="client_disconnected")
    return ChatCompletionResponse(
        id=rid,
        created=created,
        model=model,
        choices=[
            {
                "index": i,
                "message": {"role": "assistant", "content": ch.final_text()},
                "finish_reason": public_reason(ch.finish_reason),
                "logprobs": {"content": chat_content(text_of, ch.logprobs)} if want else None,
            }
            for i, ch in enumerate(choices)
        ],
        usage=usage(prompts, choices),
    )
