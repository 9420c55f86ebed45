"""Rollout throughput: generated tokens/s of a full rollout vs the same engine's raw generate.

    .venv/bin/python benchmarks/rollout_throughput.py [--config FILE] [key=value ...]
        [--users N] [--max-steps N] [--repeats N] [--build-synthetic] [--no-raw]
        [--engines sync,async] [--out-dir DIR]

For each engine mode in ``--engines`` (``policy.engine``; default: the config's), in turn:

1. Runs a rollout (``rollout.driver.run_rollout``: replicas, shards, grounding, Parquet) and takes
   its generated tokens / rollout seconds (engine start-up excluded).
2. Re-generates exactly the prompts that rollout sent (read back from its Parquet, with their
   per-request seeds) on a fresh replica-sized actor holding the same engine with the same
   settings, as fast as that engine serves them: the sync engine in ``rollout.max_batch_size``
   batches, the async one (AsyncLLM) with every request in flight at once. Takes tokens / seconds
   (the physical limit of that engine on this machine for those requests).
3. Re-generates them once more on another fresh such actor in *step waves*: every user's step-k request in one
   call (sync: in ``rollout.max_batch_size`` batches; async: all in flight), the waves in step
   order. This limit keeps the one dependency a rollout cannot avoid (a user's step k+1 prompt
   needs its step-k answer) and nothing else (no grounding, env steps or actor messages), so
   rollout / waves measures the rollout's own overhead and waves / raw what the dependency chain
   costs (fewer users are live each step, so later batches are small).
4. Prints ratio = rollout / raw per engine (target >= 0.9), the ratios across engines measured in
   the same run, vLLM's prefix-cache hit rate where the engine reports it (the async engine), the
   grounding rates, the peak resident memory of the whole process tree (driver, Ray daemons and
   actors) and CPU seconds per process role and phase, including what other processes on the
   machine used meanwhile (on a shared machine that contention moves both numbers; ``--repeats``
   alternates the two measurements).

``--build-synthetic`` first prepares what the run directory lacks: data (cfg.data), the base model
(cfg.model) and, for each split, a matrix simulator with random rewards (so any number of users
can be simulated cheaply). With an existing run (``ulrec data prepare``, ``env fit``, ``model
init``) nothing is built. The rollout's episodes go to ``--out-dir`` (default
``runs/<name>/rollouts/benchmark``); nothing else is written to the run directory.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
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
from ulrec.policy import AsyncPolicy, resolve_model_dir  # noqa: E402


class ProcessMonitor:
    """Samples this process tree every ``interval_s``: peak summed RSS, and CPU seconds per role
    and per phase, plus the CPU the rest of the machine used meanwhile (contention)."""

    ROLES = ("EngineCore", "UserShard", "PolicyReplica", "RawEngine", "raylet", "gcs_server", "dashboard", "IDLE")

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
            # AsyncLLM's engine core (a child of its actor) is named by its process title.
            name = f"{proc.name()} {' '.join(proc.cmdline()[:1])}"
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
    """The replica's engine alone: plain generate, timed inside the actor.

    Sync engine: batches on a worker thread exactly as in ``PolicyReplica`` (it matters on CPU:
    vLLM binds its OpenMP threads on the thread that built the engine, and a worker thread's team
    is not bound the same way, which measured ~2x apart here). Async engine: every request
    submitted at once on the actor's event loop, the engine schedules them.
    """

    def __init__(self, policy_factory, titles: list[str]) -> None:
        self.policy = policy_factory(titles)
        self.pool = ThreadPoolExecutor(1)

    def ready(self) -> bool:
        return True

    async def generate(self, prompts: list[str], seeds: list[int], temperature: float, batch_size: int) -> dict:
        return await self.generate_waves([(prompts, seeds)], temperature, batch_size)

    async def generate_waves(self, waves: list[tuple[list[str], list[int]]], temperature: float, batch_size: int) -> dict:
        """Each wave's requests as fast as the engine serves them, the waves one after another."""
        before = prefix_cache_of(self.policy)
        started = time.perf_counter()
        tokens = 0
        loop = asyncio.get_running_loop()
        for prompts, seeds in waves:
            if isinstance(self.policy, AsyncPolicy):
                results = await self.policy.generate_async(prompts, seeds, temperature)
                tokens += sum(r.num_tokens for r in results)
            else:
                tokens += await loop.run_in_executor(self.pool, self._batches, prompts, seeds, temperature, batch_size)
        seconds = time.perf_counter() - started
        after = prefix_cache_of(self.policy)
        cache = None if after is None else {k: after[k] - before[k] for k in after}
        return {"tokens": tokens, "seconds": seconds, "prefix_cache": cache}

    def _batches(self, prompts: list[str], seeds: list[int], temperature: float, batch_size: int) -> int:
        tokens = 0
        for start in range(0, len(prompts), batch_size):
            batch = slice(start, start + batch_size)
            tokens += sum(r.num_tokens for r in self.policy.generate(prompts[batch], seeds[batch], temperature))
        return tokens


