"""The HTTP API (FastAPI): ``POST /v1/recommend`` and ``GET /healthz``.

Built by :func:`create_api` around a *backend* (anything with ``recommend(query)`` and
``ready()``): in Ray Serve the backend is a handle to the policy deployment; in tests it is a
local :class:`~serve.recommender.Recommender`. Input safety lives here:

- an ASGI guard in front of the app: bearer token (401), body size (413, counted while streaming,
  not trusted from Content-Length), JSON content type (415) on ``/v1/`` routes;
- the pydantic request schema (:mod:`serve.schema`): 422 naming the field;
- exception handlers that never echo the input back: a failing model behind the API is a 503
  (retry later), anything unexpected a logged, opaque 500 (the fuzz tests assert no input
  reaches either).

``/healthz`` needs no token, so load balancers can probe it.
"""

# No `from __future__ import annotations`: FastAPI must see the per-app request model in
# recommend()'s signature as a class, not as a string it cannot resolve.
import hmac
import logging
import os
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.catalogue import Catalogue
from serve.recommender import Query, Recommendation, RecommendationError, SessionItem
from serve.schema import ErrorResponse, RecommendResponse, RequestLimits, request_model

logger = logging.getLogger("ulrec.serve")

TOKEN_ENV = "ULREC_SERVE_TOKEN"
# Validation errors listed in a 422 (a hostile body can hold thousands).
MAX_REPORTED_ERRORS = 10


class Backend(Protocol):
    async def recommend(self, query: Query) -> list[Recommendation]: ...

    async def ready(self) -> bool: ...


class BackendUnavailable(Exception):
    """The model behind the API failed (not the request): answered 503 with Retry-After."""


def resolve_token(serve_cfg) -> str | None:
    """The bearer token: ``serve.auth_token``, else the ULREC_SERVE_TOKEN environment variable."""
    return serve_cfg.auth_token or os.environ.get(TOKEN_ENV) or None


# ---------------------------------------------------------------------------------------- guard
def _json_message(status: int, body: dict[str, Any], extra_headers: list[tuple[bytes, bytes]] = ()) -> tuple[Message, Message]:
    payload = ErrorResponse(**body).model_dump_json(exclude_none=True).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()), *extra_headers]
    return (
        {"type": "http.response.start", "status": status, "headers": headers},
        {"type": "http.response.body", "body": payload},
    )


