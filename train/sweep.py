"""`ulrec sweep`: the KTO stage's grid (paper Fig. 4), selected on validation users.

Every cell trains stage 2 from the same stage-1 checkpoint and rows (β × α, and learning rates and
epochs when ``pipeline.sweep_learning_rates`` / ``sweep_epochs`` are given). Cells are scored on
**validation users of the train simulator**: train-split users that the training rollouts did not
play, drawn with a fixed seed. The test simulator is never consulted, so the pick (best mean Len,
ties broken by reward) can be used by ``ulrec run`` (``pipeline.use_sweep_pick``) without peeking.
Cells are resumable one by one; ``sweep/results.json`` (written after every cell) and
``sweep/heatmap.png`` hold the grid.
"""

from __future__ import annotations

import itertools
from typing import Any

from rollout.evaluate import evaluate_model
from train.stages import kto_stage
from ulrec.config import Config
from ulrec.errors import UlrecError
from ulrec.evaluation import draw_users, eval_user_pool
from ulrec.io import write_json


def cell_name(beta: float, alpha: float, lr: float | None = None, epochs: float | None = None) -> str:
    name = f"kto_b{beta:g}_a{alpha:g}"
    if lr is not None:
        name += f"_lr{lr:g}"
    if epochs is not None:
        name += f"_e{epochs:g}"
    return name


def validation_users(cfg: Config) -> list[int]:
    """Train-split users the training rollouts did not play (the same draw the rollout stage makes,
    so the two sets are disjoint), the first ``pipeline.sweep_validation_users`` of a fixed shuffle."""
    from ulrec.data import load_prepared

    pool = eval_user_pool(load_prepared(cfg.run_dir).user_histories("train"))
    trained = set(draw_users(pool, cfg.rollout.num_users, cfg.run.seed))
    held_out = [u for u in pool if u not in trained]
    if not held_out:
        raise UlrecError(f"no validation users: rollout.num_users={cfg.rollout.num_users} uses all "
                         f"{len(pool)} train users; lower it to hold some out for the sweep")
    return draw_users(held_out, cfg.pipeline.sweep_validation_users, cfg.eval.user_seed)


def sweep_grid(cfg: Config) -> list[dict[str, Any]]:
    p = cfg.pipeline
    lrs = p.sweep_learning_rates or [None]
    epochs = p.sweep_epochs or [None]
    return [{"beta": b, "alpha": a, "learning_rate": lr, "epochs": e}
            for b, a, lr, e in itertools.product(p.sweep_betas, p.sweep_alphas, lrs, epochs)]


def pick_cell(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """The cell with the best validation Len (then Traj Reward); the grid's order breaks ties."""
    if not cells:
        raise UlrecError("the sweep has no cells")
    return max(cells, key=lambda c: (c["len_mean"], c["reward_mean"]))


def sweep_stage(cfg: Config) -> dict[str, Any]:
    from ulrec.simulator.fit import simulator_fingerprint

    users = validation_users(cfg)
    simulator_fingerprint(cfg, "train")  # every cell is scored on it: missing → fail before training
    sweep_dir = cfg.run_dir / "sweep"
    cells = []
    for spec in sweep_grid(cfg):
        cell_cfg = cfg.model_copy(deep=True)
        cell_cfg.kto.beta = spec["beta"]
        cell_cfg.kto.alpha = spec["alpha"]
        if spec["learning_rate"] is not None:
            cell_cfg.kto.learning_rate = spec["learning_rate"]
        if spec["epochs"] is not None:
            cell_cfg.kto.epochs = spec["epochs"]
        name = cell_name(spec["beta"], spec["alpha"], spec["learning_rate"], spec["epochs"])
        kto_stage(cell_cfg, variant="full", output_name=name)
        summary = evaluate_model(cell_cfg, name, cfg.run_dir / "checkpoints" / name, users,
                                 out_root=sweep_dir / "eval", split="train")
        cells.append({
            **spec,
            "learning_rate": cell_cfg.kto.learning_rate,
            "epochs": cell_cfg.kto.epochs,
            "name": name,
            **{k: summary[k] for k in ("len_mean", "len_std", "reward_mean", "reward_std")},
        })
        # Written after every cell so a partial grid is still reported.
        write_json(sweep_dir / "results.json", {"cells": cells, "selection": "validation users, train simulator",
                                                "validation_users": len(users)})
    pick = pick_cell(cells)
    result = {"cells": cells, "pick": pick, "selection": "validation users, train simulator",
              "validation_users": len(users)}
    write_json(sweep_dir / "results.json", result)
    from ulrec.report import plot_sweep

    plot_sweep(result, sweep_dir / "heatmap.png")
    return result


def apply_pick(cfg: Config, pick: dict[str, Any]) -> Config:
    """``cfg`` with the KTO settings of the sweep's pick."""
    picked = cfg.model_copy(deep=True)
    picked.kto.beta = pick["beta"]
    picked.kto.alpha = pick["alpha"]
    picked.kto.learning_rate = pick["learning_rate"]
    picked.kto.epochs = pick["epochs"]
    return picked


def adopt_pick(cfg: Config, pick: dict[str, Any]) -> Config:
    """``cfg`` with the pick's KTO settings, and the pick's checkpoint in place as the main ULRec
    checkpoint: a stage's resume key does not depend on its output name, so ``kto_stage`` with these
    settings then finds its outputs done instead of training the same cell again."""
    import shutil

    from ulrec.io import atomic_path

    picked = apply_pick(cfg, pick)
    cell = cfg.run_dir / "checkpoints" / pick["name"]
    main = cfg.run_dir / "checkpoints" / "kto"
    marker = "_stage.json"
    same = (main / marker).is_file() and (cell / marker).is_file() and \
        (main / marker).read_text() == (cell / marker).read_text()
    if cell.is_dir() and not same:
        with atomic_path(main) as tmp:
            shutil.copytree(cell, tmp)
    return picked
