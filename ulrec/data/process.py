"""From raw interactions to the prepared tables: pure functions, no files.

Order of operations (each step's count goes into stats.json):
1. drop interactions with items that have no title (the policy names items by title);
2. keep the latest interaction of each (user, item) pair (a history lists an item once);
3. k-core filter: remove users with fewer than ``min_user_interactions`` and items with fewer
   than ``min_item_interactions``, repeatedly until nothing changes;
4. re-index users and items to contiguous ids 0..n-1 in raw-id order (numeric when every raw id
   is a decimal number), make titles unique;
5. time split (paper §4.1.1): interactions with timestamp <= the ``train_fraction`` quantile of
   all timestamps (an actual timestamp, numpy's "lower" quantile) train, the rest test. A user
   or item in both splits keeps one id.
Rows stay in file order until the final sort by (user_id, timestamp), which is stable, so equal
timestamps keep their file order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ulrec.config import DataConfig
from ulrec.data.raw import RawDataset
from ulrec.errors import DataError

COLUMNS = ["user_id", "item_id", "rating", "timestamp"]


@dataclass
class ProcessedData:
    items: pd.DataFrame
    users: pd.DataFrame
    interactions: pd.DataFrame
    train: pd.DataFrame
    test: pd.DataFrame
    stats: dict[str, Any]


# ------------------------------------------------------------------------------------ pure rules
def title_key(title: str) -> str:
    """Titles are compared case-insensitively with whitespace collapsed."""
    return " ".join(title.casefold().split())


def clean_title(title: Any) -> str:
    """Whitespace collapsed to single spaces; missing titles become ''."""
    if title is None or (isinstance(title, float) and np.isnan(title)):
        return ""
    return " ".join(str(title).split())


def unique_titles(titles: Sequence[str]) -> list[str]:
    """Make titles unique (by :func:`title_key`), deterministically in the given order.

    The first occurrence keeps its title; later duplicates get " (2)", " (3)", ... the first
    suffix that is neither taken already nor another item's own title.
    """
    reserved = {title_key(t) for t in titles}
    seen: set[str] = set()
    out = []
    for title in titles:
        key = title_key(title)
        if key in seen:
            n = 2
            while title_key(f"{title} ({n})") in seen | reserved:
                n += 1
            title = f"{title} ({n})"
            key = title_key(title)
        seen.add(key)
        out.append(title)
    return out


def latest_per_pair(users: np.ndarray, items: np.ndarray, timestamps: np.ndarray) -> np.ndarray:
    """Mask keeping, for each (user, item) pair, its latest row (the later row on equal timestamps)."""
    n = len(users)
    if n == 0:
        return np.zeros(0, dtype=bool)
    pair = users.astype(np.int64) * (int(items.max()) + 1) + items.astype(np.int64)
    order = np.argsort(timestamps, kind="stable")
    order = order[np.argsort(pair[order], kind="stable")]
    last = np.ones(n, dtype=bool)
    last[:-1] = pair[order][1:] != pair[order][:-1]
    keep = np.zeros(n, dtype=bool)
    keep[order[last]] = True
    return keep


def k_core(users: np.ndarray, items: np.ndarray, min_user: int, min_item: int) -> np.ndarray:
    """Mask of the rows in the (min_user, min_item)-core: repeated removal until stable."""
    keep = np.ones(len(users), dtype=bool)
    while True:
        user_count = np.bincount(users[keep], minlength=int(users.max(initial=-1)) + 1)
        item_count = np.bincount(items[keep], minlength=int(items.max(initial=-1)) + 1)
        new = keep & (user_count[users] >= min_user) & (item_count[items] >= min_item)
        if new.sum() == keep.sum():
            return keep
        keep = new


def raw_id_order(raw_ids: Sequence[str]) -> np.ndarray:
    """Indices that sort raw ids: numerically when every id is a decimal number, else as strings."""
    ids = [str(x) for x in raw_ids]
    if ids and all(s.isdecimal() for s in ids):
        keys = np.array([int(s) for s in ids], dtype=object)
    else:
        keys = np.array(ids, dtype=object)
    return np.argsort(keys, kind="stable")


def split_threshold(timestamps: np.ndarray, train_fraction: float) -> int:
    return int(np.quantile(timestamps, train_fraction, method="lower"))


def sort_histories(df: pd.DataFrame) -> pd.DataFrame:
    """Rows by (user_id, timestamp); equal timestamps keep their current (file) order."""
    order = np.argsort(df["timestamp"].to_numpy(), kind="stable")
    order = order[np.argsort(df["user_id"].to_numpy()[order], kind="stable")]
    return df.iloc[order].reset_index(drop=True)


# ------------------------------------------------------------------------------------ whole step
def _codes(column: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes and the raw id (str) of each code."""
    if isinstance(column.dtype, pd.CategoricalDtype):
        codes = column.cat.codes.to_numpy(dtype=np.int64)
        names = np.asarray([str(c) for c in column.cat.categories], dtype=object)
    else:
        codes, uniques = pd.factorize(column.astype(str), sort=False)
        codes = codes.astype(np.int64)
        names = np.asarray(list(uniques), dtype=object)
    return codes, names


