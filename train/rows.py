"""Rollout episodes → SFT and KTO rows, with Ray Data moving the data through the pure rule
:func:`ulrec.feedback.episodes_table_to_rows`.

Outputs (under ``rows/``): ``sft.parquet`` (positives), ``kto.parquet`` (positives + negatives),
``stats.json`` (counts). Rows are sorted by episode and step so the files are reproducible; the
training stages shuffle with the run seed.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ulrec.ray_session import init_ray
from ulrec.config import Config, FeedbackConfig
from ulrec.errors import DataError
from ulrec.feedback import ROW_SCHEMA, episodes_table_to_rows
from ulrec.io import atomic_path, read_json, write_json
from ulrec.resume import StageInputs, run_stage
from ulrec.tracking import stage_logger


def default_rollout_dirs(cfg: Config) -> list[Path]:
    return [cfg.layout.rollouts("train")]


def _parquet_files(directory: Path) -> list[Path]:
    if directory.is_file():
        return [directory]
    if not directory.is_dir():
        raise DataError(f"rollouts not found: {directory} (run `ulrec rollout` first)")
    files = sorted(p for p in directory.rglob("*.parquet") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise DataError(f"no Parquet episodes in {directory}")
    return files


# Ray Data does not carry our exception type back to the driver, so a bad episode travels as data:
# a row whose "error" column names it.
_BATCH_SCHEMA = ROW_SCHEMA.append(pa.field("error", pa.string()))


def _rows_batch(table: pa.Table, cfg: FeedbackConfig) -> pa.Table:
    try:
        rows = episodes_table_to_rows(table, cfg)
    except DataError as exc:
        return pa.Table.from_pylist([{"error": str(exc)}], schema=_BATCH_SCHEMA)
    return rows.append_column("error", pa.nulls(rows.num_rows, pa.string()))


def _count_episodes(files: list[Path]) -> int:
    """Episodes in the files, from Parquet metadata (also checks every file is readable)."""
    total = 0
    for f in files:
        try:
            total += pq.ParquetFile(f).metadata.num_rows
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"cannot read rollout file {f}: {exc}".splitlines()[0]) from None
    return total


def _episode_rows(cfg: Config, files: list[Path]) -> tuple[pa.Table, int]:
    import ray
    import ray.data

    num_episodes = _count_episodes(files)
    init_ray(cfg)
    ray.data.DataContext.get_current().enable_progress_bars = cfg.run.progress
    episodes = ray.data.read_parquet([str(f) for f in files])
    rows = episodes.map_batches(_rows_batch, fn_kwargs={"cfg": cfg.feedback}, batch_format="pyarrow")
    tables = [t for t in ray.get(rows.to_arrow_refs()) if t.num_rows]
    for t in tables:
        errors = t.column("error").drop_null()
        if len(errors):
            raise DataError(f"{errors[0].as_py()} (in {', '.join(sorted({str(f.parent) for f in files}))})")
    tables = [t.drop_columns(["error"]).cast(ROW_SCHEMA) for t in tables]
    table = pa.concat_tables(tables) if tables else ROW_SCHEMA.empty_table()
    return table.sort_by([("episode_id", "ascending"), ("step", "ascending")]), num_episodes


def _write_parquet(path: Path, table: pa.Table) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


# Every round's rollouts so far, each by its own resume key (what collected it, from what).
ROWS_STAGE = StageInputs("feedback rows", ("feedback",), lambda cfg, rollout_dirs: {"rollouts": list(rollout_dirs)})


def rows_stage(
    cfg: Config,
    rollout_dirs: Sequence[str | Path] | None = None,
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Build ``rows/{sft,kto}.parquet`` from the training rollouts; returns the counts.

    ``rollout_dirs``: episode datasets to use (default ``rollouts/train``); several for iterative
    rounds. ``out_dir``: where to write (default ``rows/``). Skipped when done for the same inputs.
    """
    dirs = [Path(d) for d in rollout_dirs] if rollout_dirs else default_rollout_dirs(cfg)
    out = Path(out_dir) if out_dir is not None else cfg.layout.rows()
    files = [f for d in dirs for f in _parquet_files(d)]

    def build(_key: str) -> tuple[dict[str, Any], dict[str, Any]]:
        table, num_episodes = _episode_rows(cfg, files)
        positives = table.filter(pc.field("label"))
        negatives = table.filter(~pc.field("label"))
        stats = {
            "episodes": num_episodes,
            "episodes_used": len(set(table.column("episode_id").to_pylist())),
            "positives": positives.num_rows,
            "negatives": negatives.num_rows,
            "negatives_by_reason": dict(sorted(Counter(negatives.column("reason").to_pylist()).items())),
            "rollout_dirs": [str(d) for d in dirs],
            "sft_rows": str(out / "sft.parquet"),
            "kto_rows": str(out / "kto.parquet"),
        }
        if positives.num_rows == 0:
            raise DataError(
                f"no positive rows from {', '.join(map(str, dirs))}: no episode has "
                f">= {cfg.feedback.min_accepted_steps} accepted steps"
            )
        _write_parquet(out / "sft.parquet", positives)
        _write_parquet(out / "kto.parquet", table)
        write_json(out / "stats.json", stats)
        with stage_logger(cfg, "rows", out) as log:
            counts = {k: stats[k] for k in ("episodes", "episodes_used", "positives", "negatives")}
            log.log({**counts, **{f"negatives/{k}": v for k, v in stats["negatives_by_reason"].items()}})
            log.summary(counts)
        return stats, {"positives": stats["positives"], "negatives": stats["negatives"]}

    return run_stage(ROWS_STAGE, cfg, out, build, required=("stats.json",),
                     skipped=lambda _marker: {**read_json(out / "stats.json"), "skipped": True}, rollout_dirs=dirs)
