"""Serving without Ray: the recommendation rules, the catalogue, and the HTTP API in-process
(starlette TestClient), including a bounded fuzz of hostile requests."""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from fastapi.testclient import TestClient

from _serve_helpers import TITLES, LocalBackend, ScriptedGenerate, action, hash_embed, hostile_requests
from serve.api import BackendUnavailable, create_api, resolve_token
from serve.app import HandleBackend, build_app, checkpoint_dir, group_by_temperature
from serve.catalogue import Catalogue, catalogue_path, load_titles
from serve.grounding import ServeGrounder
from serve.recommender import (
    GenerationRequest,
    Query,
    RecommendationError,
    Recommender,
    SessionItem,
    ThreadedGrounding,
)
from ulrec.config import ConfigError, load_config
from ulrec.errors import DataError, InputError
from ulrec.prompts import PromptBuilder, StepView, observation_text

ALIEN, ALIENS, HEAT, FARGO = 5, 6, 1, 2


def make_recommender(script: list[str], resample_rounds: int = 2, temperature: float = 0.5):
    gen = ScriptedGenerate(script)
    grounding = ThreadedGrounding(ServeGrounder(TITLES, embed_fn=hash_embed))
    rec = Recommender(TITLES, PromptBuilder(), generate=gen, ground=grounding.ground,
                      nearest_allowed=grounding.nearest_allowed, default_temperature=temperature,
                      resample_rounds=resample_rounds, rng_seed=0)
    return rec, gen


def run(coro):
    return asyncio.run(coro)


# ------------------------------------------------------------------------------------- rules
def test_prompt_is_the_rollout_transcript():
    rec, _ = make_recommender([action("Heat (1995)")])
    query = Query(history=["Toy Story (1995)", "Fargo (1996)"], session=[SessionItem(ALIEN, 4.0), SessionItem(HEAT)])
    expected = PromptBuilder().build(
        ["Toy Story (1995)", "Fargo (1996)"],
        [StepView("Alien (1979)", observation_text(stayed=True, reward=4.0)),
         StepView("Heat (1995)", observation_text(stayed=True, reward=None))],
    )
    assert rec.prompt(query) == expected
    assert expected.endswith("Action 3:")
    assert "Observation 1: The user stayed, reward=4.00" in expected


def test_exact_title_is_generated_not_substituted():
    rec, gen = make_recommender([action("heat (1995)")])
    [r] = run(rec.recommend(Query(history=["Fargo (1996)"], session=[])))
    assert (r.item_id, r.title, r.substituted, r.format_error, r.source) == (HEAT, "Heat (1995)", False, False, "generated")
    assert r.raw_output == action("heat (1995)")
    assert len(gen.requests) == 1


def test_unknown_title_is_grounded_to_nearest_and_marked_substituted():
    rec, _ = make_recommender([action("Aliens 1986")])
    [r] = run(rec.recommend(Query(history=[], session=[])))
    assert (r.item_id, r.substituted, r.source) == (ALIENS, True, "generated")


def test_already_recommended_item_is_resampled():
    rec, gen = make_recommender([action("Alien (1979)"), action("Fargo (1996)")])
    [r] = run(rec.recommend(Query(history=[], session=[SessionItem(ALIEN)], seed=7)))
    assert (r.item_id, r.source) == (FARGO, "resampled")
    assert len({req.seed for req in gen.requests}) == 2  # the resample draws a fresh seed


def test_endless_repeats_fall_back_to_nearest_unrecommended_item():
    rec, gen = make_recommender([action("Alien (1979)")], resample_rounds=2)
    [r] = run(rec.recommend(Query(history=[], session=[SessionItem(ALIEN)])))
    # Nearest to what the model wrote ("Alien (1979)") among items not recommended: Aliens.
    assert (r.item_id, r.source, r.substituted, r.format_error) == (ALIENS, "fallback", True, False)
    assert len(gen.requests) == 3  # first round + 2 resample rounds


def test_slots_of_one_answer_are_distinct():
    rec, _ = make_recommender([action("Heat (1995)"), action("Heat (1995)"), action("Fargo (1996)"),
                               action("Heat (1995)")])
    recs = run(rec.recommend(Query(history=[], session=[SessionItem(FARGO)], k=3, seed=1)))
    ids = [r.item_id for r in recs]
    assert len(set(ids)) == 3 and FARGO not in ids and ids[0] == HEAT
    assert [r.source for r in recs][0] == "generated"


