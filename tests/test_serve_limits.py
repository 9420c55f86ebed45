"""Slow and hostile clients without Ray: the admission rules (serve/limits.py), their config keys,
and the ASGI guard (serve/api.py) driven message by message, so a stalled body, a saturated
replica or one greedy client can be staged exactly and in a fraction of a second."""

from __future__ import annotations

import asyncio
import json
import math

import pytest

from _serve_helpers import TITLES, LocalBackend, ScriptedGenerate, action, hash_embed
from serve.api import create_api
from serve.catalogue import Catalogue
from serve.grounding import ServeGrounder
from serve.limits import (
    PROXY_TIMEOUT_SLACK_S,
    UNKNOWN_CLIENT,
    AdmissionControl,
    IngressLimits,
    client_key,
    proxy_http_options,
)
from serve.recommender import Recommender, ThreadedGrounding
from ulrec.config import ConfigError, load_config
from ulrec.prompts import PromptBuilder


def limits(**kw) -> IngressLimits:
    base = dict(max_inflight=4, max_per_client=2, body_timeout_s=1.0, request_timeout_s=5.0, retry_after_s=3)
    return IngressLimits(**{**base, **kw})


# ------------------------------------------------------------------------------ admission rules
def test_admission_sheds_with_503_beyond_max_inflight_and_recovers():
    adm = AdmissionControl(limits(max_inflight=3, max_per_client=3))
    assert [adm.admit(c) for c in ("a", "b", "c")] == [None, None, None]
    shed = adm.admit("d")
    assert (shed.status, shed.retry_after_s) == (503, 3) and "busy" in shed.error
    assert adm.inflight == 3 and adm.held_by("d") == 0  # a rejection holds nothing
    adm.release("b")
    assert adm.admit("d") is None and adm.inflight == 3


def test_admission_caps_each_client_with_429():
    adm = AdmissionControl(limits(max_inflight=10, max_per_client=2))
    assert adm.admit("a") is None and adm.admit("a") is None
    capped = adm.admit("a")
    assert (capped.status, capped.retry_after_s) == (429, 3) and "limit 2" in capped.error
    assert adm.admit("b") is None  # other clients are not affected
    adm.release("a")
    assert adm.admit("a") is None and adm.held_by("a") == 2


def test_shedding_is_checked_before_the_client_cap():
    adm = AdmissionControl(limits(max_inflight=2, max_per_client=2))
    adm.admit("a"), adm.admit("a")
    assert adm.admit("a").status == 503


def test_release_balances_and_forgets_idle_clients():
    adm = AdmissionControl(limits(max_inflight=100, max_per_client=5))
    for i in range(50):
        assert adm.admit(f"10.0.0.{i % 10}") is None
    assert adm.clients == 10 and adm.inflight == 50
    for i in range(50):
        adm.release(f"10.0.0.{i % 10}")
    assert adm.clients == 0 and adm.inflight == 0
    with pytest.raises(RuntimeError, match="without a matching admit"):
        adm.release("10.0.0.1")


@pytest.mark.parametrize("kw, message", [
    ({"max_inflight": 0}, "max_inflight"),
    ({"max_per_client": 0}, "max_per_client"),
    ({"max_per_client": 5}, "max_per_client"),
    ({"body_timeout_s": 0.0}, "body_timeout_s"),
    ({"body_timeout_s": math.inf}, "body_timeout_s"),
    ({"request_timeout_s": math.nan}, "request_timeout_s"),
    ({"retry_after_s": 0}, "retry_after_s"),
])
def test_ingress_limits_reject_bad_values(kw, message):
    with pytest.raises(ValueError, match=message):
        limits(**kw)


def test_client_key_is_the_peer_host():
    assert client_key(("203.0.113.7", 5555)) == "203.0.113.7"
    assert client_key(["::1", 1]) == "::1"
    assert client_key(None) == UNKNOWN_CLIENT == client_key(("", 0))


def test_proxy_options_come_from_the_config():
    cfg = load_config(None, ["serve.port=9001", "serve.body_timeout_s=2.5", "serve.request_timeout_s=30",
                             "serve.keep_alive_timeout_s=7"]).serve
    assert proxy_http_options(cfg) == {"host": "127.0.0.1", "port": 9001, "keep_alive_timeout_s": 7,
                                       "request_timeout_s": 2.5 + 30 + PROXY_TIMEOUT_SLACK_S}
    # The defaults are finite: no limit is "off".
    d = IngressLimits.from_config(load_config(None, []).serve)
    assert d.max_per_client <= d.max_inflight < load_config(None, []).serve.ingress_max_ongoing_requests
    assert math.isfinite(d.body_timeout_s) and math.isfinite(d.request_timeout_s)


