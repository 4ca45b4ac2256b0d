"""The FastAPI application of the endpoint (predict and generate): routes, uniform error bodies, bearer token.

Built per replica by :func:`make_api` (Serve's late-bound ingress), so the request schema carries the
configured limits and the token check its token. No Ray here: the routes call a service object
(:class:`rayblora.serve.deployment.PosteriorIngress`). Every error the application makes is an
:class:`~rayblora.serve.schemas.ErrorResponse`: bad input is a 4xx naming the field, never a 5xx.
"""

# No `from __future__ import annotations`: FastAPI reads the body type of a route defined in a function.
import asyncio
import hmac
from typing import Any, AsyncIterator, Protocol, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

import rayblora
from rayblora.config import ServeConfig
from rayblora.manifest import ArtifactError
from rayblora.serve.engine import InputError, UnknownPosterior
from rayblora.serve.generate import SSE_HEADERS, server_sent_events
from rayblora.serve.schemas import (ErrorResponse, GenerateResponse, Health, PosteriorList, PredictResponse,
                                    field_name, generate_request_model, request_model)

UNAUTHENTICATED_PATHS = ("/healthz",)
DESCRIPTION = (
    "Predictions of Bayesian LoRA posteriors with calibrated uncertainty: the Bayesian model average of the "
    "class probabilities, total entropy = aleatoric + mutual information (epistemic), and an abstain flag; "
    "and generated answers with the same split per token (POST /v1/generate, optionally streamed as "
    "server-sent events). "
    "When a bearer token is configured, every route but /healthz needs `Authorization: Bearer <token>`. "
    "Overload is answered 503 by the Serve proxy.")
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "missing or wrong bearer token"},
    404: {"model": ErrorResponse, "description": "unknown posterior"},
    413: {"model": ErrorResponse, "description": "request body over serve.max_body_bytes (refused unread)"},
    422: {"model": ErrorResponse, "description": "invalid request; `fields` names each bad field"},
    503: {"description": "overloaded: the request queue is full (answered at once by the Serve proxy)"},
}
STREAM_EXAMPLE = ('data: {"event": "token", "index": 0, "token": 17, "text": " 4", "entropy": 1.2, '
                  '"aleatoric": 1.1, "mutual_information": 0.1, "log_prob": -0.6}\n\n'
                  'data: {"event": "done", "text": "4", "tokens": [17, 2], "scores": {"mean_token_mi": 0.1}, '
                  '"abstained": false}\n\n')
GENERATE_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES,
    200: {"description": 'the answers; with `"stream": true` a `text/event-stream` instead: one `data: <json>` '
                         'line per token event ({"event": "token", "index", "token", "text", "entropy", '
                         '"aleatoric", "mutual_information", "log_prob"}; the `text` pieces concatenate to the '
                         'answer), then {"event": "done", "text", "tokens", "scores", "abstained"}, then the end '
                         '(a failure after the first event: {"event": "error", "message"})',
          "content": {"text/event-stream": {"schema": {"type": "string"}, "example": STREAM_EXAMPLE}}},
    422: {"model": ErrorResponse, "description": "invalid request, a prompt over serve.max_tokens_per_input, or "
                                                 "a posterior without a generative form; `fields` names each"},
}


class Service(Protocol):
    """What the routes need from the deployment."""

    config: ServeConfig

    async def predict(self, body: Any) -> dict[str, Any]: ...

    async def generate(self, body: Any) -> dict[str, Any]: ...

    async def generate_stream(self, body: Any) -> AsyncIterator[dict[str, Any]]: ...

    async def list_posteriors(self) -> dict[str, Any]: ...