def test_unreadable_output_is_a_format_error_fallback():
    rec, _ = make_recommender(["I would suggest a film", "recommend[ ]"], resample_rounds=1)
    [r] = run(rec.recommend(Query(history=["Up (2009)"], session=[SessionItem(19)])))
    assert r.source == "fallback" and r.format_error and r.item_id != 19
    assert r.raw_output == "recommend[ ]"


def test_greedy_decoding_does_not_resample():
    rec, gen = make_recommender([action("Alien (1979)")], resample_rounds=5, temperature=0.0)
    [r] = run(rec.recommend(Query(history=[], session=[SessionItem(ALIEN)])))
    assert r.source == "fallback" and len(gen.requests) == 1
    assert gen.requests[0].temperature == 0.0


def test_seed_makes_requests_reproducible_and_temperature_overrides():
    rec1, gen1 = make_recommender([action("Heat (1995)")])
    rec2, gen2 = make_recommender([action("Heat (1995)")])
    q = Query(history=[], session=[], k=3, seed=42, temperature=1.3)
    run(rec1.recommend(q))
    run(rec2.recommend(q))
    assert [r.seed for r in gen1.requests] == [r.seed for r in gen2.requests]
    assert {r.temperature for r in gen1.requests} == {1.3}


def test_k_larger_than_what_is_left_is_an_input_error():
    rec, _ = make_recommender([action("Heat (1995)")])
    with pytest.raises(RecommendationError) as err:
        run(rec.recommend(Query(history=[], session=[SessionItem(i) for i in range(19)], k=2)))
    assert err.value.field == "k"


def test_group_by_temperature_keeps_positions():
    reqs = [GenerationRequest("p", 1, 0.5), GenerationRequest("q", 2, 1.0), GenerationRequest("r", 3, 0.5)]
    assert group_by_temperature(reqs) == {0.5: [0, 2], 1.0: [1]}


# ---------------------------------------------------------------------------------- catalogue
def test_catalogue_formats(tmp_path: Path):
    pd.DataFrame({"item_id": [1, 0], "title": ["B", "A"], "raw_item_id": ["b", "a"]}).to_parquet(tmp_path / "i.parquet")
    (tmp_path / "t.json").write_text(json.dumps(["A", "B"]))
    (tmp_path / "t.txt").write_text("A\nB\n")
    for name in ["i.parquet", "t.json", "t.txt"]:
        assert load_titles(tmp_path / name) == ["A", "B"]
    cat = Catalogue(["Heat (1995)", "Up (2009)"])
    assert cat.find("  HEAT (1995) ") == 0 and cat.find("Down") is None


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.parquet", None, "not found"),
        ("bad.json", "{", "not a readable JSON"),
        ("obj.json", '{"a": 1}', "list of title strings"),
        ("blank.txt", "A\n \nB", "item 1 has an empty title"),
        ("empty.txt", "", "empty"),
        ("x.csv", "a", "unknown catalogue format"),
    ],
)
def test_catalogue_errors_name_the_file(tmp_path: Path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message) as err:
        load_titles(path)
    assert name in str(err.value)


def test_catalogue_parquet_ids_must_be_contiguous(tmp_path: Path):
    pd.DataFrame({"item_id": [0, 2], "title": ["A", "B"]}).to_parquet(tmp_path / "items.parquet")
    with pytest.raises(DataError, match="contiguous"):
        load_titles(tmp_path / "items.parquet")


def test_default_paths_come_from_the_run_directory(tmp_path: Path):
    cfg = load_config(None, [f"run.root={tmp_path}", "run.name=r"])
    assert catalogue_path(cfg) == tmp_path / "r" / "data" / "items.parquet"
    with pytest.raises(InputError, match="checkpoints/kto"):
        checkpoint_dir(cfg)
    with pytest.raises(InputError, match="serve.checkpoint"):
        build_app(cfg)


def test_serve_config_rejects_inverted_replica_range():
    with pytest.raises(ConfigError, match="min_replicas"):
        load_config(None, ["serve.min_replicas=5", "serve.max_replicas=2"])


# ---------------------------------------------------------------------------------------- HTTP
def make_client(script=None, token=None, overrides=(), recommender=None) -> tuple[TestClient, ScriptedGenerate]:
    cfg = load_config(None, list(overrides))
    if recommender is None:
        recommender, gen = make_recommender(script or [action("Heat (1995)"), action("Fargo (1996)")])
    else:
        gen = None
    app = create_api(LocalBackend(recommender), Catalogue(TITLES), cfg.serve, token=token)
    return TestClient(app, raise_server_exceptions=False), gen


