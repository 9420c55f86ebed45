"""Learning curves of the RL baselines and their stopping rule (train/baselines/curves.py)."""

from __future__ import annotations

import pytest

from train.baselines.curves import CurveTracker, curve_marks, mean_curve


def test_curve_marks_are_evenly_spaced_and_end_at_the_budget():
    assert curve_marks(1000, 4) == [250, 500, 750, 1000]
    assert curve_marks(10, 3) == [4, 7, 10]
    assert curve_marks(1000, 0) == []


def test_tracker_keeps_the_best_point_and_stops_after_patience_points_without_improvement():
    tracker = CurveTracker(patience=2)
    assert tracker.add(100, 2.0) == (True, False)
    assert tracker.add(200, 3.0) == (True, False)
    assert tracker.add(300, 3.0) == (False, False)  # a tie is not an improvement
    assert tracker.add(400, 2.5) == (False, True)   # two points in a row without one: stop
    assert tracker.best == {"done": 200, "len_mean": 3.0}
    never = CurveTracker(patience=None)
    assert [never.add(d, 1.0)[1] for d in range(5)] == [False] * 5


def test_mean_curve_averages_seeds_point_by_point_and_counts_early_stoppers_where_they_reached():
    curves = [[{"done": 10, "len_mean": 2.0}, {"done": 20, "len_mean": 4.0}], [{"done": 10, "len_mean": 4.0}]]
    assert mean_curve(curves) == [{"done": 10.0, "len_mean": 3.0, "seeds": 2},
                                  {"done": 20.0, "len_mean": 4.0, "seeds": 1}]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_stage_draws_validation_curves_and_evaluates_the_best_point_when_it_stops_early(tmp_path):
    import ray
    import torch

    from _baselines_helpers import make_run_dir
    from train.baselines.run import baselines_stage
    from ulrec.io import read_json
    from ulrec.report import plot_baseline_curves

    cfg = make_run_dir(tmp_path, **{"baselines.algos": "dqn,bcq", "baselines.online_env_steps": 800,
                                    "baselines.offline_updates": 200, "baselines.offline_episodes": 100,
                                    "baselines.embedding_dim": 8, "baselines.hidden": "[16]",
                                    "baselines.train_seeds": "[0,1]", "baselines.curve_points": 4,
                                    "baselines.patience": 1, "baselines.curve_validation_users": 8,
                                    "rollout.num_users": 4})
    ray.init(address="local", num_cpus=2, object_store_memory=300 * 1024**2, include_dashboard=False,
             log_to_driver=False)
    threads = torch.get_num_threads()
    try:
        baselines_stage(cfg)
    finally:
        torch.set_num_threads(threads)
        ray.shutdown()
    for algo in ("dqn", "bcq"):
        for seed in (0, 1):
            summary = read_json(cfg.run_dir / "baselines" / algo / f"seed{seed}" / "summary.json")
            curve, budget = summary["curve"], summary["budget"]
            assert 1 <= len(curve) <= 4 and [p["done"] for p in curve] == sorted(p["done"] for p in curve)
            best = max(curve, key=lambda p: p["len_mean"])  # first of the best: ties do not improve
            assert summary["evaluated_at"] == next(p["done"] for p in curve if p["len_mean"] == best["len_mean"])
            if len(curve) < 4:  # stopped early: one point without improvement after the best
                assert budget["done"] < budget["planned"] and curve[-1]["len_mean"] <= best["len_mean"]
            assert not (cfg.run_dir / "baselines" / algo / f"seed{seed}" / "point").exists()
        pooled = read_json(cfg.run_dir / "eval" / algo / "summary.json")
        assert set(pooled["curves"]) == {"0", "1"} and pooled["curve"][0]["seeds"] == 2
    png = plot_baseline_curves({a: read_json(cfg.run_dir / "eval" / a / "summary.json") for a in ("dqn", "bcq")},
                               tmp_path / "curves.png")
    assert png is not None and png.stat().st_size > 1000