def test_serve_accepts_the_proxy_and_ingress_options():
    """The option names and values are valid for the pinned Ray Serve (checked without a cluster)."""
    from ray.serve.config import HTTPOptions

    from serve.app import Ingress, _ingress_options

    cfg = load_config(None, ["serve.ingress_max_queued_requests=77", "serve.retry_after_s=3"])
    opts = HTTPOptions(**proxy_http_options(cfg.serve))
    assert (opts.request_timeout_s, opts.keep_alive_timeout_s) == (75.0, 5)
    deployment = Ingress.options(**_ingress_options(cfg))
    assert deployment.max_queued_requests == 77
    assert (deployment.backpressure_config.status_code, deployment.backpressure_config.retry_after_s) == (503, 3)
    assert deployment.max_ongoing_requests == cfg.serve.ingress_max_ongoing_requests


@pytest.mark.parametrize("override, message", [
    ("serve.body_timeout_s=0", "serve.body_timeout_s"),
    ("serve.body_timeout_s=.inf", "serve.body_timeout_s"),
    ("serve.body_timeout_s=.nan", "serve.body_timeout_s"),
    ("serve.request_timeout_s=-1", "serve.request_timeout_s"),
    ("serve.request_timeout_s=1e9", "serve.request_timeout_s"),
    ("serve.keep_alive_timeout_s=0", "serve.keep_alive_timeout_s"),
    ("serve.keep_alive_timeout_s=1.5", "serve.keep_alive_timeout_s"),
    ("serve.max_requests_per_client=0", "serve.max_requests_per_client"),
    ("serve.retry_after_s=0", "serve.retry_after_s"),
    ("serve.ingress_max_queued_requests=0", "serve.ingress_max_queued_requests"),
    ("serve.max_inflight_requests=512", "must be below ingress_max_ongoing_requests"),
    ("serve.max_requests_per_client=449", "must not exceed max_inflight_requests"),
    ("serve.body_timeout_ms=5", "unknown config key 'serve.body_timeout_ms'"),
])
def test_bad_limit_values_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(None, [override])


# ----------------------------------------------------------------------------- the ASGI guard
def make_app(overrides=(), token=None, recommender=None):
    cfg = load_config(None, list(overrides))
    if recommender is None:
        grounding = ThreadedGrounding(ServeGrounder(TITLES, embed_fn=hash_embed))
        recommender = Recommender(TITLES, PromptBuilder(), generate=ScriptedGenerate([action("Heat (1995)")]),
                                  ground=grounding.ground, nearest_allowed=grounding.nearest_allowed,
                                  default_temperature=0.5, rng_seed=0)
    return create_api(LocalBackend(recommender), Catalogue(TITLES), cfg.serve, token=token)


def scope(path="/v1/recommend", method="POST", client=("10.0.0.1", 40000), headers=()):
    hdrs = [(b"content-type", b"application/json"), *headers]
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": hdrs,
            "client": client, "server": ("testserver", 80)}


VALID = json.dumps({"history": [0], "seed": 1}).encode()


class Body:
    """An ASGI receive: ``chunks`` (with more_body until ``complete``), then it waits for ``gone``
    (a client that keeps the connection open) and reports a disconnect."""

    def __init__(self, chunks=(VALID,), complete=True, delay_s=0.0):
        self.chunks = list(chunks)
        self.complete = complete
        self.delay_s = delay_s
        self.gone = asyncio.Event()

    async def __call__(self):
        if self.chunks:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            chunk = self.chunks.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(self.chunks) or not self.complete}
        await self.gone.wait()
        return {"type": "http.disconnect"}


class Reply:
    def __init__(self):
        self.messages = []
        self.done = asyncio.Event()

    async def __call__(self, message):
        self.messages.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            self.done.set()

    @property
    def status(self):
        return next((m["status"] for m in self.messages if m["type"] == "http.response.start"), None)

    @property
    def headers(self):
        start = next(m for m in self.messages if m["type"] == "http.response.start")
        return {k.decode().lower(): v.decode() for k, v in start["headers"]}

    def json(self):
        return json.loads(b"".join(m.get("body", b"") for m in self.messages if m["type"] == "http.response.body"))


async def call(app, sc, body):
    reply = Reply()
    await asyncio.wait_for(app(sc, body, reply), 10)
    return reply


def guard_of(app):
    """The GuardMiddleware instance of a built app (Starlette builds its stack on first call)."""
    node = app.middleware_stack
    while node is not None and type(node).__name__ != "GuardMiddleware":
        node = getattr(node, "app", None)
    return node


def test_stalled_body_is_408_after_body_timeout_and_closes():
    app = make_app(["serve.body_timeout_s=0.3"])

    async def go():
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        # Content-Length says 100, 14 bytes come, then nothing (the client keeps the socket open).
        stalled = Body([b'{"history": [1'], complete=False)
        reply = await call(app, scope(headers=[(b"content-length", b"100")]), stalled)
        return reply, loop.time() - t0

    reply, took = asyncio.run(go())
    assert reply.status == 408 and reply.headers["connection"] == "close"
    assert "0.3 s" in reply.json()["error"]
    assert 0.25 <= took < 3.0
    assert guard_of(app).admission.inflight == 0


