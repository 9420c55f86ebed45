"""`ulrec sweep`: the KTO stage's grid (paper Fig. 4), selected on validation users.

When ``pipeline.sweep_sft_learning_rates`` / ``sweep_sft_epochs`` are given, stage 1 is searched
first: each SFT cell is trained from the base model and scored as ULRec-P, and the KTO grid starts
from the best one (coordinate-wise: stage 1, then stage 2), or, with ``pipeline.sweep_joint``, from
every one (the joint grid, their product; the pick is the best pair).
Otherwise every cell trains stage 2 from the same stage-1 checkpoint (``checkpoints/sft``) and rows (β × α, and learning rates and
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
from train.stages import kto_stage, sft_stage
from ulrec.config import Config
from ulrec.errors import UlrecError
from ulrec.evaluation import validation_users as select_validation_users
from ulrec.io import write_json
from ulrec.layout import STAGE1_CHECKPOINT, STAGE2_CHECKPOINT


def cell_name(beta: float, alpha: float, lr: float | None = None, epochs: float | None = None) -> str:
    name = f"kto_b{beta:g}_a{alpha:g}"
    if lr is not None:
        name += f"_lr{lr:g}"
    if epochs is not None:
        name += f"_e{epochs:g}"
    return name


def sft_cell_name(lr: float, epochs: float) -> str:
    return f"sft_lr{lr:g}_e{epochs:g}"


def sft_grid(cfg: Config) -> list[dict[str, Any]]:
    """Stage-1 cells (learning rate × epochs); empty when neither axis is given."""
    p = cfg.pipeline
    if p.sweep_sft_learning_rates is None and p.sweep_sft_epochs is None:
        return []
    lrs = p.sweep_sft_learning_rates or [cfg.sft.learning_rate]
    epochs = p.sweep_sft_epochs or [cfg.sft.epochs]
    return [{"learning_rate": lr, "epochs": e} for lr, e in itertools.product(lrs, epochs)]


def validation_users(cfg: Config) -> list[int]:
    """The sweep's ``pipeline.sweep_validation_users`` validation users (:func:`ulrec.evaluation.validation_users`)."""
    return select_validation_users(cfg, cfg.pipeline.sweep_validation_users)


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


def _score(cfg: Config, name: str, users: list[int], sweep_dir) -> dict[str, Any]:
    summary = evaluate_model(cfg, name, cfg.layout.checkpoint(name), users,
                             out_root=sweep_dir / "eval", split="train")
    return {k: summary[k] for k in ("len_mean", "len_std", "reward_mean", "reward_std")}


