"""RL baselines (train/baselines): rules as unit tests, then RLlib training on the designed env.

The designed environment (tests/_baselines_helpers.py) has a known non-repeating high-reward cycle
and a uniformly random recommender leaves after about one step.
"""

from __future__ import annotations

import math

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from gymnasium import spaces

from _baselines_helpers import (
    CLUSTERS,
    GOOD,
    N_USERS,
    PER_CLUSTER,
    PROTOCOL,
    cluster_of,
    cluster_user_model,
    make_run_dir,
    round_robin_items,
    save_cluster_user_model,
)
from rollout.episode import EPISODE_SCHEMA
from ulrec.io import read_json
from ulrec.simulator import EchoChamberEnv
from ulrec.simulator.gym_env import EchoChamberGymEnv

from train.baselines.dorl import DORLRewardWrapper, fit_matrix_members, next_item_entropy
from train.baselines.env import env_config, make_env, window_observations
from train.baselines.evaluate import episode_rows, run_episodes
from train.baselines.logged import (
    BehaviourPolicy,
    collect_episodes,
    episode_stats,
    logged_episode_id,
    pack_episode,
    unpack_episode,
)
from train.baselines.module import ItemActorCriticModule, ItemQModule

N_ITEMS = CLUSTERS * PER_CLUSTER
W = PROTOCOL.window


def _spaces(n_items: int = N_ITEMS, window: int = W) -> tuple[spaces.Dict, spaces.Discrete]:
    obs = spaces.Dict(
        {
            "items": spaces.MultiDiscrete(np.full(window, n_items + 1)),
            "rewards": spaces.Box(0.0, 5.0, (window,), np.float32),
        }
    )
    return obs, spaces.Discrete(n_items)


def _q_module(bias: np.ndarray, *, heads=("q",), act="q", imitation_bias: np.ndarray | None = None) -> ItemQModule:
    """A module whose scores ignore the state: head(s) = bias (projections zeroed)."""
    obs_space, act_space = _spaces(len(bias))
    module = ItemQModule(
        observation_space=obs_space,
        action_space=act_space,
        model_config={"heads": list(heads), "act": act, "embedding_dim": 4, "hidden": [8], "bcq_threshold": 0.6},
    )
    with torch.no_grad():
        for name, proj in module.net.proj.items():
            proj.weight.zero_()
            proj.bias.zero_()
        module.net.bias["q"].copy_(torch.as_tensor(bias, dtype=torch.float32))
        if imitation_bias is not None:
            module.net.bias["imitation"].copy_(torch.as_tensor(imitation_bias, dtype=torch.float32))
    return module


def _obs(items: list[list[int]], seen: list[list[int]] | None = None, n_items: int = N_ITEMS) -> dict:
    obs = {"items": torch.tensor(items), "rewards": torch.full((len(items), len(items[0])), 4.0)}
    if seen is not None:
        obs["seen"] = torch.tensor(seen)
    return obs


# ----------------------------------------------------------------------------------- observation
def test_window_observations_match_the_gym_view():
    model = cluster_user_model()
    gym_env = EchoChamberGymEnv(user_model=model, **vars(PROTOCOL))
    obs, _ = gym_env.reset(options={"user_id": 3})
    plan = list(round_robin_items(6))
    history, rewards = np.full((1, PROTOCOL.max_steps), N_ITEMS), np.zeros((1, PROTOCOL.max_steps), np.float32)
    for t, item in enumerate(plan):
        mine = window_observations(history, rewards, np.array([t]), W, N_ITEMS)
        np.testing.assert_array_equal(mine["items"][0], obs["items"])
        np.testing.assert_allclose(mine["rewards"][0], obs["rewards"])
        obs, reward, terminated, _, _ = gym_env.step(item)
        assert not terminated
        history[0, t], rewards[0, t] = item, reward


# ---------------------------------------------------------------------------------------- module
def test_acting_masks_window_and_seen_items_but_training_scores_stay_raw():
    bias = np.arange(N_ITEMS, dtype=np.float32)  # an unmasked argmax would always pick the last item
    module = _q_module(bias)
    window = [[N_ITEMS, N_ITEMS, 38, 39]]
    out = module.forward_inference({"obs": _obs(window)})
    assert int(out["actions"][0]) == 37
    out = module.forward_inference({"obs": _obs(window, seen=[[37, 36, N_ITEMS]])})
    assert int(out["actions"][0]) == 35
    # Exploration with ε = 0 is greedy on the same masked scores.
    assert int(module.forward_exploration({"obs": _obs(window)}, t=0)["actions"][0]) == 37

    module.make_target_networks()
    batch = {"obs": _obs(window), "new_obs": _obs(window)}
    q = module.forward_train(batch)["qf_preds"]
    np.testing.assert_allclose(q[0].detach().numpy(), bias)  # no mask inside the loss inputs


