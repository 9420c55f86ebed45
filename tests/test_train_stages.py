"""The training stages under Ray Train on CPU workers: outputs, metrics, ablation jobs, resume."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ulrec.config import Config, load_config
from ulrec.errors import DataError
from ulrec.feedback import episodes_to_rows

sys.path.insert(0, str(Path(__file__).parent))
from _train_helpers import TITLES, episode, save_tiny_model  # noqa: E402

TINY = [
    "run.progress=false",
    "wandb.enabled=false",
    "ray.num_cpus=2",
    "sft.epochs=2",
    "sft.per_device_batch_size=2",
    "sft.gradient_accumulation_steps=1",
    "sft.learning_rate=1e-3",
    "sft.logging_steps=2",
    "kto.epochs=1",
    "kto.per_device_batch_size=4",
    "kto.gradient_accumulation_steps=1",
    "kto.learning_rate=1e-3",
    "kto.logging_steps=1",
]


def make_run(root: Path, *overrides: str, with_model: bool = True) -> Config:
    """A run directory with a tiny base model and rows from hand-made episodes."""
    cfg = load_config(None, [f"run.root={root}", "run.name=t", *TINY, *overrides])
    episodes = [episode(u, TITLES[: 2 + u % 3], ["repeat", "similar", None][u % 3]) for u in range(9)]
    rows = episodes_to_rows(episodes, cfg.feedback)
    rows_dir = cfg.run_dir / "rows"
    rows_dir.mkdir(parents=True)
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, rows_dir / "kto.parquet")
    pq.write_table(table.filter(table.column("label")), rows_dir / "sft.parquet")
    if with_model:
        save_tiny_model(cfg.run_dir / "model" / "base")
    else:
        (cfg.run_dir / "model" / "base").mkdir(parents=True)
    return cfg


def positives(cfg: Config) -> int:
    return pq.read_metadata(cfg.run_dir / "rows" / "sft.parquet").num_rows


def test_stage_jobs_and_ablation_variants(tmp_path):
    from train.stages import kto_job, sft_job

    cfg = make_run(tmp_path, "kto.alpha=0.3", "kto.beta=0.05", "kto.learning_rate=2e-4", with_model=False)
    with pytest.raises(DataError, match="stage-1 checkpoint not found"):
        kto_job(cfg)
    (cfg.run_dir / "checkpoints" / "sft").mkdir(parents=True)

    sft = sft_job(cfg)
    assert (sft.kind, sft.name, Path(sft.model_path).name) == ("sft", "sft", "base")
    full = kto_job(cfg)
    assert (full.kind, full.name, full.alpha, full.beta, Path(full.rows_path).name) == ("kto", "kto", 0.3, 0.05, "kto.parquet")
    assert Path(full.model_path) == (cfg.run_dir / "checkpoints" / "sft").resolve()
    no_sft = kto_job(cfg, variant="no_sft")
    assert (no_sft.kind, no_sft.name, no_sft.alpha) == ("kto", "kto_no_sft", 0.0)
    no_kto = kto_job(cfg, variant="no_kto")
    assert (no_kto.kind, no_kto.name, Path(no_kto.rows_path).name, no_kto.learning_rate) == ("sft", "sft2", "sft.parquet", 2e-4)
    sweep = kto_job(cfg, output_name="kto_b0.05_a0.3")
    assert sweep.name == "kto_b0.05_a0.3"
    assert full.undesirable_weight == 1.0
    labels = pq.read_table(cfg.run_dir / "rows" / "kto.parquet").column("label").to_pylist()
    balanced = cfg.model_copy(update={"kto": cfg.kto.model_copy(update={"undesirable_weight": "balanced",
                                                                       "desirable_weight": 0.5})})
    assert kto_job(balanced).undesirable_weight == pytest.approx(0.5 * sum(labels) / (len(labels) - sum(labels)))
    with pytest.raises(Exception, match="balanced"):
        load_config(None, ["kto.undesirable_weight=0"])
    with pytest.raises(DataError, match="SFT rows not found"):
        sft_job(cfg, rows_path=tmp_path / "missing.parquet")


@pytest.fixture(scope="module")
def ray_session():
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, object_store_memory=300 * 1024**2, include_dashboard=False)
    yield
    ray.shutdown()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_sft_then_kto_under_ray_train(tmp_path, ray_session):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train.stages import kto_stage, sft_stage

    cfg = make_run(tmp_path)
    sft = sft_stage(cfg)
    out = cfg.run_dir / "checkpoints" / "sft"
    assert sft["global_step"] == 2 * math.ceil(positives(cfg) / 2) and not sft["resumed"]
    assert AutoModelForCausalLM.from_pretrained(out) is not None
    assert AutoTokenizer.from_pretrained(out).eos_token == "</s>"
    losses = [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert len(losses) >= 2 and all(math.isfinite(v) for v in losses)
    assert sft_stage(cfg)["skipped"] is True

    kto = kto_stage(cfg)
    assert Path(kto["output"]) == cfg.run_dir / "checkpoints" / "kto"
    records = read_jsonl(Path(kto["output"]) / "metrics.jsonl")
    logged = set().union(*records)
    assert {"loss", "kl", "rewards/chosen", "rewards/rejected", "sft_loss"} <= logged
    assert kto["global_step"] == math.ceil(pq.read_metadata(cfg.run_dir / "rows" / "kto.parquet").num_rows / 4)
    assert AutoModelForCausalLM.from_pretrained(kto["output"]) is not None
    assert not list((cfg.run_dir / "ray_train").glob("kto-*"))  # resume points removed once done


def failing_once_callback(marker: Path, after_step: int):
    """A TrainerCallback raising once, at the first step after ``after_step`` (a checkpoint exists)."""
    from transformers import TrainerCallback

    class FailOnce(TrainerCallback):  # local class: Ray pickles it by value to the workers
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step >= after_step and not marker.exists():
                marker.write_text("failed once")
                raise RuntimeError("injected failure")

    return FailOnce()


@pytest.mark.slow
def test_worker_failure_restarts_from_last_checkpoint(tmp_path, ray_session):
    from train.stages import sft_stage

    cfg = make_run(tmp_path, "sft.scaling.max_failures=1")
    steps_per_epoch = math.ceil(positives(cfg) / 2)
    marker = tmp_path / "failed"
    summary = sft_stage(cfg, callbacks=[failing_once_callback(marker, steps_per_epoch)])
    assert marker.exists()
    assert summary["resumed"] is True
    assert summary["global_step"] == 2 * steps_per_epoch


@pytest.mark.slow
def test_killed_stage_resumes_when_rerun(tmp_path, ray_session):
    from ray.train import TrainingFailedError

    from train.stages import sft_stage

    cfg = make_run(tmp_path, "sft.scaling.max_failures=0")
    steps_per_epoch = math.ceil(positives(cfg) / 2)
    with pytest.raises(TrainingFailedError):
        sft_stage(cfg, callbacks=[failing_once_callback(tmp_path / "failed", steps_per_epoch)])
    assert not (cfg.run_dir / "checkpoints" / "sft").exists()
    summary = sft_stage(cfg)
    assert summary["resumed"] is True
    assert summary["global_step"] == 2 * steps_per_epoch
    epochs = [r["epoch"] for r in read_jsonl(cfg.run_dir / "checkpoints" / "sft" / "metrics.jsonl") if "loss" in r]
    assert min(epochs) < 1 < max(epochs)  # the first epoch's logs survive the restart


def test_length_grouped_order_is_a_seeded_permutation_of_similar_length_batches():
    from train.stages import length_grouped_order

    lengths = [(i * 37) % 101 for i in range(200)]
    order = length_grouped_order(lengths, batch_size=8, seed=3, group_batches=5)
    assert sorted(order) == list(range(200))
    assert order == length_grouped_order(lengths, batch_size=8, seed=3, group_batches=5)
    assert order != length_grouped_order(lengths, batch_size=8, seed=4, group_batches=5)
    batches = [order[k : k + 8] for k in range(0, 200, 8)]
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    # Random batches of 8 from 0..100 spread ~78 on average; grouped ones far less.
    assert spread < 25