def _contiguous(codes: np.ndarray, names: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """New contiguous ids for the codes in use, in raw-id order: (old code → new id, raw ids by new id)."""
    used = np.unique(codes)
    ordered = used[raw_id_order(names[used])]
    mapping = np.full(len(names), -1, dtype=np.int64)
    mapping[ordered] = np.arange(len(ordered), dtype=np.int64)
    return mapping, names[ordered]


def _extras(table: pd.DataFrame | None, key: str, reserved: set[str]) -> pd.DataFrame | None:
    if table is None:
        return None
    extra = [c for c in table.columns if c != key and c not in reserved]
    if not extra:
        return None
    out = table[[key, *extra]].copy()
    out[key] = out[key].astype(str)
    return out.drop_duplicates(subset=key, keep="first")


def process(raw: RawDataset, d: DataConfig) -> ProcessedData:
    inter = raw.interactions
    u, user_names = _codes(inter["user"])
    i, item_names = _codes(inter["item"])
    rating = inter["rating"].to_numpy(dtype=np.float32)
    ts = inter["timestamp"].to_numpy(dtype=np.int64)
    stats: dict[str, Any] = {
        "dataset": raw.name,
        "ratings_before_filter": int(len(inter)),
        "users_before_filter": int(len(np.unique(u))),
        "items_before_filter": int(len(np.unique(i))),
    }

    catalogue = raw.items.assign(item=raw.items["item"].astype(str)).drop_duplicates("item", keep="first")
    source_titles = dict(zip(catalogue["item"], catalogue["title"]))
    titles_by_code = [clean_title(source_titles.get(name)) for name in item_names]
    titled = np.array([bool(t) for t in titles_by_code], dtype=bool)
    rows = np.flatnonzero(titled[i]) if len(i) else np.zeros(0, dtype=np.int64)
    stats["untitled_interactions_removed"] = int(len(i) - len(rows))

    latest = latest_per_pair(u[rows], i[rows], ts[rows])
    stats["duplicate_interactions_removed"] = int(len(rows) - latest.sum())
    rows = rows[latest]

    if len(rows):
        rows = rows[k_core(u[rows], i[rows], d.min_user_interactions, d.min_item_interactions)]
    if len(rows) == 0:
        raise DataError(
            f"{raw.source}: no interactions left after filtering (min_user_interactions="
            f"{d.min_user_interactions}, min_item_interactions={d.min_item_interactions}, "
            f"{stats['untitled_interactions_removed']} interactions without an item title)"
        )

    user_map, user_raw = _contiguous(u[rows], user_names)
    item_map, item_raw = _contiguous(i[rows], item_names)
    interactions = sort_histories(
        pd.DataFrame(
            {
                "user_id": user_map[u[rows]],
                "item_id": item_map[i[rows]],
                "rating": rating[rows],
                "timestamp": ts[rows],
            }
        )
    )

    code_of_item = {name: code for code, name in enumerate(item_names)}
    items = pd.DataFrame(
        {
            "item_id": np.arange(len(item_raw), dtype=np.int64),
            "title": unique_titles([titles_by_code[code_of_item[name]] for name in item_raw]),
            "raw_item_id": [str(x) for x in item_raw],
        }
    )
    item_extra = _extras(raw.items, "item", {"title"})
    if item_extra is not None:
        items = items.merge(item_extra.rename(columns={"item": "raw_item_id"}), on="raw_item_id", how="left")
    users = pd.DataFrame({"user_id": np.arange(len(user_raw), dtype=np.int64), "raw_user_id": [str(x) for x in user_raw]})
    user_extra = _extras(raw.users, "user", set())
    if user_extra is not None:
        users = users.merge(user_extra.rename(columns={"user": "raw_user_id"}), on="raw_user_id", how="left")

    threshold = split_threshold(interactions["timestamp"].to_numpy(), d.train_fraction)
    in_train = interactions["timestamp"].to_numpy() <= threshold
    train = interactions[in_train].reset_index(drop=True)
    test = interactions[~in_train].reset_index(drop=True)
    if len(test) == 0:
        raise DataError(
            f"{raw.source}: the time split left no test interactions (every timestamp <= {threshold}, "
            f"the {d.train_fraction} quantile)"
        )
    train_users, test_users = set(train["user_id"].tolist()), set(test["user_id"].tolist())
    stats.update(
        {
            "users": int(len(user_raw)),
            "items": int(len(item_raw)),
            "interactions": int(len(interactions)),
            "train_interactions": int(len(train)),
            "test_interactions": int(len(test)),
            "train_users": len(train_users),
            "test_users": len(test_users),
            "users_in_both": len(train_users & test_users),
            "train_items": int(train["item_id"].nunique()),
            "test_items": int(test["item_id"].nunique()),
            "split_timestamp": threshold,
            "train_fraction": d.train_fraction,
            "min_user_interactions": d.min_user_interactions,
            "min_item_interactions": d.min_item_interactions,
            "rating_min": float(interactions["rating"].min()),
            "rating_max": float(interactions["rating"].max()),
            "rating_mean": float(interactions["rating"].mean()),
            **raw.notes,
        }
    )
    return ProcessedData(items=items, users=users, interactions=interactions, train=train, test=test, stats=stats)
