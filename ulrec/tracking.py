"""Experiment tracking: W&B (offline unless a key is set) and a JSONL file in the run directory.

Every stage of one pipeline run logs into one W&B group (the run name), so a run's data, rollouts,
training and evaluation sit together. Nothing depends on W&B being reachable: the JSONL file is the
source of truth for the report.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from ulrec.config import Config

log = logging.getLogger(__name__)


def wandb_mode(cfg: Config) -> str:
    if not cfg.wandb.enabled or cfg.wandb.mode == "disabled":
        return "disabled"
    if cfg.wandb.mode != "auto":
        return cfg.wandb.mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class StageLogger:
    """Logs metrics of one stage to ``<stage_dir>/metrics.jsonl`` and to W&B when enabled."""

    def __init__(self, metrics_path: Path, wandb_run: Any | None) -> None:
        self.metrics_path = metrics_path
        self.wandb_run = wandb_run

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        record = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}
        if step is not None:
            record["step"] = step
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps(record, default=str) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self.wandb_run is not None:
            for key, value in values.items():
                if isinstance(value, (int, float, str, bool)):
                    self.wandb_run.summary[key] = value

    def table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        """A ``wandb.Table`` (W&B's way to compare runs row by row); nothing without W&B."""
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({key: wandb.Table(columns=columns, data=rows)})

    def images(self, paths: dict[str, str | Path]) -> None:
        """PNG files as ``wandb.Image`` under ``plots/<name>``; nothing without W&B."""
        if self.wandb_run is not None and paths:
            import wandb

            self.wandb_run.log({f"plots/{name}": wandb.Image(str(path)) for name, path in paths.items()})


@contextlib.contextmanager
def stage_logger(cfg: Config, stage: str, stage_dir: str | Path, fresh: bool = True) -> Iterator[StageLogger]:
    """A logger for ``stage``; W&B run ``<run name>/<stage>`` in group ``<run name>``."""
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = stage_dir / "metrics.jsonl"
    # This attempt logs into a sibling file that replaces metrics.jsonl only when the stage succeeds:
    # a failing stage never removes the metrics of the run that produced the current outputs.
    attempt_path = stage_dir / ".metrics.jsonl.attempt"
    if not fresh and metrics_path.is_file():
        shutil.copyfile(metrics_path, attempt_path)
    else:
        attempt_path.write_text("")
    run = None
    mode = wandb_mode(cfg)
    if mode != "disabled":
        try:
            import wandb

            run = wandb.init(
                project=cfg.wandb.project,
                entity=cfg.wandb.entity,
                group=cfg.wandb.group or cfg.run.name,
                name=f"{cfg.run.name}/{stage}",
                job_type=stage,
                mode=mode,
                dir=str(cfg.run_dir),
                config=cfg.model_dump(mode="json"),
                reinit="finish_previous",
            )
        except Exception as exc:  # W&B must never break a stage
            log.warning("W&B disabled for %s: %s", stage, exc)
            run = None
    try:
        yield StageLogger(attempt_path, run)
        os.replace(attempt_path, metrics_path)
    finally:
        attempt_path.unlink(missing_ok=True)
        if run is not None:
            run.finish()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
