"""``kto.on_policy`` (beyond the paper): stage 2's rows also hold the stage-1 model's own rollouts.

The collector explores at ``rollout.temperature``; the tuned model fails differently at
``eval.temperature`` (it repeats its favourite items), and those exits are what unpaired negatives
are for. So the model stage 2 starts from plays the same training users on the train simulator at
``kto.on_policy.temperature``; its rows (negatives only, or all) are appended to the collector's
KTO rows. Test users and the test simulator are never involved.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rollout.driver import replay_rollout_stage, training_rollout
from train.rows import rows_stage
from ulrec.config import Config
from ulrec.evaluation import training_users
from ulrec.io import atomic_path, read_json, write_json
from ulrec.resume import path_fingerprint, run_stage

ON_POLICY_ROLLOUT_STAGE = replay_rollout_stage("on-policy rollouts")


def on_policy_config(cfg: Config) -> Config:
    """The config the on-policy rollout runs with: the training rollouts' settings at the on-policy
    temperature, the tuned model playing with the action-only prompt (no collector)."""
    rollout_cfg = cfg.model_copy(deep=True)
    temperature = cfg.kto.on_policy.temperature
    rollout_cfg.rollout.temperature = cfg.eval.temperature if temperature is None else temperature
    rollout_cfg.rollout.collector = type(cfg.rollout.collector)()
    return rollout_cfg


def combine_rows(collector_rows: pa.Table, on_policy_rows: pa.Table, keep: str) -> pa.Table:
    """Stage 2's rows: the collector's, then the on-policy ones (all, or only the negatives)."""
    if keep == "negatives":
        on_policy_rows = on_policy_rows.filter(~pc.field("label"))
    return pa.concat_tables([collector_rows, on_policy_rows.cast(collector_rows.schema)])


def on_policy_stage(cfg: Config, model_dir: Path) -> dict[str, Any]:
    """Collect with ``model_dir`` (resumable), build its rows and stage 2's combined rows; returns
    the counts, with ``kto_rows`` the combined file."""
    model_dir = Path(model_dir)
    rollout_cfg = on_policy_config(cfg)
    users = training_users(cfg)
    # Named by the playing model's content, so a sweep cell and the checkpoint adopted from it share
    # one rollout; whether it is done for these settings is the runner's call, as everywhere.
    out_dir = cfg.layout.on_policy_rollouts(hashlib.sha256(path_fingerprint(model_dir).encode()).hexdigest())

    def build(_key: str) -> tuple[None, dict[str, Any]]:
        summary = training_rollout(rollout_cfg, model_dir, out_dir, users, policy_name=model_dir.name)
        return None, {"summary": summary}

    run_stage(ON_POLICY_ROLLOUT_STAGE, rollout_cfg, out_dir, build, skipped=lambda _marker: None,
              model_dir=model_dir, users=users)
    rows_dir = cfg.layout.on_policy_rows(model_dir.name)
    own = rows_stage(cfg, rollout_dirs=[out_dir], out_dir=rows_dir / "own")
    rows_stage(cfg)  # the collector's (done by the pipeline; a skipped stage reports paths as written)
    combined = combine_rows(pq.read_table(cfg.layout.rows() / "kto.parquet"),
                            pq.read_table(rows_dir / "own" / "kto.parquet"), cfg.kto.on_policy.rows)
    kto_rows = rows_dir / "kto.parquet"
    if not (kto_rows.is_file() and pq.read_table(kto_rows).equals(combined)):  # a rerun rewrites nothing
        with atomic_path(kto_rows) as tmp:
            pq.write_table(combined, tmp)
    labels = combined.column("label")
    positives = int(pc.sum(labels).as_py() or 0)
    stats = {
        "temperature": rollout_cfg.rollout.temperature,
        "keep": cfg.kto.on_policy.rows,
        "on_policy_positives": own["positives"],
        "on_policy_negatives": own["negatives"],
        "on_policy_negatives_by_reason": own["negatives_by_reason"],
        "positives": positives,
        "negatives": len(labels) - positives,
        "rollouts": str(out_dir),
        "kto_rows": str(kto_rows),
    }
    if not ((rows_dir / "stats.json").is_file() and read_json(rows_dir / "stats.json") == stats):
        write_json(rows_dir / "stats.json", stats)
    return stats
