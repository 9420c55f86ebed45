"""One real Ray Serve deployment over HTTP on 127.0.0.1: a tiny random Llama (HF backend), the real
grounder, dynamic batching, bearer auth, and hostile requests through Serve's own HTTP proxy."""

from __future__ import annotations

import asyncio
import socket
from collections import Counter

import httpx
import pandas as pd
import pytest
import ray
from ray import serve

from _serve_helpers import TITLES, build_tiny_model, hostile_requests
from serve.app import APP_NAME, start
from ulrec.config import load_config

pytestmark = pytest.mark.slow

TOKEN = "test-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}


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
        "serve.resample_rounds=1",
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
