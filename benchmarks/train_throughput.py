"""Training tokens/s of each stage (SFT, KTO) under Ray Train against plain TRL, in one run.

Both sides train the same model on the same rows with the same trainer built by
``train.stages.build_trainer`` (same settings, same per-epoch checkpointing, same thread count):

- plain TRL: ``trainer.train()`` in a fresh process with ``--cpus`` threads and the CPU priority
  (niceness) Ray gives its workers;
- Ray Train: the stage function users run (``sft_stage`` / ``kto_stage``), one worker with
  ``cpus_per_worker = --cpus``; it adds the per-epoch checkpoint report to Ray Train storage.

Tokens are TRL's ``num_tokens`` (non-padding tokens of the training batches); *loop* tokens/s
divides by the trainer's ``train_runtime``; *end-to-end* divides by the wall time of the whole
call (plain: imports, model load, tokenisation, training; Ray: also Ray Train start-up, the worker
start and the final model copy). Target (issue 5): loop ratio Ray/plain ≥ 0.9. Each figure is the median over
``--repeats`` alternating runs.

    python benchmarks/train_throughput.py                      # synthetic rows, small Llama
    python benchmarks/train_throughput.py --rows 1024 --cpus 2 --repeats 3
    python benchmarks/train_throughput.py --run-dir runs/quickstart   # that run's rows + models
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from ulrec.runtime_env import apply_defaults  # noqa: E402

apply_defaults(extra={"WANDB_MODE": "disabled"})

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from train.stages import build_trainer, kto_job, kto_stage, sft_job, sft_stage  # noqa: E402
from ulrec.config import Config, load_config  # noqa: E402
from ulrec.feedback import episodes_to_rows  # noqa: E402
from ulrec.prompts import PromptBuilder, StepView, completion_text  # noqa: E402


def synthetic_episodes(n_rows: int, n_items: int = 300, seed: int = 0) -> list[dict]:
    """Episodes with the default prompt template until they yield about ``n_rows`` KTO rows."""
    rng = random.Random(seed)
    titles = [f"Movie {i} of {rng.choice(['Love', 'War', 'Time', 'Night'])} ({1950 + i % 70})" for i in range(n_items)]
    builder = PromptBuilder()
    episodes, n = [], 0
    user = 0
    while n < n_rows:
        history = rng.sample(titles, 15)
        length = rng.randint(2, 8)
        items = rng.sample(titles, length + 1)
        views, steps = [], []
        for k, title in enumerate(items, start=1):
            live = k <= length
            steps.append({
                "step": k, "prompt": builder.build(history, views), "raw_output": completion_text(title),
                "item_id": titles.index(title), "title": title, "substituted": False,
                "reward": 4.0 if live else 1.0, "live": live, "reason": "stay" if live else "similar",
            })
            views.append(StepView(title, "The user stayed, reward=4.00"))
        episodes.append({"run": "bench", "policy": "base", "split": "train", "user_id": user, "seed": 0,
                         "length": length, "total_reward": 4.0 * length, "exit_reason": "similar", "steps": steps})
        n += length + 1
        user += 1
    return episodes


def build_synthetic_run(cfg: Config, n_rows: int, hidden: int, layers: int) -> None:
    """rows/{sft,kto}.parquet and model/base (tokenizer trained on the prompts, random init)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rows = episodes_to_rows(synthetic_episodes(n_rows), cfg.feedback)
    table = pa.Table.from_pylist(rows)
    rows_dir = cfg.run_dir / "rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, rows_dir / "kto.parquet")
    pq.write_table(table.filter(table.column("label")), rows_dir / "sft.parquet")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((r["prompt"] + r["completion"] for r in rows), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 32), num_key_value_heads=max(1, hidden // 32),
        max_position_embeddings=2048, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=True,
    ))
    base = cfg.run_dir / "model" / "base"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)


def _plain_in_child(job, threads: int, niceness: int) -> dict[str, float]:
    import torch

    os.nice(niceness)
    torch.set_num_threads(threads)
    out = tempfile.mkdtemp(prefix="bench-plain-")
    try:
        start = time.perf_counter()
        trainer = build_trainer(job, out)
        metrics = trainer.train().metrics
        wall = time.perf_counter() - start
        tokens = max(r.get("num_tokens", 0) for r in trainer.state.log_history)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"tokens": tokens, "loop_s": metrics["train_runtime"], "wall_s": wall}


