"""One real Ray Serve deployment over HTTP on 127.0.0.1: a tiny random Llama (HF backend), the real
grounder, dynamic batching, bearer auth, hostile requests through Serve's own HTTP proxy, and slow
clients (stalled bodies, idle sockets) held against it while it must keep answering."""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter

import httpx
import pandas as pd
import pytest
import ray
from ray import serve

from _serve_helpers import TITLES, RawConnections, build_tiny_model, hostile_requests
from serve.app import APP_NAME, start
from ulrec.config import load_config

pytestmark = pytest.mark.slow

TOKEN = "test-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
# Small slow-client limits (serve/limits.py) so the slow-client tests take seconds. The per-client
# cap leaves room for test_concurrent_requests_are_batched's 24 requests from one client.
INGRESS_SLOTS = 64
MAX_INFLIGHT = 48
PER_CLIENT = 30
BODY_TIMEOUT_S = 6.0
KEEP_ALIVE_S = 2
LIMITS = [f"serve.ingress_max_ongoing_requests={INGRESS_SLOTS}", f"serve.max_inflight_requests={MAX_INFLIGHT}",
          f"serve.max_requests_per_client={PER_CLIENT}", f"serve.body_timeout_s={BODY_TIMEOUT_S}",
          f"serve.keep_alive_timeout_s={KEEP_ALIVE_S}", "serve.retry_after_s=2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model_dir = build_tiny_model(root / "model", TITLES)
    items = root / "items.parquet"
    pd.DataFrame({"item_id": range(len(TITLES)), "title": TITLES}).to_parquet(items)
    port = free_port()
    cfg = load_config(None, [
        f"run.root={root}", "policy.backend=hf", "policy.max_tokens=12", f"grounding.cache_dir={root / 'emb'}",
        f"serve.checkpoint={model_dir}", f"serve.catalogue={items}", f"serve.port={port}",
        f"serve.auth_token={TOKEN}", "serve.max_batch_size=16", "serve.batch_wait_timeout_s=0.05",
        "serve.resample_rounds=1", *LIMITS,
    ])
    ray.init(num_cpus=2, object_store_memory=300 * 1024**2, include_dashboard=False)
    try:
        start(cfg)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_health_and_recommend(server):
    assert httpx.get(f"{server}/healthz", timeout=30).json() == {"status": "ok", "items": len(TITLES)}
    body = {"history": [0, "Fargo (1996)"], "recommended": [1, "Alien (1979)"], "rewards": [4.0, None], "k": 3,
            "temperature": 1.0, "seed": 5}
    resp = httpx.post(f"{server}/v1/recommend", json=body, headers=AUTH, timeout=60)
    assert resp.status_code == 200, resp.text
    recs = resp.json()["recommendations"]
    ids = [r["item_id"] for r in recs]
    assert len(ids) == 3 == len(set(ids)) and not {1, 5} & set(ids)
    assert all(TITLES[r["item_id"]] == r["title"] for r in recs)
    assert {r["source"] for r in recs} <= {"generated", "resampled", "fallback"}


def test_auth_and_validation_over_http(server):
    assert httpx.post(f"{server}/v1/recommend", json={"history": [0]}, timeout=30).status_code == 401
    resp = httpx.post(f"{server}/v1/recommend", json={"history": [0, 99]}, headers=AUTH, timeout=30)
    assert resp.status_code == 422 and resp.json()["field"] == "history.1"
    big = b'{"history": ["' + b"a" * 100_000 + b'"]}'
    resp = httpx.post(f"{server}/v1/recommend", content=big, headers={**AUTH, "content-type": "application/json"},
                      timeout=30)
    assert resp.status_code == 413
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(f"{server}{path}", timeout=30).status_code == 401, path
        assert httpx.get(f"{server}{path}", headers=AUTH, timeout=30).status_code == 200, path


def test_concurrent_requests_are_batched(server):
    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=server, headers=AUTH, timeout=120) as client:
            resps = await asyncio.gather(*(
                client.post("/v1/recommend", json={"history": [i % len(TITLES)], "seed": i}) for i in range(24)
            ))
        return [r.status_code for r in resps]

    assert asyncio.run(burst()) == [200] * 24
    stats = serve.get_deployment_handle("ULRecPolicy", app_name=APP_NAME).stats.remote().result()
    assert stats["max_batch"] > 1, stats  # @serve.batch merged concurrent generate calls


HTTP_FUZZ_REQUESTS = 200


def test_hostile_requests_over_http_never_5xx(server):
    statuses: Counter[int] = Counter()
    with httpx.Client(base_url=server, timeout=60) as client:
        for headers, body in hostile_requests(seed=99, n=HTTP_FUZZ_REQUESTS):
            resp = client.post("/v1/recommend", content=body, headers={**headers, **AUTH})
            statuses[resp.status_code] += 1
            assert resp.status_code < 500, (body[:200], resp.text)
            assert "error" in resp.json() or resp.status_code == 200
    assert sum(statuses.values()) == HTTP_FUZZ_REQUESTS and {413, 415, 422} <= set(statuses), statuses


