"""DeepFM user model (deepctr-torch) fitted on one time split's ratings (paper §4.1.1).

Features are the user id and the item id (sparse); the model regresses the rating. Reward = the
predicted rating clipped to the split's rating range (optionally rounded to integers, as the
authors' test simulator gives integer ratings). Distance = L2 between the model's item embeddings
(the shared FM/DNN embedding table), or between the item columns of the split's rating matrix
(``distance="rating_columns"``). Pairs are scored in batches; no user×item matrix is ever built.

deepctr-torch is imported lazily: its import pings PyPI for a version check (harmless offline).
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import pandas as pd
import torch

from ulrec.config import DeepFMConfig
from ulrec.console import progress_bar
from ulrec.errors import DataError, InputError
from ulrec.io import atomic_path
from ulrec.simulator.user_models import (
    META_FILE,
    ItemDistances,
    UserModel,
    VectorDistances,
    as_index_array,
    load_distances,
    rating_column_distances,
)

DistanceKind = Literal["embedding", "rating_columns"]
_FEATURES = ("user_id", "item_id")


def _import_deepctr() -> None:
    """Import deepctr-torch without its PyPI version check.

    On import, deepctr-torch 0.3.0 starts a thread that asks PyPI for newer releases and prints a
    notice when that fails: a network call from every process that loads a simulator (each
    rollout shard). Threads whose target is that check are not started; any other thread is.
    """
    if "deepctr_torch" in sys.modules:
        return

    class _WithoutVersionCheck(threading.Thread):
        def start(self) -> None:
            target = getattr(self, "_target", None)
            if getattr(target, "__qualname__", "") == "check_version.<locals>.check":
                return
            super().start()

    real_thread = threading.Thread
    threading.Thread = _WithoutVersionCheck  # deepctr_torch.utils binds it by `from threading import Thread`
    try:
        import deepctr_torch  # noqa: F401
    finally:
        threading.Thread = real_thread


def _build_deepfm(n_users: int, n_items: int, hp: DeepFMConfig, seed: int) -> Any:
    _import_deepctr()
    from deepctr_torch.inputs import SparseFeat
    from deepctr_torch.models import DeepFM

    columns = [
        SparseFeat("user_id", vocabulary_size=n_users, embedding_dim=hp.embedding_dim),
        SparseFeat("item_id", vocabulary_size=n_items, embedding_dim=hp.embedding_dim),
    ]
    return DeepFM(
        columns,
        columns,
        dnn_hidden_units=tuple(hp.hidden_units),
        l2_reg_linear=hp.l2_reg,
        l2_reg_embedding=hp.l2_reg,
        dnn_dropout=hp.dropout,
        task="regression",
        seed=seed,
        device="cpu",
    )


def _epoch_bar(epochs: int, enabled: bool) -> Any:
    """A deepctr-torch callback advancing a tqdm bar once per epoch, showing the training loss."""
    from deepctr_torch.callbacks import Callback

    bar = progress_bar(total=epochs, desc="DeepFM fit", unit="epoch", enabled=enabled, leave=False)

    class EpochBar(Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{(logs or {}).get('loss', float('nan')):.4f}")

        def on_train_end(self, logs: dict | None = None) -> None:
            bar.close()

    return EpochBar()


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Run torch ops with ``n`` intra-op threads, restoring the process setting afterwards."""
    before = torch.get_num_threads()
    if before != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if before != n:
            torch.set_num_threads(before)


