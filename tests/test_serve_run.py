"""`serve run` — Serve's own CLI — starts the recommender from the deployment YAML's format and
``serve.app:app_builder``, as a cluster operator would (``configs/serve/deployment.yaml``)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest
import yaml

from _serve_helpers import TITLES, build_tiny_model

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(600)
def test_serve_run_starts_the_app_builder_from_the_deployment_yaml(tmp_path):
    model_dir = build_tiny_model(tmp_path / "model", TITLES)
    items = tmp_path / "items.parquet"
    pd.DataFrame({"item_id": range(len(TITLES)), "title": TITLES}).to_parquet(items)
    deployment = yaml.safe_load((ROOT / "configs/serve/deployment.yaml").read_text())
    port = _free_port()
    deployment["http_options"].update(host="127.0.0.1", port=port)
    deployment["proxy_location"] = "HeadOnly"
    app = deployment["applications"][0]
    # The shipped file's args point at the quickstart's run; here a tiny model on the HF backend.
    app["args"] = {"checkpoint": str(model_dir), "serve.catalogue": str(items), "policy.backend": "hf",
                   "policy.max_tokens": "12", "run.root": str(tmp_path / "runs"),
                   "grounding.cache_dir": str(tmp_path / "emb")}
    config_file = tmp_path / "deployment.yaml"
    config_file.write_text(yaml.safe_dump(deployment))
    serve_cli = Path(sys.executable).with_name("serve")
    env = {**os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "PYTHONPATH": str(ROOT)}
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([str(serve_cli), "run", str(config_file)], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                health = httpx.get(f"{url}/healthz", timeout=5)
                if health.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(2)
        assert health.json() == {"status": "ok", "items": len(TITLES)}
        resp = httpx.post(f"{url}/v1/recommend", json={"history": [0, 2], "k": 2, "seed": 1}, timeout=60)
        assert resp.status_code == 200, resp.text
        recs = resp.json()["recommendations"]
        assert len({r["item_id"] for r in recs}) == 2 and all(TITLES[r["item_id"]] == r["title"] for r in recs)
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # serve run shuts the app and its local Ray down on Ctrl-C
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
