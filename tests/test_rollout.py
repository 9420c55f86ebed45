"""Rollout: the shard step rules (no Ray), then the actors end to end with a scripted policy,
including actors killed mid-run. Real models on both backends: tests/test_rollout_models.py."""

from __future__ import annotations

import dataclasses
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from rollout.driver import collect_episodes, episode_specs, read_episodes_dataset
from rollout.episode import (
    EPISODE_SCHEMA,
    EpisodeLabels,
    EpisodeState,
    GroundedAction,
    RolloutSummary,
    generation_seed,
    rows_to_table,
)
from rollout.replica import parse_and_ground
from rollout.shard import Lane, finished_row
from _rollout_helpers import (
    TITLES,
    fake_sources,
    hash_grounder_factory,
    register_by_value,
    rollout_config,
    tiny_env,
)
from ulrec.errors import InputError, UlrecError
from ulrec.policy import GenerationResult
from ulrec.prompts import PromptBuilder
from ulrec.simulator import EchoChamberEnv, EnvConfig, MatrixUserModel

LABELS = EpisodeLabels(run="t", policy="scripted", split="train")
SMALL_TITLES = ["Alpha", "Beta", "Gamma", "Delta", "Eps"]


def small_env(max_steps: int = 10) -> EchoChamberEnv:
    rewards = np.array(
        [
            [5, 5, 1, 5, 5],  # user 0
            [4, 4, 4, 1, 4],  # user 1
            [3, 3, 3, 3, 3],  # user 2
        ],
        dtype=np.float32,
    )
    distances = np.full((5, 5), 10.0, dtype=np.float32)
    np.fill_diagonal(distances, 0.0)
    model = MatrixUserModel(rewards=rewards, distances=distances)
    return EchoChamberEnv(model, EnvConfig(distance_threshold=1.0, max_steps=max_steps))


def act(raw: str, item: int, substituted: bool = False) -> GroundedAction:
    if item < 0:
        return GroundedAction(raw, 3, -1, "", False, True)
    return GroundedAction(raw, 3, item, SMALL_TITLES[item], substituted, False)


# ------------------------------------------------------------------------------- shard step logic
def test_lane_records_substitutions_in_prompts_and_ends_format_errors() -> None:
    builder = PromptBuilder()
    episodes = [EpisodeState(0, 7, (3, 4)), EpisodeState(1, 7, (0,)), EpisodeState(2, 7, ())]
    lane = Lane(small_env(), episodes, builder, SMALL_TITLES)

    rows, prompts, seeds = lane.requests()
    assert rows == [0, 1, 2]
    assert seeds == [generation_seed(7, u, 1) for u in (0, 1, 2)]
    assert prompts[0] == builder.build(["Delta", "Eps"], [])
    step1_prompts = prompts

    finished = lane.apply(rows, [act(" recommend[ Alpha ]", 0), act(" recommend[ Betta ]", 1, True), act("hmm", -1)])
    assert [e.user_id for e in finished] == [2]
    assert episodes[2].steps[0].reason == "format_error" and episodes[2].steps[0].item_id == -1
    assert lane.running.tolist() == [True, True, False]

    rows, prompts, seeds = lane.requests()
    assert rows == [0, 1]
    assert seeds == [generation_seed(7, 0, 2), generation_seed(7, 1, 2)]
    assert "Action 1: recommend[ Alpha ]\nObservation 1: The user stayed, reward=5.00\nAction 2:" in prompts[0]
    # The policy is told what was really recommended in place of its misspelt title.
    assert "Action 1: recommend[ Betta ]" in prompts[1]
    assert "'Betta' is not in the catalogue; recommended 'Beta' instead" in prompts[1]
    assert prompts[1].endswith("Action 2:")
    step2_prompts = prompts

    finished = lane.apply(rows, [act(" recommend[ Alpha ]", 0), act(" recommend[ Delta ]", 3)])
    assert {e.user_id: e.exit_reason for e in finished} == {0: "repeat", 1: "low_reward"}
    assert lane.num_running == 0
    assert len(episodes[2].steps) == 1  # untouched while the env ended its row

    row0 = finished_row(episodes[0], LABELS, builder, SMALL_TITLES)
    assert (row0["length"], row0["total_reward"], row0["exit_reason"]) == (1, 5.0, "repeat")
    assert [s["prompt"] for s in row0["steps"]] == [step1_prompts[0], step2_prompts[0]]
    assert [s["reason"] for s in row0["steps"]] == ["stay", "repeat"]
    assert [s["live"] for s in row0["steps"]] == [True, False]
    row1 = finished_row(episodes[1], LABELS, builder, SMALL_TITLES)
    assert row1["steps"][0]["substituted"] and row1["steps"][0]["title"] == "Beta"
    assert (row1["length"], row1["total_reward"], row1["exit_reason"]) == (1, 4.0, "low_reward")
    row2 = finished_row(episodes[2], LABELS, builder, SMALL_TITLES)
    assert row2["exit_reason"] == "format_error" and row2["length"] == 0
    assert row2["steps"][0] | {"prompt": None} == {
        "step": 1, "prompt": None, "raw_output": "hmm", "item_id": -1, "title": "",
        "substituted": False, "reward": 0.0, "live": False, "reason": "format_error",
    }
    table = rows_to_table([row0, row1, row2])
    assert table.schema.equals(EPISODE_SCHEMA)
    assert table.column("num_generated_tokens").to_pylist() == [6, 6, 3]