def plain_trl(job, threads: int) -> dict[str, float]:
    """Plain TRL in a fresh process set up like a Ray worker: OMP_NUM_THREADS = threads and the
    CPU priority Ray gives its workers (niceness RAY_worker_niceness, 15 by default), so only the
    Ray Train wrapping differs. The wall time excludes the child's interpreter start."""
    niceness = int(os.environ.get("RAY_worker_niceness", "15"))
    previous = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            return pool.apply(_plain_in_child, (job, threads, niceness))
    finally:
        if previous is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = previous


def on_ray(stage_fn, cfg: Config, **kwargs) -> dict[str, float]:
    start = time.perf_counter()
    summary = stage_fn(cfg, **kwargs)
    wall = time.perf_counter() - start
    return {"tokens": summary["num_tokens"], "loop_s": summary["train_runtime"], "wall_s": wall,
            "threads": summary["torch_threads"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=None, help="YAML config (its sft/kto sections are used)")
    parser.add_argument("--run-dir", default=None, help="use this run's rows/ and model/base instead of synthetic")
    parser.add_argument("--rows", type=int, default=512, help="synthetic KTO rows (positives + negatives)")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--cpus", type=int, default=2, help="torch threads on both sides (Ray: cpus_per_worker)")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    import ray

    tmp_root = Path(tempfile.mkdtemp(prefix="ulrec-train-bench-"))
    overrides = [
        f"run.root={tmp_root}", "run.name=bench", "run.progress=false", "wandb.enabled=false",
        f"ray.num_cpus={max(2, args.cpus)}",
    ]
    for section in ("sft", "kto"):
        overrides += [f"{section}.epochs={args.epochs}", f"{section}.per_device_batch_size={args.batch}",
                      f"{section}.gradient_accumulation_steps=1", f"{section}.logging_steps=1",
                      f"{section}.scaling.num_workers=1", f"{section}.scaling.cpus_per_worker={args.cpus}"]
    cfg = load_config(args.config, overrides)
    if args.run_dir:
        for sub in ("rows", "model"):
            shutil.copytree(Path(args.run_dir) / sub, cfg.run_dir / sub)
    else:
        build_synthetic_run(cfg, args.rows, args.hidden, args.layers)
    n_rows = {s: pq.read_metadata(cfg.run_dir / "rows" / f"{s}.parquet").num_rows for s in ("sft", "kto")}
    ray.init(num_cpus=max(2, args.cpus), object_store_memory=300 * 1024**2, include_dashboard=False)

    results: dict[str, dict[str, list[dict]]] = {"sft": {"plain": [], "ray": []}, "kto": {"plain": [], "ray": []}}
    try:
        for r in range(args.repeats):
            results["sft"]["plain"].append(plain_trl(sft_job(cfg), args.cpus))
            results["sft"]["ray"].append(on_ray(sft_stage, cfg, output_name=f"sft_bench{r}"))
        init = cfg.run_dir / "checkpoints" / "sft_bench0"
        for r in range(args.repeats):
            results["kto"]["plain"].append(plain_trl(kto_job(cfg, init_model=init), args.cpus))
            results["kto"]["ray"].append(on_ray(kto_stage, cfg, init_model=init, output_name=f"kto_bench{r}"))
    finally:
        ray.shutdown()
        shutil.rmtree(tmp_root, ignore_errors=True)

    model = args.run_dir or f"synthetic Llama hidden={args.hidden} layers={args.layers}"
    print(f"\n{model}; rows sft={n_rows['sft']} kto={n_rows['kto']}; batch {args.batch}, epochs {args.epochs}, "
          f"{args.cpus} threads; median of {args.repeats}")
    print(f"{'stage':5} {'side':6} {'tokens':>8} {'loop tok/s':>11} {'e2e tok/s':>10} {'loop s':>7} {'wall s':>7}")
    for stage, sides in results.items():
        rates = {}
        for side, runs in sides.items():
            loop = statistics.median(x["tokens"] / x["loop_s"] for x in runs)
            e2e = statistics.median(x["tokens"] / x["wall_s"] for x in runs)
            rates[side] = (loop, e2e)
            print(f"{stage:5} {side:6} {int(runs[0]['tokens']):8d} {loop:11.0f} {e2e:10.0f} "
                  f"{statistics.median(x['loop_s'] for x in runs):7.1f} {statistics.median(x['wall_s'] for x in runs):7.1f}")
        threads = sides["ray"][0]["threads"]
        print(f"{stage:5} ratio Ray/plain: loop {rates['ray'][0] / rates['plain'][0]:.2f} (target >= 0.9), "
              f"end-to-end {rates['ray'][1] / rates['plain'][1]:.2f}; Ray worker torch threads {threads}")


if __name__ == "__main__":
    main()
