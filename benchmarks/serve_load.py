"""Load test of the recommendation endpoint: many concurrent clients on loopback.

    python benchmarks/serve_load.py --config configs/quickstart.yaml [overrides...]
    python benchmarks/serve_load.py --url http://127.0.0.1:8000      # a server already running

Without ``--url`` it starts the Serve app for the config (``serve.checkpoint`` or the run's ULRec
checkpoint; see serve/app.py), loads it, and shuts it down. ``--clients`` clients (default 200) each
send requests back to back — random histories and sessions of catalogue ids — until
``--requests`` are done or ``--max-seconds`` pass, whichever comes first. Prints throughput,
latency percentiles, status counts (any 5xx is a failure: exit 1) and the policy replicas' batch
sizes, as one JSON object on the last line.

Only loopback addresses are accepted: this tool is not for loading other people's servers.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def require_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SystemExit(f"serve_load: refusing non-loopback target {url!r} (use 127.0.0.1)")


def random_body(rng: random.Random, num_items: int, k: int) -> dict:
    history = [rng.randrange(num_items) for _ in range(rng.randint(5, 15))]
    recommended = rng.sample(range(num_items), min(rng.randint(0, 5), num_items - k))
    return {"history": history, "recommended": recommended, "k": k, "seed": rng.randrange(2**31 - 1)}


async def run_load(url: str, *, clients: int, requests: int, max_seconds: float, k: int, token: str | None,
                   seed: int) -> dict:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=300) as client:
        health = (await client.get("/healthz")).json()
        num_items = int(health["items"])
        latencies: list[float] = []
        statuses: Counter[int] = Counter()
        errors: Counter[str] = Counter()
        issued = 0
        deadline = time.perf_counter() + max_seconds

        async def worker(index: int) -> None:
            nonlocal issued
            rng = random.Random(seed * 100_003 + index)
            while issued < requests and time.perf_counter() < deadline:
                issued += 1
                body = random_body(rng, num_items, k)
                start = time.perf_counter()
                try:
                    resp = await client.post("/v1/recommend", json=body)
                except httpx.HTTPError as exc:
                    errors[type(exc).__name__] += 1
                    continue
                latencies.append(time.perf_counter() - start)
                statuses[resp.status_code] += 1

        began = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(clients)))
        wall = time.perf_counter() - began
    lat_ms = np.array(latencies) * 1000 if latencies else np.zeros(1)
    ok = statuses.get(200, 0)
    return {
        "clients": clients,
        "requests": sum(statuses.values()) + sum(errors.values()),
        "ok": ok,
        "statuses": {str(s): n for s, n in sorted(statuses.items())},
        "server_errors": sum(n for s, n in statuses.items() if s >= 500),
        "transport_errors": dict(errors),
        "wall_s": round(wall, 2),
        "throughput_rps": round(ok / wall, 2) if wall > 0 else 0.0,
        "recommendations_per_s": round(ok * k / wall, 2) if wall > 0 else 0.0,
        "latency_ms": {
            "p50": round(float(np.percentile(lat_ms, 50)), 1),
            "p90": round(float(np.percentile(lat_ms, 90)), 1),
            "p99": round(float(np.percentile(lat_ms, 99)), 1),
            "max": round(float(lat_ms.max()), 1),
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="a running server (loopback only); default: start one from --config")
    parser.add_argument("--config", "-c", help="YAML config for the server started here")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. serve.max_batch_size=64")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--requests", type=int, default=2000, help="stop after this many requests")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="stop issuing requests after this long")
    parser.add_argument("--k", type=int, default=1, help="recommendations per request")
    parser.add_argument("--token", default=os.environ.get("ULREC_SERVE_TOKEN"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for name in ("clients", "requests", "k"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")

    started_here = args.url is None
    batch_stats = None
    if started_here:
        from ulrec.runtime_env import apply_defaults

        apply_defaults()
        from ray import serve

        from serve.api import resolve_token
        from serve.app import APP_NAME, start
        from ulrec.config import load_config

        cfg = load_config(args.config, args.overrides)
        if not any(o.split("=", 1)[0].strip() == "serve.max_requests_per_client" for o in args.overrides):
            # All simulated clients share 127.0.0.1, which the per-client cap (serve/limits.py)
            # sees as one client: lift it to the client count for this server.
            cfg.serve.max_requests_per_client = min(args.clients, cfg.serve.max_inflight_requests)
        url = f"http://{cfg.serve.host}:{cfg.serve.port}"
        require_loopback(url)
        t0 = time.perf_counter()
        start(cfg)
        print(f"serve_load: app up in {time.perf_counter() - t0:.1f}s at {url}", flush=True)
        token = args.token or resolve_token(cfg.serve)
    else:
        url = args.url.rstrip("/")
        require_loopback(url)
        token = args.token
    try:
        # Warm-up: first requests pay for lazy loading (embedder, caches); not measured.
        asyncio.run(run_load(url, clients=4, requests=8, max_seconds=120, k=args.k, token=token, seed=args.seed + 1))
        result = asyncio.run(run_load(url, clients=args.clients, requests=args.requests, max_seconds=args.max_seconds,
                                      k=args.k, token=token, seed=args.seed))
        if started_here:
            policy = serve.get_deployment_handle("ULRecPolicy", app_name=APP_NAME)
            batch_stats = policy.stats.remote().result()
            batch_stats.pop("node_id", None)
            batch_stats["mean_batch"] = round(batch_stats["prompts"] / max(batch_stats["batches"], 1), 2)
    finally:
        if started_here:
            serve.shutdown()
    result["policy_batches"] = batch_stats
    lat = result["latency_ms"]
    print(f"serve_load: {result['ok']}/{result['requests']} ok from {args.clients} clients in {result['wall_s']}s: "
          f"{result['throughput_rps']} req/s, latency p50 {lat['p50']} ms, p99 {lat['p99']} ms; "
          f"statuses {result['statuses']}")
    if "429" in result["statuses"]:
        print("serve_load: 429s come from the server's per-client cap (serve.max_requests_per_client): every "
              "client here shares one address; raise the cap on that server to measure throughput", file=sys.stderr)
    print(json.dumps(result, sort_keys=True))
    return 1 if result["server_errors"] or result["transport_errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