def test_recommend_by_ids_and_titles():
    client, gen = make_client()
    resp = client.post("/v1/recommend", json={"history": [0, "Some Film Not In The Catalogue"],
                                                "recommended": ["alien (1979)", 19], "rewards": [4.5, None],
                                                "k": 2, "seed": 3})
    assert resp.status_code == 200, resp.text
    recs = resp.json()["recommendations"]
    assert [r["item_id"] for r in recs] == [HEAT, FARGO]
    assert set(recs[0]) == {"item_id", "title", "raw_output", "substituted", "format_error", "source"}
    prompt = gen.requests[0].prompt
    assert "- Toy Story (1995)\n- Some Film Not In The Catalogue\n" in prompt
    assert "Action 1: recommend[ Alien (1979) ]\nObservation 1: The user stayed, reward=4.50\n" in prompt
    assert prompt.endswith("Observation 2: The user stayed\nAction 3:")


def test_healthz_needs_no_token():
    client, _ = make_client(token="s3cret")
    resp = client.get("/healthz")
    assert resp.status_code == 200 and resp.json() == {"status": "ok", "items": len(TITLES)}


@pytest.mark.parametrize(
    "body, field",
    [
        ({"history": [0, 20]}, "history.1"),
        ({"history": [-1]}, "history.0"),
        ({"history": [True]}, "history.0"),
        ({"history": ["x" * 301]}, "history.0"),
        ({"history": [], "k": 0}, "k"),
        ({"history": [], "k": 11}, "k"),
        ({"history": [], "k": "2"}, "k"),
        ({"history": [], "temperature": -0.1}, "temperature"),
        ({"history": [], "seed": 2**40}, "seed"),
        ({"history": [], "recommended": [1], "rewards": [1.0, 2.0]}, "rewards"),
        ({"history": [], "surprise": 1}, "surprise"),
        ({}, "history"),
        ({"history": [], "recommended": ["No Such Film (2099)"]}, "recommended.0"),
        ({"history": [], "recommended": list(range(20))}, "k"),
        ([1, 2], "body"),
    ],
)
def test_invalid_requests_are_422_naming_the_field(body, field):
    client, _ = make_client()
    resp = client.post("/v1/recommend", json=body)
    assert resp.status_code == 422, resp.text
    payload = resp.json()
    assert payload["field"] == field
    assert payload["error"].startswith(f"{field}: ")
    assert "Value error" not in payload["error"]


def test_422_never_echoes_the_input():
    client, _ = make_client()
    resp = client.post("/v1/recommend", json={"history": ["<script>" + "z" * 500 + "</script>"]})
    assert resp.status_code == 422 and "<script>" not in resp.text


def test_history_limit_from_config():
    client, _ = make_client(overrides=["serve.max_history=3"])
    assert client.post("/v1/recommend", json={"history": [0, 1, 2]}).status_code == 200
    resp = client.post("/v1/recommend", json={"history": [0, 1, 2, 3]})
    assert resp.status_code == 422 and resp.json()["field"] == "history"


def test_body_limits_413_declared_and_streamed():
    client, _ = make_client()
    big = json.dumps({"history": ["a" * 70_000]}).encode()
    assert client.post("/v1/recommend", content=big, headers={"content-type": "application/json"}).status_code == 413

    def chunks():  # no Content-Length: the guard counts while the body streams in
        yield b'{"history": ["'
        for _ in range(100):
            yield b"a" * 1000
        yield b'"]}'

    resp = client.post("/v1/recommend", content=chunks(), headers={"content-type": "application/json"})
    assert resp.status_code == 413 and "error" in resp.json()


def test_wrong_content_type_is_415():
    client, _ = make_client()
    resp = client.post("/v1/recommend", content=b'{"history": []}', headers={"content-type": "text/plain"})
    assert resp.status_code == 415
    ok = client.post("/v1/recommend", content=b'{"history": []}', headers={"content-type": "application/json; charset=utf-8"})
    assert ok.status_code == 200


