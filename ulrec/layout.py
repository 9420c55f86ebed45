"""Every path under ``runs/<name>/``, named once.

Stages ask :class:`RunLayout` where their inputs and outputs live instead of joining strings, so
the layout can be read (and changed) in one place::

    runs/<name>/
      data/                 items.parquet, train.parquet, test.parquet, stats.json   (ulrec data)
      simulators/           train/, test/, calibration.json, metrics.jsonl           (ulrec env fit)
      model/base/           the base policy (embedded or converted)                   (ulrec model init)
      rollouts/train/       training episodes (Parquet dataset); train_round<r>/ later rounds
                            onpolicy-<model>/ the stage-1 model's own episodes (kto.on_policy)
      rows/                 sft.parquet, kto.parquet, stats.json; rows_round<r>/ later rounds
      rows_onpolicy/<ckpt>/ own/ (those episodes' rows), kto.parquet (stage 2's), stats.json
      checkpoints/<name>/   sft (ULRec-P), kto (ULRec), kto_no_sft, sft2 (ablations),
                            kto_round<r>, sweep cells (sft_lr…, kto_b…)
      eval/<method>/        episodes/ (Parquet dataset), summary.json                 (ulrec eval)
      sweep/                results.json, heatmap.png, eval/<cell>/                  (ulrec sweep)
      rounds_eval/ rounds.json                                                        (rounds ≥ 2)
      baselines/<algo>/     RLlib checkpoints; their evaluation under eval/<algo>/
      report.md results.json plots/ timings.json                                      (ulrec report)
      logs/                 ulrec.log (library output), per-stage metrics, error tracebacks
      ray_train/            Ray Train's storage
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Stage 2's variants → the checkpoint each writes (paper Table 2 ablations beside the full method).
VARIANT_CHECKPOINTS = {"full": "kto", "no_sft": "kto_no_sft", "no_kto": "sft2"}
# Evaluated methods → their checkpoint (None: the base model, wherever it lives).
METHOD_CHECKPOINTS: dict[str, str | None] = {
    "base": None,
    "ulrec-p": "sft",
    "ulrec": VARIANT_CHECKPOINTS["full"],
    "wo-sft": VARIANT_CHECKPOINTS["no_sft"],
    "wo-kto": VARIANT_CHECKPOINTS["no_kto"],
    "billp": None,  # the BiLLP planner runs on the base model (ulrec.policy.billp)
}
# Episodes on disk: a Parquet dataset directory (``rollout.episode.EPISODE_SCHEMA``) named this.
EPISODES_DIR = "episodes"
# An evaluated method's (or one baseline training seed's) summary, beside its episodes.
SUMMARY_FILE = "summary.json"
STAGE1_CHECKPOINT = METHOD_CHECKPOINTS["ulrec-p"]
STAGE2_CHECKPOINT = METHOD_CHECKPOINTS["ulrec"]


@dataclass(frozen=True)
class RunLayout:
    root: Path

    # data and simulators
    @property
    def data(self) -> Path:
        return self.root / "data"

    def data_file(self, name: str) -> Path:
        return self.data / name

    @property
    def simulators(self) -> Path:
        return self.root / "simulators"

    @property
    def base_model(self) -> Path:
        return self.root / "model" / "base"

    # training data
    def rollouts(self, split: str = "train", round_: int = 1) -> Path:
        return self.root / "rollouts" / (split if round_ == 1 else f"{split}_round{round_}")

    def plain_rollouts(self, split: str = "train") -> Path:
        """The collector model's own rollouts when a planner collects (``rollout.collector.planner``)."""
        return self.root / "rollouts" / f"{split}-plain"

    def rows(self, round_: int = 1) -> Path:
        return self.root / ("rows" if round_ == 1 else f"rows_round{round_}")

    # kto.on_policy: the rollouts of the model stage 2 starts from, by a digest of its content (a
    # sweep cell and the checkpoint adopted from it share them), and stage 2's rows per checkpoint
    def on_policy_rollouts(self, model_digest: str) -> Path:
        return self.root / "rollouts" / f"onpolicy-{model_digest[:16]}"

    def on_policy_rows(self, model_name: str) -> Path:
        return self.root / "rows_onpolicy" / model_name

    # models
    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, name: str) -> Path:
        return self.checkpoints / name

    def round_checkpoint(self, round_: int) -> Path:
        return self.checkpoint(STAGE2_CHECKPOINT if round_ == 1 else f"{STAGE2_CHECKPOINT}_round{round_}")

    @property
    def ray_train(self) -> Path:
        return self.root / "ray_train"

    # evaluation and selection
    @property
    def eval(self) -> Path:
        return self.root / "eval"

    def eval_method(self, method: str) -> Path:
        return self.eval / method

    def eval_summary(self, method: str) -> Path:
        return self.eval_method(method) / SUMMARY_FILE

    def eval_episodes(self, method: str) -> Path:
        """A method's evaluation episodes: one Parquet dataset directory, for LLMs and baselines alike."""
        return self.eval_method(method) / EPISODES_DIR

    @property
    def sweep(self) -> Path:
        return self.root / "sweep"

    @property
    def rounds_eval(self) -> Path:
        return self.root / "rounds_eval"

    @property
    def rounds_file(self) -> Path:
        return self.root / "rounds.json"

    @property
    def baselines(self) -> Path:
        return self.root / "baselines"

    # report and logs
    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def results(self) -> Path:
        return self.root / "results.json"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def timings(self) -> Path:
        return self.root / "timings.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def console_log(self) -> Path:
        return self.logs / "ulrec.log"