# --------------------------------------------------------------------------------- slow clients
# The tester's reproduction: headers declaring a 100-byte body, 14 bytes of it, then nothing.
STALLED = (b"POST /v1/recommend HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
           b"Authorization: Bearer " + TOKEN.encode() + b"\r\nContent-Length: 100\r\n\r\n" + b'{"history": [1')
# Slack over the configured timeouts for a busy 2-core machine (Serve relays every rejection).
SLACK_S = 20.0
VALID = {"history": [0, 3], "k": 1, "seed": 11}


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def answered(conns) -> int:
    return sum(c["replied_at"] is not None or c["closed_at"] is not None for c in conns)


def assert_all_closed_in_time(raw, conns, allowed: set[int]) -> Counter:
    """Every stalled connection is answered with an allowed status and closed by the server within
    the body timeout (plus slack) of being opened; 408s only after the body timeout ran out."""
    raw.poll(BODY_TIMEOUT_S + SLACK_S, until=lambda: all(c["closed_at"] is not None for c in conns))
    statuses = Counter(RawConnections.status(c) for c in conns)
    assert set(statuses) <= allowed, statuses
    for c in conns:
        assert c["closed_at"] is not None, statuses  # the server closed it
        assert c["closed_at"] - c["sent_at"] <= BODY_TIMEOUT_S + SLACK_S
        status = RawConnections.status(c)
        if status == 408:
            assert c["replied_at"] - c["sent_at"] >= BODY_TIMEOUT_S - 0.5
        elif status in (429, 503):
            assert RawConnections.header(c, "retry-after") == "2"
    return statuses


def test_stalled_bodies_and_idle_sockets_do_not_take_the_service_down(server):
    """One client holds 250 stalled bodies (more than the ingress's 64 slots) and 100 sockets that
    send nothing; /healthz and a valid request from another client answer while they are held,
    and every stalled connection is answered (408 at the body timeout, 429 past the per-client cap)
    and closed."""
    raw = RawConnections("127.0.0.1", port_of(server))
    try:
        idle = raw.open(100, "127.0.0.3")
        stalled = raw.open(250, "127.0.0.2", STALLED)
        raw.poll(1.0)
        with httpx.Client(base_url=server, timeout=30) as client:
            health = client.get("/healthz")
            held_at_health = len(stalled) - answered(stalled)
            resp = client.post("/v1/recommend", json=VALID, headers=AUTH)
            held_at_recommend = len(stalled) - answered(stalled)
        assert health.status_code == 200 and health.json()["status"] == "ok"
        assert resp.status_code == 200, resp.text
        assert len(resp.json()["recommendations"]) == 1
        # Both answers came while stalled bodies were still held open.
        assert held_at_health > 0 and held_at_recommend > 0, (held_at_health, held_at_recommend)
        statuses = assert_all_closed_in_time(raw, stalled, {408, 429})
        assert statuses[408] >= 1 and statuses[429] >= 1, statuses
        assert not any(c["data"] for c in idle)
    finally:
        raw.close()


def test_saturated_ingress_sheds_503_and_healthz_still_answers(server):
    """Stalled bodies from 8 clients (under the per-client cap each) fill the ingress's
    max_inflight_requests: further requests get 503 with Retry-After at once, /healthz answers,
    and once the body timeout frees the slots valid requests are served again."""
    raw = RawConnections("127.0.0.1", port_of(server))
    try:
        stalled = [c for i in range(8) for c in raw.open(12, f"127.0.1.{i + 1}", STALLED)]
        raw.poll(1.0)
        with httpx.Client(base_url=server, timeout=30) as client:
            t0 = time.monotonic()
            health = client.get("/healthz")
            shed = client.post("/v1/recommend", json=VALID, headers=AUTH)
            took = time.monotonic() - t0
            held = len(stalled) - answered(stalled)
            statuses = assert_all_closed_in_time(raw, stalled, {408, 503})
            after = client.post("/v1/recommend", json=VALID, headers=AUTH)
        assert health.status_code == 200
        assert held > 0 and shed.status_code == 503, (held, shed.status_code, shed.text)
        assert shed.headers["retry-after"] == "2" and took < BODY_TIMEOUT_S
        assert statuses[408] >= 1 and statuses[503] >= 1, statuses
        assert after.status_code == 200, after.text
    finally:
        raw.close()


def test_idle_keep_alive_connection_is_closed_after_keep_alive_timeout(server):
    """Serve's proxy gets serve.keep_alive_timeout_s (Ray's default would hold it for 90 s)."""
    raw = RawConnections("127.0.0.1", port_of(server))
    try:
        [conn] = raw.open(1, "127.0.0.1", b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        raw.poll(KEEP_ALIVE_S + SLACK_S, until=lambda: conn["closed_at"] is not None)
        assert RawConnections.status(conn) == 200
        assert conn["closed_at"] is not None and conn["closed_at"] - conn["replied_at"] >= KEEP_ALIVE_S - 0.5
    finally:
        raw.close()
