"""Iterative rounds (beyond the paper): collect with the tuned policy and train again.

Round 1 is the paper's pipeline (base-policy rollouts → SFT → KTO). Round r ≥ 2 collects new
training rollouts with round r−1's ULRec policy, builds rows from every round's rollouts so far, and
runs stage 2 again from round r−1's policy (which is also its frozen reference). Each round is
evaluated with the main protocol; ``rounds.json`` feeds the report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rollout.driver import replay_rollout_stage, training_rollout
from rollout.evaluate import evaluate_model
from train.rows import rows_stage
from train.stages import kto_stage
from ulrec.config import Config
from ulrec.evaluation import select_eval_users, training_users
from ulrec.io import read_json, write_json
from ulrec.resume import run_stage


def round_model_dir(cfg: Config, r: int) -> Path:
    return cfg.layout.round_checkpoint(r)


# Round r's rollouts: the previous round's model (a retrained round keeps its path).
ROUND_ROLLOUT_STAGE = replay_rollout_stage("round rollouts")


def _collect(cfg: Config, model_dir: Path, out_dir: Path, users: list[int]) -> None:
    def build(_key: str) -> tuple[None, dict[str, Any]]:
        # The tuned policy itself collects (no separate collector in later rounds).
        summary = training_rollout(cfg, model_dir, out_dir, users, policy_name=model_dir.name)
        return None, {"summary": summary}

    run_stage(ROUND_ROLLOUT_STAGE, cfg, out_dir, build, skipped=lambda _marker: None, model_dir=model_dir, users=users)


def rounds_stage(cfg: Config) -> list[dict[str, Any]]:
    """Run rounds 2..``pipeline.rounds`` after round 1 finished; returns Len per round."""
    eval_users = select_eval_users(cfg, "test")
    train_users = training_users(cfg)
    summary = read_json(cfg.layout.eval_summary("ulrec"))
    rounds = [{"round": 1, **{k: summary[k] for k in ("len_mean", "len_std", "reward_mean", "reward_std")}}]
    rollout_dirs = [cfg.layout.rollouts("train")]
    for r in range(2, cfg.pipeline.rounds + 1):
        previous = round_model_dir(cfg, r - 1)
        rollout_dirs.append(cfg.layout.rollouts("train", r))
        _collect(cfg, previous, rollout_dirs[-1], train_users)
        rows_dir = cfg.layout.rows(r)
        rows_stage(cfg, rollout_dirs=rollout_dirs, out_dir=rows_dir)
        kto_stage(
            cfg,
            variant="full",
            rows_path=rows_dir / "kto.parquet",
            init_model=previous,
            output_name=round_model_dir(cfg, r).name,
        )
        summary = evaluate_model(
            cfg, f"ulrec-round{r}", round_model_dir(cfg, r), eval_users, out_root=cfg.layout.rounds_eval
        )
        rounds.append({"round": r, **{k: summary[k] for k in ("len_mean", "len_std", "reward_mean", "reward_std")}})
        write_json(cfg.layout.rounds_file, rounds)
    return rounds
