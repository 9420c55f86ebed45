"""DORL (Gao et al. 2023, "Alleviating Matthew Effect of Offline RL in Interactive Recommendation"):
A2C trained in the (train) user model on a penalised reward

    r̃(s, a) = r(u, a) − λ_var · Var_k[r_k(u, a)] + λ_ent · H(s)

- Var_k: the variance of the rewards predicted by an ensemble of user models (model uncertainty:
  where the user models disagree the reward is not trusted).
  DeepFM simulators: the train simulator plus ``dorl_ensemble − 1`` extra DeepFMs fitted on the
  same train ratings with other seeds. Matrix simulators (no ratings to refit on): ``dorl_ensemble``
  rank-r reconstructions of the reward matrix from bootstrap-masked entries (each entry kept with
  probability 0.8, rescaled), so the spread is where the low-rank structure is unsure.
- H(s): the entropy of the logged next-item distribution after the state's most recent item (a
  k = 1 version of DORL's entropy term; the episode start uses the distribution of first items).
  High-entropy states are where the logged behaviour was diverse; the bonus counters the Matthew
  effect of offline data. The logs are the train split's time-ordered user histories (or the
  logged baseline episodes when no ratings exist).

The shaping happens in a Gymnasium wrapper on the env RLlib samples from, applied on accepted
steps (the exit step stays 0); ``info["raw_reward"]`` keeps the user's reward.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Sequence

import gymnasium as gym
import numpy as np

from ulrec.config import Config
from ulrec.errors import InputError
from ulrec.io import atomic_path
from ulrec.simulator import UserModel, cached_user_model

# Matrix ensembles: rank of each member and share of entries each bootstrap keeps.
MATRIX_RANK = 16
MATRIX_KEEP = 0.8
# Rows of the reward matrix processed at once (bounds memory for big, memory-mapped matrices).
_ROW_BLOCK = 4096


# ------------------------------------------------------------------------------------- entropy
def next_item_entropy(sequences: Sequence[Sequence[int]], n_items: int) -> np.ndarray:
    """(n_items + 1,) float32: entropy (nats) of the next item after each item in ``sequences``;
    entry ``n_items`` is the entropy of first items. Items never followed get 0."""
    prev_parts, next_parts = [], []
    for seq in sequences:
        seq = np.asarray(seq, dtype=np.int64)
        if len(seq) == 0:
            continue
        if seq.min() < 0 or seq.max() >= n_items:
            raise InputError(f"sequence holds item ids outside [0, {n_items})")
        prev_parts.append(np.concatenate([[n_items], seq[:-1]]))
        next_parts.append(seq)
    entropy = np.zeros(n_items + 1, dtype=np.float64)
    if not prev_parts:
        return entropy.astype(np.float32)
    prev = np.concatenate(prev_parts)
    nxt = np.concatenate(next_parts)
    pairs, counts = np.unique(prev * n_items + nxt, return_counts=True)
    owner = pairs // n_items
    totals = np.bincount(owner, weights=counts, minlength=n_items + 1)
    p = counts / totals[owner]
    np.add.at(entropy, owner, -p * np.log(p))
    return entropy.astype(np.float32)


# ------------------------------------------------------------------------------------ ensembles
def fit_matrix_members(
    rewards: np.ndarray, n_members: int, out_dir: Path, *, rank: int = MATRIX_RANK, keep: float = MATRIX_KEEP, seed: int = 0
) -> list[dict[str, Any]]:
    """``n_members`` low-rank reconstructions of a (users × items) reward matrix, each from a
    bootstrap mask of its entries (randomised SVD, one power iteration). Saved as factor files."""
    n_users, n_items = rewards.shape
    rank = max(1, min(rank, n_users, n_items))
    members = []
    for k in range(n_members):
        rng = np.random.default_rng(seed + 1000 * (k + 1))
        block_seeds = rng.integers(0, 2**31, size=-(-n_users // _ROW_BLOCK))

        def masked(start: int) -> np.ndarray:
            block = np.asarray(rewards[start : start + _ROW_BLOCK], dtype=np.float32)
            mask = np.random.default_rng(block_seeds[start // _ROW_BLOCK]).random(block.shape) < keep
            return block * mask / keep

        omega = rng.standard_normal((n_items, rank + 8)).astype(np.float32)
        y = np.concatenate([masked(s) @ omega for s in range(0, n_users, _ROW_BLOCK)])
        q, _ = np.linalg.qr(y)
        # One power iteration sharpens the range estimate.
        z = sum(masked(s).T @ q[s : s + _ROW_BLOCK] for s in range(0, n_users, _ROW_BLOCK))
        q, _ = np.linalg.qr(np.concatenate([masked(s) @ z for s in range(0, n_users, _ROW_BLOCK)]))
        b = sum(q[s : s + _ROW_BLOCK].T @ masked(s) for s in range(0, n_users, _ROW_BLOCK))
        u_small, sigma, vt = np.linalg.svd(b, full_matrices=False)
        users = (q @ u_small[:, :rank]) * sigma[:rank]
        path = out_dir / f"member_{k}.npz"
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, users=users.astype(np.float32), items=vt[:rank].T.astype(np.float32))
        members.append({"kind": "factors", "path": str(path)})
    return members


@functools.lru_cache(maxsize=16)
def _load_factors(path: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as data:
        return data["users"], data["items"]


def member_row(member: dict[str, Any], user: int, n_items: int) -> np.ndarray:
    """One ensemble member's rewards of ``user`` for every item."""
    if member["kind"] == "factors":
        users, items = _load_factors(member["path"])
        return users[user] @ items.T
    if member["kind"] == "user_model":
        model = cached_user_model(member["dir"])
        return model.reward(np.full(n_items, user), np.arange(n_items))
    raise InputError(f"unknown DORL ensemble member kind {member['kind']!r}")


