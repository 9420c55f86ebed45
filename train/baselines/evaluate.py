"""Evaluate a trained baseline exactly like the LLM methods: test simulator, the same users and
seeds and horizon, episodes written in the rollout episode schema.

All (user, seed) episodes run together in one batched :class:`EchoChamberEnv`. The module sees the
Gymnasium view's observation plus ``seen`` (every item accepted so far in the episode), so items
already recommended are masked when acting. Value-based policies (DQN, CQL, BCQ, SQN) act greedily;
policies with a policy head (A2C, DORL, CRR) sample from it with a generator seeded per eval seed
(``baselines.eval_sample_policy``), as Tianshou/EasyRL4Rec evaluate stochastic policies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ulrec.episodes import episode_row, step_row, write_episodes
from ulrec.errors import InputError
from ulrec.simulator import EchoChamberEnv

from train.baselines.env import window_observations
from train.baselines.module import OBS_SEEN, ItemRecModule


def _sample(scores: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


@torch.no_grad()
def run_episodes(
    module: ItemRecModule,
    env: EchoChamberEnv,
    users: Sequence[int],
    seeds: Sequence[int],
    *,
    sample: bool,
) -> dict[str, Any]:
    """Play ``module`` for every (seed, user) pair until each episode ends.

    Returns arrays ``user_id``, ``seed``, ``length``, ``total_reward``, ``exit_reason`` (one entry
    per episode, seeds outermost) and ``steps``: per episode, a list of (item, reward, live, reason).
    """
    if not users or not seeds:
        raise InputError("users and seeds must be non-empty")
    n_items = env.user_model.n_items
    if module.n_items != n_items:
        raise InputError(f"module scores {module.n_items} items but the env has {n_items}")
    window = module.net.window
    user_ids = np.tile(np.asarray(users, dtype=np.int64), len(seeds))
    seed_of = np.repeat(np.asarray(seeds, dtype=np.int64), len(users))
    horizon = env.config.max_steps
    n = len(user_ids)
    env.reset(user_ids)
    history = np.full((n, horizon), n_items, dtype=np.int64)
    rewards = np.zeros((n, horizon), dtype=np.float32)
    lengths = np.zeros(n, dtype=np.int64)
    steps: list[list[tuple[int, float, bool, str]]] = [[] for _ in range(n)]
    generators = {int(s): torch.Generator().manual_seed(int(s)) for s in seeds}
    module.eval()
    while not env.done.all():
        active = np.flatnonzero(~env.done)
        obs = window_observations(history[active], rewards[active], lengths[active], window, n_items)
        obs = {k: torch.from_numpy(v) for k, v in obs.items()}
        obs[OBS_SEEN] = torch.from_numpy(history[active])
        scores = module.action_scores(obs)
        if sample:
            chosen = torch.empty(len(active), dtype=torch.long)
            for seed, gen in generators.items():
                rows = torch.from_numpy(np.flatnonzero(seed_of[active] == seed))
                if len(rows):
                    chosen[rows] = _sample(scores[rows], gen)
        else:
            chosen = scores.argmax(dim=-1)
        items = np.zeros(n, dtype=np.int64)
        items[active] = chosen.numpy()
        result = env.step(items)
        for row in active:
            steps[row].append((int(items[row]), float(result.reward[row]), bool(result.live[row]), str(result.reason[row])))
        stayed = active[result.live[active]]
        history[stayed, lengths[stayed]] = items[stayed]
        rewards[stayed, lengths[stayed]] = result.reward[stayed]
        lengths[stayed] += 1
    return {
        "user_id": user_ids,
        "seed": seed_of,
        "length": env.lengths.copy(),
        "total_reward": env.total_rewards.copy(),
        "exit_reason": env.exit_reasons.copy(),
        "steps": steps,
    }


def episode_rows(
    played: dict[str, Any], *, run: str, policy: str, split: str, titles: Sequence[str] | None
) -> list[dict[str, Any]]:
    """Rows of the rollout episode schema (prompt/raw_output empty, nothing substituted)."""
    return [
        episode_row(
            run=run, policy=policy, split=split, user_id=played["user_id"][k], seed=played["seed"][k],
            length=played["length"][k], total_reward=played["total_reward"][k],
            exit_reason=str(played["exit_reason"][k]),
            steps=[step_row(j, item_id=item, title=titles[item] if titles is not None else "",
                            reward=reward, live=live, reason=reason)
                   for j, (item, reward, live, reason) in enumerate(played["steps"][k], start=1)],
        )
        for k in range(len(played["user_id"]))
    ]


def write_episode_rows(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Episode rows as a Parquet dataset directory ``path`` (the form LLM evaluations write too)."""
    return write_episodes(rows, path)