class GuardMiddleware:
    """Auth, body-size and content-type checks before the app reads anything (pure ASGI, so the
    body limit holds for streamed bodies of unknown length)."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, token: str | None, prefix: str = "/v1/") -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.token = token.encode() if token else None
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope.get("path", "").startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        headers: dict[bytes, bytes] = {}
        for key, value in scope.get("headers", []):
            headers.setdefault(key.lower(), value)
        if self.token is not None and not self._authorized(headers.get(b"authorization", b"")):
            await self._reject(send, 401, "missing or invalid bearer token", [(b"www-authenticate", b"Bearer")])
            return
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                await self._reject(send, 400, "invalid Content-Length header")
                return
            if int(declared) > self.max_body_bytes:
                await self._reject(send, 413, f"body larger than {self.max_body_bytes} bytes")
                return
        if scope.get("method") == "POST" and not _is_json(headers.get(b"content-type", b"")):
            await self._reject(send, 415, "Content-Type must be application/json")
            return
        await self._call_counting(scope, receive, send)

    def _authorized(self, header: bytes) -> bool:
        scheme, _, credentials = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), self.token)

    async def _call_counting(self, scope: Scope, receive: Receive, send: Send) -> None:
        received = 0
        too_large = False

        async def counting_receive() -> Message:
            nonlocal received, too_large
            if too_large:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    # Stop reading: the app sees a disconnect and its reply is replaced below.
                    too_large = True
                    return {"type": "http.disconnect"}
            return message

        replaced = False

        async def guarded_send(message: Message) -> None:
            nonlocal replaced
            if too_large:
                if not replaced:
                    replaced = True
                    await self._reject(send, 413, f"body larger than {self.max_body_bytes} bytes")
                return
            await send(message)

        await self.app(scope, counting_receive, guarded_send)
        if too_large and not replaced:
            await self._reject(send, 413, f"body larger than {self.max_body_bytes} bytes")

    @staticmethod
    async def _reject(send: Send, status: int, error: str, extra_headers: list[tuple[bytes, bytes]] = ()) -> None:
        start, body = _json_message(status, {"error": error}, extra_headers)
        await send(start)
        await send(body)


def _is_json(content_type: bytes) -> bool:
    mime = content_type.split(b";", 1)[0].strip().lower()
    return mime == b"application/json" or (mime.startswith(b"application/") and mime.endswith(b"+json"))


# ------------------------------------------------------------------------------------ handlers
def _field(loc: tuple | list) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] == "body":
        parts = parts[1:]
    return ".".join(parts) or "body"


def _message(error: dict) -> str:
    message = str(error.get("msg", ""))
    return message.removeprefix("Value error, ")


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    # Only location, message and type: never the input (it may be huge or hostile) nor ctx.
    detail = [
        {"field": _field(e.get("loc", ())), "message": _message(e), "type": str(e.get("type", ""))}
        for e in errors[:MAX_REPORTED_ERRORS]
    ]
    first = detail[0] if detail else {"field": "body", "message": "invalid request"}
    body = ErrorResponse(error=f"{first['field']}: {first['message']}", field=first["field"], detail=detail)
    return JSONResponse(status_code=422, content=body.model_dump(exclude_none=True))


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = exc.detail if isinstance(exc.detail, str) else "request error"
    return JSONResponse(status_code=exc.status_code, content={"error": message}, headers=exc.headers)


async def _recommendation_error(_: Request, exc: RecommendationError) -> JSONResponse:
    body = ErrorResponse(error=str(exc), field=exc.field)
    return JSONResponse(status_code=422, content=body.model_dump(exclude_none=True))


async def _unavailable(_: Request, exc: BackendUnavailable) -> JSONResponse:
    return JSONResponse(status_code=503, content={"error": str(exc)}, headers={"retry-after": "1"})


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse(status_code=500, content={"error": "internal error"})


# ------------------------------------------------------------------------------------------ app
def to_query(body: Any, catalogue: Catalogue) -> Query:
    """Resolve a validated request: history ids → titles; recommended ids/titles → item ids."""
    history = [catalogue.titles[h] if isinstance(h, int) else h for h in body.history]
    rewards = body.rewards or [None] * len(body.recommended)
    session = []
    for i, (ref, reward) in enumerate(zip(body.recommended, rewards)):
        item_id = ref if isinstance(ref, int) else catalogue.find(ref)
        if item_id is None:
            raise RecommendationError(f"recommended.{i}", "title not in the catalogue (send its item id)")
        session.append(SessionItem(item_id=item_id, reward=reward))
    return Query(history=history, session=session, k=body.k, temperature=body.temperature, seed=body.seed)


def create_api(backend: Backend, catalogue: Catalogue, serve_cfg, *, token: str | None) -> FastAPI:
    """The FastAPI app serving ``backend`` over ``catalogue`` with ``serve_cfg``'s limits."""
    RecommendRequest = request_model(RequestLimits.from_config(serve_cfg, len(catalogue)))
    app = FastAPI(title="ULRec recommender", version="1")
    app.add_middleware(GuardMiddleware, max_body_bytes=serve_cfg.max_body_bytes, token=token)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RecommendationError, _recommendation_error)
    app.add_exception_handler(BackendUnavailable, _unavailable)
    app.add_exception_handler(Exception, _unexpected)

    @app.post(
        "/v1/recommend",
        response_model=RecommendResponse,
        responses={401: {"model": ErrorResponse}, 413: {"model": ErrorResponse}, 415: {"model": ErrorResponse},
                   422: {"model": ErrorResponse}},
    )
    async def recommend(body: RecommendRequest) -> dict:  # type: ignore[valid-type]
        """Recommend ``k`` items the session has not seen yet (see serve/recommender.py)."""
        recs = await backend.recommend(to_query(body, catalogue))
        return {"recommendations": [r.to_dict() for r in recs]}

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        ok = await backend.ready()
        return JSONResponse(status_code=200 if ok else 503, content={"status": "ok" if ok else "unavailable",
                                                                      "items": len(catalogue)})

    return app
