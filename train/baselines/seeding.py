"""What RLlib 2.60 leaves unseeded or unordered, seeded and ordered: the replay buffers.

``EpisodeReplayBuffer.__init__`` draws from ``np.random.default_rng(seed=None)`` whatever
``config.debugging(seed=...)`` says, so DQN's replay sampling and the OfflinePreLearner's episode
sampling (CQL, BCQ, SQN, CRR) differed between two runs of the same config (README: DQN 6.16 →
0.98, BCQ 9.00 → 1.00). These subclasses take the seed; everything else is RLlib's.

The OfflinePreLearner also hands its buffer each read batch's episodes as a ``set`` of
``SingleAgentEpisode`` objects (``_validate_episodes``), which hash by identity: their order, and
so which episode each buffer index holds, followed memory addresses in the pre-learner's process.
BCQ and CRR weights then differed between two runs of the same config and logged data (README).
``SeededPrelearnerBuffer`` adds such a set in episode-id order (the logged episodes carry fixed ids,
``train.baselines.logged.logged_episode_id``).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import numpy as np
from ray.rllib.utils.replay_buffers.episode_replay_buffer import EpisodeReplayBuffer


class SeededEpisodeReplayBuffer(EpisodeReplayBuffer):
    """RLlib's EpisodeReplayBuffer sampling from ``np.random.default_rng(seed)``."""

    def __init__(self, *args: Any, seed: int | None = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rng = np.random.default_rng(seed)


SEEDED_BUFFER_PATH = f"{SeededEpisodeReplayBuffer.__module__}.{SeededEpisodeReplayBuffer.__qualname__}"


class SeededPrelearnerBuffer(SeededEpisodeReplayBuffer):
    """The offline pre-learner's buffer: seeded, and an unordered batch of episodes goes in in id
    order (an ordered one keeps its order)."""

    def add(self, episodes: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(episodes, (set, frozenset)):
            episodes = sorted(episodes, key=lambda episode: episode.id_)
        super().add(episodes, *args, **kwargs)


@contextlib.contextmanager
def ordered_ray_data() -> Iterator[None]:
    """Ray Data hands out blocks in completion order unless told otherwise; offline training reads
    the logged episodes through it, so the order is fixed for the duration (this process's Ray Data
    executions only)."""
    from ray.data import DataContext

    options = DataContext.get_current().execution_options
    before = options.preserve_order
    options.preserve_order = True
    try:
        yield
    finally:
        options.preserve_order = before
