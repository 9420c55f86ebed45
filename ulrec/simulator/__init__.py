"""Simulated users: user models (DeepFM, matrix) and the batched echo-chamber environment.

```python
from ulrec.simulator import MatrixUserModel, EchoChamberEnv, EnvConfig
um = MatrixUserModel(rewards=R, distances=D)      # R: (n_users, n_items), D: (n_items, n_items)
env = EchoChamberEnv(um, EnvConfig(reward_threshold=2.0, window=4, distance_threshold=15.0,
                                   max_steps=100, legacy=False))
env.reset(user_ids)              # int array; one episode per entry
res = env.step(item_ids)         # res.reward, res.live, res.reason (res.code), res.done
env.lengths, env.total_rewards, env.exit_reasons, env.done
```

The Gymnasium view lives in :mod:`ulrec.simulator.gym_env`; the `ulrec env fit` stage and
:func:`ulrec.simulator.fit.load_env` in :mod:`ulrec.simulator.fit`. ``DeepFMUserModel`` is imported
lazily (deepctr-torch pings PyPI when imported).
"""

from typing import Any

from ulrec.simulator.calibration import calibrate, random_policy_exits, resolve_distance_threshold
from ulrec.simulator.env import (
    EXIT_REASONS,
    REASONS,
    EchoChamberEnv,
    EnvConfig,
    EpisodeTrace,
    StepResult,
    exit_reason,
    reference_episode,
)
from ulrec.simulator.loading import cached_user_model, load_user_model
from ulrec.simulator.user_models import MatrixUserModel, UserModel, rating_column_distances

__all__ = [
    "EXIT_REASONS",
    "REASONS",
    "DeepFMUserModel",
    "EchoChamberEnv",
    "EnvConfig",
    "EpisodeTrace",
    "MatrixUserModel",
    "StepResult",
    "UserModel",
    "calibrate",
    "exit_reason",
    "load_user_model",
    "random_policy_exits",
    "rating_column_distances",
    "reference_episode",
    "resolve_distance_threshold",
]


def __getattr__(name: str) -> Any:
    if name == "DeepFMUserModel":
        from ulrec.simulator.deepfm import DeepFMUserModel

        return DeepFMUserModel
    raise AttributeError(f"module 'ulrec.simulator' has no attribute {name!r}")
