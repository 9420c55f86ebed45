"""Rollouts with a real tiny model on both backends (hf, vllm), real grounding and a saved
simulator, through the public entry points run_rollout and rollout_stage."""

from __future__ import annotations

import json
import time

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
import ray

from _llm_helpers import perturbed_copy
from rollout.driver import collect_episodes, rollout_stage, run_rollout, run_sources
from rollout.episode import EPISODE_SCHEMA, EXIT_REASONS, STEP_REASONS, EpisodeLabels
from ulrec.resume import mark_done
from ulrec.config import Config
from ulrec.data import load_prepared, prepare_data
from ulrec.model_init import build_base_model
from ulrec.simulator import MatrixUserModel

NUM_USERS = 50


def tiny_run_config(root, backend: str, engine: str = "sync", **rollout) -> Config:
    return Config.model_validate(
        {
            "run": {"root": str(root), "name": "tiny", "progress": False},
            "data": {"dataset": "synthetic", "synthetic_users": 120, "synthetic_items": 60},
            # Head size 32: one vLLM's CPU attention supports.
            "model": dict(
                hidden_size=64, num_layers=1, num_heads=2, intermediate_size=128, vocab_size=600,
                warm_start_examples=64, warm_start_batch_size=16, warm_start_eval_prompts=4,
            ),
            "env": {"distance_threshold": 0.5},
            "policy": {"backend": backend, "engine": engine, "max_tokens": 24, "max_num_seqs": 64},
            "grounding": {"cache_dir": str(root / "grounding-cache")},
            # One lane per shard; a replica batch can take both.
            "rollout": dict(
                num_users=NUM_USERS, max_steps=4, num_shards=2, replica_num_cpus=1, shard_num_cpus=0.25,
                lane_size=32, max_batch_size=64, **rollout,
            ),
        }
    )


@pytest.fixture(scope="module")
def run_root(tmp_path_factory):
    """Synthetic data, a tiny warm-started base model and a matrix simulator per split."""
    root = tmp_path_factory.mktemp("rollout-models")
    cfg = tiny_run_config(root, "hf")
    prepare_data(cfg)
    build_base_model(cfg)
    data = load_prepared(cfg.run_dir)
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        rewards = rng.choice([1.0, 3.0, 4.0, 5.0], p=[0.2, 0.3, 0.3, 0.2], size=(data.num_users, data.num_items))
        vectors = rng.normal(size=(data.num_items, 4)).astype(np.float32)
        MatrixUserModel(rewards=rewards, item_vectors=vectors).save(cfg.run_dir / "simulators" / split)
    # Marked complete as `ulrec env fit` would: later stages key their results on this marker.
    mark_done(cfg.run_dir / "simulators", "hand-made matrix simulators", "simulators")
    ray.init(num_cpus=2, object_store_memory=300 * 1024**2, include_dashboard=False)
    yield root
    ray.shutdown()


def check_episodes(out_dir, users: list[int], seeds: list[int], policy: str) -> None:
    table = pq.read_table(out_dir)
    assert table.schema.equals(EPISODE_SCHEMA)
    keys = sorted(zip(table.column("user_id").to_pylist(), table.column("seed").to_pylist()))
    assert keys == sorted((u, s) for u in users for s in seeds)
    for row in table.to_pylist():
        assert (row["run"], row["policy"], row["split"]) == ("tiny", policy, "train")
        assert row["exit_reason"] in EXIT_REASONS
        steps = row["steps"]
        assert 1 <= len(steps) <= 4
        assert row["length"] == sum(s["live"] for s in steps)
        assert row["num_generated_tokens"] > 0
        for k, step in enumerate(steps, start=1):
            assert step["step"] == k and step["prompt"].endswith(f"Action {k}:")
            assert step["reason"] in STEP_REASONS
            assert (step["item_id"] == -1) == (step["reason"] == "format_error") == (step["title"] == "")


@pytest.mark.slow
def test_hf_backend_rollout(run_root) -> None:
    cfg = tiny_run_config(run_root, "hf")
    users = sorted(load_prepared(cfg.run_dir).user_histories("train"))[:NUM_USERS]
    out = cfg.run_dir / "rollouts" / "hf-test"
    summary = run_rollout(
        cfg, model_dir=str(cfg.run_dir / "model" / "base"), split="train", user_ids=users, seeds=[0],
        temperature=1.0, max_steps=4, out_dir=out, policy_name="base",
    )
    check_episodes(out, users, [0], "base")
    assert summary["episodes"] == NUM_USERS and summary["generated_tokens"] > 0
    assert sum(summary["grounding"].values()) == pytest.approx(1.0)


@pytest.mark.slow
def test_vllm_backend_rollout_stage_and_resume(run_root) -> None:
    cfg = tiny_run_config(run_root, "vllm")
    summary = rollout_stage(cfg)
    out = cfg.run_dir / "rollouts" / "train"
    users = pq.read_table(out, columns=["user_id"]).column("user_id").to_pylist()
    assert len(set(users)) == NUM_USERS
    check_episodes(out, sorted(set(users)), [0], "base")
    assert summary["episodes"] == NUM_USERS and summary["tokens_per_s"] > 0
    assert json.loads((out / "_stage.json").read_text())["summary"]["episodes"] == NUM_USERS
    again = rollout_stage(cfg)
    assert again["skipped"] is True and again["episodes"] == NUM_USERS


