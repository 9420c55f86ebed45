"""Stage 2 at the paper's model size on one GPU: peak memory and step time of ``ULRecKTOTrainer``.

The trainer is built by ``train.stages.build_trainer``, exactly as a Ray Train worker builds it
(Ray itself is not needed), on a Llama-3-8B-shaped model. This checks the README's *Memory plan
for the 8B configs*, which is arithmetic until measured:

- ``lora``: LoRA r 16 on every projection, bf16 frozen base, the reference = the adapter switched
  off (no second copy). Plan: ~18 GB.
- ``full``: full fine-tuning, fp32 master weights, gradients and Adam moments, bf16 autocast,
  reference log-probs precomputed (no reference copy). Plan: 32.1 + 32.1 + 64.2 GB + activations
  ≈ 130 GB on one GPU — the DDP column without its reference, which FSDP splits 8 ways in
  ``configs/steam.yaml``.

Both modes use gradient checkpointing, the paper's β 0.01 and α 0.1 and the title-only mask. The
weights are random (no model hub is reachable): memory and time depend on shapes, not values. The
tokenizer is any HF tokenizer directory whose ids lie below the model's vocabulary. Each mode runs
in a fresh process, so an out-of-memory error is a reported result, not a crash.

    python benchmarks/train_gpu_memory.py --tokenizer runs/smollm2/model/base \\
        --rows runs/smollm2/rows/kto.parquet --out gpu_memory.json
    python benchmarks/train_gpu_memory.py --shape tiny ...   # a seconds-long check, CPU or GPU
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ulrec.io import read_json, write_json, write_text  # noqa: E402
from ulrec.runtime_env import apply_defaults  # noqa: E402

apply_defaults(extra={"WANDB_MODE": "disabled"})

GB = 1e9
# Llama-3-8B (8.03 B parameters); "tiny" keeps the structure for a quick check.
SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=50000, max_position_embeddings=2048),
}
# The README's plan for one GPU, GB (None: no plan for this shape).
PLAN_GB = {("llama3-8b", "lora"): 18.0, ("llama3-8b", "full"): 130.0}


def build_model_dir(shape: str, tokenizer_dir: str, out: Path, device: str) -> dict:
    """A random-weight model of ``shape`` saved as bf16 safetensors, with the tokenizer beside it."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(**SHAPES[shape], tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if len(tokenizer) > config.vocab_size:
        raise SystemExit(f"error: the tokenizer has {len(tokenizer)} tokens, more than the {shape} vocabulary")
    start = time.perf_counter()
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: no 32 GB fp32 detour
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    return {"parameters": n_params, "build_s": round(time.perf_counter() - start, 1)}


