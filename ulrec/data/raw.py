"""What every dataset reader returns, before filtering and re-indexing."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd


@dataclass
class RawDataset:
    """Raw interactions and item metadata as read from the source files.

    ``interactions``: columns ``user``, ``item`` (raw ids, str or categorical of str), ``rating``
    (float32) and ``timestamp`` (int64, Unix seconds), rows in file order (the order breaks
    timestamp ties downstream).
    ``items``: columns ``item`` (raw id, str) and ``title`` (str; None/empty when the source has
    none), plus any extra per-item columns worth keeping.
    ``users``: optional per-user attributes, column ``user`` (raw id) plus extras.
    ``source``: the file errors about the whole dataset name (e.g. nothing left after filtering).
    ``notes``: reader counters that go into stats.json (e.g. metadata lines skipped).
    """

    name: str
    interactions: pd.DataFrame
    items: pd.DataFrame
    source: Path | str
    users: pd.DataFrame | None = None
    notes: dict[str, Any] = field(default_factory=dict)
