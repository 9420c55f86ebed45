"""ULRec's two fine-tuning stages under Ray Train (paper §3.1–3.2).

* ``sft_stage`` — stage 1 (ULRec-P): TRL ``SFTTrainer`` on the positives, loss on the completion
  tokens only (EOS included), from the base model. Output ``checkpoints/sft``.
* ``kto_stage`` — stage 2 (ULRec): :class:`train.trainers.ULRecKTOTrainer` on positives + negatives
  from the stage-1 weights, reference = frozen stage 1. Ablations (``kto.variant``): ``no_sft``
  (α = 0) → ``checkpoints/kto_no_sft``; ``no_kto`` (a second SFT stage on the same positives with
  the KTO section's optimiser settings) → ``checkpoints/sft2``.

Each stage runs its trainer inside a Ray Train ``TorchTrainer`` (workers from the section's
``scaling``: CPU here, GPUs on a cluster). Every epoch the HF checkpoint is reported to Ray Train
(``RayTrainReportCallback``); when training ends, rank 0 reports the final model directory. The
driver copies it atomically to ``checkpoints/<name>`` (an HF directory with tokenizer, loadable by
transformers and vLLM), with ``metrics.jsonl`` (the trainer's log history: loss, KTO rewards, KL)
and ``train_summary.json``.

Resume: the Ray run is named after the stage's input hash and stored under ``ray_train/`` (or
``run.train_storage``: any pyarrow.fs URI, what a multi-node cluster needs). A worker
failure restarts the worker group (``FailureConfig``); a killed stage rerun with the same inputs
finds the same run in storage. Either way the loop resumes from the latest reported checkpoint
(``ray.train.get_checkpoint`` → ``resume_from_checkpoint``). A finished stage (``_stage.json`` with
the same hash) is skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from ulrec.config import Config, KTOConfigSection, SFTConfigSection, TrainScaling
from ulrec.errors import DataError
from ulrec.checks import check_model_dir, check_model_finite, check_parquet
from ulrec.io import atomic_path, read_json, write_json
from ulrec.layout import STAGE1_CHECKPOINT, VARIANT_CHECKPOINTS
from ulrec.policy import resolve_model_dir
from ulrec.resume import StageInputs, run_stage
from ulrec.storage import delete_tree, resolve_storage
from ulrec.tracking import wandb_mode

FINAL_FILE = "final.json"  # marks the checkpoint reported after training ended
MODEL_DIR = "model"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "train_summary.json"


@dataclass
class TrainJob:
    """Everything a Ray Train worker needs for one stage (plain data: it is pickled to workers)."""

    kind: Literal["sft", "kto"]
    name: str
    rows_path: str
    model_path: str
    learning_rate: float
    epochs: float
    per_device_batch_size: int
    gradient_accumulation_steps: int
    warmup_ratio: float
    max_length: int
    logging_steps: int
    seed: int = 0
    use_gpu: bool = False
    bf16: bool = False
    gradient_checkpointing: bool = False
    progress: bool = True
    # KTO only (paper Eq. 9–10)
    beta: float = 0.1
    alpha: float = 0.0
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    mask_format_tokens: bool = True
    precompute_ref_log_probs: bool = False
    # LoRA (peft) settings as a plain dict (LoRAConfig.model_dump()); None = full fine-tuning.
    lora: dict[str, Any] | None = None
    # FSDP full_shard across the workers (full fine-tuning of large models on GPUs).
    fsdp: bool = False
    # policy.chat_template: how prompts are rendered (ulrec.prompts.ChatRenderer).
    chat_template: str = "auto"
    # The config section the settings came from ("sft" or "kto"), for messages.
    config_section: str = "sft"
    # W&B environment for rank 0 (None: no W&B)
    wandb_env: dict[str, str] | None = None
    # Extra transformers TrainerCallbacks (must pickle), e.g. for fault-injection tests.
    callbacks: list[Any] = field(default_factory=list)


# --------------------------------------------------------------------------------- the trainers
def load_rows(path: str, kind: str):
    """Rows as an in-memory HF ``Dataset``; KTO rows shuffled with a fixed seed by the caller."""
    import pyarrow.parquet as pq
    from datasets import Dataset

    columns = ["prompt", "completion", "label"] if kind == "kto" else ["prompt", "completion"]
    try:
        table = pq.read_table(path, columns=columns)
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"cannot read rows {path}: {exc}".splitlines()[0]) from None
    if table.num_rows == 0:
        raise DataError(f"no rows in {path}")
    return Dataset.from_dict(table.to_pydict())


def build_trainer(job: TrainJob, output_dir: str, report_to: Sequence[str] = ()) -> Any:
    """The TRL trainer of ``job`` (SFTTrainer, or ULRecKTOTrainer with a frozen reference copy).
    Used by the Ray Train loop and, unchanged, by the plain-TRL throughput baseline."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from train.trainers import ULRecKTOConfig, ULRecKTOTrainer, score_only_labelled_positions

    score_only_labelled_positions()
    if not job.progress:
        datasets.disable_progress_bars()
    from ulrec.prompts import ChatRenderer

    tokenizer = AutoTokenizer.from_pretrained(job.model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    renderer = ChatRenderer(tokenizer, job.chat_template, source=job.model_path)
    # Weights that never take an optimiser step (LoRA's frozen base, the KTO reference) are held in
    # bf16 on GPUs: half the memory. Trained full weights stay fp32 masters (bf16 compute through
    # autocast / FSDP mixed precision): a 5e-6 step is below bf16's resolution for most weights.
    # On CPU everything stays fp32 (bf16 is far slower there).
    frozen_dtype = torch.bfloat16 if job.bf16 and job.use_gpu else torch.float32
    model = AutoModelForCausalLM.from_pretrained(job.model_path, dtype=frozen_dtype if job.lora else torch.float32)
    peft_config = lora_config(job.lora, model, f"{job.config_section}.lora") if job.lora else None
    common = dict(
        output_dir=output_dir,
        learning_rate=job.learning_rate,
        num_train_epochs=job.epochs,
        per_device_train_batch_size=job.per_device_batch_size,
        gradient_accumulation_steps=job.gradient_accumulation_steps,
        warmup_steps=job.warmup_ratio,
        max_length=job.max_length,
        logging_steps=job.logging_steps,
        logging_first_step=True,
        save_strategy="epoch",
        save_total_limit=1,  # Ray Train keeps the reported copies
        seed=job.seed,
        bf16=job.bf16,
        gradient_checkpointing=job.gradient_checkpointing,
        use_cpu=not job.use_gpu,
        report_to=list(report_to) or "none",
        run_name=(job.wandb_env or {}).get("WANDB_NAME", job.name),
        disable_tqdm=not job.progress,
        ddp_find_unused_parameters=False,
        **fsdp_arguments(job, model),
    )
    rows = load_rows(job.rows_path, job.kind)
    if renderer.enabled:  # the text the model reads, exactly as the policy backends render it
        rows = rows.map(lambda row: {"prompt": renderer.render(row["prompt"])})
    if job.kind == "sft":
        # Batches of similar lengths: less padding (-18% step time measured on the quickstart).
        args = SFTConfig(
            **common, completion_only_loss=True, packing=False, train_sampling_strategy="group_by_length"
        )
        return SFTTrainer(
            model=model, args=args, train_dataset=rows, processing_class=tokenizer, peft_config=peft_config
        )
    args = ULRecKTOConfig(
        **common,
        beta=job.beta,
        desirable_weight=job.desirable_weight,
        undesirable_weight=job.undesirable_weight,
        sft_alpha=job.alpha,
        mask_format_tokens=job.mask_format_tokens,
        precompute_ref_log_probs=job.precompute_ref_log_probs,
    )
    # TRL's KTO reads rows in order (its KL term pairs each completion with a neighbour's prompt
    # in the batch), so the order is ours to set: shuffled, in groups of similar length.
    lengths = [len(p) + len(c) for p, c in zip(rows["prompt"], rows["completion"])]
    rows = rows.select(length_grouped_order(lengths, job.per_device_batch_size, job.seed)).flatten_indices()
    # Reference = the frozen stage-1 model. With LoRA it is the same weights with the adapter
    # disabled (TRL does this when ref_model is None), so no second copy sits in memory; with
    # precomputed reference log-probs TRL needs no reference during the steps either.
    ref_model = None
    if peft_config is None and not job.precompute_ref_log_probs:
        ref_model = AutoModelForCausalLM.from_pretrained(job.model_path, dtype=frozen_dtype)
        ref_model.requires_grad_(False)
    return ULRecKTOTrainer(
        model=model, ref_model=ref_model, args=args, train_dataset=rows, processing_class=tokenizer,
        peft_config=peft_config,
    )


def lora_config(settings: dict[str, Any], model: Any, key: str = "lora") -> Any:
    """A peft ``LoraConfig`` from ``sft.lora`` / ``kto.lora``; every target module must exist."""
    from peft import LoraConfig

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in settings["target_modules"] if m not in present]
    if missing:
        raise DataError(f"{key}.target_modules: {missing[0]!r} is not a module of this model "
                        f"(it has e.g. {', '.join(sorted(n for n in present if n.endswith('proj'))[:8]) or 'none'})")
    return LoraConfig(
        r=settings["r"],
        lora_alpha=settings["alpha"],
        lora_dropout=settings["dropout"],
        target_modules=list(settings["target_modules"]),
        task_type="CAUSAL_LM",
    )


