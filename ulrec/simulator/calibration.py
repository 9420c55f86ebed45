"""Distance threshold calibration: τ_d as an absolute value or a quantile of item distances.

τ_d only means something on the scale of a given distance (the authors' Steam distances run
~225–1300 with τ_d = 50; DeepFM embedding distances are O(1)), so the config may give a quantile of
the pairwise item-distance distribution instead. To see what a threshold does, a uniformly random
policy is played in the batched environment and the share of episodes ending by each rule logged.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ulrec.config import EnvConfigSection
from ulrec.errors import InputError
from ulrec.episodes import TRUNCATED
from ulrec.simulator.env import EXIT_REASONS, EchoChamberEnv, EnvConfig
from ulrec.simulator.user_models import UserModel


def sample_item_pairs(n_items: int, n_pairs: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Distinct-item pairs: all of them when there are at most ``n_pairs``, else a uniform sample."""
    if n_items < 2:
        raise InputError(f"need at least 2 items to measure distances (got n_items={n_items})")
    if n_pairs < 1:
        raise InputError(f"n_pairs must be >= 1 (got {n_pairs})")
    if n_items * (n_items - 1) // 2 <= n_pairs:
        a, b = np.triu_indices(n_items, k=1)
        return a.astype(np.int64), b.astype(np.int64)
    rng = np.random.default_rng(seed)
    a = rng.integers(0, n_items, n_pairs)
    b = (a + rng.integers(1, n_items, n_pairs)) % n_items  # never equal to a
    return a, b


def random_policy_exits(
    user_model: UserModel, config: EnvConfig, users: np.ndarray, *, seed: int = 0
) -> dict[str, Any]:
    """Play a uniformly random policy (items drawn with replacement) for ``users`` until every
    episode ends; share of episodes ending by each rule, mean Len and mean Traj Reward."""
    if len(users) == 0:
        raise InputError("users is empty")
    rng = np.random.default_rng(seed)
    env = EchoChamberEnv(user_model, config)
    env.reset(users)
    while not env.done.all():
        env.step(rng.integers(0, user_model.n_items, len(users)))
    reasons = env.exit_reasons
    return {
        "users": int(len(users)),
        "mean_length": float(env.lengths.mean()),
        "mean_reward": float(env.total_rewards.mean()),
        "exit_shares": {r: float(np.mean(reasons == r)) for r in (*EXIT_REASONS, TRUNCATED)},
    }


def resolve_distance_threshold(
    user_model: UserModel, section: EnvConfigSection, *, seed: int = 0
) -> tuple[float, np.ndarray]:
    """τ_d for ``user_model``: the absolute ``distance_threshold`` when set (it wins), else the
    ``distance_quantile`` of sampled distinct-item distances. Also returns those distances."""
    a, b = sample_item_pairs(user_model.n_items, section.calibration_pairs, seed)
    distances = user_model.distance(a, b)
    if section.distance_threshold is not None:
        return float(section.distance_threshold), distances
    if section.distance_reference == "nearest_neighbour":
        nn = nearest_neighbour_distances(user_model, section.calibration_pairs, seed)
        return float(np.quantile(nn, section.distance_quantile)), distances
    return float(np.quantile(distances, section.distance_quantile)), distances


def nearest_neighbour_distances(user_model: UserModel, max_pairs: int, seed: int = 0) -> np.ndarray:
    """Each item's distance to its closest other item, for a sample of items sized so that about
    ``max_pairs`` × 10 distances are computed (all items on catalogues of a few thousand)."""
    n = user_model.n_items
    if n < 2:
        raise InputError(f"need at least 2 items to measure distances (got n_items={n})")
    rng = np.random.default_rng(seed)
    n_query = min(n, max(1, (10 * max_pairs) // n))
    queries = np.sort(rng.choice(n, n_query, replace=False)) if n_query < n else np.arange(n)
    others = np.arange(n)
    nearest = np.empty(len(queries), dtype=np.float64)
    rows_per_chunk = max(1, 2_000_000 // n)
    for start in range(0, len(queries), rows_per_chunk):
        chunk = queries[start : start + rows_per_chunk]
        a = np.repeat(chunk, n)
        b = np.tile(others, len(chunk))
        d = user_model.distance(a, b).reshape(len(chunk), n).astype(np.float64)
        d[np.arange(len(chunk)), chunk] = np.inf  # not its own neighbour
        nearest[start : start + len(chunk)] = d.min(axis=1)
    return nearest


def calibrate(
    user_model: UserModel,
    section: EnvConfigSection,
    *,
    max_steps: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Resolve τ_d for ``user_model`` from the env config section and describe its effect.

    Returns the threshold, how it was set, a summary of the sampled item distances, and a uniformly
    random policy's exit shares on up to ``section.calibration_users`` of the model's users.
    """
    threshold, distances = resolve_distance_threshold(user_model, section, seed=seed)
    absolute = section.distance_threshold is not None
    config = EnvConfig(
        distance_threshold=threshold,
        reward_threshold=section.reward_threshold,
        window=section.window,
        max_steps=max_steps or section.max_steps,
        legacy=section.legacy,
    )
    users = user_model.known_users()
    rng = np.random.default_rng(seed)
    if len(users) > section.calibration_users:
        users = rng.choice(users, section.calibration_users, replace=False)
    return {
        "distance_threshold": threshold,
        "source": "absolute" if absolute else "quantile",
        "quantile": None if absolute else section.distance_quantile,
        "reference": None if absolute else section.distance_reference,
        "share_of_pairs_below": float(np.mean(distances < threshold)),
        "distance_percentiles": {
            f"p{q}": float(np.percentile(distances, q)) for q in (1, 5, 25, 50, 75, 95, 99)
        },
        "pairs_sampled": int(len(distances)),
        "random_policy": random_policy_exits(user_model, config, users, seed=seed),
    }