def test_bad_json_is_4xx():
    client, _ = make_client()
    for raw in [b'{"history": [1,', b"\xff\xfe", b"[" * 5000 + b"]" * 5000, b"NaN"]:
        resp = client.post("/v1/recommend", content=raw, headers={"content-type": "application/json"})
        assert resp.status_code in (400, 422), (raw[:20], resp.status_code)


def test_bearer_token(monkeypatch):
    client, _ = make_client(token="s3cret")
    body = {"history": [0]}
    assert client.post("/v1/recommend", json=body).status_code == 401
    resp = client.post("/v1/recommend", json=body, headers={"authorization": "Bearer wrong"})
    assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer"
    assert client.post("/v1/recommend", json=body, headers={"authorization": "Basic s3cret"}).status_code == 401
    assert client.post("/v1/recommend", json=body, headers={"authorization": "Bearer s3cret"}).status_code == 200
    cfg = load_config(None, [])
    monkeypatch.setenv("ULREC_SERVE_TOKEN", "from-env")
    assert resolve_token(cfg.serve) == "from-env"
    assert resolve_token(load_config(None, ["serve.auth_token=from-config"]).serve) == "from-config"
    monkeypatch.delenv("ULREC_SERVE_TOKEN")
    assert resolve_token(cfg.serve) is None


DOC_PATHS = ["/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"]


def test_docs_and_schema_need_the_token_when_auth_is_on():
    client, _ = make_client(token="s3cret")
    for path in DOC_PATHS:
        resp = client.get(path)
        assert resp.status_code == 401, path
        assert resp.headers["www-authenticate"] == "Bearer" and "openapi" not in resp.text.lower()
        assert client.get(path, headers={"authorization": "Bearer wrong"}).status_code == 401, path
        assert client.get(path, headers={"authorization": "Bearer s3cret"}).status_code == 200, path
    assert client.get("/no/such/path").status_code == 401  # default deny: nothing is probed without the token
    assert client.get("/healthz").status_code == 200
    open_client, _ = make_client(token=None)
    assert all(open_client.get(path).status_code == 200 for path in DOC_PATHS)


def test_unexpected_errors_are_logged_opaque_500(caplog):
    class Broken:
        titles = TITLES

        async def recommend(self, query):
            raise RuntimeError("boom")

    client = TestClient(create_api(Broken(), Catalogue(TITLES), load_config(None, []).serve, token=None),
                        raise_server_exceptions=False)
    with caplog.at_level(logging.ERROR, logger="ulrec.serve"):
        resp = client.post("/v1/recommend", json={"history": [0]})
    assert resp.status_code == 500 and resp.json() == {"error": "internal error"}
    assert "boom" not in resp.text
    assert any("unhandled error" in r.message for r in caplog.records)


FUZZ_REQUESTS = 1200


def test_fuzz_hostile_requests_never_5xx():
    """A bounded, seeded fuzz: every response is a 2xx/4xx with a JSON body; every 200 obeys the
    contract (k distinct items, none already recommended)."""
    client, _ = make_client(script=[action("Alien (1979)"), "garbage", action("Heat (1995)"), action("Up (2009)")])
    statuses: Counter[int] = Counter()
    for headers, body in hostile_requests(seed=1234, n=FUZZ_REQUESTS):
        resp = client.post("/v1/recommend", content=body, headers=headers)
        statuses[resp.status_code] += 1
        assert resp.status_code < 500, (body[:200], resp.text)
        payload = resp.json()
        if resp.status_code == 200:
            sent = json.loads(body)
            recs = payload["recommendations"]
            ids = [r["item_id"] for r in recs]
            assert len(ids) == sent.get("k", 1) == len(set(ids))
            catalogue = Catalogue(TITLES)
            excluded = {r if isinstance(r, int) else catalogue.find(r) for r in sent.get("recommended", [])}
            assert not excluded & set(ids)
        else:
            assert "error" in payload
    assert sum(statuses.values()) == FUZZ_REQUESTS
    assert set(statuses) <= {200, 400, 413, 415, 422}, statuses
    # The generator must reach every guard, not just one.
    assert {400, 413, 415, 422} <= set(statuses), statuses


