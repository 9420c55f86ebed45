"""The HTTP API (FastAPI): ``POST /v1/recommend`` and ``GET /healthz``.

Built by :func:`create_api` around a *backend* (anything with ``recommend(query)`` and
``ready()``): in Ray Serve the backend is a handle to the policy deployment; in tests it is a
local :class:`~serve.recommender.Recommender`. Input safety lives here:

- an ASGI guard in front of the app (:class:`GuardMiddleware`): load shedding (503) and a
  per-client cap (429), both with Retry-After (:mod:`serve.limits`); bearer token (401) on every
  path but ``/healthz`` (the docs and the OpenAPI schema included); on ``/v1/`` routes body size
  (413, counted while streaming, not trusted from Content-Length), JSON content type (415) and a
  deadline for the whole body (408); a deadline for the answer (503);
- the pydantic request schema (:mod:`serve.schema`): 422 naming the field;
- exception handlers that never echo the input back: a failing model behind the API is a 503
  (retry later), anything unexpected a logged, opaque 500 (the fuzz tests assert no input
  reaches either).

``/healthz`` needs no token and is never shed, so load balancers can probe it.
"""

# No `from __future__ import annotations`: FastAPI must see the per-app request model in
# recommend()'s signature as a class, not as a string it cannot resolve.
import asyncio
import hmac
import logging
import os
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.metrics import NoMetrics, RequestMetrics
from serve.catalogue import Catalogue
from serve.limits import AdmissionControl, IngressLimits, client_key
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
Headers = list[tuple[bytes, bytes]]


def _json_message(status: int, body: dict[str, Any], extra_headers: Headers = ()) -> tuple[Message, Message]:
    payload = ErrorResponse(**body).model_dump_json(exclude_none=True).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()), *extra_headers]
    return (
        {"type": "http.response.start", "status": status, "headers": headers},
        {"type": "http.response.body", "body": payload},
    )


class _BodyRejected(Exception):
    def __init__(self, status: int, error: str) -> None:
        super().__init__(error)
        self.status = status
        self.error = error


