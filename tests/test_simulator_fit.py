"""`ulrec env fit`: fit/save both simulators on a tiny run directory, calibrate, resume, load_env."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pandas as pd
import pytest

from ulrec.config import ConfigError, load_config
from ulrec.errors import DataError
from ulrec.simulator import EchoChamberEnv, MatrixUserModel
from ulrec.simulator.fit import env_config_for, fit_simulators, load_env, simulator_path

N_USERS, N_ITEMS = 40, 30


def write_run_data(root, seed=0) -> None:
    """A tiny prepared dataset in the data stage's contract (time split, contiguous ids)."""
    rng = np.random.default_rng(seed)
    ub, ib = rng.normal(0, 1, N_USERS), rng.normal(0, 1, N_ITEMS)
    rows = [(u, i) for u in range(N_USERS) for i in rng.choice(N_ITEMS, 12, replace=False)]
    u, i = np.array(rows).T
    frame = pd.DataFrame(
        {
            "user_id": u.astype(np.int64),
            "item_id": i.astype(np.int64),
            "rating": np.clip(np.rint(3 + ub[u] + ib[i]), 1, 5).astype(np.float32),
            "timestamp": rng.permutation(len(u)).astype(np.int64),
        }
    )
    data = root / "data"
    data.mkdir(parents=True)
    cut = frame.timestamp.median()
    frame[frame.timestamp <= cut].to_parquet(data / "train.parquet")
    frame[frame.timestamp > cut].to_parquet(data / "test.parquet")
    pd.DataFrame({"user_id": np.arange(N_USERS)}).to_parquet(data / "users.parquet")
    pd.DataFrame({"item_id": np.arange(N_ITEMS), "title": [f"item {k}" for k in range(N_ITEMS)]}).to_parquet(
        data / "items.parquet"
    )


def config(tmp_path, *extra: str):
    return load_config(
        None,
        [
            f"run.root={tmp_path}",
            "run.name=tiny",
            "run.progress=false",
            "wandb.enabled=false",
            "simulator.deepfm.epochs=2",
            "simulator.deepfm.embedding_dim=4",
            "simulator.deepfm.hidden_units=[8]",
            "simulator.deepfm.batch_size=64",
            "env.calibration_users=50",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("runs")
    cfg = config(tmp_path)
    write_run_data(cfg.run_dir)
    return cfg, fit_simulators(cfg)


def test_fit_writes_both_simulators_and_calibration(fitted):
    cfg, summary = fitted
    out = cfg.run_dir / "simulators"
    for split in ("train", "test"):
        assert (out / split / "meta.json").is_file()
        part = summary[split]
        assert part["n_users"] == N_USERS and part["n_items"] == N_ITEMS
        assert part["fit"]["rmse"] is not None and part["fit"]["baseline_rmse"] > 0
        cal = part["calibration"]
        assert cal["source"] == "quantile" and cal["quantile"] == cfg.env.distance_quantile
        assert summary["thresholds"][split] == cal["distance_threshold"] > 0
        shares = cal["random_policy"]["exit_shares"]
        assert set(shares) == {"repeat", "low_reward", "similar", "horizon"}
        assert sum(shares.values()) == pytest.approx(1.0)
    on_disk = json.loads((out / "calibration.json").read_text())
    assert on_disk["thresholds"] == summary["thresholds"]
    assert (out / "_stage.json").is_file() and (out / "metrics.jsonl").is_file()


def test_rerun_skips_without_refitting(fitted, monkeypatch):
    cfg, summary = fitted
    from ulrec.simulator import deepfm

    def refit(*args, **kwargs):
        raise AssertionError("simulators were refitted")

    monkeypatch.setattr(deepfm.DeepFMUserModel, "fit", refit)
    again = fit_simulators(cfg)
    assert again["skipped"] is True and again["thresholds"] == summary["thresholds"]
    # Regression: the resume key held the whole `run` section, so hiding progress bars refitted.
    quiet = cfg.model_copy(deep=True)
    quiet.run.progress = not cfg.run.progress
    assert fit_simulators(quiet)["skipped"] is True


def test_load_env_uses_saved_model_and_calibrated_threshold(fitted):
    cfg, summary = fitted
    env = load_env(cfg, "test", max_steps=5)
    assert isinstance(env, EchoChamberEnv)
    assert env.config.distance_threshold == summary["thresholds"]["test"]
    assert env.config.max_steps == 5 and env.config.window == cfg.env.window
    assert load_env(cfg, "train").config.max_steps == cfg.env.max_steps
    env.reset(np.arange(N_USERS))
    res = env.step(np.arange(N_USERS) % N_ITEMS)
    assert res.reward.shape == (N_USERS,)


def test_env_config_follows_changed_thresholds(fitted):
    cfg, summary = fitted
    absolute = cfg.model_copy(update={"env": cfg.env.model_copy(update={"distance_threshold": 0.25})})
    assert env_config_for(absolute, "train").distance_threshold == 0.25
    wider = cfg.model_copy(update={"env": cfg.env.model_copy(update={"distance_quantile": 0.5})})
    assert env_config_for(wider, "train").distance_threshold > summary["thresholds"]["train"]


def test_matrix_kind_from_published_files(tmp_path):
    published = tmp_path / "published"
    published.mkdir()
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        np.save(published / f"toy_{split}.npy", rng.integers(1, 6, (6, 5)).astype(float))
        d = rng.uniform(200, 1300, (5, 5))
        with open(published / f"{split}_distance_mat.pickle", "wb") as fh:
            pickle.dump((d + d.T) / 2 * (1 - np.eye(5)), fh)
    (published / "test.json").write_text(json.dumps([{"userid_encoded": 3, "pos_seq_name": ["a"]}]))
    cfg = config(
        tmp_path,
        "simulator.kind=matrix",
        f"simulator.matrix_dir={published}",
        "simulator.matrix_dataset=toy",
        "env.distance_threshold=50",
    )
    summary = fit_simulators(cfg)
    assert summary["thresholds"] == {"train": 50.0, "test": 50.0}
    assert summary["test"]["fit"] is None and summary["test"]["n_known_users"] == 1
    env = load_env(cfg, "test")
    assert isinstance(env.user_model, MatrixUserModel) and env.config.distance_threshold == 50.0
    assert env.user_model.known_users().tolist() == [3]
    assert json.loads((simulator_path(cfg, "test") / "meta.json").read_text())["kind"] == "published"


def test_missing_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="train.parquet"):
        fit_simulators(config(tmp_path))
    with pytest.raises(ConfigError, match="simulator.matrix_dir"):
        fit_simulators(config(tmp_path, "simulator.kind=matrix"))
    with pytest.raises(DataError, match="ulrec env fit"):
        load_env(config(tmp_path), "test")
    cfg = config(tmp_path)
    (cfg.run_dir / "data").mkdir(parents=True)
    pd.DataFrame({"user_id": [0], "item_id": [0]}).to_parquet(cfg.run_dir / "data" / "train.parquet")
    with pytest.raises(DataError, match="rating"):
        fit_simulators(cfg)


def test_cli_env_fit_reports_skip(fitted, capsys):
    from ulrec.cli import main

    cfg, _ = fitted
    overrides = [
        f"run.root={cfg.run.root}", "run.name=tiny", "run.progress=false", "wandb.enabled=false",
        "simulator.deepfm.epochs=2", "simulator.deepfm.embedding_dim=4", "simulator.deepfm.hidden_units=[8]",
        "simulator.deepfm.batch_size=64", "env.calibration_users=50",
    ]
    assert main(["env", "fit", *overrides]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] is True
