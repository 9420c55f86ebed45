"""Gymnasium view of one simulated user, for RLlib and other single-agent RL code.

The episode follows exactly the batched environment's exit protocol (it *is* an
:class:`EchoChamberEnv` holding one episode).

- action: ``Discrete(n_items)``, the recommended item.
- observation: ``Dict(items=MultiDiscrete([n_items + 1] * W), rewards=Box(lo, hi, (W,)))``: the
  last W accepted items, oldest first, with the user's rewards for them; slots before the episode's
  start hold the sentinel item ``n_items`` and reward 0. W = ``obs_window`` (default: the env's
  window, at least 1); [lo, hi] is the user model's reward range widened to include 0.
- reward: the user's reward on accepted steps, 0 on the exit step.
- terminated: the user exited (repeat, low_reward, similar); truncated: ``max_steps`` accepted
  steps were reached. ``info`` holds ``user_id``, ``reason``, ``length`` and ``total_reward``.
- reset draws a user uniformly (seeded) from ``users`` (default: the user model's known users);
  ``reset(options={"user_id": u})`` picks one.

Registered as ``ulrec/EchoChamber-v0``. Constructor arguments (a dict, keyword arguments, or both,
so both ``gym.make(id, **env_config)`` and RLlib's ``env_config`` work): ``user_model`` (an object)
or ``user_model_dir`` (a saved user model, so remote workers can build it), the
:class:`EnvConfig` fields (``distance_threshold`` required), ``users``, ``obs_window``. From a
process that has not imported this module use the id ``"ulrec.simulator.gym_env:ulrec/EchoChamber-v0"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from ulrec.errors import InputError
from ulrec.simulator.env import EchoChamberEnv, EnvConfig
from ulrec.simulator.loading import load_user_model
from ulrec.simulator.user_models import UserModel, as_index_array

ENV_ID = "ulrec/EchoChamber-v0"
_ENV_FIELDS = {f.name for f in fields(EnvConfig)}
_OWN_KEYS = {"user_model", "user_model_dir", "users", "obs_window"}


class EchoChamberGymEnv(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, config: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        options = {**dict(config or {}), **kwargs}
        unknown = set(options) - _ENV_FIELDS - _OWN_KEYS
        if unknown:
            raise InputError(f"unknown env_config key(s) {sorted(unknown)}")
        user_model = options.get("user_model")
        if user_model is None:
            if options.get("user_model_dir") is None:
                raise InputError("env_config needs user_model or user_model_dir")
            user_model = load_user_model(options["user_model_dir"])
        if not isinstance(user_model, UserModel):
            raise InputError(f"user_model must be a UserModel (got {type(user_model).__name__})")
        if "distance_threshold" not in options:
            raise InputError("env_config needs distance_threshold (τ_d, see ulrec.simulator.fit.env_config_for)")
        self.env_config = EnvConfig(**{k: v for k, v in options.items() if k in _ENV_FIELDS})
        self.user_model = user_model
        users = options.get("users")
        self.users = user_model.known_users() if users is None else as_index_array(users, "users", user_model.n_users)
        if len(self.users) == 0:
            raise InputError("users is empty")
        self.obs_window = int(options.get("obs_window") or max(self.env_config.window, 1))
        if self.obs_window < 1:
            raise InputError(f"obs_window must be >= 1 (got {self.obs_window})")

        n_items = user_model.n_items
        lo, hi = user_model.reward_range()
        low, high = np.float32(min(lo, 0.0)), np.float32(max(hi, 0.0))  # 0 pads the empty slots
        self.action_space = spaces.Discrete(n_items)
        self.observation_space = spaces.Dict(
            {
                "items": spaces.MultiDiscrete(np.full(self.obs_window, n_items + 1, dtype=np.int64)),
                "rewards": spaces.Box(low, high, shape=(self.obs_window,), dtype=np.float32),
            }
        )
        self._env = EchoChamberEnv(user_model, self.env_config)
        self._user = -1
        self._rewards: list[float] = []

    def _observation(self) -> dict[str, np.ndarray]:
        items = self._env.accepted_items(0)[-self.obs_window :]
        rewards = np.asarray(self._rewards[-self.obs_window :], dtype=np.float32)
        pad = self.obs_window - len(items)
        return {
            "items": np.concatenate([np.full(pad, self.user_model.n_items, dtype=np.int64), items]),
            "rewards": np.concatenate([np.zeros(pad, dtype=np.float32), rewards]),
        }

    def _info(self, reason: str) -> dict[str, Any]:
        return {
            "user_id": self._user,
            "reason": reason,
            "length": int(self._env.lengths[0]),
            "total_reward": float(self._env.total_rewards[0]),
        }

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        super().reset(seed=seed)
        if options and "user_id" in options:
            self._user = int(as_index_array([options["user_id"]], "user_id", self.user_model.n_users)[0])
        else:
            self._user = int(self.users[self.np_random.integers(len(self.users))])
        self._env.reset(np.array([self._user]))
        self._rewards = []
        return self._observation(), self._info("reset")

    def step(self, action: Any) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        if self._user < 0:
            raise InputError("step called before reset")
        if self._env.done[0]:
            raise InputError("step called on a finished episode; call reset")
        result = self._env.step(np.array([int(action)]))
        reason = str(result.reason[0])
        live = bool(result.live[0])
        reward = float(result.reward[0]) if live else 0.0
        if live:
            self._rewards.append(reward)
        return self._observation(), reward, not live, reason == "horizon", self._info(reason)


if ENV_ID not in gym.registry:
    gym.register(id=ENV_ID, entry_point="ulrec.simulator.gym_env:EchoChamberGymEnv")