def test_failing_model_is_503_and_its_handle_errors_are_wrapped():
    class DeadHandle:
        """Stands in for a DeploymentHandle whose replica's engine died."""

        class _Method:
            def remote(self, *args):
                async def fail():
                    raise RuntimeError("EngineDeadError")

                return fail()

        recommend = _Method()
        ping = _Method()

    backend = HandleBackend(DeadHandle())
    with pytest.raises(BackendUnavailable):
        run(backend.recommend(Query(history=[], session=[])))
    assert run(backend.ready()) is False
    client = TestClient(create_api(backend, Catalogue(TITLES), load_config(None, []).serve, token=None),
                        raise_server_exceptions=False)
    resp = client.post("/v1/recommend", json={"history": [0]})
    assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
    assert client.get("/healthz").status_code == 503


def test_app_builder_reads_config_checkpoint_and_overrides(tmp_path: Path):
    from serve.app import app_builder, builder_config

    repo = Path(__file__).resolve().parents[1]
    cfg = builder_config({"config": str(repo / "configs/quickstart.yaml"), "checkpoint": str(tmp_path / "ckpt"),
                          "serve.num_replicas": "2", "run.root": str(tmp_path)})
    assert cfg.serve.checkpoint == str(tmp_path / "ckpt") and cfg.serve.num_replicas == 2 and cfg.run.name == "quickstart"
    with pytest.raises(InputError, match="serve.checkpoint"):  # checked before any replica starts
        app_builder({"checkpoint": str(tmp_path / "missing")})


def test_serve_deployment_yaml_is_a_valid_serve_config_for_our_builder():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from serve.app import builder_config
    from serve.limits import proxy_http_options

    repo = Path(__file__).resolve().parents[1]
    spec = ServeDeploySchema.model_validate(yaml.safe_load((repo / "configs/serve/deployment.yaml").read_text()))
    (app,) = spec.applications
    assert app.import_path == "serve.app:app_builder"
    cfg = builder_config({**app.args, "config": str(repo / app.args["config"])})  # paths relative to the repo
    assert cfg.serve.checkpoint == "runs/quickstart/checkpoints/kto"
    # the file's proxy options are the ones `ulrec serve` derives from the config
    derived = proxy_http_options(cfg.serve)
    assert spec.http_options.request_timeout_s == derived["request_timeout_s"]
    assert spec.http_options.keep_alive_timeout_s == derived["keep_alive_timeout_s"]


class RecordedMetrics:
    def __init__(self) -> None:
        self.requests: list[tuple[str, int]] = []
        self.sources: list[str] = []

    def request(self, path, status, latency_s) -> None:
        assert latency_s >= 0
        self.requests.append((path, status))

    def recommendations(self, recs) -> None:
        self.sources += [r.source for r in recs]


def test_requests_and_blocked_repeats_are_counted_by_status_and_source():
    metrics = RecordedMetrics()
    rec, _ = make_recommender([action("Alien (1979)"), action("Fargo (1996)")])
    cfg = load_config(None, [])
    client = TestClient(create_api(LocalBackend(rec), Catalogue(TITLES), cfg.serve, token="t", metrics=metrics),
                        raise_server_exceptions=False)
    auth = {"authorization": "Bearer t"}
    assert client.post("/v1/recommend", json={"history": [0], "recommended": [ALIEN], "k": 1}, headers=auth).status_code == 200
    assert client.post("/v1/recommend", json={"history": [0]}).status_code == 401
    assert client.post("/v1/recommend", json={"history": "x"}, headers=auth).status_code == 422
    assert client.get("/healthz").status_code == 200
    assert metrics.requests == [("/v1/recommend", 200), ("/v1/recommend", 401), ("/v1/recommend", 422), ("/healthz", 200)]
    assert metrics.sources == ["resampled"]  # the model repeated Alien; the repeat was blocked


def test_serve_metrics_use_bounded_labels():
    from serve.metrics import ServeMetrics

    recorded: list[tuple[str, float, dict]] = []

    class Metric:
        def __init__(self, name, description="", tag_keys=None, boundaries=None) -> None:
            self.name = name

        def inc(self, value=1, tags=None) -> None:
            recorded.append((self.name, value, tags or {}))

        def observe(self, value, tags=None) -> None:
            recorded.append((self.name, value, tags or {}))

    module = type("M", (), {"Counter": Metric, "Histogram": Metric})
    metrics = ServeMetrics(module)
    metrics.request("/v1/recommend", 200, 0.5)
    metrics.request("/../../etc/passwd", 401, 0.01)  # an attacker's path never becomes a label
    assert [r[2] for r in recorded if r[0] == "ulrec_requests"] == [
        {"path": "/v1/recommend", "status": "200"}, {"path": "other", "status": "401"}]
