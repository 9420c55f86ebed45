"""The echo-chamber environment: the exit protocol, batched over many users at once.

Exit protocol (docs/architecture.md; order matters), for one user at step j with recommended item a_j:

1. a_j was already recommended earlier in this episode            → exit "repeat"
2. reward(u, a_j) < reward_threshold                               → exit "low_reward"
3. some item among the last ``window`` recommended ones lies at
   distance(a_j, item) < distance_threshold (strictly)             → exit "similar"
4. otherwise the user stays ("stay"); the step that brings the accepted steps to ``max_steps``
   is reported as "horizon": it is accepted and the episode is truncated (not an exit).

Len_u counts the accepted steps and R_u sums their rewards (paper Eq. 4–5): the exit step counts in
neither. ``legacy=True`` is the older BiLLP rule: no repeat rule, no reward check on step 1.

:func:`exit_reason` states the rules for one step; :func:`reference_episode` applies them in a
plain per-user loop (the way the authors' environment runs); :class:`EchoChamberEnv` applies the
same rules to whole arrays of users per call. A property test holds the two to the same answers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ulrec.episodes import ENV_EXITS, STAY as STAY_REASON, TRUNCATED
from ulrec.errors import InputError
from ulrec.simulator.user_models import UserModel, as_index_array

# Step outcomes as small integers for the arrays; "done" marks users whose episode already ended.
REASONS = (STAY_REASON, *ENV_EXITS, TRUNCATED, "done")
STAY, REPEAT, LOW_REWARD, SIMILAR, HORIZON, DONE = range(len(REASONS))
_REASON_NAMES = np.array(REASONS, dtype=object)
# Exit reason per episode; "" (index STAY) while it is running.
_EXIT_NAMES = np.array(("",) + REASONS[1:], dtype=object)
# Reasons that end an episode by the user leaving (horizon is a truncation, not an exit).
EXIT_REASONS = ENV_EXITS


@dataclass(frozen=True, kw_only=True)
class EnvConfig:
    """Exit-protocol parameters. ``distance_threshold`` (τ_d) is absolute here; see
    ``ulrec.simulator.calibration`` to derive it from a quantile of item distances."""

    distance_threshold: float
    reward_threshold: float = 2.0
    window: int = 4
    max_steps: int = 100
    legacy: bool = False

    def __post_init__(self) -> None:
        for name in ("distance_threshold", "reward_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
                raise InputError(f"{name} must be a number (got {value!r})")
            if not math.isfinite(value) or value < 0:
                raise InputError(f"{name} must be finite and >= 0 (got {value!r})")
        for name, low in (("window", 0), ("max_steps", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise InputError(f"{name} must be an integer >= {low} (got {value!r})")
        if not isinstance(self.legacy, (bool, np.bool_)):
            raise InputError(f"legacy must be a bool (got {self.legacy!r})")


def exit_reason(
    *, step: int, repeated: bool, reward: float, window_distances: Sequence[float], config: EnvConfig
) -> str:
    """The protocol for one recommendation at 1-based ``step`` of an episode whose earlier steps
    were all accepted. ``window_distances``: distances to the last ``window`` earlier items."""
    if repeated and not config.legacy:
        return "repeat"
    if reward < config.reward_threshold and not (config.legacy and step == 1):
        return "low_reward"
    if any(d < config.distance_threshold for d in window_distances):
        return "similar"
    return "horizon" if step >= config.max_steps else "stay"


@dataclass
class EpisodeTrace:
    """One user's episode as :func:`reference_episode` plays it."""

    rewards: list[float] = field(default_factory=list)
    live: list[bool] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    length: int = 0
    total_reward: float = 0.0


def reference_episode(
    user_model: UserModel, user_id: int, items: Sequence[int], config: EnvConfig
) -> EpisodeTrace:
    """Play ``items`` for one user, one at a time, until the episode ends (extra items unused).

    A deliberately plain loop: the per-user baseline for tests and the throughput benchmark.
    """
    trace = EpisodeTrace()
    history: list[int] = []
    for step, item in enumerate(items, start=1):
        reward = float(user_model.reward(np.array([user_id]), np.array([item]))[0])
        window = history[-config.window :] if config.window else []
        distances = user_model.distance(np.full(len(window), item), np.array(window, dtype=np.int64))
        reason = exit_reason(
            step=step, repeated=item in history, reward=reward, window_distances=distances, config=config
        )
        live = reason in ("stay", "horizon")
        trace.rewards.append(reward)
        trace.live.append(live)
        trace.reasons.append(reason)
        if live:
            trace.length += 1
            trace.total_reward += reward
        if reason != "stay":
            break
        history.append(int(item))
    return trace


@dataclass(frozen=True)
class StepResult:
    """What one :meth:`EchoChamberEnv.step` returns, one entry per episode.

    reward: float32, the user model's reward for the recommended item (also on the exit step,
        which nevertheless counts in neither Len nor Traj Reward); 0 for users already done.
    live: True where the step was accepted (reason "stay" or "horizon").
    code: int8 index into :data:`REASONS` per episode; ``reason`` gives the names: "stay",
        "repeat", "low_reward", "similar", "horizon", or "done" for users whose episode had
        already ended (their item was ignored).
    done: whether each episode has ended after this step.
    """

    reward: np.ndarray
    live: np.ndarray
    code: np.ndarray
    done: np.ndarray

    @property
    def reason(self) -> np.ndarray:
        """Reason names per episode (an object array of str)."""
        return _REASON_NAMES[self.code]


