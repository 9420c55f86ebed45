"""Walk the pipeline's chain of resume keys: changing one input of a stage changes the key of
exactly that stage and of the stages below it, and nothing else.

Each stage's output is stood in for by its marker (``_stage.json`` holding its key; the rows files
hold theirs), written in pipeline order, so a stage sees its upstream outputs exactly as it would
after a real run. The keys come from the stages' own declarations (``ulrec.resume.StageInputs``).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from rollout.driver import ROLLOUT_STAGE
from rollout.evaluate import EVAL_STAGE
from train.rows import ROWS_STAGE
from train.stages import TRAIN_STAGES
from ulrec.config import load_config
from ulrec.data.prepare import DATA_STAGE
from ulrec.model_init import EMBEDDED_MODEL_STAGE
from ulrec.resume import resume_key
from ulrec.simulator.fit import SIMULATORS_STAGE

CHAIN = ["data", "simulators", "base model", "rollouts", "rows", "sft", "kto", "eval", "billp eval"]
BASE = ["data.dataset=synthetic", "wandb.enabled=false"]


def _mark(directory: Path, key: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "_stage.json").write_text(json.dumps({"hash": key}))


def walk(root: Path, overrides: list[str]) -> dict[str, str]:
    """Every stage's key for this config, each stage's stand-in output written before the next."""
    cfg = load_config(None, [f"run.root={root}", *BASE, *overrides])
    lay, keys = cfg.layout, {}
    keys["data"] = resume_key(DATA_STAGE, cfg)
    _mark(lay.data, keys["data"])
    keys["simulators"] = resume_key(SIMULATORS_STAGE, cfg)
    _mark(lay.simulators, keys["simulators"])
    for split in ("train", "test"):
        (lay.simulators / split).mkdir(exist_ok=True)
        (lay.simulators / split / "meta.json").write_text("{}")
    keys["base model"] = resume_key(EMBEDDED_MODEL_STAGE, cfg, template="T", history_length=cfg.policy.history_length)
    _mark(lay.base_model, keys["base model"])
    keys["rollouts"] = resume_key(ROLLOUT_STAGE, cfg, model_dir=lay.base_model)
    _mark(lay.rollouts("train"), keys["rollouts"])
    keys["rows"] = resume_key(ROWS_STAGE, cfg, rollout_dirs=[lay.rollouts("train")])
    lay.rows().mkdir(parents=True, exist_ok=True)
    for name in ("sft.parquet", "kto.parquet"):  # the rows' content follows what they were made from
        (lay.rows() / name).write_text(keys["rows"])
    sft_job = SimpleNamespace(kind="sft", rows_path=lay.rows() / "sft.parquet", model_path=lay.base_model)
    keys["sft"] = resume_key(TRAIN_STAGES["sft"], cfg, job=sft_job)
    _mark(lay.checkpoint("sft"), keys["sft"])
    kto_job = SimpleNamespace(kind="kto", rows_path=lay.rows() / "kto.parquet", model_path=lay.checkpoint("sft"))
    keys["kto"] = resume_key(TRAIN_STAGES["kto"], cfg, job=kto_job, variant="full")
    _mark(lay.checkpoint("kto"), keys["kto"])
    keys["eval"] = resume_key(EVAL_STAGE, cfg, model_dir=lay.checkpoint("kto"), users=[1, 2, 3], split="test",
                              collector=None)
    # BiLLP runs on the base model with a memory built from the training rollouts.
    keys["billp eval"] = resume_key(EVAL_STAGE, cfg, model_dir=lay.base_model, users=[1, 2, 3], split="test",
                                    collector=None, billp=True)
    return keys


# What each stage consumes (the pipeline's graph; the base model does not read the simulators).
CONSUMES = {"data": [], "simulators": ["data"], "base model": ["data"], "rollouts": ["data", "simulators", "base model"],
            "rows": ["rollouts"], "sft": ["rows", "base model"], "kto": ["rows", "sft"], "eval": ["kto", "simulators", "data"],
            "billp eval": ["base model", "rollouts", "simulators", "data"]}


def below(stages: str | tuple[str, ...]) -> set[str]:
    """``stages`` and everything that consumes them, directly or not."""
    out = {stages} if isinstance(stages, str) else set(stages)
    while True:
        more = {s for s, inputs in CONSUMES.items() if set(inputs) & out} - out
        if not more:
            return out
        out |= more


@pytest.mark.parametrize(
    "override, first",
    [
        ("data.min_user_interactions=7", "data"),
        ("run.seed=3", "data"),
        ("simulator.deepfm.epochs=3", "simulators"),
        ("env.window=3", "simulators"),
        ("model.hidden_size=96", "base model"),
        ("policy.temperature=0.7", "rollouts"),
        ("grounding.batch_size=64", "rollouts"),
        ("rollout.num_users=7", "rollouts"),
        ("feedback.min_accepted_steps=3", "rows"),
        ("sft.learning_rate=1e-3", "sft"),
        ("kto.beta=0.05", "kto"),
        ("eval.temperature=0.7", ("eval", "billp eval")),  # the protocol every method is played under
        ("eval.seeds=[0,1]", ("eval", "billp eval")),
        ("billp.candidates=2", "billp eval"),
    ],
)
def test_a_changed_input_reruns_its_stage_and_those_below(tmp_path, override, first):
    before = walk(tmp_path / "before", [])
    after = walk(tmp_path / "after", [override])
    changed = {stage for stage in CHAIN if before[stage] != after[stage]}
    assert changed == below(first), (override, sorted(changed))


@pytest.mark.parametrize("override", ["run.progress=false", "run.name=other", "wandb.enabled=true",
                                      "pipeline.sweep_betas=[0.1]", "serve.port=9000",
                                      # which methods are listed does not change any one's numbers
                                      "eval.methods=[base]", "eval.ablations=true"])
def test_what_no_stage_reads_reruns_nothing(tmp_path, override):
    assert walk(tmp_path / "before", []) == walk(tmp_path / "after", [override])