def sweep_stage(cfg: Config) -> dict[str, Any]:
    from ulrec.simulator.fit import simulator_fingerprint

    users = validation_users(cfg)
    simulator_fingerprint(cfg, "train")  # every cell is scored on it: missing → fail before training
    sweep_dir = cfg.layout.sweep
    meta = {"selection": "validation users, train simulator", "validation_users": len(users)}
    result: dict[str, Any] = {**meta}

    # Stage 1 (optional): ULRec-P cells, each from the base model.
    for spec in sft_grid(cfg):
        cell_cfg = apply_sft(cfg, spec)
        name = sft_cell_name(spec["learning_rate"], spec["epochs"])
        sft_stage(cell_cfg, output_name=name)
        result.setdefault("sft_cells", []).append({**spec, "name": name, **_score(cell_cfg, name, users, sweep_dir)})
        write_json(sweep_dir / "results.json", result)  # a partial grid is still reported
    # Where stage 2 starts: checkpoints/sft (no stage-1 grid), the stage-1 pick, or every SFT cell.
    starts: list[dict[str, Any] | None] = [None]
    if result.get("sft_cells"):
        result["sft_pick"] = pick_cell(result["sft_cells"])
        starts = list(result["sft_cells"]) if cfg.pipeline.sweep_joint else [result["sft_pick"]]

    # Stage 2: the KTO grid from each start.
    cells = result["cells"] = []
    for start in starts:
        for spec in sweep_grid(cfg):
            cell_cfg = apply_pick(cfg, spec, start)
            name = cell_name(spec["beta"], spec["alpha"], spec["learning_rate"], spec["epochs"])
            if cfg.pipeline.sweep_joint and start is not None:
                name = f"{start['name']}_{name}"
            kto_stage(cell_cfg, variant="full", output_name=name,
                      init_model=cfg.layout.checkpoint(start["name"]) if start else None)
            cells.append({
                **spec,
                "learning_rate": cell_cfg.kto.learning_rate,
                "epochs": cell_cfg.kto.epochs,
                "name": name,
                **({"sft_cell": start["name"]} if start else {}),
                **_score(cell_cfg, name, users, sweep_dir),
            })
            write_json(sweep_dir / "results.json", result)
    result["pick"] = pick_cell(cells)
    if cfg.pipeline.sweep_joint and "sft_cell" in result["pick"]:
        # The pair's stage 1 is what `ulrec run` adopts, whatever stage 1 scored alone.
        result["sft_pick"] = next(c for c in result["sft_cells"] if c["name"] == result["pick"]["sft_cell"])
    write_json(sweep_dir / "results.json", result)
    from ulrec.report import plot_sweep

    plot_sweep(result, sweep_dir / "heatmap.png")
    return result


def apply_sft(cfg: Config, sft_cell: dict[str, Any]) -> Config:
    """``cfg`` with the SFT settings of a stage-1 cell."""
    picked = cfg.model_copy(deep=True)
    picked.sft.learning_rate = sft_cell["learning_rate"]
    picked.sft.epochs = sft_cell["epochs"]
    return picked


def apply_pick(cfg: Config, pick: dict[str, Any], sft_pick: dict[str, Any] | None = None) -> Config:
    """``cfg`` with the KTO settings of a cell (a grid spec's None axes keep the config's value),
    and the SFT settings of the stage-1 cell it starts from."""
    picked = apply_sft(cfg, sft_pick) if sft_pick is not None else cfg.model_copy(deep=True)
    picked.kto.beta = pick["beta"]
    picked.kto.alpha = pick["alpha"]
    if pick.get("learning_rate") is not None:
        picked.kto.learning_rate = pick["learning_rate"]
    if pick.get("epochs") is not None:
        picked.kto.epochs = pick["epochs"]
    return picked


def _put_in_place(cfg: Config, cell_name_: str, main_name: str) -> None:
    """Copy ``checkpoints/<cell>`` to ``checkpoints/<main>`` unless it already holds that cell."""
    import shutil

    from ulrec.io import STAGE_FILE, atomic_path

    cell = cfg.layout.checkpoint(cell_name_)
    main = cfg.layout.checkpoint(main_name)
    same = (main / STAGE_FILE).is_file() and (cell / STAGE_FILE).is_file() and \
        (main / STAGE_FILE).read_text() == (cell / STAGE_FILE).read_text()
    if cell.is_dir() and not same:
        with atomic_path(main) as tmp:
            shutil.copytree(cell, tmp)


def adopt_pick(cfg: Config, sweep: dict[str, Any]) -> Config:
    """``cfg`` with the sweep's picks, and the picked checkpoints in place as the main ULRec-P /
    ULRec checkpoints: a stage's resume key does not depend on its output name (and a finished
    checkpoint is identified by its resume key), so ``sft_stage`` / ``kto_stage`` with these
    settings then find their outputs done instead of training the same cells again."""
    sft_pick = sweep.get("sft_pick")
    if sft_pick is not None:
        _put_in_place(cfg, sft_pick["name"], STAGE1_CHECKPOINT)
    _put_in_place(cfg, sweep["pick"]["name"], STAGE2_CHECKPOINT)
    return apply_pick(cfg, sweep["pick"], sft_pick)
