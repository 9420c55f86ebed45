"""Rollout throughput: generated tokens/s of a full rollout vs the same engine's raw generate.

    .venv/bin/python benchmarks/rollout_throughput.py [--config FILE] [key=value ...]
        [--users N] [--max-steps N] [--repeats N] [--build-synthetic] [--no-raw]

1. Runs a rollout (``rollout.driver.run_rollout``: replicas, shards, grounding, Parquet) and takes
   its generated tokens / rollout seconds (engine start-up excluded).
2. Re-generates exactly the prompts that rollout sent (read back from its Parquet, with their
   per-request seeds) on a fresh replica-sized actor holding the same engine with the same
   settings, in ``rollout.max_batch_size`` batches, and takes tokens / seconds.
3. Prints ratio = rollout / raw (target >= 0.9), the grounding rates, the peak resident memory
   of the whole process tree (driver, Ray daemons and actors) and CPU seconds per process role
   and phase, including what other processes on the machine used meanwhile (on a shared machine
   that contention moves both numbers; ``--repeats`` alternates the two measurements).

``--build-synthetic`` first prepares what the run directory lacks: data (cfg.data), the base model
(cfg.model) and, for each split, a matrix simulator with random rewards (so any number of users
can be simulated cheaply). With an existing run (``ulrec data prepare``, ``env fit``, ``model
init``) nothing is built.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ulrec.runtime_env import apply_defaults  # noqa: E402

apply_defaults()

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rollout.driver import run_rollout, run_sources  # noqa: E402
from rollout.episode import generation_seed  # noqa: E402
from ulrec.config import Config, load_config  # noqa: E402
from ulrec.policy import resolve_model_dir  # noqa: E402


class ProcessMonitor:
    """Samples this process tree every ``interval_s``: peak summed RSS, and CPU seconds per role
    and per phase, plus the CPU the rest of the machine used meanwhile (contention)."""

    ROLES = ("UserShard", "PolicyReplica", "RawEngine", "raylet", "gcs_server", "dashboard", "IDLE")

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.peak_total = 0
        self.peak_by_role: dict[str, int] = {}
        self.cpu_s: dict[str, dict[str, float]] = {}  # phase -> role -> CPU seconds
        self.phase = "setup"
        self._last_cpu: dict[int, float] = {}
        self._last_machine = self._machine_busy()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _machine_busy() -> float:
        t = psutil.cpu_times()
        return t.user + t.system + getattr(t, "nice", 0.0)

    def _role(self, proc: psutil.Process) -> str:
        if proc.pid == os.getpid():
            return "driver"
        try:
            name = " ".join(proc.cmdline()[:1]) or proc.name()
        except psutil.Error:
            return "other"
        return next((role for role in self.ROLES if role in name), "other")

    def _sample(self) -> None:
        me = psutil.Process()
        rss_by_role: dict[str, int] = {}
        cpu = self.cpu_s.setdefault(self.phase, {})
        ours = 0.0
        for proc in [me] + me.children(recursive=True):
            try:
                with proc.oneshot():
                    rss = proc.memory_info().rss
                    times = proc.cpu_times()
            except psutil.Error:
                continue
            role = self._role(proc)
            rss_by_role[role] = rss_by_role.get(role, 0) + rss
            used = times.user + times.system
            delta = used - self._last_cpu.get(proc.pid, 0.0)  # a new process: all its CPU so far
            self._last_cpu[proc.pid] = used
            cpu[role] = cpu.get(role, 0.0) + delta
            ours += delta
        machine = self._machine_busy()
        cpu["(other processes)"] = cpu.get("(other processes)", 0.0) + max(machine - self._last_machine - ours, 0.0)
        self._last_machine = machine
        self.peak_total = max(self.peak_total, sum(rss_by_role.values()))
        for role, rss in rss_by_role.items():
            self.peak_by_role[role] = max(self.peak_by_role.get(role, 0), rss)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    def enter_phase(self, phase: str) -> None:
        self._sample()
        self.phase = phase

    def __enter__(self) -> "ProcessMonitor":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


@ray.remote
class RawEngine:
    """The replica's engine alone: plain batch generate, timed inside the actor.

    Generation runs on a worker thread exactly as in ``PolicyReplica`` (it matters on CPU: vLLM
    binds its OpenMP threads on the thread that built the engine, and a worker thread's team is
    not bound the same way, which measured ~2x apart here).
    """

    def __init__(self, policy_factory, titles: list[str]) -> None:
        self.policy = policy_factory(titles)
        self.pool = ThreadPoolExecutor(1)

    def ready(self) -> bool:
        return True

    def generate(self, prompts: list[str], seeds: list[int], temperature: float, batch_size: int) -> dict:
        return self.pool.submit(self._generate, prompts, seeds, temperature, batch_size).result()

    def _generate(self, prompts: list[str], seeds: list[int], temperature: float, batch_size: int) -> dict:
        tokens, started = 0, time.perf_counter()
        for start in range(0, len(prompts), batch_size):
            batch = slice(start, start + batch_size)
            results = self.policy.generate(prompts[batch], seeds[batch], temperature)
            tokens += sum(r.num_tokens for r in results)
        return {"tokens": tokens, "seconds": time.perf_counter() - started}


def build_synthetic(cfg: Config) -> None:
    """Prepare data, base model and random matrix simulators where the run directory lacks them."""
    from ulrec.data import load_prepared, prepare_data
    from ulrec.model_init import build_base_model
    from ulrec.simulator import MatrixUserModel

    prepare_data(cfg)
    if not (resolve_model_dir(cfg) / "config.json").is_file():
        build_base_model(cfg)
    data = load_prepared(cfg.run_dir)
    rng = np.random.default_rng(cfg.run.seed)
    for split in ("train", "test"):
        path = cfg.run_dir / "simulators" / split
        if not (path / "meta.json").is_file():
            rewards = rng.choice([1.0, 3.0, 4.0, 5.0], p=[0.1, 0.3, 0.3, 0.3], size=(data.num_users, data.num_items))
            vectors = rng.normal(size=(data.num_items, 8)).astype(np.float32)
            MatrixUserModel(rewards=rewards.astype(np.float32), item_vectors=vectors).save(path)


def rollout_prompts(out_dir: Path) -> tuple[list[str], list[int]]:
    """Every prompt the rollout sent with its sampling seed, in (step, user, seed) order."""
    table = pq.read_table(out_dir, columns=["user_id", "seed", "steps"])
    requests = []
    for user, seed, steps in zip(*(table.column(c).to_pylist() for c in ("user_id", "seed", "steps"))):
        for step in steps:
            requests.append((step["step"], user, seed, step["prompt"]))
    requests.sort(key=lambda r: r[:3])
    return [r[3] for r in requests], [generation_seed(r[2], r[1], r[0]) for r in requests]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=None)
    parser.add_argument("--users", type=int, default=None, help="default: rollout.num_users")
    parser.add_argument("--max-steps", type=int, default=None, help="default: rollout.max_steps")
    parser.add_argument("--build-synthetic", action="store_true")
    parser.add_argument("--no-raw", action="store_true", help="skip the raw-generate baseline")
    parser.add_argument(
        "--repeats", type=int, default=1, help="alternate rollout and raw generate this many times (load drifts)"
    )
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.build_synthetic:
        build_synthetic(cfg)

    from ulrec.data import load_prepared
    from ulrec.evaluation import draw_users, eval_user_pool

    ro = cfg.rollout
    num_users = args.users or ro.num_users
    max_steps = args.max_steps or ro.max_steps
    histories = load_prepared(cfg.run_dir).user_histories(ro.split)
    users = draw_users(eval_user_pool(histories), num_users, cfg.run.seed)
    model_dir = resolve_model_dir(cfg)
    out_dir = cfg.run_dir / "rollouts" / "benchmark"

    rollouts, raws = [], []
    with ProcessMonitor() as monitor:
        engine = None
        for _ in range(args.repeats):
            monitor.enter_phase("startup")
            summary = run_rollout(
                cfg, model_dir=str(model_dir), split=ro.split, user_ids=users, seeds=list(ro.seeds),
                temperature=ro.temperature, max_steps=max_steps, out_dir=out_dir, policy_name="benchmark",
            )
            rollouts.append(summary)
            if args.no_raw:
                continue
            prompts, seeds = rollout_prompts(out_dir)
            if engine is None:
                monitor.enter_phase("startup")
                sources = run_sources(cfg, model_dir=str(model_dir), split=ro.split, max_steps=max_steps)
                engine = RawEngine.options(num_cpus=ro.replica_num_cpus, num_gpus=ro.replica_num_gpus).remote(
                    sources.policy_factory, sources.titles
                )
                ray.get(engine.ready.remote())
            monitor.enter_phase("raw")
            raws.append(ray.get(engine.generate.remote(prompts, seeds, ro.temperature, ro.max_batch_size)))
            monitor.enter_phase("between")
        if engine is not None:
            ray.kill(engine)
    # The rollout's CPU is attributed to "startup" until its actors are up; the per-phase numbers
    # are for reading contention, not exact accounting.
    summary = rollouts[-1]
    result = {
        "backend": cfg.policy.backend,
        "model_dir": str(model_dir),
        "users": len(users),
        "episodes": summary["episodes"],
        "steps": summary["steps"],
        "mean_length": summary["mean_length"],
        "grounding": summary["grounding"],
        "exit_reasons": summary["exit_reasons"],
        "rollouts": [
            {k: r[k] for k in ("generated_tokens", "wall_s", "tokens_per_s", "startup_s")} for r in rollouts
        ],
        "raws": [{**r, "tokens_per_s": r["tokens"] / r["seconds"]} for r in raws],
        "cpu_seconds": {p: {k: round(v, 1) for k, v in roles.items()} for p, roles in monitor.cpu_s.items()},
        "peak_rss_gib": monitor.peak_total / 1024**3,
        "peak_rss_gib_by_role": {k: round(v / 1024**3, 3) for k, v in sorted(monitor.peak_by_role.items())},
    }
    rollout_rate = sum(r["generated_tokens"] for r in rollouts) / sum(r["wall_s"] for r in rollouts)
    if raws:
        raw_rate = sum(r["tokens"] for r in raws) / sum(r["seconds"] for r in raws)
        result.update(
            rollout_tokens_per_s=rollout_rate,
            raw_tokens_per_s=raw_rate,
            ratio=rollout_rate / raw_rate,
            ratios_per_repeat=[r["tokens_per_s"] / w["tokens_per_s"] for r, w in zip(rollouts, result["raws"])],
        )
    print(json.dumps(result, indent=2))
    if raws:
        print(
            f"rollout {rollout_rate:.0f} tok/s vs raw generate {raw_rate:.0f} tok/s over {len(raws)} repeat(s): "
            f"ratio {result['ratio']:.3f} (target >= 0.9); per repeat "
            + ", ".join(f"{r:.3f}" for r in result["ratios_per_repeat"])
        )
    g = summary["grounding"]
    print(
        f"grounding: exact {g['exact']:.3f}, substituted {g['substituted']:.3f}, "
        f"format errors {g['format_error']:.3f}"
    )
    print(f"peak RSS of the process tree: {result['peak_rss_gib']:.2f} GiB")
    return result


if __name__ == "__main__":
    main()