def test_bcq_acts_on_q_restricted_to_plausible_items():
    q_bias = np.zeros(N_ITEMS, np.float32)
    q_bias[0], q_bias[5], q_bias[6] = 10.0, 2.0, 1.0  # item 0: best Q but implausible
    imitation = np.full(N_ITEMS, -10.0, np.float32)
    imitation[5] = imitation[6] = 3.0
    module = _q_module(q_bias, heads=("q", "imitation"), act="bcq", imitation_bias=imitation)
    empty = [[N_ITEMS] * W]
    assert int(module.forward_inference({"obs": _obs(empty)})["actions"][0]) == 5
    assert int(module.forward_inference({"obs": _obs([[N_ITEMS] * (W - 1) + [5]])})["actions"][0]) == 6
    # Every plausible item already shown: fall back to the best unseen Q.
    assert int(module.forward_inference({"obs": _obs([[N_ITEMS, N_ITEMS, 5, 6]])})["actions"][0]) == 0


def test_policy_module_samples_only_unseen_items():
    obs_space, act_space = _spaces()
    module = ItemActorCriticModule(
        observation_space=obs_space,
        action_space=act_space,
        model_config={"heads": ["policy", "value"], "act": "policy", "embedding_dim": 4, "hidden": [8]},
    )
    window = [[1, 2, 3, 4]] * 256
    actions = module.forward_exploration({"obs": _obs(window)})["actions"].numpy()
    assert not np.isin(actions, [1, 2, 3, 4]).any()
    assert len(np.unique(actions)) > 5
    values = module.compute_values({"obs": _obs(window)})
    assert values.shape == (256,)


# ----------------------------------------------------------------------------------- logged data
def test_behaviour_episodes_follow_the_env_and_roundtrip_rllib_format():
    model = cluster_user_model()
    env = EchoChamberEnv(model, PROTOCOL)
    popularity = np.ones(N_ITEMS)
    policy = BehaviourPolicy(popularity, epsilon=0.3, rng=np.random.default_rng(0))
    users = np.arange(N_USERS).repeat(4)
    episodes = collect_episodes(env, users, policy, window=W)
    lengths = env.lengths
    for k, episode in enumerate(episodes):
        actions = np.asarray(episode.get_actions())
        assert len(set(actions.tolist())) == len(actions)  # the behaviour policy never repeats
        assert episode.is_done and (episode.is_truncated == (env.exit_reasons[k] == "horizon"))
        assert len(actions) == lengths[k] + (1 if episode.is_terminated else 0)
        live = actions[: lengths[k]]
        np.testing.assert_allclose(
            episode.get_rewards()[: lengths[k]], model.reward(np.full(len(live), users[k]), live), rtol=1e-6
        )
        if episode.is_terminated:
            assert episode.get_rewards()[-1] == 0.0
        np.testing.assert_array_equal(episode.get_observations(0)["items"], [N_ITEMS] * W)
    again = unpack_episode(pack_episode(episodes[0]))
    np.testing.assert_array_equal(again.get_actions(), episodes[0].get_actions())
    np.testing.assert_array_equal(again.get_observations(-1)["items"], episodes[0].get_observations(-1)["items"])
    stats = episode_stats(episodes)
    assert stats["len_mean"] == pytest.approx(lengths.mean())
    assert stats["reward_mean"] == pytest.approx(env.total_rewards.mean(), rel=1e-5)
    # Fixed ids (the pre-learner orders by them), kept through the Parquet format.
    assert [e.id_ for e in episodes] == [logged_episode_id(k) for k in range(len(episodes))]
    assert again.id_ == episodes[0].id_


