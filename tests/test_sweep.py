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