def pick_rows(rows_path: str, n: int, out: Path) -> dict:
    """The first ``n`` rows with negatives and positives alternating (KTO wants both in a batch)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(rows_path, columns=["prompt", "completion", "label"]).to_pylist()
    pos = [r for r in table if r["label"]]
    neg = [r for r in table if not r["label"]]
    picked = []
    while len(picked) < n and (pos or neg):
        for side in (neg, pos):
            if side and len(picked) < n:
                picked.append(side.pop(0))
    pq.write_table(pa.Table.from_pylist(picked), out)
    return {"rows": len(picked), "negatives": sum(not r["label"] for r in picked),
            "mean_prompt_chars": round(statistics.mean(len(r["prompt"]) for r in picked))}


def measure(mode: str, model_dir: str, rows_path: str, batch: int, max_length: int, result_file: str) -> None:
    """One mode in this (fresh) process; writes its result as JSON."""
    import torch
    from transformers import TrainerCallback

    from train.stages import TrainJob, build_trainer
    from ulrec.config import LoRAConfig

    use_gpu = torch.cuda.is_available()

    class StepClock(TrainerCallback):
        """Wall time per optimiser step (device synchronised) and no checkpoint writes."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self._t = 0.0

        def on_step_begin(self, args, state, control, **kw):
            if use_gpu:
                torch.cuda.synchronize()
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if use_gpu:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self._t)
            control.should_save = False  # a full 8B checkpoint would cost minutes of disk I/O
            return control

        def on_epoch_end(self, args, state, control, **kw):
            control.should_save = False
            return control

    job = TrainJob(
        kind="kto", name=f"gpu-{mode}", rows_path=rows_path, model_path=model_dir,
        learning_rate=1e-4 if mode == "lora" else 5e-6, epochs=1, per_device_batch_size=batch,
        gradient_accumulation_steps=1, warmup_ratio=0.1, max_length=max_length, logging_steps=1,
        use_gpu=use_gpu, bf16=use_gpu, gradient_checkpointing=True, progress=False,
        beta=0.01, alpha=0.1, mask_format_tokens=True, precompute_ref_log_probs=mode == "full",
        lora=LoRAConfig(enabled=True).model_dump() if mode == "lora" else None, config_section="kto",
    )
    result: dict = {"mode": mode}
    try:
        with tempfile.TemporaryDirectory(prefix="ulrec-gpu-") as output_dir:
            start = time.perf_counter()
            trainer = build_trainer(job, output_dir)
            clock = StepClock()
            trainer.add_callback(clock)
            result["build_s"] = round(time.perf_counter() - start, 1)
            result["trainable_parameters"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
            if use_gpu:
                torch.cuda.synchronize()
                result["allocated_after_build_gb"] = round(torch.cuda.memory_allocated() / GB, 2)
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            train = trainer.train()
            result["train_s"] = round(time.perf_counter() - start, 1)
            if use_gpu:
                result["peak_allocated_gb"] = round(torch.cuda.max_memory_allocated() / GB, 2)
                result["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved() / GB, 2)
            # Steady state: the first two steps include allocator warm-up and kernel selection.
            steady = clock.times[2:] or clock.times
            result["steps"] = len(clock.times)
            result["median_step_s"] = round(statistics.median(steady), 3)
            logs = [r for r in trainer.state.log_history if "loss" in r]
            tokens = train.metrics.get("num_tokens") or (logs[-1].get("num_tokens") if logs else None)
            result["tokens"] = tokens
            if tokens:  # non-padding tokens over the timed steps (TRL's num_tokens)
                result["tokens_per_s"] = round(tokens / sum(clock.times), 1)
            result["losses"] = [round(r["loss"], 4) for r in logs]
            result["finite"] = all(math.isfinite(r["loss"]) for r in logs)
            for key in ("logratio/chosen", "logratio/rejected", "kl"):
                values = [r[key] for r in logs if key in r]
                if values:
                    result[key] = round(values[-1], 4)
    except torch.cuda.OutOfMemoryError as exc:
        result["oom"] = str(exc).splitlines()[0]
        if use_gpu:
            result["peak_allocated_gb"] = round(torch.cuda.max_memory_allocated() / GB, 2)
    write_json(result_file, result)  # atomic: the parent may kill a child mid-write on timeout


def markdown(report: dict) -> str:
    lines = [
        f"Model {report['shape']} ({report['model']['parameters'] / 1e9:.2f} B parameters, random weights), "
        f"{report['device']}, per-device batch {report['batch']}, {report['rows']['rows']} rows "
        f"(mean prompt {report['rows']['mean_prompt_chars']} characters), gradient checkpointing.",
        "",
        "| mode | trainable params | after load GB | peak allocated GB | peak reserved GB | plan GB | median step s | tokens/s | loss finite |",
        "|---|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in report["modes"]:
        if "error" in r or "oom" in r:
            lines.append(f"| {r['mode']} | | | {r.get('peak_allocated_gb', '')} | | {r.get('plan_gb') or '–'} | | "
                         f"| {'out of memory' if 'oom' in r else 'failed: ' + r['error']} |")
            continue
        lines.append(
            f"| {r['mode']} | {r['trainable_parameters'] / 1e6:,.1f} M | {r.get('allocated_after_build_gb', '–')} | "
            f"{r.get('peak_allocated_gb', '–')} | {r.get('peak_reserved_gb', '–')} | {r.get('plan_gb') or '–'} | "
            f"{r['median_step_s']} | {r.get('tokens_per_s', '–')} | {'yes' if r['finite'] else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="an HF tokenizer (or model) directory")
    parser.add_argument("--rows", required=True, help="KTO rows parquet (prompt, completion, label)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--modes", default="lora,full", help="comma-separated: lora, full")
    parser.add_argument("--steps", type=int, default=8, help="optimiser steps per mode")
    parser.add_argument("--batch", type=int, default=2, help="per-device batch (configs/steam.yaml: 2)")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--out", default="gpu_memory.json", help="JSON results (a .md table is written beside)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per mode before it is stopped")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if not modes or any(m not in ("lora", "full") for m in modes):
        raise SystemExit(f"error: --modes must list lora and/or full, got {args.modes!r}")
    for path, what in ((args.tokenizer, "--tokenizer"), (args.rows, "--rows")):
        if not Path(path).exists():
            raise SystemExit(f"error: {what} {path} does not exist")

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(tempfile.mkdtemp(prefix="ulrec-gpu-mem-"))
    try:
        model_dir, rows_path = work / "model", work / "rows.parquet"
        report = {"shape": args.shape, "batch": args.batch, "max_length": args.max_length,
                  "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                  "torch": torch.__version__}
        ctx = multiprocessing.get_context("spawn")
        # Built in a child process: this one must hold no GPU memory while the modes measure.
        with ctx.Pool(1) as pool:
            report["model"] = pool.apply(build_model_dir, (args.shape, args.tokenizer, model_dir, device))
        print(f"model: {report['model']}", flush=True)
        report["rows"] = pick_rows(args.rows, args.steps * args.batch, rows_path)
        report["modes"] = []
        for mode in modes:
            result_file = work / f"{mode}.json"
            proc = ctx.Process(target=measure, args=(mode, str(model_dir), str(rows_path), args.batch,
                                                      args.max_length, str(result_file)))
            proc.start()
            proc.join(args.timeout)
            if proc.is_alive():
                proc.kill()
                proc.join()
            result = read_json(result_file) if result_file.is_file() else {
                "mode": mode, "error": f"exit code {proc.exitcode}" if proc.exitcode is not None else "timed out"}
            result["plan_gb"] = PLAN_GB.get((args.shape, mode))
            report["modes"].append(result)
            print(json.dumps(result), flush=True)
        out = Path(args.out)
        write_json(out, report)
        table = markdown(report)
        write_text(out.with_suffix(".md"), table)
        print(table)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
