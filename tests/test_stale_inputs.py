"""A stage reruns when what it read changed, even where a path stays the same (regressions)."""

from __future__ import annotations

import json

import pytest

from ulrec.config import load_config


def _mark(directory, key: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "_stage.json").write_text(json.dumps({"hash": key}))


def _fitted_simulators(cfg, key: str) -> None:
    """A stand-in for `ulrec env fit`'s output: the stage marker (its resume key) and the meta file."""
    _mark(cfg.run_dir / "simulators", key)
    (cfg.run_dir / "simulators" / "train").mkdir(exist_ok=True)
    (cfg.run_dir / "simulators" / "train" / "meta.json").write_text("{}")


@pytest.fixture
def counted_rollouts(monkeypatch):
    calls = []

    def fake_rollout(cfg, model_dir, out_dir, users, **kwargs):
        calls.append(str(model_dir))
        out_dir.mkdir(parents=True, exist_ok=True)
        return {"episodes": len(users), "exit_reasons": {}, "grounding": {}}

    monkeypatch.setattr("rollout.driver.training_rollout", fake_rollout)
    monkeypatch.setattr("train.rounds.training_rollout", fake_rollout)
    return calls


def test_round_rollouts_rerun_when_the_previous_round_is_retrained_in_place(tmp_path, counted_rollouts):
    from train.rounds import _collect

    cfg = load_config(None, [f"run.root={tmp_path}"])
    model = cfg.run_dir / "checkpoints" / "kto"
    _mark(model, "round-1-training-A")
    _fitted_simulators(cfg, "sim-A")
    out = cfg.run_dir / "rollouts" / "train_round2"
    _collect(cfg, model, out, [1, 2])
    _collect(cfg, model, out, [1, 2])
    assert len(counted_rollouts) == 1  # same model, same simulator: skipped
    _mark(model, "round-1-training-B")  # round 1 retrained: same path, other weights
    _collect(cfg, model, out, [1, 2])
    assert len(counted_rollouts) == 2
    _fitted_simulators(cfg, "sim-B")  # the train simulator refitted
    _collect(cfg, model, out, [1, 2])
    assert len(counted_rollouts) == 3


def test_training_rollouts_rerun_when_the_train_simulator_is_refitted(tmp_path, counted_rollouts, monkeypatch):
    import rollout.driver as driver

    cfg = load_config(None, [f"run.root={tmp_path}", "wandb.enabled=false"])
    model = tmp_path / "base"
    _mark(model, "base-model")
    monkeypatch.setattr(driver, "collector_model_dir", lambda cfg: model)
    monkeypatch.setattr(driver, "check_model_dir", lambda *a, **k: None)
    _mark(cfg.run_dir / "data", "data-A")

    class Prepared:
        def user_histories(self, split):
            return {u: [1, 2, 3, 4, 5] for u in range(40)}

    monkeypatch.setattr("ulrec.data.load_prepared", lambda run_dir: Prepared())
    _fitted_simulators(cfg, "sim-A")
    assert "skipped" not in driver.rollout_stage(cfg)
    assert driver.rollout_stage(cfg)["skipped"] is True
    _fitted_simulators(cfg, "sim-B")
    assert "skipped" not in driver.rollout_stage(cfg)
    assert len(counted_rollouts) == 2


def test_evaluation_reruns_when_the_test_simulator_is_refitted(tmp_path, monkeypatch):
    import rollout.evaluate as evaluate

    cfg = load_config(None, [f"run.root={tmp_path}"])
    model = tmp_path / "kto"
    _mark(model, "ulrec-weights")
    (model / "config.json").write_text("{}")
    monkeypatch.setattr("ulrec.checks.check_model_dir", lambda *a, **k: None)
    _mark(cfg.run_dir / "data", "data-A")
    runs = []

    def fake_run_rollout(cfg, *, out_dir, **kwargs):
        runs.append(kwargs["split"])
        out_dir.mkdir(parents=True, exist_ok=True)  # the episodes, as run_rollout writes them
        return {}

    monkeypatch.setattr("rollout.driver.run_rollout", fake_run_rollout)
    monkeypatch.setattr(evaluate, "read_episodes", lambda path: None)
    monkeypatch.setattr(evaluate, "summarize_episodes", lambda episodes: {"len_mean": float(len(runs))})

    def fitted_test_simulator(key):
        _mark(cfg.run_dir / "simulators", key)
        (cfg.run_dir / "simulators" / "test").mkdir(exist_ok=True)
        (cfg.run_dir / "simulators" / "test" / "meta.json").write_text("{}")

    fitted_test_simulator("sim-A")
    assert evaluate.evaluate_model(cfg, "ulrec", model, [1, 2])["len_mean"] == 1.0
    assert evaluate.evaluate_model(cfg, "ulrec", model, [1, 2])["len_mean"] == 1.0  # cached
    fitted_test_simulator("sim-B")  # refitted with other settings: the cached numbers are stale
    assert evaluate.evaluate_model(cfg, "ulrec", model, [1, 2])["len_mean"] == 2.0
    assert runs == ["test", "test"]
