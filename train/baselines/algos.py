"""Which RLlib algorithm config each baseline is, with the settings from ``cfg.baselines``.

Everything runs with one local learner and one local env runner (Ray resources stay small; the
same configs scale out by raising ``num_learners`` / ``num_env_runners``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gymnasium as gym
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig

from ulrec.config import BaselinesConfig

from train.baselines.seeding import SEEDED_BUFFER_PATH, SeededPrelearnerBuffer
from train.baselines.a2c import A2CConfig
from train.baselines.dqn import RecDQNConfig
from train.baselines.env import registered_env_name
from train.baselines.offline import BCQConfig, CQLConfig, CRRConfig, OfflineQConfig, SQNConfig

ONLINE_ALGOS = ("dqn", "a2c", "dorl")
OFFLINE_ALGOS = ("cql", "bcq", "crr", "sqn")
ALGOS = ONLINE_ALGOS + OFFLINE_ALGOS
# Algorithms that act with a policy head (sampled at evaluation when eval_sample_policy).
POLICY_ALGOS = ("a2c", "dorl", "crr")
# Progress granularity: one algo.train() call per this fraction of the budget.
TRAIN_CALLS = 50

_OFFLINE_CONFIGS: dict[str, type[OfflineQConfig]] = {
    "cql": CQLConfig,
    "bcq": BCQConfig,
    "crr": CRRConfig,
    "sqn": SQNConfig,
}


@dataclass(frozen=True)
class Budget:
    """What one baseline gets: env steps (online) or gradient updates (offline), per train() call."""

    total: int
    per_call: int
    unit: str  # "env_steps" or "updates"

    @property
    def calls(self) -> int:
        return -(-self.total // self.per_call)


def budget_for(algo: str, b: BaselinesConfig) -> Budget:
    if algo == "dqn":
        return Budget(b.online_env_steps, max(1, b.online_env_steps // TRAIN_CALLS), "env_steps")
    if algo in ONLINE_ALGOS:
        return Budget(b.onpolicy_env_steps, max(1, b.onpolicy_env_steps // TRAIN_CALLS), "env_steps")
    return Budget(b.offline_updates, max(1, b.offline_updates // TRAIN_CALLS), "updates")


def _common(config: AlgorithmConfig, b: BaselinesConfig, model_config: dict[str, Any], seed: int) -> AlgorithmConfig:
    return (
        config.framework("torch")
        .learners(num_learners=0)
        .rl_module(model_config={"embedding_dim": b.embedding_dim, "hidden": list(b.hidden), **model_config})
        .debugging(seed=seed, log_level="ERROR")
    )


def build_config(
    algo: str,
    b: BaselinesConfig,
    *,
    seed: int,
    env_config: dict[str, Any] | None = None,
    logged_path: str | None = None,
    observation_space: gym.Space | None = None,
    action_space: gym.Space | None = None,
    logged_steps_per_episode: float = 4.0,
) -> AlgorithmConfig:
    """The RLlib config of ``algo``: online algos need ``env_config`` (for :data:`ENV_NAME`),
    offline ones ``logged_path`` (Parquet episodes), the spaces of the Gymnasium view and the
    mean transitions per logged episode."""
    if algo not in ALGOS:
        raise ValueError(f"unknown baseline {algo!r} (known: {', '.join(ALGOS)})")
    budget = budget_for(algo, b)
    if algo in ONLINE_ALGOS:
        if env_config is None:
            raise ValueError(f"{algo} trains online and needs env_config")
        if algo == "dorl" and not env_config.get("dorl"):
            raise ValueError("dorl needs env_config['dorl'] (the reward shaping)")
    elif logged_path is None or observation_space is None or action_space is None:
        raise ValueError(f"{algo} trains offline and needs logged_path, observation_space and action_space")

    if algo == "dqn":
        epsilon_steps = max(1, int(0.3 * b.online_env_steps))
        learning_starts = min(1000, max(b.batch_size, b.online_env_steps // 10))
        updates_per_step = b.dqn_updates_per_step
        config = (
            RecDQNConfig()
            .environment(registered_env_name(), env_config=env_config)
            .env_runners(num_env_runners=0, num_envs_per_env_runner=b.num_envs)
            .training(
                lr=b.lr,
                gamma=b.gamma,
                train_batch_size_per_learner=b.batch_size,
                n_step=b.n_step,
                double_q=True,
                dueling=False,
                epsilon=[(0, 1.0), (epsilon_steps, b.dqn_final_epsilon)],
                num_steps_sampled_before_learning_starts=learning_starts,
                training_intensity=updates_per_step * b.batch_size,
                target_network_update_freq=max(1, int(b.target_update_updates / updates_per_step)),
                # By import path: RLlib looks for "EpisodeReplayBuffer" in the type's string.
                replay_buffer_config={"type": SEEDED_BUFFER_PATH, "capacity": 50_000, "seed": seed},
            )
            .reporting(min_sample_timesteps_per_iteration=budget.per_call, min_time_s_per_iteration=0)
        )
        return _common(config, b, {"heads": ["q"], "act": "q"}, seed)

    if algo in ("a2c", "dorl"):
        config = (
            A2CConfig()
            .environment(registered_env_name(), env_config=env_config)
            .env_runners(num_env_runners=0, num_envs_per_env_runner=b.num_envs)
            .training(
                lr=b.lr,
                gamma=b.gamma,
                train_batch_size_per_learner=b.onpolicy_batch_size,
                vf_loss_coeff=b.a2c_value_coef,
                entropy_coeff=b.a2c_entropy_coef,
            )
            .reporting(min_sample_timesteps_per_iteration=budget.per_call, min_time_s_per_iteration=0)
        )
        return _common(config, b, {"heads": ["policy", "value"], "act": "policy"}, seed)

    config = (
        _OFFLINE_CONFIGS[algo]()
        .environment(observation_space=observation_space, action_space=action_space)
        .training(
            lr=b.lr,
            gamma=b.gamma,
            train_batch_size_per_learner=b.batch_size,
            target_network_update_freq=b.target_update_updates * b.batch_size,
            cql_alpha=b.cql_alpha,
            bcq_threshold=b.bcq_threshold,
            crr_beta=b.crr_beta,
            crr_ratio_upper_bound=b.crr_ratio_upper_bound,
            crr_min_q_weight=b.crr_min_q_weight,
        )
        .offline_data(
            input_=[str(logged_path)],
            input_read_episodes=True,
            # RLlib turns each read batch of episodes into ONE train batch sampled from them, and
            # replays the mapped batches every epoch: read about a train batch's worth of
            # transitions at a time so an epoch covers the logged data once.
            input_read_batch_size=max(1, round(b.batch_size / max(logged_steps_per_episode, 1.0))),
            dataset_num_iters_per_learner=budget.per_call,
            # One OfflinePreLearner actor with a fractional CPU: RLlib's default (2 actors × 1 CPU)
            # leaves no CPU for the Parquet read tasks on a 2-CPU Ray instance and deadlocks.
            map_batches_kwargs={"concurrency": 1, "num_cpus": 0.5},
            # RLlib's default pre-learner buffer is unseeded and takes episodes in set order
            # (train/baselines/seeding.py).
            prelearner_buffer_class=SeededPrelearnerBuffer,
            prelearner_buffer_kwargs={"seed": seed},
        )
        .reporting(min_time_s_per_iteration=0, min_sample_timesteps_per_iteration=0)
    )
    return _common(config, b, {}, seed)