def prefix_cache_of(policy) -> dict | None:
    counts = getattr(policy, "prefix_cache", None)
    return counts() if counts else None


def hit_rate(counts: dict | None) -> float | None:
    """Prefix-cache hits / queries (prompt tokens), None where the engine does not report them."""
    return counts["hits"] / counts["queries"] if counts and counts["queries"] else None


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


def rollout_requests(out_dir: Path) -> list[tuple[int, str, int]]:
    """Every request the rollout sent as (step, prompt, sampling seed), in (step, user, seed) order."""
    table = pq.read_table(out_dir, columns=["user_id", "seed", "steps"])
    requests = []
    for user, seed, steps in zip(*(table.column(c).to_pylist() for c in ("user_id", "seed", "steps"))):
        for step in steps:
            requests.append((step["step"], user, seed, step["prompt"]))
    requests.sort(key=lambda r: r[:3])
    return [(r[0], r[3], generation_seed(r[2], r[1], r[0])) for r in requests]


def step_waves(requests: list[tuple[int, str, int]]) -> list[tuple[list[str], list[int]]]:
    """The requests grouped by step, in step order: (prompts, seeds) per step."""
    waves: dict[int, tuple[list[str], list[int]]] = {}
    for step, prompt, seed in requests:
        prompts, seeds = waves.setdefault(step, ([], []))
        prompts.append(prompt)
        seeds.append(seed)
    return [waves[k] for k in sorted(waves)]


