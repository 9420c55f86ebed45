"""`ulrec sweep`: the β × α grid of the KTO stage (paper Fig. 4).

Every cell trains stage 2 from the same stage-1 checkpoint and rows, and is evaluated with the same
protocol as the main methods. Cells are resumable one by one; ``sweep/results.json`` feeds the
report's heatmap.
"""

from __future__ import annotations

from typing import Any

from rollout.evaluate import evaluate_model
from train.stages import kto_stage
from ulrec.config import Config
from ulrec.evaluation import select_eval_users
from ulrec.io import write_json


def cell_name(beta: float, alpha: float) -> str:
    return f"kto_b{beta:g}_a{alpha:g}"


def sweep_stage(cfg: Config) -> dict[str, Any]:
    users = select_eval_users(cfg, "test")
    sweep_dir = cfg.run_dir / "sweep"
    cells = []
    for beta in cfg.pipeline.sweep_betas:
        for alpha in cfg.pipeline.sweep_alphas:
            cell_cfg = cfg.model_copy(deep=True)
            cell_cfg.kto.beta = beta
            cell_cfg.kto.alpha = alpha
            name = cell_name(beta, alpha)
            kto_stage(cell_cfg, variant="full", output_name=name)
            summary = evaluate_model(
                cell_cfg, name, cfg.run_dir / "checkpoints" / name, users, out_root=sweep_dir / "eval"
            )
            cells.append(
                {
                    "beta": beta,
                    "alpha": alpha,
                    **{k: summary[k] for k in ("len_mean", "len_std", "reward_mean", "reward_std")},
                }
            )
            # Written after every cell so a partial grid is still reported.
            write_json(sweep_dir / "results.json", {"cells": cells})
    return {"cells": cells}