def error_response(status: int, message: str, fields: Sequence[tuple[str, str]] = (),
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """An ErrorResponse body with `status`."""
    body = {"message": message, "fields": [{"field": f, "message": m} for f, m in fields]}
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_fields(exc: RequestValidationError) -> list[tuple[str, str]]:
    fields = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            where = err["loc"][-1] if err.get("loc") else "?"
            reason = (err.get("ctx") or {}).get("error", "not valid JSON")
            fields.append(("body", f"not valid JSON: {reason} (at character {where})"))
        else:
            fields.append((field_name(err.get("loc", ())), err.get("msg", "invalid")))
    return fields


def _add_error_handlers(app: FastAPI) -> None:
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        fields = _validation_fields(exc)
        return error_response(422, "invalid request: " + "; ".join(f"{f}: {m}" for f, m in fields), fields)

    async def refused_inputs(_: Request, exc: InputError) -> JSONResponse:
        return error_response(422, f"invalid request: {exc}", exc.fields)

    async def unknown_posterior(_: Request, exc: UnknownPosterior) -> JSONResponse:
        return error_response(404, exc.message, [("posterior", exc.message)])

    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    async def unloadable(_: Request, exc: ArtifactError) -> JSONResponse:
        return error_response(500, f"the posterior could not be loaded: {exc}")

    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(InputError, refused_inputs)
    app.add_exception_handler(UnknownPosterior, unknown_posterior)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(ArtifactError, unloadable)


def route_path(scope: dict[str, Any]) -> str:
    """The request path below the application's route prefix (Serve passes the prefix as `root_path`)."""
    path, root = scope.get("path", "/"), scope.get("root_path", "") or ""
    if root and root != "/" and path.startswith(root):
        path = path[len(root):] or "/"
    return path


def _add_bearer_check(app: FastAPI, token: str) -> None:
    expected = f"Bearer {token}".encode()

    @app.middleware("http")
    async def bearer_token(request: Request, call_next):
        given = request.headers.get("authorization", "").encode()
        if route_path(request.scope) in UNAUTHENTICATED_PATHS or hmac.compare_digest(given, expected):
            return await call_next(request)
        return error_response(401, "missing or wrong bearer token: send `Authorization: Bearer <token>`",
                              headers={"WWW-Authenticate": "Bearer"})


class BodyLimit:
    """ASGI middleware answering 413 to a request body over `max_bytes` before the application reads it: a
    `Content-Length` over the limit at once, without reading a byte; a body without one (chunked) is read up
    to the limit and refused as soon as it passes it, else handed on whole.

    Once answered, the rest of a refused body is read and discarded (up to `drain_bytes`, waiting at most
    `drain_timeout_s` for each next part) before the connection closes: a client still uploading then reads its
    413, where closing at once would reset the connection under it (servers drain or linger-close for the same
    reason). The wait is per part, not for the whole body: uploads that share a busy proxy arrive slowly but
    steadily, and each is drained to its end."""

    def __init__(self, app, max_bytes: int, drain_bytes: int = 0, drain_timeout_s: float = 0.0):
        self.app, self.max_bytes = app, max_bytes
        self.drain_bytes, self.drain_timeout_s = drain_bytes, drain_timeout_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(scope, receive, send, int(length))
        if length is not None:
            return await self.app(scope, receive, send)
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send, None)
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        return await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send, length: int | None) -> None:
        given = f"{length} bytes" if length is not None else f"over {self.max_bytes} bytes (chunked)"
        response = error_response(413, f"request body too large: {given}, the limit is {self.max_bytes} bytes "
                                       "(serve.max_body_bytes)", [("body", "too large")],
                                  headers={"Connection": "close"})
        await response(scope, receive, send)
        await self._drain(receive)

    async def _drain(self, receive) -> None:
        """Read and drop the refused body's remaining messages, up to :attr:`drain_bytes`, until one does not come
        within :attr:`drain_timeout_s`."""
        drained = 0
        while drained < self.drain_bytes:
            try:
                message = await asyncio.wait_for(receive(), self.drain_timeout_s)
            except asyncio.TimeoutError:
                return
            drained += len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body"):
                return


def make_api(service: Service, auth_token: str = "") -> FastAPI:
    """The endpoint's FastAPI app: POST /v1/predict, POST /v1/generate, GET /v1/posteriors, GET /healthz,
    /openapi.json, /docs."""
    body_model, generate_model = request_model(service.config), generate_request_model(service.config)
    app = FastAPI(title="rayblora posterior endpoint", version=rayblora.__version__, description=DESCRIPTION)
    _add_error_handlers(app)
    if auth_token:
        _add_bearer_check(app, auth_token)
    app.add_middleware(BodyLimit, max_bytes=service.config.body_limit(), drain_bytes=service.config.drain_bytes,
                       drain_timeout_s=service.config.drain_timeout_s)

    @app.get("/healthz", response_model=Health, tags=["health"])
    async def healthz() -> dict[str, str]:
        """Liveness; never needs the token."""
        return {"status": "ok"}

    @app.get("/v1/posteriors", response_model=PosteriorList, responses=ERROR_RESPONSES, tags=["posteriors"])
    async def posteriors() -> dict[str, Any]:
        """The served posteriors: method, members, samples, task and labels."""
        return await service.list_posteriors()

    @app.post("/v1/predict", response_model=PredictResponse, responses=ERROR_RESPONSES, tags=["predict"])
    async def predict(body: body_model) -> dict[str, Any]:
        """Posterior predictive with uncertainty for each input (posterior from the body, else the
        `serve_multiplexed_model_id` header, else the default)."""
        return await service.predict(body)

    @app.post("/v1/generate", response_model=GenerateResponse, responses=GENERATE_RESPONSES, tags=["generate"])
    async def generate(body: generate_model) -> Any:
        """Answers to raw prompts decoded under the posterior, with per-token entropy / aleatoric / mutual
        information and sequence scores; `"stream": true` sends one prompt's tokens as server-sent events.
        Posterior as for /v1/predict. Not batched across requests."""
        if body.stream:
            events = await service.generate_stream(body)
            return StreamingResponse(server_sent_events(events), media_type="text/event-stream",
                                     headers=SSE_HEADERS)
        return await service.generate(body)

    return app