def test_prelearner_buffer_adds_an_unordered_batch_in_id_order():
    """RLlib's OfflinePreLearner passes a set of episodes (identity-hashed: its order follows memory
    addresses); the buffer must hold them in the same order however the set iterates."""
    from ray.rllib.env.single_agent_episode import SingleAgentEpisode

    from train.baselines.seeding import SeededPrelearnerBuffer

    def episodes():
        return [SingleAgentEpisode(id_=logged_episode_id(k), observations=[0, 1], actions=[k], rewards=[1.0],
                                   terminated=True, len_lookback_buffer=0) for k in range(12)]

    orders = []
    for permutation in (range(12), reversed(range(12)), [5, 0, 11, 3, 7, 1, 9, 2, 10, 4, 8, 6]):
        made = episodes()
        buffer = SeededPrelearnerBuffer(capacity=1000, seed=0)
        buffer.add({made[k] for k in permutation})
        orders.append([e.id_ for e in buffer.episodes])
        assert [int(e.get_actions()[0]) for e in buffer.episodes] == list(range(12))
    assert orders[0] == orders[1] == orders[2]
    # An ordered batch keeps its order (DQN's replay buffer and any caller passing a list).
    listed = SeededPrelearnerBuffer(capacity=1000, seed=0)
    listed.add(list(reversed(episodes())))
    assert [e.id_ for e in listed.episodes] == [logged_episode_id(k) for k in reversed(range(12))]


def test_behaviour_policy_without_exploration_draws_only_popular_items():
    popularity = np.zeros(N_ITEMS)
    popularity[[3, 7, 11, 19]] = 1.0
    policy = BehaviourPolicy(popularity, epsilon=0.0, rng=np.random.default_rng(1))
    policy.begin(np.zeros(500, dtype=np.int64), horizon=4)
    history = np.full((500, 4), N_ITEMS)
    items = policy.act(np.arange(500), history, np.zeros(500, dtype=np.int64))
    assert set(items.tolist()) == {3, 7, 11, 19}


def test_behaviour_policy_replays_user_sequences_then_falls_back_to_popularity():
    popularity = np.zeros(N_ITEMS)
    popularity[39] = 1.0
    cycle = round_robin_items(CLUSTERS * GOOD)
    policy = BehaviourPolicy(popularity, 0.0, np.random.default_rng(2), sequences={0: cycle, 1: cycle[:3]})
    env = EchoChamberEnv(cluster_user_model(), PROTOCOL)
    episodes = collect_episodes(env, np.array([0, 1]), policy, window=W)
    replayed = np.asarray(episodes[0].get_actions())
    start = int(np.flatnonzero(cycle == replayed[0])[0])
    np.testing.assert_array_equal(replayed, cycle[start : start + PROTOCOL.max_steps])
    assert episodes[0].is_truncated  # the logged cycle is a good episode: it reaches the horizon
    np.testing.assert_array_equal(episodes[1].get_actions(), list(cycle[:3]) + [39])


# ------------------------------------------------------------------------------------------- DORL
def test_next_item_entropy_by_hand():
    entropy = next_item_entropy([[0, 1], [0, 2], [1]], n_items=3)
    assert entropy[0] == pytest.approx(math.log(2))
    assert entropy[1] == 0.0 and entropy[2] == 0.0
    assert entropy[3] == pytest.approx(-(2 / 3) * math.log(2 / 3) - (1 / 3) * math.log(1 / 3))


def test_matrix_ensemble_recovers_a_low_rank_matrix_and_bootstraps_differ(tmp_path):
    rng = np.random.default_rng(0)
    rewards = (rng.normal(size=(30, 2)) @ rng.normal(size=(2, 20))).astype(np.float32)
    exact = fit_matrix_members(rewards, 1, tmp_path / "exact", rank=2, keep=1.0)
    with np.load(exact[0]["path"]) as f:
        np.testing.assert_allclose(f["users"] @ f["items"].T, rewards, atol=1e-3)
    boot = fit_matrix_members(rewards, 2, tmp_path / "boot", rank=2, keep=0.8)
    with np.load(boot[0]["path"]) as a, np.load(boot[1]["path"]) as b:
        assert np.abs(a["users"] @ a["items"].T - b["users"] @ b["items"].T).mean() > 1e-3