def test_lane_horizon_counts_the_last_step() -> None:
    episodes = [EpisodeState(2, 0, (1,))]
    lane = Lane(small_env(max_steps=2), episodes, PromptBuilder(), SMALL_TITLES)
    assert lane.apply([0], [act(" recommend[ Alpha ]", 0)]) == []
    (done,) = lane.apply([0], [act(" recommend[ Gamma ]", 2)])
    row = finished_row(done, LABELS, PromptBuilder(), SMALL_TITLES)
    assert (row["length"], row["total_reward"], row["exit_reason"]) == (2, 6.0, "horizon")
    assert [s["reason"] for s in row["steps"]] == ["stay", "horizon"]


def test_generation_seed_is_fixed_by_episode_and_step() -> None:
    seeds = {generation_seed(s, u, k) for s in range(3) for u in range(50) for k in range(1, 20)}
    assert len(seeds) == 3 * 50 * 19
    assert all(0 <= s < 2**31 for s in seeds)
    assert generation_seed(1, 2, 3) == generation_seed(1, 2, 3)


def test_parse_and_ground_marks_exact_substituted_and_unreadable() -> None:
    grounder = hash_grounder_factory(TITLES)
    results = [
        GenerationResult(" recommend[ Heat (1995) ]", 5),
        GenerationResult(" recommend[ [REC] (2007) remastered ]", 6),
        GenerationResult("no action here", 3),
    ]
    exact, sub, bad = parse_and_ground(results, grounder)
    assert (exact.item_id, exact.substituted, exact.format_error) == (0, False, False)
    assert (sub.item_id, sub.title, sub.substituted) == (1, "[REC] (2007)", True)
    assert (bad.item_id, bad.title, bad.format_error, bad.raw_output) == (-1, "", True, "no action here")


def test_episode_specs_reject_bad_input() -> None:
    histories = {0: [1, 2, 3], 1: [4]}
    assert episode_specs([0, 1], [5], histories, 2) == [(0, 5, (2, 3)), (1, 5, (4,))]
    with pytest.raises(InputError, match="duplicates"):
        episode_specs([0, 0], [5], histories, 2)
    with pytest.raises(InputError, match="user 7"):
        episode_specs([7], [5], histories, 2)
    with pytest.raises(InputError, match="seeds is empty"):
        episode_specs([0], [], histories, 2)


# ----------------------------------------------------------------------------- on Ray, end to end
@pytest.fixture(scope="module")
def ray_session():
    register_by_value()
    ray.init(num_cpus=2, object_store_memory=300 * 1024**2, include_dashboard=False)
    yield
    ray.shutdown()


def reference_rows(sources, specs, max_steps: int, builder: PromptBuilder, labels: EpisodeLabels) -> dict:
    """Each episode played alone, in a plain loop, with the same policy, grounder and env."""
    policy = sources.policy_factory(sources.titles)
    grounder = sources.grounder_factory(sources.titles)
    rows = {}
    for user, seed, history in specs:
        episode = EpisodeState(user, seed, history)
        lane = Lane(sources.env_factory(), [episode], builder, sources.titles)
        while lane.num_running:
            idx, prompts, seeds = lane.requests()
            lane.apply(idx, parse_and_ground(policy.generate(prompts, seeds, 1.0), grounder))
        rows[(user, seed)] = finished_row(episode, labels, builder, sources.titles)
    return rows


def check_dataset(out_dir, expected: dict) -> pa.Table:
    table = pq.read_table(out_dir)
    assert table.schema.equals(EPISODE_SCHEMA)
    keys = list(zip(table.column("user_id").to_pylist(), table.column("seed").to_pylist()))
    assert len(keys) == len(set(keys)) == len(expected)
    for row in table.to_pylist():
        assert row == expected[(row["user_id"], row["seed"])]
    return table


