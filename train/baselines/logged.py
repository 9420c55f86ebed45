"""Logged data for the offline baselines: episodes of a behaviour policy on the TRAIN simulator.

Behaviour policy (documented in README): at each step, with probability ``epsilon`` a uniformly
random item, otherwise the next item of the user's own time-ordered train history — the logged
interactions EasyRL4Rec's offline methods learn from, here replayed on the train simulator so
rewards and exits follow the exit protocol — and, once that history is used up (or absent), an
item drawn in proportion to its popularity (train-split interaction counts + 1; the user model's
mean reward over a sample of users when no ratings file exists). It never re-recommends an item
of the current episode, like a deployed recommender that filters already-shown items. Episodes run
on the batched env with the training horizon.

The episodes are written as RLlib's episode format: one Parquet row per episode whose ``item``
column holds the msgpack-packed ``SingleAgentEpisode.get_state()`` (what RLlib's
``OfflineSingleAgentEnvRunner`` records with ``output_write_episodes=True`` and what
``config.offline_data(input_read_episodes=True)`` reads).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack
import msgpack_numpy
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from ray.rllib.env.single_agent_episode import SingleAgentEpisode

from ulrec.errors import InputError
from ulrec.io import atomic_path
from ulrec.simulator import EchoChamberEnv, UserModel

from train.baselines.env import window_observations

EPISODE_COLUMN = "item"  # the column RLlib's OfflinePreLearner unpacks episodes from
# Redraws of a popularity sample that hit an item already in the episode, before going uniform.
_MAX_REDRAWS = 8


def popularity_from_ratings(item_ids: np.ndarray, n_items: int) -> np.ndarray:
    """Interaction counts + 1 (every item stays reachable), as sampling weights."""
    item_ids = np.asarray(item_ids, dtype=np.int64)
    return np.bincount(item_ids, minlength=n_items)[:n_items].astype(np.float64) + 1.0


def popularity_from_model(user_model: UserModel, n_users: int = 256, seed: int = 0) -> np.ndarray:
    """Mean reward of each item over up to ``n_users`` of the model's users, shifted positive."""
    users = user_model.known_users()
    rng = np.random.default_rng(seed)
    sample = rng.choice(users, size=min(n_users, len(users)), replace=False)
    items = np.arange(user_model.n_items)
    mean = np.zeros(user_model.n_items, dtype=np.float64)
    for user in sample:
        mean += user_model.reward(np.full(len(items), user), items)
    mean /= len(sample)
    return mean - mean.min() + 1e-3


def logged_episode_id(index: int) -> str:
    """The id of the ``index``-th logged episode (its row in the Parquet file)."""
    return f"logged-{index:08d}"