class EchoChamberEnv:
    """Many users' episodes stepped together as arrays.

    ``reset(user_ids)`` starts one episode per entry (a user may appear more than once);
    ``step(item_ids)`` takes one item per episode. Episodes run in lock step: every step of a
    running episode so far was accepted, so all running episodes have taken exactly ``t`` steps.
    The recommended items are kept in a (max_steps, episodes) int32 array whose first ``t`` rows
    serve both the repeat check (all rows) and the window (the last ``window`` rows); Len and Traj
    Reward run along.
    """

    def __init__(self, user_model: UserModel, config: EnvConfig) -> None:
        if not isinstance(user_model, UserModel):
            raise InputError(f"user_model must be a UserModel (got {type(user_model).__name__})")
        if not isinstance(config, EnvConfig):
            raise InputError(f"config must be an EnvConfig (got {type(config).__name__})")
        self.user_model = user_model
        self.config = config
        self._user_ids: np.ndarray | None = None

    # --------------------------------------------------------------------------------- state
    def reset(self, user_ids: Any) -> None:
        """Start one fresh episode per entry of ``user_ids``."""
        users = as_index_array(user_ids, "user_ids", self.user_model.n_users)
        n = len(users)
        self._user_ids = users
        self._t = 0
        self._history = np.full((self.config.max_steps, n), -1, dtype=np.int32)
        self._lengths = np.zeros(n, dtype=np.int64)
        self._total_rewards = np.zeros(n, dtype=np.float64)
        self._done = np.zeros(n, dtype=bool)
        self._exit_codes = np.full(n, STAY, dtype=np.int8)

    def _require_reset(self) -> None:
        if self._user_ids is None:
            raise InputError("EchoChamberEnv.step called before reset(user_ids)")

    @property
    def user_ids(self) -> np.ndarray:
        self._require_reset()
        return self._user_ids

    @property
    def done(self) -> np.ndarray:
        """True for episodes that have ended (exit or horizon)."""
        self._require_reset()
        return self._done

    @property
    def lengths(self) -> np.ndarray:
        """Len_u: accepted steps per episode."""
        self._require_reset()
        return self._lengths

    @property
    def total_rewards(self) -> np.ndarray:
        """R_u: sum of the accepted steps' rewards per episode."""
        self._require_reset()
        return self._total_rewards

    @property
    def exit_reasons(self) -> np.ndarray:
        """How each episode ended: "repeat", "low_reward", "similar", "horizon"; "" while running."""
        self._require_reset()
        return _EXIT_NAMES[self._exit_codes]

    def accepted_items(self, episode: int) -> np.ndarray:
        """The items accepted so far in one episode, oldest first."""
        self._require_reset()
        return self._history[: self._lengths[episode], episode].astype(np.int64)

    # ---------------------------------------------------------------------------------- step
    def step(self, item_ids: Any) -> StepResult:
        """Recommend ``item_ids[k]`` to episode k; episodes already done ignore their entry."""
        self._require_reset()
        items_all = np.asarray(item_ids)
        n = len(self._user_ids)
        if items_all.shape != (n,):
            raise InputError(f"item_ids must have shape ({n},) (one item per episode), got {items_all.shape}")
        if self._done.all():
            return StepResult(
                reward=np.zeros(n, dtype=np.float32),
                live=np.zeros(n, dtype=bool),
                code=np.full(n, DONE, dtype=np.int8),
                done=self._done.copy(),
            )
        cfg, t = self.config, self._t
        everyone = not self._done.any()
        active = np.arange(n) if everyone else np.flatnonzero(~self._done)
        items = as_index_array(items_all if everyone else items_all[active], "item_ids", self.user_model.n_items)
        users = self._user_ids if everyone else self._user_ids[active]
        # Rows = earlier steps; all accepted, since the episodes in these columns are running.
        history = self._history[:t] if everyone else self._history[:t, active]

        reward = self.user_model._reward(users, items)
        code = np.full(len(active), STAY, dtype=np.int8)
        if t > 0 and not cfg.legacy:
            code[(history == items.astype(np.int32)).any(axis=0)] = REPEAT
        if t > 0 or not cfg.legacy:
            code[(code == STAY) & (reward < cfg.reward_threshold)] = LOW_REWARD
        if t > 0 and cfg.window > 0:
            # Distances only for episodes no earlier rule has ended, against the last W items.
            window = history[max(0, t - cfg.window) :]
            rows = np.flatnonzero(code == STAY)
            previous = window[:, rows]
            current = np.tile(items[rows], len(previous))  # row-major, like previous.ravel()
            distances = self.user_model._distance(current, previous.ravel().astype(np.int64))
            close = (distances < cfg.distance_threshold).reshape(previous.shape).any(axis=0)
            code[rows[close]] = SIMILAR

        stays = code == STAY
        stay_cols = active[stays]
        self._history[t, stay_cols] = items[stays]
        self._lengths[stay_cols] += 1
        self._total_rewards[stay_cols] += reward[stays]
        if t + 1 >= cfg.max_steps:
            code[stays] = HORIZON
        self._t = t + 1

        ended = code != STAY
        self._done[active[ended]] = True
        self._exit_codes[active[ended]] = code[ended]

        if everyone:
            return StepResult(reward=reward, live=(code == STAY) | (code == HORIZON), code=code, done=self._done.copy())
        reward_all = np.zeros(n, dtype=np.float32)
        reward_all[active] = reward
        code_all = np.full(n, DONE, dtype=np.int8)
        code_all[active] = code
        live_all = (code_all == STAY) | (code_all == HORIZON)
        return StepResult(reward=reward_all, live=live_all, code=code_all, done=self._done.copy())