def measure(cfg: Config, args, users: list[int], max_steps: int, out_dir: Path, monitor: ProcessMonitor) -> dict:
    """Rollout(s) and raw generate(s) on ``cfg``'s engine, alternated ``args.repeats`` times."""
    ro = cfg.rollout
    engine_mode = cfg.policy.engine
    model_dir = resolve_model_dir(cfg)
    rollouts, raws, waves, requests_digest = [], [], [], None
    for _ in range(args.repeats):
        monitor.enter_phase(f"{engine_mode}:startup")
        summary = run_rollout(
            cfg, model_dir=str(model_dir), split=ro.split, user_ids=users, seeds=list(ro.seeds),
            temperature=ro.temperature, max_steps=max_steps, out_dir=out_dir, policy_name="benchmark",
        )
        rollouts.append(summary)
        requests = rollout_requests(out_dir)
        prompts, seeds = [r[1] for r in requests], [r[2] for r in requests]
        requests_digest = hashlib.sha256(json.dumps([prompts, seeds]).encode()).hexdigest()[:16]
        if args.no_raw:
            continue
        # A fresh engine per measurement, like the rollout's replica: a cold prefix cache each time
        # (the requests repeat exactly; on the raw pass's warm cache the waves would hit more often
        # than the rollout could), and its CPUs free again for the next rollout's actors.
        sources = run_sources(cfg, model_dir=str(model_dir), split=ro.split, max_steps=max_steps)

        def on_fresh_engine(phase: str, method: str, *call_args):
            monitor.enter_phase(f"{engine_mode}:startup")
            engine = RawEngine.options(num_cpus=ro.replica_num_cpus, num_gpus=ro.replica_num_gpus).remote(
                sources.policy_factory, sources.titles
            )
            ray.get(engine.ready.remote())
            monitor.enter_phase(f"{engine_mode}:{phase}")
            result = ray.get(getattr(engine, method).remote(*call_args))
            ray.kill(engine)
            return result

        raws.append(on_fresh_engine("raw", "generate", prompts, seeds, ro.temperature, ro.max_batch_size))
        waves.append(on_fresh_engine("waves", "generate_waves", step_waves(requests), ro.temperature, ro.max_batch_size))
        monitor.enter_phase("between")
    caches = [s["prefix_cache"] for r in rollouts for s in r["replica_stats"] if s and "prefix_cache" in s]
    rollout_cache = {k: sum(c[k] for c in caches) for k in ("queries", "hits")} if caches else None
    raw_caches = [r["prefix_cache"] for r in raws if r["prefix_cache"]]
    raw_cache = {k: sum(c[k] for c in raw_caches) for k in ("queries", "hits")} if raw_caches else None
    result = {
        "summary": rollouts[-1],
        "requests_sha256": requests_digest,
        "rollouts": [
            {k: r[k] for k in ("generated_tokens", "wall_s", "tokens_per_s", "startup_s")} for r in rollouts
        ],
        "raws": [{**r, "tokens_per_s": r["tokens"] / r["seconds"]} for r in raws],
        "step_waves": [{**w, "tokens_per_s": w["tokens"] / w["seconds"]} for w in waves],
        "rollout_tokens_per_s": sum(r["generated_tokens"] for r in rollouts) / sum(r["wall_s"] for r in rollouts),
        "prefix_cache_hit_rate": {"rollout": hit_rate(rollout_cache), "raw": hit_rate(raw_cache)},
    }
    if raws:
        raw_rate = sum(r["tokens"] for r in raws) / sum(r["seconds"] for r in raws)
        result.update(
            raw_tokens_per_s=raw_rate,
            ratio=result["rollout_tokens_per_s"] / raw_rate,
            ratios_per_repeat=[r["tokens_per_s"] / w["tokens_per_s"] for r, w in zip(result["rollouts"], result["raws"])],
        )
        wave_rate = sum(w["tokens"] for w in waves) / sum(w["seconds"] for w in waves)
        result.update(step_waves_tokens_per_s=wave_rate, ratio_to_step_waves=result["rollout_tokens_per_s"] / wave_rate,
                      step_waves_to_raw=wave_rate / raw_rate)
    return result


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
    parser.add_argument("--engines", default=None, help="policy.engine values measured in turn, e.g. sync,async")
    parser.add_argument("--out-dir", default=None, help="the rollout's Parquet (default runs/<name>/rollouts/benchmark)")
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
    out_dir = Path(args.out_dir) if args.out_dir else cfg.run_dir / "rollouts" / "benchmark"
    engines = args.engines.split(",") if args.engines else [cfg.policy.engine]

    by_engine = {}
    with ProcessMonitor() as monitor:
        for engine in engines:
            engine_cfg = load_config(args.config, [*args.overrides, f"policy.engine={engine}"])
            by_engine[engine] = measure(engine_cfg, args, users, max_steps, out_dir, monitor)
    # The rollout's CPU is attributed to "startup" until its actors are up; the per-phase numbers
    # are for reading contention, not exact accounting.
    summary = by_engine[engines[-1]]["summary"]
    result = {
        "backend": cfg.policy.backend,
        "model_dir": str(resolve_model_dir(cfg)),
        "users": len(users),
        "episodes": summary["episodes"],
        "steps": summary["steps"],
        "mean_length": summary["mean_length"],
        "grounding": summary["grounding"],
        "exit_reasons": summary["exit_reasons"],
        "engines": {e: {k: v for k, v in m.items() if k != "summary"} for e, m in by_engine.items()},
        "cpu_seconds": {p: {k: round(v, 1) for k, v in roles.items()} for p, roles in monitor.cpu_s.items()},
        "peak_rss_gib": monitor.peak_total / 1024**3,
        "peak_rss_gib_by_role": {k: round(v / 1024**3, 3) for k, v in sorted(monitor.peak_by_role.items())},
    }
    if len(engines) > 1:
        # Every engine served the same requests (per-request seeds): same digest of prompts + seeds.
        result["same_requests"] = len({m["requests_sha256"] for m in by_engine.values()}) == 1
        best_raw = max((m["raw_tokens_per_s"] for m in by_engine.values() if "raw_tokens_per_s" in m), default=None)
        result["cross"] = {
            f"{a}/{b}": by_engine[a]["rollout_tokens_per_s"] / by_engine[b]["rollout_tokens_per_s"]
            for a in engines for b in engines if a != b
        }
        if best_raw:
            result["ratio_to_best_raw"] = {e: m["rollout_tokens_per_s"] / best_raw for e, m in by_engine.items()}
    print(json.dumps(result, indent=2))
    for engine, m in by_engine.items():
        line = f"[{engine}] rollout {m['rollout_tokens_per_s']:.0f} tok/s"
        if "ratio" in m:
            line += (
                f" vs raw generate {m['raw_tokens_per_s']:.0f} tok/s over {len(m['raws'])} repeat(s): "
                f"ratio {m['ratio']:.3f} (target >= 0.9); per repeat "
                + ", ".join(f"{r:.3f}" for r in m["ratios_per_repeat"])
            )
        if "ratio_to_step_waves" in m:
            line += (f"; step waves {m['step_waves_tokens_per_s']:.0f} tok/s: rollout / waves "
                     f"{m['ratio_to_step_waves']:.3f}, waves / raw {m['step_waves_to_raw']:.3f}")
        rates = m["prefix_cache_hit_rate"]
        if rates["rollout"] is not None:
            line += f"; prefix-cache hit rate rollout {rates['rollout']:.3f}"
            if rates["raw"] is not None:
                line += f", raw {rates['raw']:.3f}"
        print(line)
    if "cross" in result:
        print("across engines (same run): " + ", ".join(f"{k} {v:.3f}" for k, v in result["cross"].items())
              + f"; same requests: {result['same_requests']}")
    if "ratio_to_best_raw" in result:
        print("rollout / fastest raw engine: " + ", ".join(f"{k} {v:.3f}" for k, v in result["ratio_to_best_raw"].items()))
    g = summary["grounding"]
    print(
        f"grounding: exact {g['exact']:.3f}, substituted {g['substituted']:.3f}, "
        f"format errors {g['format_error']:.3f}"
    )
    print(f"peak RSS of the process tree: {result['peak_rss_gib']:.2f} GiB")
    return result


if __name__ == "__main__":
    main()