# -------------------------------------------------------------------------------------- wrapper
class DORLRewardWrapper(gym.Wrapper):
    """Shapes the rewards of :class:`~ulrec.simulator.gym_env.EchoChamberGymEnv` for DORL."""

    def __init__(
        self,
        env: gym.Env,
        *,
        members: list[dict[str, Any]],
        entropy_path: str,
        lambda_var: float,
        lambda_ent: float,
    ) -> None:
        super().__init__(env)
        if not members:
            raise InputError("DORL needs at least one ensemble member")
        self.members = members
        self.entropy = np.load(entropy_path)
        self.n_items = env.action_space.n
        if self.entropy.shape != (self.n_items + 1,):
            raise InputError(f"{entropy_path}: entropy must have shape ({self.n_items + 1},), got {self.entropy.shape}")
        self.lambda_var = float(lambda_var)
        self.lambda_ent = float(lambda_ent)
        self._variance = np.zeros(self.n_items, dtype=np.float32)
        self._last_item = self.n_items

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        obs, info = self.env.reset(**kwargs)
        user = int(info["user_id"])
        rows = np.stack([member_row(m, user, self.n_items) for m in self.members])
        self._variance = rows.var(axis=0).astype(np.float32)
        self._last_item = int(obs["items"][-1])
        return obs, info

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        info = {**info, "raw_reward": reward}
        if not terminated:
            reward = (
                reward
                - self.lambda_var * float(self._variance[int(action)])
                + self.lambda_ent * float(self.entropy[self._last_item])
            )
        self._last_item = int(obs["items"][-1])
        return obs, float(reward), terminated, truncated, info


# --------------------------------------------------------------------------------- preparation
def fit_deepfm_members(cfg: Config, n_extra: int, out_dir: Path) -> list[dict[str, Any]]:
    """``n_extra`` DeepFMs fitted on the train ratings with seeds run.seed + 1, + 2, …"""
    from ulrec.data import load_prepared
    from ulrec.simulator.deepfm import DeepFMUserModel

    data = load_prepared(cfg.run_dir)
    hparams = cfg.simulator.deepfm
    if cfg.baselines.dorl_ensemble_epochs is not None:
        hparams = hparams.model_copy(update={"epochs": cfg.baselines.dorl_ensemble_epochs})
    members = []
    for k in range(n_extra):
        model = DeepFMUserModel.fit(
            data.train,
            n_users=data.num_users,
            n_items=data.num_items,
            hparams=hparams,
            distance=cfg.simulator.distance,
            seed=cfg.run.seed + 1 + k,
            progress=cfg.run.progress,
        )
        path = out_dir / f"member_{k}"
        model.save(path)
        members.append({"kind": "user_model", "dir": str(path)})
    return members


def prepare_dorl(
    cfg: Config, train_model_dir: Path, train_model: UserModel, logged_sequences: Sequence[Sequence[int]], out_dir: Path
) -> dict[str, Any]:
    """Fit the ensemble and the entropy table; the ``dorl`` entry of the env_config."""
    out_dir.mkdir(parents=True, exist_ok=True)
    b = cfg.baselines
    if cfg.simulator.kind == "deepfm":
        members = [{"kind": "user_model", "dir": str(train_model_dir)}]
        members += fit_deepfm_members(cfg, b.dorl_ensemble - 1, out_dir)
    else:
        members = fit_matrix_members(train_model.rewards, b.dorl_ensemble, out_dir, seed=cfg.run.seed)
    if cfg.layout.data_file("train.parquet").is_file():
        from ulrec.data import load_prepared

        sequences = list(load_prepared(cfg.run_dir).user_histories("train").values())
    else:
        sequences = list(logged_sequences)
    entropy_path = out_dir / "next_item_entropy.npy"
    with atomic_path(entropy_path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, next_item_entropy(sequences, train_model.n_items))
    return {
        "members": members,
        "entropy_path": str(entropy_path),
        "lambda_var": b.dorl_lambda_var,
        "lambda_ent": b.dorl_lambda_ent,
    }