def run(cfg, sources, users, seeds, out_dir, on_report=None) -> dict:
    return collect_episodes(
        cfg, sources, user_ids=users, seeds=seeds, temperature=1.0, out_dir=out_dir, labels=LABELS, on_report=on_report
    )


@pytest.mark.parametrize("engine", ["sync", "async"])
def test_rollout_matches_a_plain_loop_and_writes_each_episode_once(ray_session, tmp_path, engine) -> None:
    cfg = rollout_config(tmp_path, num_replicas=2, episodes_per_file=40)
    max_steps = 6
    sources = fake_sources(60, max_steps, engine=engine, delay_s=0.01 if engine == "async" else 0.0)
    users, seeds = list(range(50)), [0, 1]
    out = tmp_path / "episodes"
    summary = run(cfg, sources, users, seeds, out)

    specs = episode_specs(users, seeds, sources.histories, cfg.policy.history_length)
    table = check_dataset(out, reference_rows(sources, specs, max_steps, PromptBuilder(), LABELS))
    parts = sorted(p.name for p in out.iterdir())
    assert len(parts) >= 2 and all(p.startswith("part-") and p.endswith(".parquet") for p in parts)
    assert read_episodes_dataset(out).count() == 100

    expected = RolloutSummary()
    expected.add(table)
    assert summary["episodes"] == 100 and summary["steps"] == expected.steps
    assert summary["mean_length"] == pytest.approx(np.mean(table.column("length").to_numpy()))
    assert summary["generated_tokens"] == sum(table.column("num_generated_tokens").to_pylist())
    assert sum(summary["exit_reasons"].values()) == pytest.approx(1.0)
    assert summary["exit_reasons"]["horizon"] > 0 and summary["exit_reasons"]["format_error"] > 0
    assert summary["grounding"]["substituted"] > 0 and summary["grounding"]["exact"] > 0.5
    assert summary["restarts"] == 0
    for row in table.slice(0, 10).to_pylist():
        steps = row["steps"]
        assert [s["step"] for s in steps] == list(range(1, len(steps) + 1))
        assert all(s["prompt"].endswith(f"Action {s['step']}:") for s in steps)
        assert row["length"] == sum(s["live"] for s in steps)
        assert steps[-1]["reason"] == row["exit_reason"] and all(s["reason"] == "stay" for s in steps[:-1])


def _kill_once(kind: str):
    """An on_report hook that kills one actor of ``kind`` once some episodes are done."""
    state = {"killed_at": None}

    def hook(progress) -> None:
        if state["killed_at"] is None and progress.done >= 5:
            actor = progress.shards[0] if kind == "shard" else progress.replicas[0]
            state["killed_at"] = progress.done
            ray.kill(actor, no_restart=False)

    return hook, state


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["sync", "async"])
@pytest.mark.parametrize("kind", ["shard", "replica"])
def test_killed_actor_is_restarted_and_each_episode_written_once(ray_session, tmp_path, kind, engine) -> None:
    cfg = rollout_config(tmp_path)
    max_steps = 8
    sources = fake_sources(40, max_steps, delay_s=0.03, engine=engine)
    users, seeds = list(range(40)), [3]
    hook, state = _kill_once(kind)
    summary = run(cfg, sources, users, seeds, tmp_path / "episodes", on_report=hook)

    assert state["killed_at"] is not None and state["killed_at"] < 40  # killed mid-run
    specs = episode_specs(users, seeds, sources.histories, cfg.policy.history_length)
    check_dataset(tmp_path / "episodes", reference_rows(sources, specs, max_steps, PromptBuilder(), LABELS))
    assert summary["episodes"] == 40
    if kind == "shard":
        assert summary["restarts"] == 1


def test_replica_whose_async_engine_died_is_restarted(ray_session, tmp_path) -> None:
    """An AsyncPolicy whose engine is gone for good (AsyncLLM's engine core lost) ends its replica,
    which Ray restarts with a fresh engine; every episode is still written once."""
    cfg = rollout_config(tmp_path)
    max_steps = 6
    marker = tmp_path / "engine-died"
    sources = fake_sources(30, max_steps, engine="async", delay_s=0.01, die_once=str(marker))
    users, seeds = list(range(30)), [0]
    summary = run(cfg, sources, users, seeds, tmp_path / "episodes")
    assert marker.exists()
    specs = episode_specs(users, seeds, sources.histories, cfg.policy.history_length)
    check_dataset(tmp_path / "episodes", reference_rows(sources, specs, max_steps, PromptBuilder(), LABELS))
    assert summary["episodes"] == 30