class DeepFMUserModel(UserModel):
    """A fitted deepctr-torch DeepFM as a user model. Build with :meth:`fit` or ``load_user_model``."""

    def __init__(
        self,
        model: Any,
        *,
        n_users: int,
        n_items: int,
        hparams: DeepFMConfig,
        rating_range: tuple[float, float],
        distances: ItemDistances | None = None,
        distance_kind: DistanceKind = "embedding",
        users: Any = None,
        seed: int = 0,
        fit_report: dict[str, Any] | None = None,
    ) -> None:
        lo, hi = float(rating_range[0]), float(rating_range[1])
        if not (np.isfinite(lo) and np.isfinite(hi) and lo <= hi):
            raise InputError(f"rating_range must be finite with low <= high (got {rating_range})")
        self.model = model.eval()
        self.n_users, self.n_items = int(n_users), int(n_items)
        self.hparams = hparams
        self.rating_range = (lo, hi)
        self.seed = seed
        self.users = None if users is None else as_index_array(users, "users", self.n_users)
        self.fit_report = fit_report
        self.distance_kind = distance_kind
        if distances is None:
            if distance_kind != "embedding":
                raise InputError("distances are required for distance_kind='rating_columns'")
            distances = VectorDistances(self.item_embeddings(), name="DeepFM item embeddings")
        self.item_distances = distances
        order = list(model.feature_index)
        self._columns = [order.index(name) for name in _FEATURES]

    # ----------------------------------------------------------------------------------- fitting
    @classmethod
    def fit(
        cls,
        ratings: pd.DataFrame,
        *,
        n_users: int,
        n_items: int,
        hparams: DeepFMConfig | None = None,
        distance: DistanceKind = "embedding",
        seed: int = 0,
        progress: bool = True,
    ) -> "DeepFMUserModel":
        """Fit on a ratings frame (columns user_id, item_id, rating).

        ``hparams.holdout_fraction`` of the ratings (random, seeded) are held out to report RMSE of
        the reward (clipped/rounded prediction) against a mean-rating baseline in ``fit_report``;
        the model is fitted on the rest.
        """
        hp = hparams or DeepFMConfig()
        missing = [c for c in ("user_id", "item_id", "rating") if c not in ratings.columns]
        if missing:
            raise InputError(f"ratings lacks column(s) {missing}")
        if len(ratings) == 0:
            raise InputError("ratings is empty")
        users = as_index_array(ratings["user_id"].to_numpy(), "ratings.user_id", n_users)
        items = as_index_array(ratings["item_id"].to_numpy(), "ratings.item_id", n_items)
        values = ratings["rating"].to_numpy(dtype=np.float32)
        if not np.isfinite(values).all():
            raise InputError("ratings.rating holds NaN or inf values")

        rng = np.random.default_rng(seed)
        order = rng.permutation(len(values))
        n_hold = int(round(hp.holdout_fraction * len(values)))
        if n_hold >= len(values):
            n_hold = 0
        hold, train = order[:n_hold], order[n_hold:]

        torch.manual_seed(seed)
        net = _build_deepfm(n_users, n_items, hp, seed)
        net.compile(torch.optim.Adam(net.parameters(), lr=hp.lr), "mse")
        x = {"user_id": users[train], "item_id": items[train]}
        # deepctr prints the device and sample counts to stdout; keep stdout for stage results.
        with contextlib.redirect_stdout(sys.stderr), _torch_threads(hp.num_threads):
            net.fit(x, values[train], batch_size=hp.batch_size, epochs=hp.epochs, verbose=0,
                    callbacks=[_epoch_bar(hp.epochs, progress)])

        if distance == "rating_columns":
            distances: ItemDistances | None = rating_column_distances(users, items, values, n_users, n_items)
        else:
            distances = None
        model = cls(
            net,
            n_users=n_users,
            n_items=n_items,
            hparams=hp,
            rating_range=(float(values.min()), float(values.max())),
            distances=distances,
            distance_kind=distance,
            users=np.unique(users),
            seed=seed,
        )
        model.fit_report = model._holdout_report(users[hold], items[hold], values[hold], values[train], len(train))
        return model

    def _holdout_report(
        self, users: np.ndarray, items: np.ndarray, truth: np.ndarray, train_values: np.ndarray, n_train: int
    ) -> dict[str, Any]:
        report: dict[str, Any] = {"n_train": int(n_train), "n_holdout": int(len(truth))}
        if len(truth) == 0:
            return report | {"rmse": None, "baseline_rmse": None}
        pred = self._reward(users, items).astype(np.float64)
        baseline = float(train_values.mean())
        report["rmse"] = float(np.sqrt(np.mean((pred - truth) ** 2)))
        report["baseline_rmse"] = float(np.sqrt(np.mean((baseline - truth) ** 2)))
        report["baseline_mean_rating"] = baseline
        return report

    # ----------------------------------------------------------------------------------- scoring
    def item_embeddings(self) -> np.ndarray:
        """The item embedding table shared by the FM and DNN parts, (n_items, embedding_dim)."""
        return self.model.embedding_dict["item_id"].weight.detach().cpu().numpy().astype(np.float32)

    def predict(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Raw predicted ratings of validated pairs, in batches of ``hparams.batch_score_size``."""
        out = np.empty(len(users), dtype=np.float32)
        step = self.hparams.batch_score_size
        x = np.empty((min(step, len(users)), 2), dtype=np.float32)
        with torch.inference_mode(), _torch_threads(self.hparams.num_threads):
            for start in range(0, len(users), step):
                n = min(step, len(users) - start)
                x[:n, self._columns[0]] = users[start : start + n]
                x[:n, self._columns[1]] = items[start : start + n]
                out[start : start + n] = self.model(torch.from_numpy(x[:n])).reshape(-1).numpy()
        return out

    def _reward(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        reward = np.clip(self.predict(users, items), *self.rating_range)
        return np.rint(reward) if self.hparams.round_rewards else reward

    def reward_range(self) -> tuple[float, float]:
        return self.rating_range

    def _distance(self, items_a: np.ndarray, items_b: np.ndarray) -> np.ndarray:
        return self.item_distances.pairs(items_a, items_b)

    # ------------------------------------------------------------------------------- persistence
    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        with atomic_path(directory) as tmp:
            tmp.mkdir()
            torch.save(self.model.state_dict(), tmp / "model.pt")
            if self.distance_kind != "embedding":
                self.item_distances.save(tmp)
            if self.users is not None:
                np.save(tmp / "users.npy", self.users)
            meta = {
                "kind": "deepfm",
                "n_users": self.n_users,
                "n_items": self.n_items,
                "hparams": self.hparams.model_dump(mode="json"),
                "rating_range": list(self.rating_range),
                "distance_kind": self.distance_kind,
                "seed": self.seed,
                "fit_report": self.fit_report,
            }
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return directory

    @classmethod
    def _load(cls, directory: Path, meta: dict[str, Any]) -> "DeepFMUserModel":
        try:
            hp = DeepFMConfig.model_validate(meta["hparams"])
            n_users, n_items = int(meta["n_users"]), int(meta["n_items"])
            net = _build_deepfm(n_users, n_items, hp, int(meta.get("seed", 0)))
            net.load_state_dict(torch.load(directory / "model.pt", map_location="cpu", weights_only=True))
        except (KeyError, ValueError, RuntimeError, OSError) as exc:
            raise DataError(f"{directory}: cannot load the DeepFM user model ({exc})") from None
        kind = meta.get("distance_kind", "embedding")
        users_path = directory / "users.npy"
        return cls(
            net,
            n_users=n_users,
            n_items=n_items,
            hparams=hp,
            rating_range=tuple(meta["rating_range"]),
            distances=None if kind == "embedding" else load_distances(directory),
            distance_kind=kind,
            users=np.load(users_path) if users_path.is_file() else None,
            seed=int(meta.get("seed", 0)),
            fit_report=meta.get("fit_report"),
        )