def test_trickled_body_gets_no_extension():
    """A client that sends a byte now and then still has body_timeout_s for the whole body."""
    app = make_app(["serve.body_timeout_s=0.5"])
    trickle = Body([b"{"] + [b" "] * 100, complete=False, delay_s=0.05)
    reply = asyncio.run(call(app, scope(), trickle))
    assert reply.status == 408 and len(trickle.chunks) > 80


def test_body_split_in_chunks_within_the_deadline_is_served():
    app = make_app(["serve.body_timeout_s=5"])
    parts = [VALID[:5], VALID[5:12], VALID[12:]]
    reply = asyncio.run(call(app, scope(), Body(parts, delay_s=0.01)))
    assert reply.status == 200, reply.json()
    assert len(reply.json()["recommendations"]) == 1


def test_client_gone_while_sending_body_gets_no_answer_and_frees_its_slot():
    app = make_app(["serve.body_timeout_s=5"])

    async def go():
        body = Body([b'{"hist'], complete=False)
        reply = Reply()
        task = asyncio.create_task(app(scope(), body, reply))
        await asyncio.sleep(0.05)
        assert guard_of(app).admission.inflight == 1
        body.gone.set()
        await asyncio.wait_for(task, 5)
        return reply

    reply = asyncio.run(go())
    assert reply.messages == [] and guard_of(app).admission.inflight == 0


SMALL = ["serve.ingress_max_ongoing_requests=4", "serve.max_inflight_requests=3", "serve.max_requests_per_client=2",
         "serve.body_timeout_s=1.0", "serve.retry_after_s=2"]


def test_saturated_replica_sheds_503_healthz_still_answers_and_valid_requests_resume():
    app = make_app(SMALL)

    async def go():
        # Three stalled bodies from three clients fill max_inflight_requests.
        stalled = [Body([b"{"], complete=False) for _ in range(3)]
        replies = [Reply() for _ in stalled]
        tasks = [asyncio.create_task(app(scope(client=(f"10.0.1.{i}", 1)), b, r))
                 for i, (b, r) in enumerate(zip(stalled, replies))]
        await asyncio.sleep(0.1)
        assert guard_of(app).admission.inflight == 3
        shed = await call(app, scope(client=("10.0.2.1", 1)), Body())
        health = await call(app, scope("/healthz", "GET", client=("10.0.2.1", 1), headers=()), Body([b""]))
        assert all(not r.messages for r in replies)  # still held: both answers came while saturated
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        after = await call(app, scope(client=("10.0.2.1", 1)), Body())
        return shed, health, replies, after

    shed, health, replies, after = asyncio.run(go())
    assert shed.status == 503 and shed.headers["retry-after"] == "2" and shed.headers["connection"] == "close"
    assert health.status == 200 and health.json()["status"] == "ok"
    assert [r.status for r in replies] == [408, 408, 408]
    assert after.status == 200
    assert guard_of(app).admission.inflight == 0


def test_one_client_is_capped_with_429_others_are_served():
    app = make_app(SMALL)

    async def go():
        stalled = [Body([b"{"], complete=False) for _ in range(2)]
        tasks = [asyncio.create_task(app(scope(client=("10.0.3.3", 1000 + i)), b, Reply()))
                 for i, b in enumerate(stalled)]
        await asyncio.sleep(0.1)
        capped = await call(app, scope(client=("10.0.3.3", 2000)), Body())
        other = await call(app, scope(client=("10.0.3.4", 1)), Body())
        for b in stalled:
            b.gone.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        return capped, other

    capped, other = asyncio.run(go())
    assert capped.status == 429 and capped.headers["retry-after"] == "2"
    assert other.status == 200


def test_answer_not_started_within_request_timeout_is_503():
    class Slow:
        titles = TITLES

        async def recommend(self, query):
            await asyncio.sleep(30)

    app = make_app(["serve.request_timeout_s=0.3", "serve.retry_after_s=4"], recommender=Slow())
    reply = asyncio.run(call(app, scope(), Body()))
    assert reply.status == 503 and reply.headers["retry-after"] == "4"
    assert "0.3 s" in reply.json()["error"]
    assert guard_of(app).admission.inflight == 0


def test_rejections_before_admission_work_do_not_leak_slots():
    """401, 400, 413, 415 and 404 answers all release their admission."""
    app = make_app(SMALL, token="tok")
    auth = [(b"authorization", b"Bearer tok")]

    async def go():
        statuses = []
        for sc in [scope(), scope(headers=[*auth, (b"content-length", b"x")]),
                   scope(headers=[*auth, (b"content-length", b"999999")]),
                   scope(headers=auth) | {"headers": [(b"content-type", b"text/plain"), *auth]},
                   scope("/nope", "GET", headers=auth)]:
            statuses.append((await call(app, sc, Body())).status)
        return statuses

    assert asyncio.run(go()) == [401, 400, 413, 415, 404]
    assert guard_of(app).admission.inflight == 0
