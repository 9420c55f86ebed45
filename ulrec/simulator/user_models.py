"""User models: reward(user, item) and distance(item, item), scored for batches of pairs.

A user model answers two questions for the echo-chamber environment (docs/architecture.md, "The exit
protocol"): how much user u likes item i (``reward``) and how far apart two items are
(``distance``). Both take equal-length integer arrays and score the pairs element-wise, so the
environment can ask for thousands of users at once without any dense user×item matrix being built.

Saved user models are directories holding ``meta.json`` (its ``kind`` picks the loader) plus the
arrays; :func:`ulrec.simulator.loading.load_user_model` reads any of them back.
"""

from __future__ import annotations

import json
import pickle
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from ulrec.errors import DataError, InputError
from ulrec.io import atomic_path

META_FILE = "meta.json"
# Rows checked at once when validating big (possibly memory-mapped) matrices.
_CHECK_ROWS = 4096
# Pairs scored at once by vector distances (bounds temporary memory for wide vectors).
_PAIR_CHUNK = 16384
# rating_columns: below this many items the full item×item distance matrix is materialised
# (8192² float32 = 256 MiB at most); above it distances are computed per pair from sparse columns.
DENSE_DISTANCE_MAX_ITEMS = 8192


# ------------------------------------------------------------------------------------- validation
def as_index_array(values: Any, name: str, upper: int) -> np.ndarray:
    """``values`` as a 1-D int64 array of indices in [0, upper); InputError naming ``name``."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise InputError(f"{name} must be a 1-D array of indices (got shape {arr.shape})")
    if arr.size == 0:
        return arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise InputError(f"{name} must hold integers (got dtype {arr.dtype})")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= upper:
        bad = lo if lo < 0 else hi
        raise InputError(f"{name} holds {bad}, outside [0, {upper})")
    return arr.astype(np.int64, copy=False)


def check_finite(matrix: Any, name: str, *, nonnegative: bool = False) -> None:
    """Raise InputError naming ``name`` if the matrix holds NaN/inf (or negatives when asked).

    Works block by block so memory-mapped matrices of several GB are never copied whole.
    """
    if sp.issparse(matrix):
        data = matrix.data
        blocks = [data]
    else:
        blocks = (matrix[i : i + _CHECK_ROWS] for i in range(0, matrix.shape[0], _CHECK_ROWS))
    for block in blocks:
        block = np.asarray(block)
        if not np.isfinite(block).all():
            raise InputError(f"{name} holds NaN or inf values")
        if nonnegative and (block < 0).any():
            raise InputError(f"{name} holds negative values")


def _as_matrix(values: Any, name: str) -> np.ndarray:
    arr = values if isinstance(values, np.ndarray) else np.asarray(values)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InputError(f"{name} must be a non-empty 2-D matrix (got shape {arr.shape})")
    if arr.dtype.kind not in "fiu":
        raise InputError(f"{name} must be numeric (got dtype {arr.dtype})")
    return arr


def _gather(matrix: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """matrix[rows, cols] as float32; a flat take is ~2× faster than 2-D fancy indexing."""
    if matrix.flags.c_contiguous:
        return np.take(matrix, rows * matrix.shape[1] + cols).astype(np.float32, copy=False)
    return np.asarray(matrix[rows, cols], dtype=np.float32)


# --------------------------------------------------------------------------------- item distances
class ItemDistances(ABC):
    """distance(a, b) for pairs of item indices (already validated)."""

    n_items: int

    @abstractmethod
    def pairs(self, items_a: np.ndarray, items_b: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def save(self, directory: Path) -> None: ...


class DenseDistances(ItemDistances):
    """An explicit n_items × n_items distance matrix (the authors' published format)."""

    def __init__(self, matrix: Any, name: str = "distances") -> None:
        matrix = _as_matrix(matrix, name)
        if matrix.shape[0] != matrix.shape[1]:
            raise InputError(f"{name} must be square (n_items × n_items), got shape {matrix.shape}")
        check_finite(matrix, name, nonnegative=True)
        self.matrix = matrix
        self.n_items = matrix.shape[0]

    def pairs(self, items_a: np.ndarray, items_b: np.ndarray) -> np.ndarray:
        return _gather(self.matrix, items_a, items_b)

    def save(self, directory: Path) -> None:
        np.save(directory / "distances.npy", np.asarray(self.matrix))


class VectorDistances(ItemDistances):
    """Euclidean (L2) distance between item vectors: dense (n_items, d) or scipy sparse rows."""

    def __init__(self, vectors: Any, name: str = "item_vectors") -> None:
        if sp.issparse(vectors):
            vectors = sp.csr_matrix(vectors, dtype=np.float32)
            if vectors.shape[0] == 0 or vectors.shape[1] == 0:
                raise InputError(f"{name} must be a non-empty 2-D matrix (got shape {vectors.shape})")
            check_finite(vectors, name)
            self._sq_norms = np.asarray(vectors.multiply(vectors).sum(axis=1), dtype=np.float64).ravel()
        else:
            vectors = _as_matrix(vectors, name).astype(np.float32, copy=False)
            check_finite(vectors, name)
        self.vectors = vectors
        self.n_items = vectors.shape[0]

    def pairs(self, items_a: np.ndarray, items_b: np.ndarray) -> np.ndarray:
        out = np.empty(len(items_a), dtype=np.float32)
        for start in range(0, len(items_a), _PAIR_CHUNK):
            a = items_a[start : start + _PAIR_CHUNK]
            b = items_b[start : start + _PAIR_CHUNK]
            if sp.issparse(self.vectors):
                # |x - y|² = |x|² + |y|² - 2 x·y, with x·y from the sparse rows.
                dot = np.asarray(self.vectors[a].multiply(self.vectors[b]).sum(axis=1)).ravel()
                sq = np.maximum(self._sq_norms[a] + self._sq_norms[b] - 2.0 * dot, 0.0)
                out[start : start + len(a)] = np.sqrt(sq)
            else:
                diff = self.vectors[a] - self.vectors[b]
                out[start : start + len(a)] = np.sqrt(np.einsum("ij,ij->i", diff, diff))
        return out

    def save(self, directory: Path) -> None:
        if sp.issparse(self.vectors):
            sp.save_npz(directory / "item_vectors.npz", self.vectors)
        else:
            np.save(directory / "item_vectors.npy", self.vectors)


def make_distances(distances: Any = None, item_vectors: Any = None) -> ItemDistances:
    if (distances is None) == (item_vectors is None):
        raise InputError("give exactly one of distances= (n_items × n_items) or item_vectors= (n_items × d)")
    return DenseDistances(distances) if distances is not None else VectorDistances(item_vectors)


def load_distances(directory: Path) -> ItemDistances:
    if (directory / "distances.npy").is_file():
        return DenseDistances(np.load(directory / "distances.npy", mmap_mode="r"))
    if (directory / "item_vectors.npy").is_file():
        return VectorDistances(np.load(directory / "item_vectors.npy"))
    if (directory / "item_vectors.npz").is_file():
        return VectorDistances(sp.load_npz(directory / "item_vectors.npz"))
    raise DataError(f"{directory}: no distances.npy, item_vectors.npy or item_vectors.npz")


def rating_column_distances(
    user_ids: np.ndarray, item_ids: np.ndarray, ratings: np.ndarray, n_users: int, n_items: int
) -> ItemDistances:
    """Euclidean distance between item columns of the split's user×item rating matrix.

    The most likely origin of the authors' published distance matrices (NOTES.md). Small
    catalogues get the full item×item matrix from the sparse Gram matrix; large ones keep the
    sparse columns and score pairs on demand, so neither n_items² nor n_items × n_users dense
    arrays are built beyond :data:`DENSE_DISTANCE_MAX_ITEMS`.
    """
    columns = sp.csr_matrix(
        (np.asarray(ratings, dtype=np.float32), (np.asarray(item_ids), np.asarray(user_ids))),
        shape=(n_items, n_users),
    )
    columns.sum_duplicates()
    if n_items > DENSE_DISTANCE_MAX_ITEMS:
        return VectorDistances(columns, name="rating columns")
    gram = (columns @ columns.T).toarray().astype(np.float64)
    sq = np.diag(gram)
    dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0)).astype(np.float32)
    np.fill_diagonal(dist, 0.0)
    return DenseDistances(dist, name="rating column distances")


