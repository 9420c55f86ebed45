"""`ulrec sweep` selects on validation users of the train simulator: the pure parts."""

from __future__ import annotations

import pytest

from ulrec.config import load_config
from ulrec.errors import UlrecError


def test_grid_covers_beta_alpha_and_optional_lr_epochs():
    from train.sweep import cell_name, sweep_grid

    cfg = load_config(None, ["pipeline.sweep_betas=[0.01,0.1]", "pipeline.sweep_alphas=[0.1,1]"])
    grid = sweep_grid(cfg)
    assert [(c["beta"], c["alpha"]) for c in grid] == [(0.01, 0.1), (0.01, 1.0), (0.1, 0.1), (0.1, 1.0)]
    assert all(c["learning_rate"] is None and c["epochs"] is None for c in grid)
    cfg = load_config(None, ["pipeline.sweep_betas=[0.01]", "pipeline.sweep_alphas=[0.1]",
                             "pipeline.sweep_learning_rates=[1e-4,1e-3]", "pipeline.sweep_epochs=[1,2]"])
    assert len(sweep_grid(cfg)) == 4
    assert cell_name(0.01, 0.1, 1e-4, 2) == "kto_b0.01_a0.1_lr0.0001_e2" and cell_name(0.01, 0.1) == "kto_b0.01_a0.1"


def test_pick_is_the_best_validation_len_then_reward():
    from train.sweep import apply_pick, pick_cell

    cells = [{"name": "a", "len_mean": 2.0, "reward_mean": 9.0}, {"name": "b", "len_mean": 3.0, "reward_mean": 1.0},
             {"name": "c", "len_mean": 3.0, "reward_mean": 2.0}]
    assert pick_cell(cells)["name"] == "c"
    with pytest.raises(UlrecError, match="no cells"):
        pick_cell([])
    cfg = load_config(None, [])
    picked = apply_pick(cfg, {"beta": 0.1, "alpha": 1.0, "learning_rate": 3e-4, "epochs": 2.0})
    assert (picked.kto.beta, picked.kto.alpha, picked.kto.learning_rate, picked.kto.epochs) == (0.1, 1.0, 3e-4, 2.0)
    assert cfg.kto.beta == 0.01  # the original is untouched


def test_validation_users_are_train_users_the_rollouts_never_played(tmp_path, monkeypatch):
    import train.sweep as sweep
    from ulrec.evaluation import draw_users

    histories = {u: [1, 2, 3] for u in range(50)}

    class Prepared:
        def user_histories(self, split):
            assert split == "train"  # never the test split
            return histories

    monkeypatch.setattr("ulrec.data.load_prepared", lambda run_dir: Prepared())
    cfg = load_config(None, [f"run.root={tmp_path}", "rollout.num_users=30", "pipeline.sweep_validation_users=15"])
    users = sweep.validation_users(cfg)
    trained = set(draw_users(sorted(histories), 30, cfg.run.seed))
    assert len(users) == 15 and not set(users) & trained and set(users) <= set(histories)
    cfg = load_config(None, [f"run.root={tmp_path}", "rollout.num_users=50"])
    with pytest.raises(UlrecError, match="no validation users"):
        sweep.validation_users(cfg)


def test_stage_one_grid_is_empty_unless_asked_and_its_pick_is_adopted(tmp_path):
    from train.sweep import adopt_pick, sft_cell_name, sft_grid

    assert sft_grid(load_config(None, [])) == []  # default: the KTO grid only, from checkpoints/sft
    cfg = load_config(None, [f"run.root={tmp_path}", "sft.epochs=2", "pipeline.sweep_sft_learning_rates=[1e-4,1e-3]"])
    assert sft_grid(cfg) == [{"learning_rate": 1e-4, "epochs": 2.0}, {"learning_rate": 1e-3, "epochs": 2.0}]
    assert sft_cell_name(1e-3, 2) == "sft_lr0.001_e2"

    # Both picks' checkpoints become the main ones (the resume keys match, so the stages skip).
    ckpt = cfg.run_dir / "checkpoints"
    for name, key in [("sft_lr0.001_e2", "s1"), ("sft", "s0"), ("kto_b0.1_a1", "k1")]:
        (ckpt / name).mkdir(parents=True)
        (ckpt / name / "_stage.json").write_text(f'{{"hash": "{key}"}}')
    sweep = {"sft_pick": {"name": "sft_lr0.001_e2", "learning_rate": 1e-3, "epochs": 2.0},
             "pick": {"name": "kto_b0.1_a1", "beta": 0.1, "alpha": 1.0, "learning_rate": 3e-4, "epochs": 1.0}}
    picked = adopt_pick(cfg, sweep)
    assert (picked.sft.learning_rate, picked.sft.epochs, picked.kto.beta) == (1e-3, 2.0, 0.1)
    assert (ckpt / "sft/_stage.json").read_text() == '{"hash": "s1"}'
    assert (ckpt / "kto/_stage.json").read_text() == '{"hash": "k1"}'