def test_dorl_wrapper_shapes_accepted_steps_only(tmp_path):
    model = cluster_user_model()
    n_users = model.n_users
    # Two members that differ by 1 on item 0 only: variance 0.25 there, 0 elsewhere.
    base_items = np.eye(N_ITEMS, dtype=np.float32)
    for k, shift in enumerate((0.0, 1.0)):
        users = np.full((n_users, N_ITEMS), 3.0, np.float32)
        users[:, 0] += shift
        np.savez(tmp_path / f"m{k}.npz", users=users, items=base_items)
    entropy = np.zeros(N_ITEMS + 1, np.float32)
    entropy[N_ITEMS], entropy[0] = 2.0, 1.0
    np.save(tmp_path / "entropy.npy", entropy)
    env = DORLRewardWrapper(
        EchoChamberGymEnv(user_model=model, **vars(PROTOCOL)),
        members=[{"kind": "factors", "path": str(tmp_path / f"m{k}.npz")} for k in range(2)],
        entropy_path=str(tmp_path / "entropy.npy"),
        lambda_var=0.4,
        lambda_ent=0.1,
    )
    env.reset(options={"user_id": 2})
    _, reward, terminated, _, info = env.step(0)  # first step: start-state entropy, item 0's variance
    assert not terminated
    assert reward == pytest.approx(info["raw_reward"] - 0.4 * 0.25 + 0.1 * 2.0)
    _, reward, terminated, _, info = env.step(PER_CLUSTER)  # previous item 0: entropy 1, variance 0
    assert reward == pytest.approx(info["raw_reward"] + 0.1 * 1.0)
    _, reward, terminated, _, info = env.step(1)  # same cluster as item 0: the user leaves
    assert terminated and reward == 0.0


# ------------------------------------------------------------------------------------- evaluation
def test_oracle_module_plays_the_known_cycle_and_rows_follow_the_episode_schema():
    # Scores fall along the round-robin order, so the greedy unseen choice walks the good cycle.
    order = round_robin_items(CLUSTERS * GOOD)
    bias = np.full(N_ITEMS, -100.0, np.float32)
    bias[order] = -np.arange(len(order), dtype=np.float32)
    module = _q_module(bias)
    env = EchoChamberEnv(cluster_user_model(seed=1), PROTOCOL)
    users = list(range(N_USERS))
    played = run_episodes(module, env, users, [0, 1], sample=False)
    assert (played["length"] == PROTOCOL.max_steps).all()
    assert set(played["exit_reason"]) == {"horizon"}
    rows = episode_rows(played, run="r", policy="oracle", split="test", titles=None)
    table = pa.Table.from_pylist(rows, schema=EPISODE_SCHEMA)
    assert table.num_rows == 2 * N_USERS
    for row in rows:
        items = [s["item_id"] for s in row["steps"]]
        assert len(set(items)) == len(items)
        assert row["total_reward"] == pytest.approx(sum(s["reward"] for s in row["steps"] if s["live"]))


# --------------------------------------------------------------------------------- RLlib training
@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(address="local", num_cpus=2, object_store_memory=300 * 1024**2, include_dashboard=False,
             log_to_driver=False)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    ray.shutdown()


def random_policy(users: list[int], seeds: list[int]) -> tuple[float, float]:
    """A uniformly random recommender on the test simulator: mean Len, share of low-reward exits."""
    env = EchoChamberEnv(cluster_user_model(seed=1), PROTOCOL)
    lengths, low = [], []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        env.reset(np.asarray(users))
        while not env.done.all():
            env.step(rng.integers(0, N_ITEMS, len(users)))
        lengths.append(env.lengths.mean())
        low.append(np.mean(env.exit_reasons == "low_reward"))
    return float(np.mean(lengths)), float(np.mean(low))


ALL_ALGOS = ["dqn", "a2c", "dorl", "cql", "bcq", "crr", "sqn"]


