"""`ulrec env fit`: fit (or load) the train and test simulators, calibrate τ_d, save everything.

Outputs under ``<run_dir>/simulators/``: ``train/`` and ``test/`` (saved user models: the train
simulator collects data, the test simulator evaluates; never mix them) and ``calibration.json``
(τ_d per split, fit RMSE against the mean-rating baseline, a random policy's exit shares). The
stage is skipped when it already ran with the same data/simulator/env/run settings. Later stages
call :func:`load_env`, which reloads the saved models rather than refitting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ulrec.config import Config, ConfigError
from ulrec.console import progress_bar
from ulrec.errors import DataError
from ulrec.io import STAGE_FILE, read_json, write_json
from ulrec.resume import StageInputs, run_stage
from ulrec.simulator.calibration import calibrate, resolve_distance_threshold
from ulrec.simulator.env import EchoChamberEnv, EnvConfig
from ulrec.simulator.loading import load_user_model
from ulrec.simulator.user_models import META_FILE, MatrixUserModel, UserModel

SPLITS = ("train", "test")
CALIBRATION_FILE = "calibration.json"
_RATING_COLUMNS = ["user_id", "item_id", "rating"]


def simulators_dir(cfg: Config) -> Path:
    return cfg.layout.simulators


def simulator_path(cfg: Config, split: str) -> Path:
    """Directory of the saved user model of ``split`` ("train" or "test")."""
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS} (got {split!r})")
    return simulators_dir(cfg) / split


def simulator_fingerprint(cfg: Config, split: str) -> str:
    """The saved simulator of ``split`` as an input of later stages (its fit's resume key), so that
    refitting it invalidates their cached results; DataError when it is missing."""
    path = simulator_path(cfg, split)
    marker = simulators_dir(cfg) / STAGE_FILE
    if not (path / META_FILE).is_file() or not marker.is_file():
        raise DataError(f"{path}: no saved simulator (run `ulrec env fit` first)")
    return str(read_json(marker).get("hash"))


# The prepared data by its own resume key; the run's seed (in every key), not its name or display.
SIMULATORS_STAGE = StageInputs("simulators", ("simulator", "env"), lambda cfg: {"data": cfg.layout.data})


# ------------------------------------------------------------------------------------- data input
def _read_ratings(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{path}: file not found (run `ulrec data prepare` first)")
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    missing = [c for c in _RATING_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}")
    frame = frame[_RATING_COLUMNS]
    if frame["user_id"].isna().any() or frame["item_id"].isna().any() or not np.isfinite(frame["rating"]).all():
        raise DataError(f"{path}: user_id/item_id/rating hold missing or non-finite values")
    return frame


def _table_rows(path: Path) -> int | None:
    if not path.is_file():
        return None
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None


def _catalogue_sizes(data_dir: Path, frames: dict[str, pd.DataFrame]) -> tuple[int, int]:
    """(n_users, n_items): users.parquet / items.parquet rows (contiguous ids), else max id + 1."""
    max_user = max(int(f["user_id"].max()) for f in frames.values())
    max_item = max(int(f["item_id"].max()) for f in frames.values())
    n_users = _table_rows(data_dir / "users.parquet") or max_user + 1
    n_items = _table_rows(data_dir / "items.parquet") or max_item + 1
    if max_user >= n_users or max_item >= n_items:
        raise DataError(
            f"{data_dir}: split ids exceed the catalogue (user {max_user} of {n_users}, item {max_item} of {n_items})"
        )
    return n_users, n_items


# ------------------------------------------------------------------------------------------ stage
def _build_user_models(cfg: Config) -> dict[str, UserModel]:
    sim = cfg.simulator
    if sim.kind == "matrix":
        if sim.matrix_dir is None:
            raise ConfigError("config key 'simulator.matrix_dir': required when simulator.kind is 'matrix'")
        root = Path(sim.matrix_dir).expanduser()
        if sim.matrix_dataset is not None:
            return {s: MatrixUserModel.from_published(root, sim.matrix_dataset, s) for s in SPLITS}
        return {s: load_user_model(root / s) for s in SPLITS}

    from ulrec.simulator.deepfm import DeepFMUserModel

    data_dir = cfg.layout.data
    frames = {s: _read_ratings(data_dir / f"{s}.parquet") for s in SPLITS}
    n_users, n_items = _catalogue_sizes(data_dir, frames)
    models: dict[str, UserModel] = {}
    for split in progress_bar(SPLITS, desc="simulators", enabled=cfg.run.progress):
        models[split] = DeepFMUserModel.fit(
            frames[split],
            n_users=n_users,
            n_items=n_items,
            hparams=sim.deepfm,
            distance=sim.distance,
            seed=cfg.run.seed,
            progress=cfg.run.progress,
        )
    return models


def fit_simulators(cfg: Config) -> dict[str, Any]:
    """Fit or load both simulators, calibrate τ_d per split, save; skip when already done."""
    from ulrec.tracking import stage_logger

    out = simulators_dir(cfg)

    def build(_key: str) -> tuple[dict[str, Any], dict[str, Any]]:
        with stage_logger(cfg, "simulators", out) as logger:
            models = _build_user_models(cfg)
            summary: dict[str, Any] = {
                "kind": cfg.simulator.kind,
                "distance": cfg.simulator.distance if cfg.simulator.kind == "deepfm" else "matrix",
                "thresholds": {},
            }
            for split, model in models.items():
                model.save(simulator_path(cfg, split))
                calibration = calibrate(model, cfg.env, seed=cfg.run.seed)
                fit_report = getattr(model, "fit_report", None)
                summary["thresholds"][split] = calibration["distance_threshold"]
                summary[split] = {
                    "n_users": model.n_users,
                    "n_items": model.n_items,
                    "n_known_users": int(len(model.known_users())),
                    "fit": fit_report,
                    "calibration": calibration,
                }
                metrics = {f"{split}/distance_threshold": calibration["distance_threshold"]}
                metrics |= {f"{split}/random_{k}": v for k, v in calibration["random_policy"]["exit_shares"].items()}
                metrics[f"{split}/random_mean_length"] = calibration["random_policy"]["mean_length"]
                if fit_report:
                    metrics |= {f"{split}/fit_{k}": v for k, v in fit_report.items()}
                logger.log(metrics)
                logger.summary(metrics)
            write_json(out / CALIBRATION_FILE, summary)
        return summary, {}

    return run_stage(SIMULATORS_STAGE, cfg, out, build, required=(CALIBRATION_FILE,),
                     skipped=lambda _marker: {"skipped": True, **read_json(out / CALIBRATION_FILE)})


# ------------------------------------------------------------------------------------ later stages
def env_config_for(cfg: Config, split: str, *, max_steps: int | None = None) -> EnvConfig:
    """The exit-protocol parameters of ``split``'s environment: cfg.env with τ_d resolved.

    An absolute ``env.distance_threshold`` is used as is; a quantile uses the threshold calibrated
    by ``ulrec env fit`` (recomputed from the saved model if the quantile has changed since).
    """
    section = cfg.env
    if section.distance_threshold is not None:
        threshold = float(section.distance_threshold)
    else:
        cal_path = simulators_dir(cfg) / CALIBRATION_FILE
        if not cal_path.is_file():
            raise DataError(f"{cal_path}: file not found (run `ulrec env fit` first)")
        stored = read_json(cal_path).get(split, {}).get("calibration", {})
        same_rule = (stored.get("quantile") == section.distance_quantile
                     and stored.get("reference", "pairs") == section.distance_reference)
        if stored.get("source") == "quantile" and same_rule:
            threshold = float(stored["distance_threshold"])
        else:
            threshold, _ = resolve_distance_threshold(load_simulator(cfg, split), section, seed=cfg.run.seed)
    return EnvConfig(
        distance_threshold=threshold,
        reward_threshold=section.reward_threshold,
        window=section.window,
        max_steps=max_steps if max_steps is not None else section.max_steps,
        legacy=section.legacy,
    )


def load_simulator(cfg: Config, split: str) -> UserModel:
    """The saved user model of ``split`` (never refits)."""
    path = simulator_path(cfg, split)
    if not (path / META_FILE).is_file():
        raise DataError(f"{path}: no saved simulator (run `ulrec env fit` first)")
    return load_user_model(path)


def load_env(cfg: Config, split: str, *, max_steps: int | None = None) -> EchoChamberEnv:
    """A batched environment on ``split``'s saved simulator with cfg.env's protocol.

    ``max_steps`` overrides cfg.env.max_steps (e.g. the rollout horizon for training data).
    """
    return EchoChamberEnv(load_simulator(cfg, split), env_config_for(cfg, split, max_steps=max_steps))