class BehaviourPolicy:
    """ε-mixture of uniform random items and the user's own logged sequence, never repeating an
    item within an episode.

    With probability ``epsilon`` a uniformly random item; otherwise the next item of the user's
    logged sequence (``sequences``: time-ordered train history per user; each episode starts at a
    random offset), or, when the user has none left, an item drawn in proportion to
    ``popularity``. Call :meth:`begin` with the episodes' users, then :meth:`act` once per step.
    """

    def __init__(
        self,
        popularity: np.ndarray,
        epsilon: float,
        rng: np.random.Generator,
        sequences: dict[int, np.ndarray] | None = None,
    ) -> None:
        popularity = np.asarray(popularity, dtype=np.float64)
        if popularity.ndim != 1 or len(popularity) == 0 or (popularity < 0).any() or popularity.sum() <= 0:
            raise InputError("popularity must be a non-empty 1-D array of non-negative weights with a positive sum")
        if not 0.0 <= epsilon <= 1.0:
            raise InputError(f"epsilon must be in [0, 1] (got {epsilon})")
        self.n_items = len(popularity)
        self.cdf = np.cumsum(popularity / popularity.sum())
        self.epsilon = epsilon
        self.rng = rng
        self.sequences = {int(u): np.asarray(s, dtype=np.int64) for u, s in (sequences or {}).items()}
        self._users = np.zeros(0, dtype=np.int64)
        self._offsets = np.zeros(0, dtype=np.int64)

    def begin(self, users: np.ndarray, horizon: int) -> None:
        """Start one episode per entry of ``users``; pick where each replays its sequence from."""
        self._users = np.asarray(users, dtype=np.int64)
        spare = np.array([max(len(self.sequences.get(int(u), ())) - horizon, 0) for u in self._users])
        self._offsets = (self.rng.random(len(self._users)) * (spare + 1)).astype(np.int64)

    def _popular(self, n: int) -> np.ndarray:
        return np.minimum(np.searchsorted(self.cdf, self.rng.random(n), side="right"), self.n_items - 1)

    def act(self, rows: np.ndarray, history: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """One item for each episode of ``rows``; ``history`` (len(rows), T) holds their earlier
        items, ``lengths`` how many."""
        n = len(rows)
        items = self._popular(n)
        if self.sequences:
            for k, row in enumerate(rows):
                seq = self.sequences.get(int(self._users[row]))
                pos = self._offsets[row] + lengths[k]
                if seq is not None and pos < len(seq):
                    items[k] = seq[pos]
        explore = self.rng.random(n) < self.epsilon
        items[explore] = self.rng.integers(0, self.n_items, int(explore.sum()))
        seen_cols = np.arange(history.shape[1])[None, :] < lengths[:, None]
        for _ in range(_MAX_REDRAWS):
            clash = ((history == items[:, None]) & seen_cols).any(axis=1)
            if not clash.any():
                break
            items[clash] = self._popular(int(clash.sum()))
        clash = ((history == items[:, None]) & seen_cols).any(axis=1)
        items[clash] = self.rng.integers(0, self.n_items, int(clash.sum()))
        return items


def collect_episodes(
    env: EchoChamberEnv, users: np.ndarray, policy: BehaviourPolicy, window: int
) -> list[SingleAgentEpisode]:
    """Play ``policy`` for each entry of ``users`` until every episode ends; RLlib episodes.

    Observations are the Gymnasium view's (:func:`window_observations`); rewards are the user's
    reward on accepted steps and 0 on the exit step; ``terminated`` marks an exit, ``truncated``
    the horizon.
    """
    n_items = env.user_model.n_items
    horizon = env.config.max_steps
    env.reset(users)
    n = len(users)
    history = np.full((n, horizon), n_items, dtype=np.int64)
    rewards = np.zeros((n, horizon), dtype=np.float32)
    lengths = np.zeros(n, dtype=np.int64)
    observations: list[list[dict[str, np.ndarray]]] = [[] for _ in range(n)]
    actions: list[list[int]] = [[] for _ in range(n)]
    step_rewards: list[list[float]] = [[] for _ in range(n)]
    reasons = np.full(n, "", dtype=object)

    def record_observations(rows: np.ndarray) -> None:
        obs = window_observations(history[rows], rewards[rows], lengths[rows], window, n_items)
        for k, row in enumerate(rows):
            observations[row].append({"items": obs["items"][k], "rewards": obs["rewards"][k]})

    policy.begin(users, horizon)
    record_observations(np.arange(n))
    while not env.done.all():
        active = np.flatnonzero(~env.done)
        items = np.zeros(n, dtype=np.int64)
        items[active] = policy.act(active, history[active], lengths[active])
        result = env.step(items)
        for row in active:
            actions[row].append(int(items[row]))
            step_rewards[row].append(float(result.reward[row]) if result.live[row] else 0.0)
        stayed = active[result.live[active]]
        history[stayed, lengths[stayed]] = items[stayed]
        rewards[stayed, lengths[stayed]] = result.reward[stayed]
        lengths[stayed] += 1
        reasons[active] = result.reason[active]
        record_observations(active)

    episodes = []
    for row in range(n):
        info = {"user_id": int(users[row])}
        episodes.append(
            SingleAgentEpisode(
                # A fixed id, not RLlib's random uuid4: the pre-learner orders episodes by id
                # (train/baselines/seeding.py), so two runs must name them alike.
                id_=logged_episode_id(row),
                observations=observations[row],
                actions=actions[row],
                rewards=step_rewards[row],
                infos=[info] * (len(actions[row]) + 1),
                terminated=reasons[row] != "horizon",
                truncated=reasons[row] == "horizon",
                len_lookback_buffer=0,
            )
        )
    return episodes


def pack_episode(episode: SingleAgentEpisode) -> bytes:
    return msgpack.packb(episode.get_state(), default=msgpack_numpy.encode)


def unpack_episode(blob: bytes) -> SingleAgentEpisode:
    return SingleAgentEpisode.from_state(msgpack.unpackb(blob, object_hook=msgpack_numpy.decode))


def write_episodes(episodes: list[SingleAgentEpisode], path: str | Path) -> Path:
    """One Parquet file of packed episodes (atomically)."""
    table = pa.table({EPISODE_COLUMN: pa.array([pack_episode(e) for e in episodes], type=pa.binary())})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def episode_stats(episodes: list[SingleAgentEpisode]) -> dict[str, Any]:
    """Len / Traj Reward of logged episodes (every step but the exit step of a terminated one)."""
    lengths = [len(e) - (1 if e.is_terminated else 0) for e in episodes]
    returns = [float(np.sum(e.get_rewards())) for e in episodes]
    return {
        "episodes": len(episodes),
        "transitions": int(sum(len(e) for e in episodes)),
        "len_mean": float(np.mean(lengths)) if lengths else 0.0,
        "reward_mean": float(np.mean(returns)) if returns else 0.0,
    }
