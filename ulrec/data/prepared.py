"""Read access to a prepared dataset (``<run>/data``) for the other stages."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from ulrec.data.prepare import data_dir
from ulrec.data.process import COLUMNS, sort_histories
from ulrec.errors import DataError, InputError
from ulrec.io import read_json

_REQUIRED = {
    "items": ["item_id", "title", "raw_item_id"],
    "users": ["user_id", "raw_user_id"],
    "train": COLUMNS,
    "test": COLUMNS,
}


@dataclass
class PreparedData:
    """Items (``item_id`` 0..n-1, ``title``, ``raw_item_id``, extras), users, and the time split.

    ``train``/``test`` rows: ``user_id``, ``item_id``, ``rating`` (float32), ``timestamp`` (int64),
    sorted by user then time (equal timestamps in source-file order).
    """

    items: pd.DataFrame
    users: pd.DataFrame
    train: pd.DataFrame
    test: pd.DataFrame
    stats: dict[str, Any]

    @property
    def num_items(self) -> int:
        return len(self.items)

    @property
    def num_users(self) -> int:
        return len(self.users)

    @property
    def titles(self) -> list[str]:
        """Titles indexed by item_id (unique, case-insensitively)."""
        return self.items.sort_values("item_id")["title"].tolist()

    def split(self, split: Literal["train", "test"]) -> pd.DataFrame:
        if split not in ("train", "test"):
            raise InputError(f"split must be 'train' or 'test', got {split!r}")
        return self.train if split == "train" else self.test

    def user_histories(self, split: Literal["train", "test"], max_len: int | None = None) -> dict[int, list[int]]:
        """Each user's item_ids in ``split`` in time order (the most recent ``max_len`` if given).

        Only users with at least one interaction in the split appear.
        """
        if max_len is not None and max_len < 1:
            raise InputError(f"max_len must be >= 1 or None, got {max_len}")
        df = sort_histories(self.split(split)[["user_id", "item_id", "timestamp"]])
        users = df["user_id"].to_numpy()
        items = df["item_id"].to_numpy()
        starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
        ends = np.r_[starts[1:], len(users)]
        if max_len is not None:
            starts = np.maximum(starts, ends - max_len)
        return {int(users[s]): items[s:e].tolist() for s, e in zip(starts, ends)}


def load_prepared(run_dir: str | Path) -> PreparedData:
    """Load ``<run_dir>/data``; DataError when it is missing or incomplete."""
    folder = data_dir(run_dir)
    tables = {}
    for name, required in _REQUIRED.items():
        path = folder / f"{name}.parquet"
        if not path.is_file():
            raise DataError(f"{path}: not found (run `ulrec data prepare` first)")
        table = pd.read_parquet(path)
        missing = [c for c in required if c not in table.columns]
        if missing:
            raise DataError(f"{path}: missing column '{missing[0]}'")
        tables[name] = table
    stats_path = folder / "stats.json"
    if not stats_path.is_file():
        raise DataError(f"{stats_path}: not found (run `ulrec data prepare` first)")
    return PreparedData(**tables, stats=read_json(stats_path))
