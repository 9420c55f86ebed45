"""The catalogue a served model recommends from: titles indexed by item id.

Where it comes from (``cfg.serve.catalogue``):

- ``None`` → the run's ``data/items.parquet`` (the catalogue the model was trained on);
- a ``.parquet`` file with ``item_id`` (0..n-1) and ``title`` columns (a copy of items.parquet,
  e.g. shipped beside a checkpoint that is served away from its run directory);
- a ``.json`` file holding a list of titles, or a ``.txt`` file with one title per line; item ids
  are list positions / line indices.

Every replica (the HTTP ingress and each policy replica) loads the file itself, so on a cluster it
must be readable at the same path on every node (the repository's file mounts or shared storage).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ulrec.config import Config
from ulrec.errors import DataError
from ulrec.grounding import normalize_title


def catalogue_path(cfg: Config) -> Path:
    """The catalogue file for ``cfg`` (see the module docstring)."""
    if cfg.serve.catalogue:
        return Path(cfg.serve.catalogue).expanduser()
    return cfg.layout.data_file("items.parquet")


def load_titles(path: str | Path) -> list[str]:
    """Titles by item id from a catalogue file; DataError naming the file when it is unusable."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: catalogue file not found (run `ulrec data prepare` or set serve.catalogue)")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        titles = _parquet_titles(path)
    elif suffix == ".json":
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise DataError(f"{path}: not a readable JSON file ({exc.__class__.__name__})") from None
        if not isinstance(loaded, list) or not all(isinstance(t, str) for t in loaded):
            raise DataError(f"{path}: expected a JSON list of title strings")
        titles = loaded
    elif suffix == ".txt":
        try:
            titles = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: not a readable UTF-8 text file ({exc.__class__.__name__})") from None
    else:
        raise DataError(f"{path}: unknown catalogue format (use .parquet, .json or .txt)")
    if not titles:
        raise DataError(f"{path}: the catalogue is empty")
    for item_id, title in enumerate(titles):
        if not title.strip():
            raise DataError(f"{path}: item {item_id} has an empty title")
    return titles


def _parquet_titles(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=["item_id", "title"])
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{path}: cannot read item_id and title columns ({exc.__class__.__name__})") from None
    ids = np.asarray(table.column("item_id").to_numpy(), dtype=np.int64)
    titles = table.column("title").to_pylist()
    order = np.argsort(ids, kind="stable")
    if not np.array_equal(ids[order], np.arange(len(ids))):
        raise DataError(f"{path}: item_id must be contiguous 0..n-1")
    if any(not isinstance(titles[i], str) for i in order):
        raise DataError(f"{path}: every title must be a string")
    return [titles[i] for i in order]


class Catalogue:
    """Titles by item id, with exact lookup of client-supplied titles (same normalisation as
    grounding: :func:`ulrec.grounding.normalize_title`)."""

    def __init__(self, titles: list[str]) -> None:
        if not titles:
            raise DataError("the catalogue is empty")
        self.titles = list(titles)
        self._by_key: dict[str, int] = {}
        for item_id, title in enumerate(self.titles):
            self._by_key.setdefault(normalize_title(title), item_id)

    @classmethod
    def load(cls, path: str | Path) -> "Catalogue":
        return cls(load_titles(path))

    def __len__(self) -> int:
        return len(self.titles)

    def find(self, title: str) -> int | None:
        """The item id whose title matches ``title`` exactly after normalisation, else None."""
        return self._by_key.get(normalize_title(title))