def fsdp_arguments(job: TrainJob, model: Any) -> dict[str, Any]:
    """TrainingArguments for FSDP full_shard, one unit per decoder layer; {} when off."""
    if not job.fsdp:
        return {}
    if job.lora:
        raise DataError(f"{job.config_section}.scaling.fsdp with {job.config_section}.lora.enabled is not supported: LoRA trains few weights; use plain DDP")
    layer_classes = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.endswith("DecoderLayer")})
    if not layer_classes:
        raise DataError(f"{job.config_section}.scaling.fsdp: no decoder layer class found in {type(model).__name__} to shard by")
    return {
        "fsdp": "full_shard auto_wrap",
        "fsdp_config": {
            "version": 2,
            "transformer_layer_cls_to_wrap": layer_classes,
            "activation_checkpointing": job.gradient_checkpointing,
            # Every rank gathers the full weights when the final model is saved (a plain HF dir).
            "state_dict_type": "FULL_STATE_DICT",
        },
    }


def length_grouped_order(lengths: Sequence[int], batch_size: int, seed: int, group_batches: int = 50) -> list[int]:
    """A shuffled order in which each run of ``batch_size`` rows has similar lengths.

    Like transformers' length-grouped sampler: shuffle, cut into groups of ``group_batches``
    batches, sort each group by length (longest first), then shuffle the batches. Padding then
    costs little (KTO steps 40% shorter on the quickstart rows) while batches stay random.
    """
    import random

    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    group = batch_size * group_batches
    batches = []
    for start in range(0, len(order), group):
        chunk = sorted(order[start : start + group], key=lambda i: -lengths[i])
        batches += [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return [i for batch in batches for i in batch]


def train_summary(trainer: Any, train_metrics: dict[str, Any]) -> dict[str, Any]:
    """Final step, runtime, throughput and the last logged value of each training metric."""
    last: dict[str, Any] = {}
    for record in trainer.state.log_history:
        last.update({k: v for k, v in record.items() if isinstance(v, (int, float))})
    summary = {k: v for k, v in last.items() if k not in {"step"}}
    summary.update({k: v for k, v in train_metrics.items() if isinstance(v, (int, float))})
    summary["global_step"] = trainer.state.global_step
    runtime = summary.get("train_runtime") or 0.0
    if "num_tokens" in summary and runtime > 0:
        summary["train_tokens_per_second"] = summary["num_tokens"] / runtime
    return summary


# ----------------------------------------------------------------------------- Ray Train worker
def _train_loop(config: dict[str, Any]) -> None:
    """Per worker: build the trainer, resume from Ray's latest checkpoint, train, report the model."""
    import ray.train
    import torch
    from ray.train import Checkpoint
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer

    job: TrainJob = config["job"]
    rank = ray.train.get_context().get_world_rank()
    report_to: list[str] = []
    if job.wandb_env is not None and rank == 0:
        os.environ.update(job.wandb_env)
        report_to = ["wandb"]

    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else nullcontext(None) as ckpt_dir:
        if ckpt_dir is not None and (Path(ckpt_dir) / FINAL_FILE).is_file():
            return  # finished in an earlier attempt: its final report is the result
        resume_from = str(Path(ckpt_dir) / RayTrainReportCallback.CHECKPOINT_NAME) if ckpt_dir else None
        with tempfile.TemporaryDirectory(prefix=f"ulrec-{job.name}-") as output_dir:
            trainer = build_trainer(job, output_dir, report_to)
            trainer.add_callback(RayTrainReportCallback())
            for callback in job.callbacks:
                trainer.add_callback(callback)
            trainer = prepare_trainer(trainer)
            result = trainer.train(resume_from_checkpoint=resume_from)

    summary = train_summary(trainer, result.metrics)
    summary["resumed"] = resume_from is not None
    summary["torch_threads"] = torch.get_num_threads()
    summary["fsdp"] = bool(getattr(trainer, "is_fsdp_enabled", False))
    if job.fsdp and not summary["fsdp"] and rank == 0:
        # accelerate shards only on accelerator devices (GPU, NPU, XPU, ...); CPU workers run DDP.
        print(f"ulrec: {job.config_section}.scaling.fsdp: accelerate does not shard on CPU workers; "
              "this stage trained unsharded (DDP)", flush=True)
    summary["lora"] = job.lora is not None
    summary["num_workers"] = ray.train.get_context().get_world_size()
    with tempfile.TemporaryDirectory() as tmp:
        save_merged_model(trainer, Path(tmp) / MODEL_DIR, is_main=rank == 0)
        final = None
        if rank == 0:
            with (Path(tmp) / METRICS_FILE).open("w") as fh:
                for record in trainer.state.log_history:
                    fh.write(json.dumps(record) + "\n")
            (Path(tmp) / FINAL_FILE).write_text(json.dumps(summary, indent=2))
            final = Checkpoint.from_directory(tmp)
        ray.train.report(metrics=summary, checkpoint=final)


def save_merged_model(trainer: Any, path: Path, is_main: bool) -> None:
    """The trained model as a full HF directory (LoRA adapters merged in), so vLLM, evaluation,
    serving and the next stage load it unchanged. Every rank calls (FSDP gathers the full state)."""
    from peft import PeftModel

    model = trainer.accelerator.unwrap_model(trainer.model)
    if not isinstance(model, PeftModel):
        trainer.save_model(str(path))  # every rank calls; rank 0 writes
        return
    if is_main:
        merged = model.merge_and_unload()
        merged.save_pretrained(str(path))
        trainer.processing_class.save_pretrained(str(path))


def worker_resources(scaling: TrainScaling) -> dict[str, float]:
    """What each Ray Train worker asks for: its CPUs, a GPU when used, and the custom resources
    that pin it to a node type (``resources_per_worker``)."""
    resources = {"CPU": scaling.cpus_per_worker, **scaling.resources_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = 1
    return resources


def _run_on_ray(cfg: Config, job: TrainJob, scaling: TrainScaling, resume_key: str, out_dir: Path) -> dict[str, Any]:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ulrec.ray_session import init_ray  # here: build_trainer must import without Ray (GPU benchmark)

    init_ray(cfg)
    from rollout.engines import make_room

    resources = worker_resources(scaling)
    make_room({k: v * scaling.num_workers for k, v in resources.items()}, f"{job.name} training")
    filesystem, storage = resolve_storage(cfg.run.train_storage or cfg.layout.ray_train)
    # The resume key names the Ray Train run: a restarted stage resumes its own checkpoints only.
    run_name = f"{job.name}-{resume_key}"
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers, use_gpu=scaling.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run {run_name} ended without a checkpoint")
    with result.checkpoint.as_directory() as ckpt_dir:
        ckpt = Path(ckpt_dir)
        if not (ckpt / FINAL_FILE).is_file():
            raise RuntimeError(f"Ray Train run {run_name}: latest checkpoint is not the final model")
        summary = read_json(ckpt / FINAL_FILE)
        # A diverged run (NaN/inf weights) fails here and is never marked complete.
        check_model_finite(ckpt / MODEL_DIR, f"{job.name} stage")
        with atomic_path(out_dir) as tmp:
            shutil.copytree(ckpt / MODEL_DIR, tmp)
            shutil.copy2(ckpt / METRICS_FILE, tmp / METRICS_FILE)
            write_json(tmp / SUMMARY_FILE, summary)
    summary["output"] = str(out_dir)
    # The optimiser-state checkpoints are only resume points; the stage is done.
    delete_tree(filesystem, f"{storage}/{run_name}")
    return summary


# ------------------------------------------------------------------------------------------ stages
def _wandb_env(cfg: Config, stage: str) -> dict[str, str] | None:
    mode = wandb_mode(cfg)
    if mode == "disabled":
        return None
    env = {
        "WANDB_MODE": mode,
        "WANDB_PROJECT": cfg.wandb.project,
        "WANDB_RUN_GROUP": cfg.wandb.group or cfg.run.name,
        "WANDB_JOB_TYPE": stage,
        "WANDB_NAME": f"{cfg.run.name}/{stage}",
        "WANDB_DIR": str(cfg.run_dir.resolve()),
    }
    if cfg.wandb.entity:
        env["WANDB_ENTITY"] = cfg.wandb.entity
    return env


def _job(cfg: Config, kind: str, name: str, rows: Path, model: Path,
         section: SFTConfigSection | KTOConfigSection, **extra: Any) -> TrainJob:
    scaling = section.scaling
    return TrainJob(
        kind=kind,
        name=name,
        rows_path=str(rows.resolve()),
        model_path=str(model.resolve()),
        learning_rate=section.learning_rate,
        epochs=section.epochs,
        per_device_batch_size=section.per_device_batch_size,
        gradient_accumulation_steps=section.gradient_accumulation_steps,
        warmup_ratio=section.warmup_ratio,
        max_length=section.max_length,
        logging_steps=section.logging_steps,
        seed=cfg.run.seed,
        use_gpu=scaling.use_gpu,
        bf16=scaling.use_gpu if scaling.bf16 is None else scaling.bf16,
        gradient_checkpointing=scaling.gradient_checkpointing,
        fsdp=scaling.fsdp,
        lora=section.lora.model_dump() if section.lora.enabled else None,
        chat_template=cfg.policy.chat_template,
        config_section="kto" if isinstance(section, KTOConfigSection) else "sft",
        progress=cfg.run.progress,
        wandb_env=_wandb_env(cfg, name),
        **extra,
    )


def _require(path: Path, what: str, hint: str) -> Path:
    """An input of a training stage that exists and reads (model directory or Parquet rows)."""
    if not path.exists():
        raise DataError(f"{what} not found: {path} ({hint})")
    if path.suffix == ".parquet":
        return check_parquet(path, what)
    return check_model_dir(path, what)


def _train_inputs(cfg: Config, job: TrainJob, variant: str | None = None) -> dict[str, Any]:
    # The rows and the initial model by content; how the prompts are rendered (chat template).
    return {"kind": job.kind, "rows": Path(job.rows_path), "model": Path(job.model_path),
            "chat_template": cfg.policy.chat_template, "variant": variant}


TRAIN_STAGES = {
    "sft": StageInputs("SFT", ("sft",), _train_inputs),
    "kto": StageInputs("KTO", ("kto",), _train_inputs),
}


def _stage(cfg: Config, job: TrainJob, section_name: str, scaling: TrainScaling, out_dir: Path,
           extra_hash: dict[str, Any]) -> dict[str, Any]:
    def build(key: str) -> tuple[dict[str, Any], dict[str, Any]]:
        check_job(job)
        summary = _run_on_ray(cfg, job, scaling, key, out_dir)
        return summary, {k: summary[k] for k in ("global_step", "output")}

    return run_stage(TRAIN_STAGES[section_name], cfg, out_dir, build, required=(SUMMARY_FILE,),
                     skipped=lambda _marker: {**read_json(out_dir / SUMMARY_FILE), "output": str(out_dir), "skipped": True},
                     job=job, **extra_hash)


def check_job(job: TrainJob) -> None:
    """Settings that depend on the model (LoRA targets, FSDP layers, chat template) checked on the
    driver, on an empty (meta-device) copy of the architecture: a bad key fails in one line before
    any worker starts."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ulrec.prompts import ChatRenderer

    if not (job.lora or job.fsdp or job.chat_template == "on"):
        return
    ChatRenderer(AutoTokenizer.from_pretrained(job.model_path), job.chat_template, source=job.model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(job.model_path))
    if job.lora:
        lora_config(job.lora, model, f"{job.config_section}.lora")
    fsdp_arguments(job, model)


def sft_job(
    cfg: Config,
    *,
    rows_path: str | Path | None = None,
    init_model: str | Path | None = None,
    output_name: str = STAGE1_CHECKPOINT,
    callbacks: Sequence[Any] = (),
) -> TrainJob:
    """Stage 1's job: SFT on ``rows/sft.parquet`` from the base model."""
    rows = _require(Path(rows_path) if rows_path else cfg.layout.rows() / "sft.parquet",
                    "SFT rows", "run `ulrec train rows` first")
    model = _require(Path(init_model) if init_model else resolve_model_dir(cfg),
                     "base model", "run `ulrec model init` or set policy.model")
    return _job(cfg, "sft", output_name, rows, model, cfg.sft, callbacks=list(callbacks))


def undesirable_weight(section: KTOConfigSection, rows: Path) -> float:
    """λ_0 of ``kto.undesirable_weight``; "balanced" = desirable_weight × positives / negatives."""
    if section.undesirable_weight != "balanced":
        return float(section.undesirable_weight)
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    labels = pq.read_table(rows, columns=["label"]).column("label")
    positives = int(pc.sum(labels).as_py() or 0)
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        raise DataError(f"kto.undesirable_weight=balanced needs positive and negative rows ({rows}: "
                        f"{positives} positives, {negatives} negatives)")
    return section.desirable_weight * positives / negatives


def kto_job(
    cfg: Config,
    *,
    variant: Literal["full", "no_sft", "no_kto"] | None = None,
    rows_path: str | Path | None = None,
    init_model: str | Path | None = None,
    output_name: str | None = None,
    callbacks: Sequence[Any] = (),
) -> TrainJob:
    """Stage 2's job for ``variant`` (default ``cfg.kto.variant``), from the stage-1 checkpoint.

    ``full``: KTO (+ α·SFT) on ``rows/kto.parquet`` → ``kto``; ``no_sft``: the same with α = 0 →
    ``kto_no_sft``; ``no_kto``: a second SFT on ``rows/sft.parquet`` with the KTO section's
    optimiser settings → ``sft2``. ``output_name``/``rows_path``/``init_model`` override these.
    """
    variant = variant or cfg.kto.variant
    name = output_name or VARIANT_CHECKPOINTS[variant]
    init = _require(Path(init_model) if init_model else cfg.layout.checkpoint(STAGE1_CHECKPOINT),
                    "stage-1 checkpoint", "run `ulrec train sft` first")
    section = cfg.kto
    if variant == "no_kto":
        rows = _require(Path(rows_path) if rows_path else cfg.layout.rows() / "sft.parquet",
                        "SFT rows", "run `ulrec train rows` first")
        return _job(cfg, "sft", name, rows, init, section, callbacks=list(callbacks))
    rows = _require(Path(rows_path) if rows_path else cfg.layout.rows() / "kto.parquet",
                    "KTO rows", "run `ulrec train rows` first")
    return _job(
        cfg, "kto", name, rows, init, section,
        beta=section.beta,
        alpha=0.0 if variant == "no_sft" else section.alpha,
        desirable_weight=section.desirable_weight,
        undesirable_weight=undesirable_weight(section, rows),
        mask_format_tokens=section.mask_format_tokens,
        precompute_ref_log_probs=section.precompute_ref_log_probs,
        callbacks=list(callbacks),
    )


def sft_stage(
    cfg: Config,
    *,
    rows_path: str | Path | None = None,
    init_model: str | Path | None = None,
    output_name: str = STAGE1_CHECKPOINT,
    callbacks: Sequence[Any] = (),
) -> dict[str, Any]:
    """Stage 1 (ULRec-P) under Ray Train → ``checkpoints/<output_name>``; returns the summary."""
    job = sft_job(cfg, rows_path=rows_path, init_model=init_model, output_name=output_name, callbacks=callbacks)
    return _stage(cfg, job, "sft", cfg.sft.scaling, cfg.layout.checkpoint(job.name), {})


def kto_stage(
    cfg: Config,
    *,
    variant: Literal["full", "no_sft", "no_kto"] | None = None,
    rows_path: str | Path | None = None,
    init_model: str | Path | None = None,
    output_name: str | None = None,
    callbacks: Sequence[Any] = (),
) -> dict[str, Any]:
    """Stage 2 (ULRec) or an ablation under Ray Train → ``checkpoints/<name>`` (see :func:`kto_job`).

    With ``kto.on_policy.enabled`` and no ``rows_path``, the KTO rows are the collector's plus the
    starting model's own rollouts' (:mod:`train.on_policy`), collected first when not done yet."""
    variant = variant or cfg.kto.variant
    if cfg.kto.on_policy.enabled and rows_path is None and variant != "no_kto":
        from train.on_policy import on_policy_stage

        start = _require(Path(init_model) if init_model else cfg.layout.checkpoint(STAGE1_CHECKPOINT),
                         "stage-1 checkpoint", "run `ulrec train sft` first")
        rows_path = on_policy_stage(cfg, start)["kto_rows"]
    job = kto_job(cfg, variant=variant, rows_path=rows_path, init_model=init_model,
                  output_name=output_name, callbacks=callbacks)
    return _stage(cfg, job, "kto", cfg.kto.scaling, cfg.layout.checkpoint(job.name), {"variant": variant})