# ------------------------------------------------------------------------------------- user models
class UserModel(ABC):
    """reward(user, item) and distance(item, item) over pairs, plus save/load.

    ``users`` lists the users the model knows (those with ratings in its split, or the published
    test users); ``None`` means every id in [0, n_users).
    """

    n_users: int
    n_items: int
    users: np.ndarray | None

    def reward(self, user_ids: Any, item_ids: Any) -> np.ndarray:
        """float32 rewards of the (user_ids[k], item_ids[k]) pairs."""
        users = as_index_array(user_ids, "user_ids", self.n_users)
        items = as_index_array(item_ids, "item_ids", self.n_items)
        if users.shape != items.shape:
            raise InputError(f"user_ids and item_ids differ in length ({len(users)} vs {len(items)})")
        return self._reward(users, items)

    def distance(self, items_a: Any, items_b: Any) -> np.ndarray:
        """float32 distances of the (items_a[k], items_b[k]) pairs."""
        a = as_index_array(items_a, "items_a", self.n_items)
        b = as_index_array(items_b, "items_b", self.n_items)
        if a.shape != b.shape:
            raise InputError(f"items_a and items_b differ in length ({len(a)} vs {len(b)})")
        return self._distance(a, b)

    def known_users(self) -> np.ndarray:
        return self.users if self.users is not None else np.arange(self.n_users)

    @abstractmethod
    def reward_range(self) -> tuple[float, float]:
        """Lowest and highest reward the model can give (bounds an observation space)."""

    @abstractmethod
    def _reward(self, users: np.ndarray, items: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def _distance(self, items_a: np.ndarray, items_b: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def save(self, directory: str | Path) -> Path: ...


def _check_users(users: Any, n_users: int) -> np.ndarray | None:
    if users is None:
        return None
    return as_index_array(users, "users", n_users)


class MatrixUserModel(UserModel):
    """Explicit arrays: rewards R (n_users × n_items) and item distances D or item vectors V.

    ``MatrixUserModel(rewards=R, distances=D)`` or ``MatrixUserModel(rewards=R, item_vectors=V)``
    (distance = L2 between rows of V; V may be scipy sparse). ``from_published`` replays the
    environment files published by the paper's authors.
    """

    def __init__(
        self,
        rewards: Any,
        distances: Any = None,
        item_vectors: Any = None,
        users: Any = None,
        histories: list[list[str]] | None = None,
    ) -> None:
        rewards = _as_matrix(rewards, "rewards")
        check_finite(rewards, "rewards")
        self.rewards = rewards
        self.n_users, self.n_items = rewards.shape
        self.item_distances = make_distances(distances, item_vectors)
        if self.item_distances.n_items != self.n_items:
            what = "distances" if distances is not None else "item_vectors"
            raise InputError(
                f"{what} covers {self.item_distances.n_items} items but rewards has {self.n_items} columns"
            )
        self.users = _check_users(users, self.n_users)
        # Titles of each published user's positive history (published test.json), in users order.
        self.histories = histories
        self._published: dict[str, str] | None = None
        self._reward_range: tuple[float, float] | None = None

    @classmethod
    def from_published(cls, directory: str | Path, dataset: str, split: str) -> "MatrixUserModel":
        """Read the authors' environment files from ``directory``.

        ``<dataset>_<split>.npy`` (rewards, memory-mapped), ``<split>_distance_mat.pickle`` (item
        distances) and, when present, ``<split>.json``: a list of records with ``userid_encoded``
        (the user's row) and ``pos_seq_name`` (their history titles), which becomes ``users`` and
        ``histories``.
        """
        directory = Path(directory).expanduser()
        if split not in ("train", "test"):
            raise InputError(f"split must be 'train' or 'test' (got {split!r})")
        reward_path = directory / f"{dataset}_{split}.npy"
        distance_path = directory / f"{split}_distance_mat.pickle"
        for path in (reward_path, distance_path):
            if not path.is_file():
                raise DataError(f"{path}: file not found")
        try:
            rewards = np.load(reward_path, mmap_mode="r")
        except (ValueError, OSError) as exc:
            raise DataError(f"{reward_path}: not a readable .npy file ({exc})") from None
        try:
            with distance_path.open("rb") as fh:
                distances = np.asarray(pickle.load(fh))
        except (pickle.UnpicklingError, EOFError, ValueError) as exc:
            raise DataError(f"{distance_path}: not a readable pickle ({exc})") from None
        users, histories = _read_published_users(directory / f"{split}.json")
        try:
            model = cls(rewards=rewards, distances=distances, users=users, histories=histories)
        except InputError as exc:
            raise DataError(f"{directory}: {exc}") from None
        model._published = {"directory": str(directory.resolve()), "dataset": dataset, "split": split}
        return model

    def _reward(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        return _gather(self.rewards, users, items)

    def reward_range(self) -> tuple[float, float]:
        if self._reward_range is None:
            lo, hi = np.inf, -np.inf
            for i in range(0, self.n_users, _CHECK_ROWS):
                block = np.asarray(self.rewards[i : i + _CHECK_ROWS])
                lo, hi = min(lo, float(block.min())), max(hi, float(block.max()))
            self._reward_range = (lo, hi)
        return self._reward_range

    def _distance(self, items_a: np.ndarray, items_b: np.ndarray) -> np.ndarray:
        return self.item_distances.pairs(items_a, items_b)

    def save(self, directory: str | Path) -> Path:
        """Write the model to ``directory`` (atomically). A model read with ``from_published``
        is saved as a reference to the published files, not a multi-GB copy."""
        directory = Path(directory)
        with atomic_path(directory) as tmp:
            tmp.mkdir()
            meta: dict[str, Any] = {"kind": "matrix", "n_users": self.n_users, "n_items": self.n_items}
            if self._published is not None:
                meta = {"kind": "published", **self._published}
            else:
                np.save(tmp / "rewards.npy", np.asarray(self.rewards))
                self.item_distances.save(tmp)
                if self.users is not None:
                    np.save(tmp / "users.npy", self.users)
                if self.histories is not None:
                    (tmp / "histories.json").write_text(json.dumps(self.histories))
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return directory

    @classmethod
    def _load(cls, directory: Path) -> "MatrixUserModel":
        model = cls.__new__(cls)
        model.rewards = np.load(directory / "rewards.npy", mmap_mode="r")
        model.n_users, model.n_items = model.rewards.shape
        model.item_distances = load_distances(directory)
        users_path = directory / "users.npy"
        model.users = np.load(users_path) if users_path.is_file() else None
        hist_path = directory / "histories.json"
        model.histories = json.loads(hist_path.read_text()) if hist_path.is_file() else None
        model._published = None
        model._reward_range = None
        return model


def _read_published_users(path: Path) -> tuple[list[int] | None, list[list[str]] | None]:
    if not path.is_file():
        return None, None
    try:
        records = json.loads(path.read_text())
        users = [int(rec["userid_encoded"]) for rec in records]
        histories = [[str(t) for t in rec.get("pos_seq_name", [])] for rec in records]
    except (ValueError, TypeError, KeyError) as exc:
        raise DataError(f"{path}: expected a list of records with userid_encoded ({exc!r})") from None
    return users, histories