def engine_cores_since(started: float) -> list[psutil.Process]:
    """vLLM engine-core processes (AsyncLLM's child) started after ``started``."""
    found = []
    for proc in psutil.process_iter(["name", "create_time"]):
        if proc.info["create_time"] >= started and "EngineCore" in (proc.info["name"] or ""):
            found.append(proc)
    return found


@pytest.mark.slow
def test_vllm_async_engine_rollout_survives_a_replica_kill_and_equals_the_sync_one(run_root, tmp_path) -> None:
    """policy.engine=async: the replica (and with it its AsyncLLM engine-core process) is killed
    mid-run and restarted; every episode is written exactly once, and equals the sync engine's
    (per-request seeds), and no engine core outlives the rollout."""
    started = time.time()
    users = sorted(load_prepared(tiny_run_config(run_root, "vllm").run_dir).user_histories("train"))[:30]
    labels = EpisodeLabels(run="tiny", policy="base", split="train")
    tables, killed = {}, {}
    for engine in ("sync", "async"):
        # Reports after every finished episode, so the kill comes while most are still running.
        cfg = tiny_run_config(run_root, "vllm", engine, flush_episodes=1, flush_s=0.1)
        sources = run_sources(cfg, model_dir=str(cfg.run_dir / "model" / "base"), split="train", max_steps=4)

        def kill_replica(progress, engine=engine) -> None:
            if engine == "async" and not killed and progress.done >= 1:
                killed["at"] = progress.done
                ray.kill(progress.replicas[0], no_restart=False)

        out = tmp_path / engine
        summary = collect_episodes(cfg, sources, user_ids=users, seeds=[0], temperature=1.0, out_dir=out,
                                   labels=labels, on_report=kill_replica)
        check_episodes(out, users, [0], "base")
        assert summary["episodes"] == len(users)
        tables[engine] = {(r["user_id"], r["seed"]): r for r in pq.read_table(out).to_pylist()}
    assert killed and killed["at"] < len(users)  # killed mid-run
    assert tables["async"] == tables["sync"]
    deadline = time.time() + 30
    while engine_cores_since(started) and time.time() < deadline:
        time.sleep(1)
    assert not engine_cores_since(started)


@pytest.mark.slow
def test_kept_replicas_switch_weights_in_place_and_play_as_fresh_ones(run_root, tmp_path) -> None:
    """rollout.keep_engines: inside one scope the next model's rollout reuses the replica (same
    actor), its engine switched to the new weights; its episodes equal a fresh replica's on that
    model, also when the replica is killed mid-run (Ray rebuilds it on the first model, and it
    switches before it answers). A model that only differs in weights is switched; one with another
    generation config replaces the replica."""
    from rollout.engines import kept_engines

    cfg = tiny_run_config(run_root, "vllm", flush_episodes=1, flush_s=0.1)
    base = cfg.run_dir / "model" / "base"
    other, regenerated = tmp_path / "other", tmp_path / "regenerated"
    perturbed_copy(base, other)
    perturbed_copy(base, regenerated)
    config = json.loads((regenerated / "generation_config.json").read_text())
    (regenerated / "generation_config.json").write_text(json.dumps({**config, "top_k": 5}))
    users = sorted(load_prepared(cfg.run_dir).user_histories("train"))[:20]
    labels = EpisodeLabels(run="tiny", policy="base", split="train")

    def play(model_dir, name, on_report=None):
        sources = run_sources(cfg, model_dir=str(model_dir), split="train", max_steps=4)
        summary = collect_episodes(cfg, sources, user_ids=users, seeds=[0], temperature=1.0,
                                   out_dir=tmp_path / name, labels=labels, on_report=on_report)
        check_episodes(tmp_path / name, users, [0], "base")
        return summary, {(r["user_id"], r["seed"]): r for r in pq.read_table(tmp_path / name).to_pylist()}

    fresh, fresh_episodes = play(other, "fresh")  # no scope: its own replica, killed after
    assert fresh["engines"] == "started"
    killed = {}

    def kill_replica(progress) -> None:
        if not killed and progress.done >= 1:
            killed["at"] = progress.done
            ray.kill(progress.replicas[0], no_restart=False)

    with kept_engines() as pool:
        first, first_episodes = play(base, "first")
        replica = pool.replicas[0]
        switched, switched_episodes = play(other, "switched", on_report=kill_replica)
        assert switched["engines"] == "switched" and pool.replicas[0] is replica
        again, again_episodes = play(other, "again")
        assert again["engines"] == "kept" and again["replica_stats"][0]["swaps"] == 0
        replaced, _ = play(regenerated, "regenerated")
        assert replaced["engines"] == "replaced: generation_config.json differs"
        assert pool.replicas[0] is not replica
    assert killed and killed["at"] < len(users)  # killed mid-run, after the switch
    assert first_episodes != fresh_episodes  # the weights did change what the policy writes
    assert switched_episodes == fresh_episodes and again_episodes == fresh_episodes
    assert not pool.replicas  # the scope's end released them
