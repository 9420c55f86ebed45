"""The training stages under Ray Train on CPU workers: outputs, metrics, ablation jobs, resume."""

from __future__ import annotations

import json
import math
import os
import shutil
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

    cfg = make_run(tmp_path, "kto.alpha=0.3", "kto.beta=0.05", "kto.learning_rate=2e-4")
    with pytest.raises(DataError, match="stage-1 checkpoint not found"):
        kto_job(cfg)
    # A directory that is not a model is refused when the job is built, before any worker starts.
    (cfg.run_dir / "checkpoints" / "sft").mkdir(parents=True)
    with pytest.raises(DataError, match="stage-1 checkpoint .* has no config.json"):
        kto_job(cfg)
    shutil.rmtree(cfg.run_dir / "checkpoints" / "sft")
    shutil.copytree(cfg.run_dir / "model" / "base", cfg.run_dir / "checkpoints" / "sft")

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


def poisoning_callback():
    """A TrainerCallback that makes the weights NaN after the last step (what an overflowing
    learning rate does), so the stage's finite check is what stands between it and `complete`."""
    from transformers import TrainerCallback

    class Poison(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            import torch

            with torch.no_grad():
                next(p for p in model.parameters() if p.is_floating_point()).fill_(float("nan"))

    return Poison()


@pytest.mark.slow
def test_diverged_training_is_never_marked_complete(tmp_path, ray_session):
    from train.stages import sft_stage

    cfg = make_run(tmp_path, "sft.epochs=1")
    with pytest.raises(DataError, match="training diverged, 1 weight tensors hold NaN/inf"):
        sft_stage(cfg, callbacks=[poisoning_callback()])
    assert not (cfg.run_dir / "checkpoints" / "sft").exists()


def test_finite_check_names_the_bad_tensor(tmp_path):
    import torch
    from safetensors.torch import save_file

    from ulrec.checks import check_model_finite

    save_file({"a": torch.ones(3), "b": torch.tensor([1.0, float("inf")]), "ids": torch.arange(3)},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(DataError, match=r"1 weight tensors hold NaN/inf \(first: b\)"):
        check_model_finite(tmp_path, "sft stage")
    save_file({"a": torch.ones(3)}, str(tmp_path / "model.safetensors"))
    check_model_finite(tmp_path, "sft stage")


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


LORA = ["sft.lora.enabled=true", "kto.lora.enabled=true", "sft.lora.r=4", "kto.lora.r=4",
        "sft.lora.target_modules=[q_proj,v_proj,down_proj]", "kto.lora.target_modules=[q_proj,v_proj,down_proj]"]


@pytest.mark.slow
def test_lora_sft_then_kto_on_two_workers_emits_merged_models(tmp_path, ray_session):
    """LoRA in both stages under Ray Train with 2 CPU workers (DDP, gloo): each stage's output is a
    full HF directory (adapter merged), stage 2 starts from it and moves away from it."""
    import torch
    from transformers import AutoModelForCausalLM

    from train.stages import kto_stage, sft_stage

    two = ["sft.scaling.num_workers=2", "sft.scaling.cpus_per_worker=1",
           "kto.scaling.num_workers=2", "kto.scaling.cpus_per_worker=1"]
    cfg = make_run(tmp_path, *LORA, *two)
    base = AutoModelForCausalLM.from_pretrained(cfg.run_dir / "model" / "base")
    sft = sft_stage(cfg)
    kto = kto_stage(cfg)
    weights = {}
    for name, out in [("sft", Path(sft["output"])), ("kto", Path(kto["output"]))]:
        assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
        model = AutoModelForCausalLM.from_pretrained(out)
        assert set(model.state_dict()) == set(base.state_dict())  # a plain model, no lora_ weights
        weights[name] = model.state_dict()
    changed = lambda a, b: [k for k in a if not torch.equal(a[k], b[k])]  # noqa: E731
    moved_by_sft = changed(weights["sft"], base.state_dict())
    # only the adapted projections change (merged), the rest of the model is untouched
    assert moved_by_sft and all(k.split(".")[-2] in {"q_proj", "v_proj", "down_proj"} for k in moved_by_sft)
    assert changed(weights["kto"], weights["sft"])
    records = read_jsonl(Path(kto["output"]) / "metrics.jsonl")
    assert {"rewards/chosen", "logratio/chosen", "sft_loss"} <= set().union(*records)


def test_bad_lora_target_is_one_line_before_any_worker_starts(tmp_path, capsys):
    from ulrec.cli import main

    cfg = make_run(tmp_path, "sft.lora.enabled=true")
    args = [f"run.root={tmp_path}", "run.name=t", *TINY, "sft.lora.enabled=true", "sft.lora.target_modules=[qkv_proj]"]
    capsys.readouterr()  # the tiny model's save progress
    assert main(["train", "sft", *args]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("ulrec: error: sft.lora.target_modules: 'qkv_proj' is not a module of this model")
    assert "\n" not in err and not (cfg.run_dir / "checkpoints" / "sft").exists()


@pytest.mark.slow
def test_fsdp_settings_reach_the_trainer_and_cpu_workers_fall_back_to_ddp(tmp_path, ray_session):
    """The sharded path of the 8B configs: the FSDP plugin settings (FSDP2, one unit per decoder
    layer, full state dict for the final save) reach the HF trainer. accelerate shards only on
    accelerator devices, so on 2 CPU workers the same stage trains unsharded (DDP) and says so;
    the sharding itself, and its memory savings, need GPUs."""
    from transformers import AutoModelForCausalLM, TrainingArguments

    from train.stages import fsdp_arguments, sft_job, sft_stage

    fsdp = ["sft.scaling.num_workers=2", "sft.scaling.cpus_per_worker=1", "sft.scaling.fsdp=true"]
    cfg = make_run(tmp_path, *fsdp, "sft.epochs=1")
    job = sft_job(cfg)
    model = AutoModelForCausalLM.from_pretrained(job.model_path)
    args = TrainingArguments(output_dir=str(tmp_path / "probe"), use_cpu=True, **fsdp_arguments(job, model))
    plugin = args.fsdp_plugin_args
    assert plugin["fsdp_version"] == 2 and plugin["transformer_cls_names_to_wrap"] == "LlamaDecoderLayer"
    assert plugin["state_dict_type"] == "FULL_STATE_DICT"
    summary = sft_stage(cfg)
    assert summary["fsdp"] is False and summary["num_workers"] == 2
    lora_job = sft_job(make_run(tmp_path / "lora", *fsdp, "sft.lora.enabled=true"))
    with pytest.raises(DataError, match="sft.scaling.fsdp with sft.lora.enabled is not supported"):
        fsdp_arguments(lora_job, model)


def test_train_storage_takes_local_paths_and_pyarrow_uris(tmp_path):
    import pyarrow.fs as pafs

    from ulrec.config import ConfigError, load_config
    from ulrec.storage import delete_tree, resolve_storage

    fs, path = resolve_storage("relative/dir")
    assert isinstance(fs, pafs.LocalFileSystem) and Path(path).is_absolute()
    fs, path = resolve_storage(f"file://{tmp_path}/store")
    assert isinstance(fs, pafs.LocalFileSystem) and path == f"{tmp_path}/store"
    assert load_config(None, ["run.train_storage=s3://bucket/ulrec"]).run.train_storage == "s3://bucket/ulrec"
    with pytest.raises(ConfigError, match="unsupported storage scheme 'ftp'"):
        load_config(None, ["run.train_storage=ftp://host/x"])
    mock = pafs._MockFileSystem()  # any pyarrow filesystem: the cleanup goes through its API only
    mock.create_dir("store/sft-abc/checkpoint_0")
    with mock.open_output_stream("store/sft-abc/checkpoint_0/model.bin") as out:
        out.write(b"weights")
    delete_tree(mock, "store/sft-abc")
    assert mock.get_file_info("store/sft-abc").type == pafs.FileType.NotFound
    delete_tree(mock, "store/sft-abc")  # absent: nothing to do


@pytest.mark.slow
def test_killed_stage_resumes_from_a_storage_uri(tmp_path, ray_session):
    """Resume points in ``run.train_storage`` (a file:// URI standing in for s3://): a killed stage
    leaves them there, not in the run directory; the rerun resumes from them and removes them."""
    from ray.train import TrainingFailedError

    from train.stages import sft_stage

    store = tmp_path / "shared-store"
    cfg = make_run(tmp_path, "sft.scaling.max_failures=0", f"run.train_storage=file://{store}")
    steps_per_epoch = math.ceil(positives(cfg) / 2)
    with pytest.raises(TrainingFailedError):
        sft_stage(cfg, callbacks=[failing_once_callback(tmp_path / "failed", steps_per_epoch)])
    runs = list(store.glob("sft-*"))
    assert len(runs) == 1 and list(runs[0].rglob("checkpoint_*"))
    assert not (cfg.run_dir / "ray_train").exists()
    summary = sft_stage(cfg)
    assert summary["resumed"] is True and summary["global_step"] == 2 * steps_per_epoch
    assert not runs[0].exists()  # resume points removed once the stage is done
