"""Reading raw dataset files: plain or gzip text, line by line, with one-line errors.

Every failure (missing file, truncated or corrupt gzip, bad encoding, malformed record, missing
field) becomes a :class:`DataError` whose message names the file and, where it applies, the line.
"""

from __future__ import annotations

import ast
import gzip
import json
import math
import zlib
from array import array
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd

from ulrec.config import ConfigError
from ulrec.console import progress_bar
from ulrec.errors import DataError

_GZIP_MAGIC = b"\x1f\x8b"
_PROGRESS_EVERY = 20_000  # lines between progress-bar updates


def require_file(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    return path


def resolve_inputs(path: str | None, meta_path: str | None, names: tuple[str, ...], meta_names: tuple[str, ...],
                   dataset: str) -> tuple[Path, Path]:
    """``data.path`` is the interactions file or a folder holding it under a standard name;
    ``data.meta_path`` likewise (default: a standard name beside the interactions file)."""
    if not path:
        raise ConfigError(f"data.path must name the {dataset} interactions file ({names[-1]}[.gz]) or its folder")

    def pick(p: Path, candidates: tuple[str, ...]) -> Path:
        if p.is_dir():
            for name in candidates:
                if (p / name).is_file():
                    return p / name
            return p / candidates[-1]  # reported as missing by require_file
        return p

    data = require_file(pick(Path(path).expanduser(), names))
    meta = require_file(pick(Path(meta_path).expanduser() if meta_path else data.parent, meta_names))
    return data, meta


def iter_lines(path: Path, *, progress: bool = False, desc: str | None = None) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, line)`` for the non-blank lines of a UTF-8 text file.

    Gzip is recognised by its magic bytes, not the file name. The progress bar counts bytes of the
    file on disk (compressed bytes for gzip), so its total is known up front.
    """
    path = require_file(path)
    lineno = 0
    with open(path, "rb") as raw:
        is_gzip = raw.read(2) == _GZIP_MAGIC
        raw.seek(0)
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if is_gzip else raw
        bar = progress_bar(
            total=path.stat().st_size, unit="B", unit_scale=True, desc=desc or path.name,
            enabled=progress, leave=False,
        )
        try:
            # Bytes lines decoded one by one, so a bad byte is reported on its own line.
            for lineno, data in enumerate(stream, start=1):
                if lineno % _PROGRESS_EVERY == 0:
                    bar.update(raw.tell() - bar.n)
                try:
                    line = data.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError:
                    raise DataError(f"{path}:{lineno}: not valid UTF-8 text") from None
                if line.strip():
                    yield lineno, line
        except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
            raise DataError(f"{path}: truncated or corrupt gzip file ({_one_line(exc)})") from None
        finally:
            bar.close()


def parse_record(line: str, path: Path, lineno: int) -> dict[str, Any]:
    """One JSON object, or one Python dict literal (the Steam and 2014 Amazon files use those)."""
    try:
        record = json.loads(line)
    except ValueError:
        try:
            record = ast.literal_eval(line.strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise DataError(f"{path}:{lineno}: malformed line (neither JSON nor a Python literal)") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}:{lineno}: malformed line (expected an object, got {type(record).__name__})")
    return record


def field(record: dict[str, Any], name: str, path: Path, lineno: int) -> Any:
    value = record.get(name)
    if value is None:
        raise DataError(f"{path}:{lineno}: missing field '{name}'")
    return value


def as_float(value: Any, name: str, path: Path, lineno: int) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{path}:{lineno}: field '{name}' is not a number ({value!r:.40})") from None
    if not math.isfinite(out):
        raise DataError(f"{path}:{lineno}: field '{name}' is not finite ({value!r:.40})")
    return out


def as_timestamp(value: Any, name: str, path: Path, lineno: int) -> int:
    return int(as_float(value, name, path, lineno))


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class InteractionBuilder:
    """Accumulates (user, item, rating, timestamp) rows compactly, in file order.

    Raw ids are interned to integer codes as they arrive, so millions of rows cost a few bytes
    each instead of two Python strings; :meth:`build` returns categorical ``user``/``item``
    columns.
    """

    def __init__(self) -> None:
        self._users: dict[str, int] = {}
        self._items: dict[str, int] = {}
        self._user_codes = array("q")
        self._item_codes = array("q")
        self._ratings = array("f")
        self._timestamps = array("q")

    def __len__(self) -> int:
        return len(self._ratings)

    def add(self, user: str, item: str, rating: float, timestamp: int) -> None:
        self._user_codes.append(self._users.setdefault(user, len(self._users)))
        self._item_codes.append(self._items.setdefault(item, len(self._items)))
        self._ratings.append(rating)
        self._timestamps.append(timestamp)

    @property
    def item_ids(self) -> set[str]:
        return set(self._items)

    def build(self) -> pd.DataFrame:
        users = pd.Categorical.from_codes(np.frombuffer(self._user_codes, dtype=np.int64), categories=list(self._users))
        items = pd.Categorical.from_codes(np.frombuffer(self._item_codes, dtype=np.int64), categories=list(self._items))
        return pd.DataFrame(
            {
                "user": users,
                "item": items,
                "rating": np.frombuffer(self._ratings, dtype=np.float32).copy(),
                "timestamp": np.frombuffer(self._timestamps, dtype=np.int64).copy(),
            }
        )