def test_failed_rollout_leaves_no_output(ray_session, tmp_path) -> None:
    cfg = rollout_config(tmp_path)
    sources = fake_sources(10, 4)
    bad = dataclasses.replace(sources, env_factory=partial(tiny_env, 10, len(TITLES), 0))  # max_steps 0
    with pytest.raises(ray.exceptions.RayActorError, match="max_steps"):
        run(cfg, bad, list(range(10)), [0], tmp_path / "episodes")
    assert not (tmp_path / "episodes").exists()


def test_actors_that_cannot_be_placed_fail_with_what_they_asked_for(ray_session, tmp_path) -> None:
    cfg = rollout_config(tmp_path, replica_num_gpus=1.0, start_timeout_s=2)  # the session has no GPU
    with pytest.raises(UlrecError, match=r"did not start within rollout.start_timeout_s=2 s: 1 replica\(s\) need 0.5 CPU \+ 1 GPU"):
        run(cfg, fake_sources(4, 2), list(range(4)), [0], tmp_path / "episodes")
    assert not (tmp_path / "episodes").exists()


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["sync", "async"])
@pytest.mark.parametrize("kind", ["shard", "replica"])
def test_actor_dead_for_good_fails_the_rollout_without_output(ray_session, tmp_path, kind, engine) -> None:
    cfg = rollout_config(tmp_path, max_restarts=0)
    sources = fake_sources(40, 8, delay_s=0.03, engine=engine)
    hook, state = _kill_once(kind)
    with pytest.raises(ray.exceptions.RayActorError):
        run(cfg, sources, list(range(40)), [0], tmp_path / "episodes", on_report=hook)
    assert state["killed_at"] is not None
    assert not (tmp_path / "episodes").exists()


def test_lanes_keep_their_replica_until_it_fails_or_falls_behind():
    """Lane → replica affinity (prefix-cache reuse), with fail-over and overload moves."""
    import asyncio

    from ray.exceptions import RayActorError

    from rollout.shard import _ReplicaRouter

    class FakeReplica:
        def __init__(self, name):
            self.name, self.calls, self.fail = name, [], False
            outer = self

            class Act:
                async def remote(self, prompts, seeds, temperature, model=None):
                    outer.calls.append(len(prompts))
                    if outer.fail:
                        raise RayActorError()
                    await asyncio.sleep(0)
                    return [outer.name] * len(prompts)

            self.act = Act()

    a, b = FakeReplica("a"), FakeReplica("b")
    router = _ReplicaRouter([a, b], attempts=3, backoff_s=0.5, slack=4)

    async def rounds(n, lanes=4):
        served = {lane: [] for lane in range(lanes)}
        for _ in range(n):
            answers = await asyncio.gather(*(router.act(["p"] * 2, [0, 1], 1.0, lane=lane) for lane in range(lanes)))
            for lane, answer in enumerate(answers):
                served[lane].append(answer[0])
        return served

    served = asyncio.run(rounds(5))
    assert all(len(set(names)) == 1 for names in served.values())  # each lane stays home
    assert sorted(names[0] for names in served.values()) == ["a", "a", "b", "b"]  # balanced homes
    assert router.moves == 0
    b.fail = True  # b dies: its lanes move to a and stay there
    served = asyncio.run(rounds(3))
    assert all(names == ["a"] * 3 for names in served.values())
    assert router.moves == 2
    # Overload: a lane whose home has more than `slack` prompts outstanding beyond the least-loaded moves.
    b.fail = False
    router.outstanding, router.down_until = [10, 0], [0.0, 0.0]  # b is back
    router.home[0] = 0
    assert router._pick(0) == 1 and router.home[0] == 1


def test_a_restarting_replica_is_waited_for_without_using_up_attempts():
    """ActorUnavailableError (restarting, e.g. an AsyncLLM replica rebuilding its engine) does not
    count against the request's attempts; other actor failures do."""
    import asyncio

    from ray.exceptions import ActorUnavailableError, RayActorError

    from rollout.shard import _ReplicaRouter

    class Flaky:
        def __init__(self, errors):
            self.errors = list(errors)
            outer = self

            class Act:
                async def remote(self, prompts, seeds, temperature, model=None):
                    if outer.errors:
                        raise outer.errors.pop(0)
                    return ["ok"] * len(prompts)

            self.act = Act()

    restarting = Flaky([ActorUnavailableError("The actor is restarting", None) for _ in range(6)])
    router = _ReplicaRouter([restarting], attempts=2, backoff_s=0.01)
    assert asyncio.run(router.act(["p"], [0], 1.0, lane=0)) == ["ok"]
    dying = Flaky([RayActorError(), RayActorError(), RayActorError()])
    router = _ReplicaRouter([dying], attempts=2, backoff_s=0.01)
    with pytest.raises(RayActorError):
        asyncio.run(router.act(["p"], [0], 1.0, lane=0))
    assert len(dying.errors) == 1  # gave up after 2 attempts
