"""What keeps slow or hostile clients from taking the endpoint down, without Ray or HTTP (so it is
tested directly; the ASGI guard in :mod:`serve.api` only applies it).

Serve's HTTP proxy hands a request to an ingress replica as soon as its headers arrive; the
replica then pulls the body from the proxy. Every request therefore holds one of the replica's
``serve.ingress_max_ongoing_requests`` slots until it is answered, including while its client
dawdles over the body. The rules:

- **Load shedding.** At most ``max_inflight`` requests per ingress replica are worked on at once
  (every path but ``/healthz``); the next one is answered 503 with ``Retry-After`` at once. The
  limit sits below ``ingress_max_ongoing_requests``: the slots between the two stay free for
  ``/healthz`` and for the rejections themselves, so the health check answers while the replica
  is saturated.
- **Per-client cap.** At most ``max_per_client`` of those from one client address; the next is
  a 429 with ``Retry-After``. One client cannot fill the shared budget on its own.
- **Deadlines.** The whole body must arrive within ``body_timeout_s`` of the replica starting to
  read it, else 408 and the connection is closed; the answer must start within
  ``request_timeout_s`` after that, else 503 with ``Retry-After``. A slot is never held for longer
  than their sum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Serve's proxy times a request out (408) end to end; its limit is set this much above the
# ingress's own deadlines, so a timed-out request is answered by the ingress (which knows why).
# The proxy's limit still bounds requests queued at the proxy for a busy ingress, and it can be
# lifted per request by a client header (x-request-timeout-seconds), which is why the ingress
# enforces its own.
PROXY_TIMEOUT_SLACK_S = 5.0

# The client of a request without a peer address (a unix socket, some test clients).
UNKNOWN_CLIENT = "unknown"


@dataclass(frozen=True)
class IngressLimits:
    max_inflight: int
    max_per_client: int
    body_timeout_s: float
    request_timeout_s: float
    retry_after_s: int

    def __post_init__(self) -> None:
        if self.max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1 (got {self.max_inflight})")
        if not 1 <= self.max_per_client <= self.max_inflight:
            raise ValueError(f"max_per_client must lie in 1..max_inflight={self.max_inflight} "
                             f"(got {self.max_per_client})")
        for name in ("body_timeout_s", "request_timeout_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0 (got {value!r})")
        if self.retry_after_s < 1:
            raise ValueError(f"retry_after_s must be >= 1 (got {self.retry_after_s})")

    @classmethod
    def from_config(cls, serve_cfg) -> "IngressLimits":
        return cls(
            max_inflight=serve_cfg.max_inflight_requests,
            max_per_client=serve_cfg.max_requests_per_client,
            body_timeout_s=serve_cfg.body_timeout_s,
            request_timeout_s=serve_cfg.request_timeout_s,
            retry_after_s=serve_cfg.retry_after_s,
        )


@dataclass(frozen=True)
class Rejection:
    """Why a request was not admitted: answered ``status`` with ``Retry-After: retry_after_s``."""

    status: int
    error: str
    retry_after_s: int


class AdmissionControl:
    """Counts the requests one ingress replica works on, in all and per client, and decides who
    gets in. Single-threaded by design (one event loop per replica): no locks.

    ``admit(client)`` returns None (admitted: call ``release(client)`` exactly once when the
    request is over) or the :class:`Rejection` to answer with.
    """

    def __init__(self, limits: IngressLimits) -> None:
        self.limits = limits
        self.inflight = 0
        # Only clients with a request in flight have an entry: the dict never outgrows max_inflight.
        self._per_client: dict[str, int] = {}

    def admit(self, client: str) -> Rejection | None:
        limits = self.limits
        if self.inflight >= limits.max_inflight:
            return Rejection(503, "server busy; retry later", limits.retry_after_s)
        held = self._per_client.get(client, 0)
        if held >= limits.max_per_client:
            return Rejection(429, f"too many concurrent requests from this client (limit {limits.max_per_client})",
                             limits.retry_after_s)
        self.inflight += 1
        self._per_client[client] = held + 1
        return None

    def release(self, client: str) -> None:
        held = self._per_client.get(client, 0)
        if held < 1:
            raise RuntimeError(f"release({client!r}) without a matching admit")
        self.inflight -= 1
        if held == 1:
            del self._per_client[client]
        else:
            self._per_client[client] = held - 1

    def held_by(self, client: str) -> int:
        return self._per_client.get(client, 0)

    @property
    def clients(self) -> int:
        """Clients with at least one request in flight."""
        return len(self._per_client)


def client_key(client: tuple | list | None) -> str:
    """The per-client key of an ASGI ``scope["client"]`` (host, port): the host. Behind a load
    balancer every request has the balancer's address (see ``serve.max_requests_per_client``)."""
    if not client:
        return UNKNOWN_CLIENT
    host = client[0]
    return str(host) if host else UNKNOWN_CLIENT


def proxy_request_timeout_s(serve_cfg) -> float:
    """Serve's proxy's end-to-end timeout: the ingress's deadlines plus a margin."""
    return serve_cfg.body_timeout_s + serve_cfg.request_timeout_s + PROXY_TIMEOUT_SLACK_S


def proxy_http_options(serve_cfg) -> dict:
    """``serve.start(http_options=...)`` for ``serve_cfg``: address, the proxy's request timeout and
    how long it keeps an idle keep-alive connection open between requests."""
    return {
        "host": serve_cfg.host,
        "port": serve_cfg.port,
        "request_timeout_s": proxy_request_timeout_s(serve_cfg),
        "keep_alive_timeout_s": serve_cfg.keep_alive_timeout_s,
    }
