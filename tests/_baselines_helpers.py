"""A small designed environment where a good recommender is easy to tell from a random one.

Items sit in clusters; items of one cluster are close (distance 1), items of different clusters far
apart (distance 10), with τ_d = 5: recommending an item whose cluster appears among the last W = 4
accepted items makes the user leave. In every cluster the first ``good`` items are liked by every
user (reward ≈ 4) and the rest disliked (reward 1 < τ_r = 2). A non-repeating high-reward cycle
exists: visit the clusters round-robin, taking a new good item each time — ``clusters × good``
accepted steps. A uniformly random recommender leaves after about one step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ulrec.simulator import EnvConfig, MatrixUserModel

CLUSTERS = 8
PER_CLUSTER = 5
GOOD = 3
N_USERS = 16
PROTOCOL = EnvConfig(distance_threshold=5.0, reward_threshold=2.0, window=4, max_steps=20)


def cluster_of(items: np.ndarray) -> np.ndarray:
    return np.asarray(items) // PER_CLUSTER


def cluster_user_model(seed: int = 0) -> MatrixUserModel:
    rng = np.random.default_rng(seed)
    n_items = CLUSTERS * PER_CLUSTER
    good = (np.arange(n_items) % PER_CLUSTER) < GOOD
    rewards = np.where(good, 4.0, 1.0)[None, :] + rng.uniform(-0.3, 0.3, (N_USERS, n_items))
    cluster = cluster_of(np.arange(n_items))
    distances = np.where(cluster[:, None] == cluster[None, :], 1.0, 10.0)
    np.fill_diagonal(distances, 0.0)
    return MatrixUserModel(rewards=rewards.astype(np.float32), distances=distances.astype(np.float32))


def save_cluster_user_model(directory: Path, seed: int = 0) -> Path:
    return cluster_user_model(seed).save(directory)


def round_robin_items(length: int) -> np.ndarray:
    """The known good cycle: cluster c = t mod CLUSTERS, its (t // CLUSTERS)-th good item."""
    t = np.arange(length)
    return (t % CLUSTERS) * PER_CLUSTER + (t // CLUSTERS) % GOOD


def make_run_dir(root: Path, **overrides: object):
    """A run directory holding the designed simulators (train: seed 0, test: seed 1) and a tiny
    prepared dataset, plus a Config pointing at it; ``overrides`` are dotted config overrides."""
    import json

    import pandas as pd

    from ulrec.config import load_config

    cfg = load_config(
        None,
        [
            f"run.root={root}",
            "run.name=baselines-test",
            "run.progress=false",
            "wandb.enabled=false",
            "simulator.kind=matrix",
            f"env.distance_threshold={PROTOCOL.distance_threshold}",
            f"env.window={PROTOCOL.window}",
            f"eval.num_users={N_USERS}",
            f"eval.max_steps={PROTOCOL.max_steps}",
            f"baselines.train_max_steps={PROTOCOL.max_steps}",
            "ray.num_cpus=2",
        ]
        + [f"{k}={v}" for k, v in overrides.items()],
    )
    sims = cfg.run_dir / "simulators"
    save_cluster_user_model(sims / "train", seed=0)
    save_cluster_user_model(sims / "test", seed=1)
    data = cfg.run_dir / "data"
    data.mkdir(parents=True, exist_ok=True)
    n_items = CLUSTERS * PER_CLUSTER
    pd.DataFrame({"item_id": range(n_items), "title": [f"item {i}" for i in range(n_items)],
                  "raw_item_id": [str(i) for i in range(n_items)]}).to_parquet(data / "items.parquet")
    pd.DataFrame({"user_id": range(N_USERS), "raw_user_id": [str(u) for u in range(N_USERS)]}).to_parquet(
        data / "users.parquet"
    )
    # Each user's history walks the good cycle from their own starting point (liked, diverse items).
    cycle = round_robin_items(CLUSTERS * GOOD)
    for split in ("train", "test"):
        rows = [(u, int(item), 4.0, t) for u in range(N_USERS) for t, item in enumerate(np.roll(cycle, -3 * u))]
        frame = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])
        frame.astype({"rating": "float32", "timestamp": "int64"}).to_parquet(data / f"{split}.parquet")
    (data / "stats.json").write_text(json.dumps({}))
    return cfg