def _fake_sweep(monkeypatch, tmp_path, overrides, scores):
    """``sweep_stage`` with training and scoring replaced: ``scores`` maps a cell's output name to
    its validation Len; each trained cell records the settings and start it was trained with."""
    import train.sweep as sweep

    trained: dict[str, dict] = {}
    monkeypatch.setattr(sweep, "validation_users", lambda cfg: [1, 2, 3])
    monkeypatch.setattr("ulrec.simulator.fit.simulator_fingerprint", lambda cfg, split: "sim")
    monkeypatch.setattr("ulrec.report.plot_sweep", lambda result, path: None)
    monkeypatch.setattr(sweep, "sft_stage", lambda cfg, output_name: trained.update(
        {output_name: {"sft_lr": cfg.sft.learning_rate}}))
    monkeypatch.setattr(sweep, "kto_stage", lambda cfg, variant, output_name, init_model: trained.update(
        {output_name: {"sft_lr": cfg.sft.learning_rate, "kto_lr": cfg.kto.learning_rate,
                       "init": init_model.name if init_model else None}}))

    def evaluate_model(cfg, name, model_dir, users, out_root, split):
        assert split == "train"  # selection never reads the test simulator
        return {"len_mean": scores[name], "len_std": 0.0, "reward_mean": 0.0, "reward_std": 0.0}

    monkeypatch.setattr(sweep, "evaluate_model", evaluate_model)
    cfg = load_config(None, [f"run.root={tmp_path}", "sft.epochs=1", "pipeline.sweep_betas=[0.01]", "pipeline.sweep_alphas=[0.1]",
                             "pipeline.sweep_sft_learning_rates=[1e-4,1e-3]", "pipeline.sweep_learning_rates=[1e-3,3e-3]",
                             *overrides])
    return sweep.sweep_stage(cfg), trained


# Stage 1 alone prefers lr 1e-3, but KTO does best from the lr-1e-4 cell (as measured on SmolLM2).
_SCORES = {"sft_lr0.0001_e1": 1.2, "sft_lr0.001_e1": 1.4,
           "kto_b0.01_a0.1_lr0.001": 3.0, "kto_b0.01_a0.1_lr0.003": 2.5,
           "sft_lr0.0001_e1_kto_b0.01_a0.1_lr0.001": 3.7, "sft_lr0.0001_e1_kto_b0.01_a0.1_lr0.003": 2.0,
           "sft_lr0.001_e1_kto_b0.01_a0.1_lr0.001": 3.0, "sft_lr0.001_e1_kto_b0.01_a0.1_lr0.003": 2.5}


def test_coordinate_wise_sweep_trains_stage_two_from_the_stage_one_pick_only(monkeypatch, tmp_path):
    result, trained = _fake_sweep(monkeypatch, tmp_path, [], _SCORES)
    assert result["sft_pick"]["name"] == "sft_lr0.001_e1"
    assert [c["name"] for c in result["cells"]] == ["kto_b0.01_a0.1_lr0.001", "kto_b0.01_a0.1_lr0.003"]
    assert trained["kto_b0.01_a0.1_lr0.003"] == {"sft_lr": 1e-3, "kto_lr": 3e-3, "init": "sft_lr0.001_e1"}
    assert result["pick"]["name"] == "kto_b0.01_a0.1_lr0.001"


def test_joint_sweep_picks_the_best_pair_and_its_stage_one(monkeypatch, tmp_path):
    result, trained = _fake_sweep(monkeypatch, tmp_path, ["pipeline.sweep_joint=true"], _SCORES)
    assert len(result["cells"]) == 4  # every SFT cell × every KTO cell
    assert trained["sft_lr0.0001_e1_kto_b0.01_a0.1_lr0.003"] == {"sft_lr": 1e-4, "kto_lr": 3e-3,
                                                                  "init": "sft_lr0.0001_e1"}
    assert result["pick"]["name"] == "sft_lr0.0001_e1_kto_b0.01_a0.1_lr0.001"
    # The pair's stage 1 is adopted, not the cell that scored best alone.
    assert result["sft_pick"]["name"] == "sft_lr0.0001_e1" and result["sft_pick"]["learning_rate"] == 1e-4