class GuardMiddleware:
    """Everything decided before the app runs (pure ASGI, in front of FastAPI):

    1. ``/healthz`` passes straight through: no token, never shed (:mod:`serve.limits`).
    2. Admission (:class:`~serve.limits.AdmissionControl`): 503 when the replica is at
       ``max_inflight``, 429 when this client is at ``max_per_client``; both with Retry-After.
    3. Bearer token (401) on every other path (the API, its docs and schema, unknown paths).
    4. On ``/v1/`` routes: Content-Length (400, 413 when declared too large), JSON content type
       (415), then the body is read in full, counted while it streams (413) and within
       ``body_timeout_s`` (408), before the app sees it.
    5. The app must start its answer within ``request_timeout_s``, else 503 with Retry-After.

    Every rejection here closes the connection (``connection: close``): its body may be unread.
    """

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, limits: IngressLimits, token: str | None,
                 prefix: str = "/v1/", open_paths: tuple[str, ...] = ("/healthz",),
                 metrics: RequestMetrics | None = None) -> None:
        self.app = app
        self.metrics = metrics or NoMetrics()
        self.max_body_bytes = max_body_bytes
        self.limits = limits
        self.admission = AdmissionControl(limits)
        self.token = token.encode() if token else None
        self.prefix = prefix
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # Every answer is counted by path and status, rejections included, with its latency.
        loop = asyncio.get_running_loop()
        began = loop.time()
        status = 499  # nothing sent: the client went away first (nginx's "client closed request")

        async def counted_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self._guarded(scope, receive, counted_send)
        finally:
            self.metrics.request(scope.get("path", ""), status, loop.time() - began)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("path", "") in self.open_paths:
            await self.app(scope, receive, send)
            return
        client = client_key(scope.get("client"))
        rejection = self.admission.admit(client)
        if rejection is not None:
            await self._reject(send, rejection.status, rejection.error, retry_after_s=rejection.retry_after_s)
            return
        try:
            await self._admitted(scope, receive, send)
        finally:
            self.admission.release(client)

    async def _admitted(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers: dict[bytes, bytes] = {}
        for key, value in scope.get("headers", []):
            headers.setdefault(key.lower(), value)
        if self.token is not None and not self._authorized(headers.get(b"authorization", b"")):
            await self._reject(send, 401, "missing or invalid bearer token", [(b"www-authenticate", b"Bearer")])
            return
        if not scope.get("path", "").startswith(self.prefix):
            await self._call_app(scope, receive, send)
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
        try:
            body = await self._read_body(receive)
        except _BodyRejected as exc:
            await self._reject(send, exc.status, exc.error)
            return
        if body is None:  # the client went away: nobody to answer
            return
        replayed = False

        async def replay() -> Message:
            # The buffered body once, then the client's own messages (a disconnect, if it leaves).
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self._call_app(scope, replay, send)

    def _authorized(self, header: bytes) -> bool:
        scheme, _, credentials = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), self.token)

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body, or None when the client disconnected. Raises :class:`_BodyRejected`:
        413 once it passes ``max_body_bytes`` (counted, not trusted from Content-Length), 408 when
        it has not all arrived ``body_timeout_s`` after the first read."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.body_timeout_s
        chunks: list[bytes] = []
        received = 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except asyncio.TimeoutError:
                raise _BodyRejected(408, f"request body not received within {self.limits.body_timeout_s:g} s") from None
            if message["type"] == "http.disconnect":
                return None
            if message["type"] != "http.request":
                continue
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.max_body_bytes:
                raise _BodyRejected(413, f"body larger than {self.max_body_bytes} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _call_app(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        loop = asyncio.get_running_loop()
        began = loop.time()
        try:
            await asyncio.wait_for(self.app(scope, receive, tracking_send), self.limits.request_timeout_s)
        except asyncio.TimeoutError:
            # Only this deadline's own expiry, before any answer started, is replaced by a 503 (a
            # started answer cannot be; a TimeoutError raised by the app itself propagates).
            if started or loop.time() - began < self.limits.request_timeout_s:
                raise
            logger.warning("%s %s not answered within %.3g s", scope.get("method"), scope.get("path"),
                           self.limits.request_timeout_s)
            await self._reject(send, 503, f"not answered within {self.limits.request_timeout_s:g} s; retry later",
                               retry_after_s=self.limits.retry_after_s)

    @staticmethod
    async def _reject(send: Send, status: int, error: str, extra_headers: Headers = (), *,
                      retry_after_s: int | None = None) -> None:
        headers = [*extra_headers, (b"connection", b"close")]
        if retry_after_s is not None:
            headers.append((b"retry-after", str(retry_after_s).encode()))
        start, body = _json_message(status, {"error": error}, headers)
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


def create_api(backend: Backend, catalogue: Catalogue, serve_cfg, *, token: str | None,
               metrics: RequestMetrics | None = None) -> FastAPI:
    """The FastAPI app serving ``backend`` over ``catalogue`` with ``serve_cfg``'s limits;
    ``metrics`` records requests and recommendations (``serve/metrics.py``)."""
    RecommendRequest = request_model(RequestLimits.from_config(serve_cfg, len(catalogue)))
    limits = IngressLimits.from_config(serve_cfg)
    metrics = metrics or NoMetrics()
    app = FastAPI(title="ULRec recommender", version="1")
    app.add_middleware(GuardMiddleware, max_body_bytes=serve_cfg.max_body_bytes, limits=limits, token=token,
                       metrics=metrics)

    async def _unavailable(_: Request, exc: BackendUnavailable) -> JSONResponse:
        return JSONResponse(status_code=503, content={"error": str(exc)},
                            headers={"retry-after": str(limits.retry_after_s)})

    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RecommendationError, _recommendation_error)
    app.add_exception_handler(BackendUnavailable, _unavailable)
    app.add_exception_handler(Exception, _unexpected)

    @app.post(
        "/v1/recommend",
        response_model=RecommendResponse,
        responses={status: {"model": ErrorResponse} for status in (400, 401, 408, 413, 415, 422, 429, 503)},
    )
    async def recommend(body: RecommendRequest) -> dict:  # type: ignore[valid-type]
        """Recommend ``k`` items the session has not seen yet (see serve/recommender.py)."""
        recs = await backend.recommend(to_query(body, catalogue))
        metrics.recommendations(recs)
        return {"recommendations": [r.to_dict() for r in recs]}

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        ok = await backend.ready()
        return JSONResponse(status_code=200 if ok else 503, content={"status": "ok" if ok else "unavailable",
                                                                      "items": len(catalogue)})

    return app