@pytest.mark.parametrize("algo_name", ALL_ALGOS)
def test_each_algorithm_trains_a_few_iterations(tmp_path, ray_session, algo_name):
    from ray.rllib.core.rl_module.rl_module import RLModule

    from train.baselines.algos import build_config
    from train.baselines.dorl import prepare_dorl
    from train.baselines.logged import write_episodes
    from train.baselines.run import MODULE_IN_CHECKPOINT

    cfg = make_run_dir(tmp_path, **{"baselines.online_env_steps": 64, "baselines.offline_updates": 4,
                                    "baselines.onpolicy_batch_size": 32, "baselines.batch_size": 16,
                                    "baselines.num_envs": 2, "baselines.embedding_dim": 8,
                                    "baselines.hidden": "[16]", "baselines.dorl_ensemble": 2})
    sim_dir = cfg.run_dir / "simulators" / "train"
    model = cluster_user_model()
    econf = env_config(sim_dir, PROTOCOL)
    probe = make_env(econf)
    logged = None
    if algo_name in ("cql", "bcq", "crr", "sqn"):
        episodes = collect_episodes(EchoChamberEnv(model, PROTOCOL), np.arange(N_USERS).repeat(4),
                                    BehaviourPolicy(np.ones(N_ITEMS), 0.3, np.random.default_rng(0)), window=W)
        logged = str(write_episodes(episodes, tmp_path / "logged.parquet"))
    if algo_name == "dorl":
        econf = {**econf, "dorl": prepare_dorl(cfg, sim_dir, model, [], tmp_path / "dorl")}
    config = build_config(algo_name, cfg.baselines, seed=0, env_config=econf, logged_path=logged,
                          observation_space=probe.observation_space, action_space=probe.action_space)
    algo = config.build_algo()
    try:
        for _ in range(20):  # DQN samples a few steps before its first update
            losses = algo.train().get("learners", {}).get("default_policy")
            if losses:
                break
        assert losses, f"{algo_name} made no update"
        total = losses.get("total_loss", losses.get("qf_loss"))
        assert total is not None and np.isfinite(float(total))
        algo.save_to_path(tmp_path / "ckpt")
    finally:
        algo.stop()
    module = RLModule.from_checkpoint(tmp_path / "ckpt" / MODULE_IN_CHECKPOINT)
    played = run_episodes(module, EchoChamberEnv(model, PROTOCOL), [0, 1, 2], [0], sample=algo_name in ("a2c", "dorl", "crr"))
    assert (played["length"] >= 0).all() and len(played["steps"]) == 3


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~2 CPU-minutes; the default 600 s is too tight on a shared, busy CPU
def test_stage_trains_every_baseline_beats_random_and_resumes(tmp_path, ray_session, monkeypatch):
    """The `ulrec baselines` stage on the designed env: each algorithm beats random.

    Every method must learn which items users like: far fewer low-reward exits than random (about
    half of random's episodes end that way) and its first recommendation accepted. The online
    methods must also learn the cluster cycle: Len ≥ random + 1 (about twice random's). The offline
    methods are held to the first criterion only: with ~1k updates on a few hundred logged
    episodes their greedy sequential behaviour varies from run to run (measured Len 1.0–7.0 for
    BCQ, 2.9–6.4 for CQL, 3.1–4.6 for CRR, 1.0–4.3 for SQN), while item quality is learned every
    time.
    """
    from train.baselines.run import baselines_stage

    # A relative run.root, as in the configs (RLlib rejects relative checkpoint paths; Ray's
    # workers started elsewhere): the stage must make its paths absolute.
    monkeypatch.chdir(tmp_path)
    cfg = make_run_dir(
        Path("relative-root"),
        **{
            "baselines.algos": ",".join(ALL_ALGOS),
            "baselines.online_env_steps": 3000,
            "baselines.onpolicy_env_steps": 8000,
            "baselines.offline_updates": 600,
            "baselines.offline_episodes": 400,
            "baselines.embedding_dim": 16,
            "baselines.dorl_ensemble": 2,
            "baselines.train_seeds": "[0]",
        },
    )
    table = baselines_stage(cfg)
    assert list(table) == ALL_ALGOS
    random_len, random_low = random_policy(list(range(N_USERS)), list(cfg.eval.seeds))
    assert random_len < 1.5 and random_low > 0.4
    lengths, low_exits = {}, {}
    for algo_name in ALL_ALGOS:
        episodes = pd.read_parquet(cfg.run_dir / "eval" / algo_name / "episodes")
        assert pq.read_schema(cfg.run_dir / "eval" / algo_name / "episodes" / "part-00000.parquet").equals(
            EPISODE_SCHEMA, check_metadata=False)
        assert len(episodes) == N_USERS * len(cfg.eval.seeds)
        assert (cfg.run_dir / "baselines" / algo_name / "seed0" / "checkpoint").is_dir()
        lengths[algo_name] = float(episodes["length"].mean())
        low_exits[algo_name] = float((episodes["exit_reason"] == "low_reward").mean())
        summary = read_json(cfg.run_dir / "eval" / algo_name / "summary.json")
        print(f"{algo_name}: Len {lengths[algo_name]:.2f} vs random {random_len:.2f}; {table[algo_name]}; "
              f"train {summary['train_s']:.1f}s eval {summary['eval_s']:.1f}s")
    for algo_name, length in lengths.items():
        assert low_exits[algo_name] <= random_low - 0.3, f"{algo_name} low-reward exits {low_exits[algo_name]:.2f}"
        assert length >= 1.0, f"{algo_name} Len {length:.2f}"
        if algo_name in ("dqn", "a2c", "dorl"):
            assert length >= random_len + 1.0, f"{algo_name} Len {length:.2f} vs random {random_len:.2f}"
    # A second run with the same inputs is a resume: nothing is retrained.
    marker = (cfg.run_dir / "baselines" / "dqn" / "seed0" / "_stage.json").stat().st_mtime_ns
    assert baselines_stage(cfg) == table
    assert (cfg.run_dir / "baselines" / "dqn" / "seed0" / "_stage.json").stat().st_mtime_ns == marker


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_same_config_and_seed_give_the_same_baseline_episodes(tmp_path, ray_session):
    """Two fresh runs of the stage (one online method, one offline) give identical episodes.
    Before the replay buffers were seeded (train/baselines/seeding.py), DQN and BCQ did not."""
    from train.baselines.run import baselines_stage

    settings = {"baselines.algos": "dqn,bcq", "baselines.online_env_steps": 800, "baselines.offline_updates": 200,
                "baselines.offline_episodes": 100, "baselines.embedding_dim": 8, "baselines.hidden": "[16]",
                "baselines.train_seeds": "[0]"}
    episodes = []
    for attempt in ("first", "second"):
        cfg = make_run_dir(tmp_path / attempt, **settings)
        baselines_stage(cfg)
        episodes.append({algo: pd.read_parquet(cfg.run_dir / "eval" / algo / "episodes").drop(columns=["run"])
                         for algo in ("dqn", "bcq")})
    for algo in ("dqn", "bcq"):
        first, second = episodes[0][algo], episodes[1][algo]
        assert first["length"].tolist() == second["length"].tolist(), algo
        items = [[s["item_id"] for s in steps] for steps in first["steps"]]
        assert items == [[s["item_id"] for s in steps] for steps in second["steps"]], algo

    # A second training seed: only it trains (each seed has its own resume key); the summary's ±
    # is now over the training seeds, and seed 0's numbers are those of the runs above.
    cfg = make_run_dir(tmp_path / "second", **{**settings, "baselines.train_seeds": "[0,1]"})
    mtime = (cfg.run_dir / "baselines" / "dqn" / "seed0" / "_stage.json").stat().st_mtime_ns
    table = baselines_stage(cfg)
    assert (cfg.run_dir / "baselines" / "dqn" / "seed0" / "_stage.json").stat().st_mtime_ns == mtime
    for algo in ("dqn", "bcq"):
        summary = read_json(cfg.run_dir / "eval" / algo / "summary.json")
        assert summary["std_over"] == "training seeds" and summary["train_seeds"] == [0, 1]
        per = summary["per_train_seed"]
        assert per["0"]["len_mean"] == pytest.approx(episodes[0][algo].groupby("seed")["length"].mean().mean())
        assert summary["len_mean"] == pytest.approx((per["0"]["len_mean"] + per["1"]["len_mean"]) / 2)
        pooled = pd.read_parquet(cfg.run_dir / "eval" / algo / "episodes")
        assert len(pooled) == 2 * len(episodes[0][algo])  # both seeds' episodes, for the plots
        assert table[algo]["Len"].startswith(f"{summary['len_mean']:.2f} ± {summary['len_std']:.2f}")


def test_summary_over_training_seeds_is_mean_and_sample_std_of_their_means():
    from train.baselines.run import over_train_seeds

    per_seed = {0: {"len_mean": 2.0, "len_std": 0.3, "reward_mean": 6.0, "reward_std": 0.4},
                3: {"len_mean": 4.0, "len_std": 0.1, "reward_mean": 10.0, "reward_std": 0.2}}
    summary = over_train_seeds(per_seed, {"exit_shares": {"repeat": 1.0}})
    assert summary["len_mean"] == 3.0 and summary["len_std"] == pytest.approx(2 ** 0.5)
    assert summary["reward_mean"] == 8.0 and summary["exit_shares"] == {"repeat": 1.0}
    assert summary["train_seeds"] == [0, 3] and summary["std_over"] == "training seeds"
    single = over_train_seeds({0: per_seed[0]}, {})
    assert (single["len_std"], single["reward_std"]) == (0.3, 0.4) and single["std_over"] == "evaluation seeds"
