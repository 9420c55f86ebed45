"""The evaluation protocol (paper §4.1.4), as pure functions shared by every method.

Every method — the LLM policies and the RL baselines alike — is evaluated on the *test* simulator
with the same users (``eval.num_users`` drawn with ``eval.user_seed``), the same sampling seeds and
the same horizon, and its episodes are written in one Parquet schema. These functions pick the users
and turn episodes into the numbers of the paper's Tables 1 and 2.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from ulrec.config import Config
from ulrec.episodes import END_REASONS

EXIT_REASONS = END_REASONS  # how episodes end, for the exit-share columns

from ulrec.layout import METHOD_CHECKPOINTS  # noqa: F401  (LLM method → checkpoint; re-exported)

ABLATION_METHODS = ("wo-sft", "wo-kto")
METHOD_LABELS = {
    "collector": "Collector",
    "base": "Base",
    "ulrec-p": "ULRec-P",
    "ulrec": "ULRec",
    "wo-sft": "w/o SFT",
    "wo-kto": "w/o KTO",
    "billp": "BiLLP",
    "dqn": "DQN",
    "a2c": "A2C",
    "dorl": "DORL",
    "cql": "CQL",
    "bcq": "BCQ",
    "crr": "CRR",
    "sqn": "SQN",
}


def eval_user_pool(histories: dict[int, list[int]], min_history: int = 1) -> list[int]:
    """Users of a split that have a history to show the policy, sorted by id."""
    return sorted(u for u, items in histories.items() if len(items) >= min_history)


def draw_users(pool: Iterable[int], num_users: int, seed: int) -> list[int]:
    """A fixed-seed shuffle of the pool, first ``num_users`` (all if fewer)."""
    pool = np.asarray(sorted(pool), dtype=np.int64)
    order = np.random.default_rng(seed).permutation(len(pool))
    return [int(u) for u in pool[order][:num_users]]


def select_eval_users(cfg: Config, split: str = "test") -> list[int]:
    """The evaluation users: ``eval.num_users`` users of ``split`` drawn with ``eval.user_seed``."""
    from ulrec.data import load_prepared

    histories = load_prepared(cfg.run_dir).user_histories(split)
    return draw_users(eval_user_pool(histories), cfg.eval.num_users, cfg.eval.user_seed)


def training_users(cfg: Config, pool: Iterable[int] | None = None) -> list[int]:
    """The users the training rollouts play: ``rollout.num_users`` users of ``rollout.split``
    drawn with ``run.seed`` (from ``pool``, that split's :func:`eval_user_pool`, when the caller
    has it). Later rounds and on-policy rollouts replay exactly these, and validation holds out the
    rest."""
    if pool is None:
        from ulrec.data import load_prepared

        pool = eval_user_pool(load_prepared(cfg.run_dir).user_histories(cfg.rollout.split))
    return draw_users(pool, cfg.rollout.num_users, cfg.run.seed)


def validation_users(cfg: Config, n: int) -> list[int]:
    """Validation users: train-split users the training rollouts did not play (the same draw the
    rollout stage makes, so the two sets are disjoint), the first ``n`` of a fixed shuffle. Used
    to select and to draw learning curves; never test users."""
    from ulrec.data import load_prepared
    from ulrec.errors import UlrecError

    pool = eval_user_pool(load_prepared(cfg.run_dir).user_histories("train"))
    trained = set(training_users(cfg, pool))
    held_out = [u for u in pool if u not in trained]
    if not held_out:
        raise UlrecError(f"no validation users: rollout.num_users={cfg.rollout.num_users} uses all "
                         f"{len(pool)} train users; lower it to hold some out for validation")
    return draw_users(held_out, n, cfg.eval.user_seed)


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return math.nan, math.nan
    # Population std over seeds would understate the spread of 3 runs; use the sample std.
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return float(arr.mean()), std


def _steps_frame(episodes: pd.DataFrame) -> pd.DataFrame:
    if "steps" not in episodes or episodes.empty:
        return pd.DataFrame(columns=["substituted", "reason", "item_id"])
    rows = [s for steps in episodes["steps"] for s in (steps if steps is not None else [])]
    return pd.DataFrame(rows, columns=["substituted", "reason", "item_id"]) if rows else pd.DataFrame(
        columns=["substituted", "reason", "item_id"]
    )


def item_diversity(steps: pd.DataFrame) -> dict[str, Any]:
    """How spread the recommended items are over all steps (the echo chamber's symptom): distinct
    catalogue items, the entropy of their distribution (nats), and the 10 most frequent's share."""
    items = pd.to_numeric(steps["item_id"], errors="coerce").dropna() if "item_id" in steps else pd.Series([], dtype=float)
    items = items[items >= 0]  # a format error received no item
    if items.empty:
        return {"distinct": 0, "entropy": math.nan, "top10_share": math.nan}
    p = items.value_counts().to_numpy(dtype=float)  # most frequent first
    p /= p.sum()
    return {"distinct": int(len(p)), "entropy": float(-(p * np.log(p)).sum()), "top10_share": float(p[:10].sum())}


def episode_item_diversity(episodes: pd.DataFrame) -> dict[str, Any]:
    """``item_diversity`` over every step of ``episodes`` (one row per episode, with ``steps``)."""
    return item_diversity(_steps_frame(episodes))


def summarize_episodes(episodes: pd.DataFrame) -> dict[str, Any]:
    """Len and Traj Reward (Eq. 4–5) per seed, then mean ± std over seeds; exit and grounding shares.

    ``episodes`` has one row per (user, seed) episode with ``seed``, ``length``, ``total_reward``,
    ``exit_reason`` and optionally ``steps`` (for grounding statistics).
    """
    if episodes.empty:
        raise ValueError("no episodes to summarise")
    per_seed = (
        episodes.groupby("seed")
        .agg(len_mean=("length", "mean"), reward_mean=("total_reward", "mean"), users=("user_id", "nunique"))
        .reset_index()
    )
    len_mean, len_std = _mean_std(per_seed["len_mean"].tolist())
    rew_mean, rew_std = _mean_std(per_seed["reward_mean"].tolist())
    counts = episodes["exit_reason"].value_counts()
    exit_shares = {r: float(counts.get(r, 0)) / len(episodes) for r in EXIT_REASONS}
    steps = _steps_frame(episodes)
    n_steps = len(steps)
    if n_steps:
        format_errors = int((steps["reason"] == "format_error").sum())
        substituted = int(steps["substituted"].fillna(False).astype(bool).sum())
        grounding = {
            "steps": n_steps,
            "exact": (n_steps - format_errors - substituted) / n_steps,
            "substituted": substituted / n_steps,
            "format_error": format_errors / n_steps,
        }
    else:
        grounding = {"steps": 0, "exact": math.nan, "substituted": math.nan, "format_error": math.nan}
    return {
        "len_mean": len_mean,
        "len_std": len_std,
        "reward_mean": rew_mean,
        "reward_std": rew_std,
        "per_seed": per_seed.to_dict(orient="records"),
        "episodes": int(len(episodes)),
        "users": int(episodes["user_id"].nunique()),
        "exit_shares": exit_shares,
        "grounding": grounding,
        "items": item_diversity(steps),
    }


def read_episodes(path: str | Path) -> pd.DataFrame:
    """Episodes written by a rollout or a baseline evaluation (``ulrec.episodes``)."""
    from ulrec import episodes

    return episodes.read_episodes(path)
