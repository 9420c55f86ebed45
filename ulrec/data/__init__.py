"""Datasets → Parquet: MovieLens-100k (embedded default), Steam, Amazon Book, synthetic.

``prepare_data(cfg)`` writes ``<run>/data/`` (items, users, interactions, train, test Parquet and
stats.json); ``load_prepared(run_dir)`` reads it back for the other stages.
"""

from ulrec.data.prepare import (
    data_dir,
    load_stats,
    prepare_data,
    prepared_data,
    read_raw,
    stats_table,
)
from ulrec.data.prepared import PreparedData, load_prepared
from ulrec.data.process import title_key
from ulrec.data.raw import RawDataset

__all__ = [
    "PreparedData",
    "RawDataset",
    "data_dir",
    "load_prepared",
    "load_stats",
    "prepare_data",
    "prepared_data",
    "read_raw",
    "stats_table",
    "title_key",
]
