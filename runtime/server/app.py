"""The FastAPI application: OpenAI routes, the risk score and its feedback, probes and /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from runtime import contract as c
from runtime.metrics import CONTENT_TYPE_LATEST
from runtime.server import errors, risk
from runtime.server.auth import GuardMiddleware, warn_if_open
from runtime.server.errors import APIError
from runtime.server.openai_api import engine_refusals, ready_state, router
from runtime.server.prediction_store import (
    AlreadyLabelled,
    PredictionRecord,
    RecordNotFound,
    StoreUnavailable,
    features_digest,
)
from runtime.server.schemas import (
    FEEDBACK_DESCRIPTION,
    RISK_DESCRIPTION,
    ErrorResponse,
    FeedbackRequest,
    FeedbackResponse,
    Health,
    RiskRequest,
    RiskResponse,
)
from runtime.server.state import ServiceState

log = logging.getLogger(__name__)

RISK_ERRORS = {s: {"model": ErrorResponse} for s in (400, 409, 422, 429, 503)}


def _store_down(request_id: str) -> APIError:
    return APIError(
        503,
        f"the prediction store is unavailable; the label for '{request_id}' was not recorded, retry later",
        code="store_unavailable",
        headers={"Retry-After": "5"},
    )


def _doc_paths(app: FastAPI) -> tuple[str, ...]:
    """The API's description (OpenAPI document, docs pages): no request content, and what a client reads
    to learn that it needs a key."""
    paths = (app.openapi_url, app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url)
    return tuple(p for p in paths if p)


def _bearer_openapi(app: FastAPI) -> None:
    """Declare the bearer scheme on every operation outside ``open_paths`` (docs get an Authorize button)."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        schema.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = {
            "type": "http",
            "scheme": "bearer",
            "description": "one of the keys given to serve (--api-key, --api-key-file or $" + c.ENV_API_KEYS + ")",
        }
        for path, ops in schema.get("paths", {}).items():
            if path not in c.OPEN_PATHS:
                for op in ops.values():
                    op["security"] = [{"bearer": []}]
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(state: ServiceState, load: bool = True) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if load:
            state.start_loading(asyncio.get_running_loop())
        yield
        state.stop_engine()
        if state.records is not None:
            await asyncio.to_thread(state.records.close)

    app = FastAPI(
        title="MoE Fleet runtime",
        version="0.1.0",
        description="OpenAI-compatible MoE inference with continuous batching, and a risk score built on it.",
        lifespan=lifespan,
    )
    app.state.service = state
    errors.install(app, state.metrics)
    warn_if_open(state.settings.api_keys)
    if state.settings.api_keys:
        _bearer_openapi(app)
    app.add_middleware(
        GuardMiddleware,
        keys=state.settings.api_keys,
        max_request_bytes=state.settings.max_request_bytes,
        open_paths=(*c.OPEN_PATHS, *_doc_paths(app)),
        on_reject=lambda reason: state.metrics.rejected.labels(reason).inc(),
    )
    app.include_router(router)

    @app.get(c.HEALTH_PATH, response_model=Health)
    async def healthz() -> Health:
        """Liveness: the process answers (a slow model load is not a reason to restart)."""
        return Health(status="ok")

    @app.get(c.READY_PATH, response_model=Health, responses={503: {"model": Health}})
    async def readyz():
        """Readiness: loaded and warmed up, and not draining."""
        if state.ready and not state.draining:
            return Health(status="ready")
        status = "draining" if state.draining else ("failed: " + state.fatal if state.fatal else "loading")
        return JSONResponse({"status": status}, status_code=503)

    @app.get(
        c.METRICS_PATH,
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def risk_state(request: Request) -> ServiceState:
        st = ready_state(request)
        if st.risk_off is not None:
            raise APIError(503, f"the risk service is off: {st.risk_off}", code="risk_disabled")
        return st

    async def risk_predict(body: RiskRequest, request: Request) -> RiskResponse:
        st = risk_state(request)
        tok, engine, task = st.tokenizer, st.engine, st.risk_task
        features = dict(body.features)
        prompts = [tok.encode(p) for p in risk.leave_one_out_prompts(task, features)]
        longest = max(len(p) for p in prompts)
        if longest > engine.max_model_len:
            st.metrics.rejected.labels("context_length").inc()
            raise APIError(
                400,
                f"the rendered features take {longest} tokens; this model's maximum context "
                f"length is {engine.max_model_len}",
                "features",
                "context_length_exceeded",
            )
        with engine_refusals(st):
            fut = engine.score(prompts, list(st.label_ids))
        lps = await asyncio.wrap_future(fut)
        scores = [risk.score_from_logprobs(a, b) for a, b in lps]
        rid = body.request_id or st.new_id("risk")
        predicted = task.classify(scores[0])
        record = PredictionRecord(
            request_id=rid,
            task=task.name,
            score=scores[0],
            predicted=predicted,
            positive=predicted == task.positive_class,
            features_digest=features_digest(features),
            model=st.settings.model_name,
            model_revision=st.settings.model_revision,
            created_at=time.time(),
        )
        try:
            await asyncio.to_thread(st.records.write, record)
        except AlreadyLabelled:
            raise APIError(
                409,
                f"request_id '{rid}' already has a ground-truth label; use a new request_id",
                "request_id",
                "already_labelled",
            ) from None
        st.metrics.risk_predictions.inc()
        return RiskResponse(
            request_id=rid,
            model=st.settings.model_name,
            task=task.name,
            risk_score=scores[0],
            label=predicted,
            threshold=task.threshold,
            factors=[
                {"name": f.name, "value": f.value, "impact": f.impact} for f in risk.rank_factors(features, scores)
            ],
        )

    for path in (c.RISK_PATH, c.RISK_ALIAS_PATH):
        app.post(
            path,
            response_model=RiskResponse,
            responses=RISK_ERRORS,
            summary="Risk score and factors (the source document's /risk_predict)",
            description=RISK_DESCRIPTION,
        )(risk_predict)

    @app.post(
        c.FEEDBACK_PATH,
        response_model=FeedbackResponse,
        responses={s: {"model": ErrorResponse} for s in (400, 404, 409, 422, 503)},
        summary="Ground truth for an earlier risk prediction",
        description=FEEDBACK_DESCRIPTION,
    )
    async def feedback(body: FeedbackRequest, request: Request) -> FeedbackResponse:
        st = risk_state(request)
        rid = body.request_id
        try:
            rec = await asyncio.to_thread(st.records.store.label, rid, bool(body.label))
        except RecordNotFound:
            if st.records.is_pending(rid):
                raise _store_down(rid) from None
            raise APIError(404, f"no stored prediction for request_id '{rid}'", "request_id", "not_found") from None
        except AlreadyLabelled:
            raise APIError(
                409, f"request_id '{rid}' is already labelled (labels are final)", "request_id", "already_labelled"
            ) from None
        except StoreUnavailable as exc:
            log.warning("feedback for %s: %s", rid, exc)
            raise _store_down(rid) from None
        st.metrics.feedback.inc()
        st.metrics.risk_labelled.inc()
        if rec.correct:
            st.metrics.risk_correct.inc()
        acc = st.accuracy.add(bool(rec.correct))
        st.metrics.accuracy_rolling.set(acc)
        return FeedbackResponse(
            request_id=rid,
            correct=bool(rec.correct),
            rolling_accuracy=0.0 if math.isnan(acc) else acc,
            labelled=st.accuracy.labelled,
            baseline=st.settings.accuracy_baseline,
        )

    return app
