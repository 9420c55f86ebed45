"""The simulated users as RLlib sees them, and the window observation shared with the batched env.

RLlib builds its envs from :data:`ENV_NAME` with an ``env_config`` dict holding a *directory* of a
saved user model (so every env runner process can rebuild it) plus the exit-protocol fields; a
process loads each user model once and shares it between its vectorised sub-envs. With a
``"dorl"`` entry the rewards are shaped for DORL (see :mod:`train.baselines.dorl`).

:func:`window_observations` builds the same observation as the Gymnasium view
(:mod:`ulrec.simulator.gym_env`) for whole batches of episodes at once; the logged data and the
evaluation use it, so offline data, online training and evaluation see identical states.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from ray.tune.registry import register_env

from ulrec.config import Config
from ulrec.simulator import EnvConfig, cached_user_model
from ulrec.simulator.gym_env import EchoChamberGymEnv

from train.baselines.dorl import DORLRewardWrapper

ENV_NAME = "ulrec-baselines/EchoChamber-v0"


def make_env(env_config: dict[str, Any]) -> Any:
    """RLlib env creator: the Gymnasium view on a saved user model, DORL-shaped when asked."""
    options = dict(env_config)
    dorl = options.pop("dorl", None)
    model_dir = options.pop("user_model_dir")
    env = EchoChamberGymEnv(user_model=cached_user_model(str(model_dir)), **options)
    if dorl:
        env = DORLRewardWrapper(env, **dorl)
    return env


def registered_env_name() -> str:
    """:data:`ENV_NAME`, registered with the Ray session that is up now. Tune's registry lives in the
    cluster's key-value store: a registration made for an earlier Ray session (a process that runs
    the stage twice, or a test suite) is not in the next one, where RLlib would then look the name
    up in Gymnasium's registry and fail."""
    register_env(ENV_NAME, make_env)
    return ENV_NAME


register_env(ENV_NAME, make_env)


def env_config(
    user_model_dir: str | Path,
    protocol: EnvConfig,
    *,
    users: list[int] | None = None,
    dorl: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The env_config dict for :data:`ENV_NAME` (plain values only: it travels to workers)."""
    out: dict[str, Any] = {"user_model_dir": str(user_model_dir), **asdict(protocol)}
    if users is not None:
        out["users"] = [int(u) for u in users]
    if dorl is not None:
        out["dorl"] = dorl
    return out


def train_protocol(cfg: Config) -> EnvConfig:
    """The train simulator's exit protocol with the baselines' training horizon."""
    from ulrec.simulator.fit import env_config_for

    return env_config_for(cfg, "train", max_steps=cfg.baselines.train_max_steps)


def window_observations(
    history: np.ndarray, rewards: np.ndarray, lengths: np.ndarray, window: int, n_items: int
) -> dict[str, np.ndarray]:
    """The Gymnasium view's observation for a batch of episodes.

    ``history``/``rewards``: (B, T) accepted items and their rewards, oldest first; ``lengths``:
    (B,) accepted steps so far. Returns ``items`` (B, window) int64 — the last ``window`` accepted
    items, oldest first, the sentinel ``n_items`` before the episode start — and ``rewards``
    (B, window) float32 (0 in padded slots).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    pos = lengths[:, None] - window + np.arange(window)[None, :]
    valid = pos >= 0
    rows = np.arange(len(lengths))[:, None]
    safe = np.where(valid, pos, 0)
    items = np.where(valid, history[rows, safe], n_items).astype(np.int64)
    rew = np.where(valid, rewards[rows, safe], 0.0).astype(np.float32)
    return {"items": items, "rewards": rew}
