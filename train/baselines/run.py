"""`ulrec baselines`: train every algorithm of ``baselines.algos`` on RLlib, evaluate it like the LLM
methods, write its episodes where the report finds them.

Per algorithm: ``<run>/baselines/<algo>/`` holds the RLlib checkpoint, ``summary.json`` and a
stage marker (an algorithm whose inputs did not change is skipped); ``<run>/eval/<algo>/`` holds
``episodes/`` (the rollout episode schema) and ``summary.json``. Offline methods share the
logged episodes in ``<run>/baselines/logged/``.
"""

from __future__ import annotations

import contextlib
import gc
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ulrec.config import Config
from ulrec.console import progress_bar
from ulrec.episodes import EPISODE_SCHEMA
from ulrec.episodes import write_episodes as write_episode_dataset
from ulrec.layout import EPISODES_DIR, SUMMARY_FILE
from ulrec.evaluation import select_eval_users, summarize_episodes, validation_users
from ulrec.io import atomic_path, read_json, write_json
from ulrec.resume import StageInputs, run_stage
from ulrec.simulator import EchoChamberEnv, UserModel
from ulrec.simulator.fit import load_env, load_simulator, simulator_path
from ulrec.tracking import StageLogger, stage_logger

from train.baselines.algos import OFFLINE_ALGOS, POLICY_ALGOS, budget_for, build_config
from train.baselines.curves import CurveTracker, curve_marks, mean_curve
from train.baselines.env import env_config, make_env, train_protocol
from train.baselines.seeding import ordered_ray_data
from train.baselines.evaluate import episode_rows, run_episodes, write_episode_rows
from train.baselines.logged import (
    EPISODE_COLUMN,
    BehaviourPolicy,
    collect_episodes,
    episode_stats,
    popularity_from_model,
    popularity_from_ratings,
    unpack_episode,
    write_episodes,
)

LOGGED_FILE = "episodes.parquet"
# Where RLlib keeps the trained module inside an algorithm checkpoint.
MODULE_IN_CHECKPOINT = Path("learner_group") / "learner" / "rl_module" / "default_policy"


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Tiny models step faster single-threaded (intra-op threads only add sync cost)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _baselines_settings(cfg: Config) -> dict[str, Any]:
    # Each training seed has its own resume key, so adding a seed trains only that one.
    return cfg.baselines.model_dump(mode="json", exclude={"algos", "enabled", "train_seeds", *cfg.baselines.not_stage_inputs})


def over_train_seeds(per_seed: dict[int, dict[str, Any]], pooled: dict[str, Any]) -> dict[str, Any]:
    """One method's summary across training seeds: Len and Traj Reward as mean ± sample std over
    the seeds' evaluation means (each itself a mean over eval seeds); exit and grounding shares of
    all the seeds' episodes (``pooled``)."""
    def mean_std(values: list[float]) -> tuple[float, float]:
        arr = np.asarray(values, dtype=float)
        return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0

    seeds = sorted(per_seed)
    curves = {}
    if all("curve" in per_seed[s] for s in seeds):
        curves = {"curve": mean_curve([per_seed[s]["curve"] for s in seeds]),
                  "curves": {str(s): per_seed[s]["curve"] for s in seeds}}
    len_mean, len_std = mean_std([per_seed[s]["len_mean"] for s in seeds])
    reward_mean, reward_std = mean_std([per_seed[s]["reward_mean"] for s in seeds])
    if len(seeds) == 1:  # one training seed: the ± stays the one over evaluation seeds
        len_std, reward_std = per_seed[seeds[0]]["len_std"], per_seed[seeds[0]]["reward_std"]
    return {
        **pooled,
        "len_mean": len_mean, "len_std": len_std, "reward_mean": reward_mean, "reward_std": reward_std,
        "std_over": "training seeds" if len(seeds) > 1 else "evaluation seeds",
        "train_seeds": seeds,
        "per_train_seed": {str(s): {k: per_seed[s][k] for k in ("len_mean", "len_std", "reward_mean", "reward_std")}
                           for s in seeds},
        **curves,
    }


# The logged episodes of the offline methods: the behaviour policy's settings on the train
# simulator. Each (method, training seed): every baselines setting but the method list and the
# seed list, the evaluation protocol, both simulators and the prepared data.
LOGGED_STAGE = StageInputs(
    "baselines logged data", ("env",),
    lambda cfg: {"simulators": cfg.layout.simulators, "data": cfg.layout.data,
                 "behaviour": [cfg.baselines.offline_episodes, cfg.baselines.behaviour_epsilon,
                               cfg.baselines.train_max_steps],
                 # Logged files written before the episodes had fixed ids are rewritten.
                 "episode_ids": "logged-<row>"},
)
BASELINE_STAGE = StageInputs(
    "baseline", ("env",),
    lambda cfg, algo, train_seed, logged=None: {
        "algo": algo, "train_seed": train_seed, "baselines": _baselines_settings(cfg),
        "eval": cfg.eval.model_dump(mode="json", include={"num_users", "user_seed", "max_steps", "seeds"}),
        "simulators": cfg.layout.simulators, "data": cfg.layout.data,
        # An offline method by the logged episodes it learns from (by content).
        **({"logged": Path(logged)} if logged is not None else {})},
)
# A method's pooled evaluation: its training seeds' outputs, each by its own resume key.
POOLED_STAGE = StageInputs("baseline over training seeds", (), lambda cfg, seed_dirs: {"seeds": list(seed_dirs)})


def _data_file(cfg: Config, name: str) -> Path | None:
    path = cfg.layout.data_file(name)
    return path if path.is_file() else None


# ------------------------------------------------------------------------------------ logged data
def ensure_logged_data(cfg: Config, train_model: UserModel, out_dir: Path) -> tuple[Path, dict[str, Any]]:
    """Behaviour-policy episodes on the train simulator as RLlib episode Parquet (cached)."""
    path = out_dir / LOGGED_FILE
    stats = run_stage(LOGGED_STAGE, cfg, out_dir, lambda _key: (_log_behaviour_episodes(cfg, train_model, out_dir), {}),
                      skipped=lambda _marker: read_json(out_dir / "stats.json"), required=(LOGGED_FILE, "stats.json"))
    return path, stats


def _log_behaviour_episodes(cfg: Config, train_model: UserModel, out_dir: Path) -> dict[str, Any]:
    b = cfg.baselines
    path = out_dir / LOGGED_FILE
    rng = np.random.default_rng(cfg.run.seed)
    sequences = None
    if _data_file(cfg, "train.parquet") is not None:
        from ulrec.data import load_prepared

        prepared = load_prepared(cfg.run_dir)
        popularity = popularity_from_ratings(prepared.train["item_id"].to_numpy(), train_model.n_items)
        sequences = prepared.user_histories("train")
    else:
        popularity = popularity_from_model(train_model, seed=cfg.run.seed)
    policy = BehaviourPolicy(popularity, b.behaviour_epsilon, rng, sequences=sequences)
    users = rng.choice(train_model.known_users(), size=b.offline_episodes, replace=True)
    env = EchoChamberEnv(train_model, train_protocol(cfg))
    episodes = collect_episodes(env, users, policy, window=max(cfg.env.window, 1))
    write_episodes(episodes, path)
    stats = episode_stats(episodes)
    write_json(out_dir / "stats.json", stats)
    return stats


def logged_sequences(path: Path) -> list[list[int]]:
    """The recommended items of every logged episode (DORL's entropy when no ratings exist)."""
    blobs = pd.read_parquet(path, columns=[EPISODE_COLUMN])[EPISODE_COLUMN]
    return [[int(a) for a in unpack_episode(blob).get_actions()] for blob in blobs]


# --------------------------------------------------------------------------------------- training
def _scalars(result: dict[str, Any]) -> dict[str, float]:
    """The few numbers worth logging from an RLlib result dict."""
    out: dict[str, float] = {}
    runners = result.get("env_runners", {}) or {}
    for key in ("episode_return_mean", "episode_len_mean", "num_env_steps_sampled_lifetime"):
        if isinstance(runners.get(key), (int, float)):
            out[key] = float(runners[key])
    for key, value in (result.get("learners", {}).get("default_policy", {}) or {}).items():
        if isinstance(value, (int, float, np.floating)) and ("loss" in key or "penalty" in key or key == "entropy"):
            out[key] = float(value)
    return out


def train_algorithm(
    algo_name: str, config: Any, budget_total: int, per_call: int, online: bool, logger: StageLogger, progress: bool,
    marks: Sequence[int] = (), at_mark: Callable[[Any, int], bool] | None = None,
) -> tuple[Any, int]:
    """Run ``algo.train()`` until the budget is spent, or until ``at_mark(algo, done)`` — called
    after each ``train()`` call that reached one or more of ``marks`` (once: a call that passes two
    marks has one policy to measure) — returns True; returns the algorithm and the amount done."""
    algo = config.build_algo()
    done = 0
    pending = list(marks)
    with progress_bar(total=budget_total, desc=f"baseline {algo_name}", enabled=progress, unit="step" if online else "upd") as bar:
        while done < budget_total:
            result = algo.train()
            new = (
                int(result.get("env_runners", {}).get("num_env_steps_sampled_lifetime", done + per_call))
                if online
                else done + per_call
            )
            bar.update(new - done)
            done = new
            logger.log({f"{algo_name}/{k}": v for k, v in _scalars(result).items()}, step=None)
            reached = [m for m in pending if m <= done]
            del pending[:len(reached)]
            if reached and at_mark is not None and at_mark(algo, done):
                break
    return algo, done


def load_trained_module(checkpoint: Path) -> Any:
    from ray.rllib.core.rl_module.rl_module import RLModule

    return RLModule.from_checkpoint(checkpoint / MODULE_IN_CHECKPOINT)


# ------------------------------------------------------------------------------------- evaluation
def evaluate_baseline(
    cfg: Config, algo_name: str, module: Any, test_env: EchoChamberEnv, users: list[int], titles: list[str] | None,
    out_dir: Path,
) -> dict[str, Any]:
    """The test-simulator episodes of one trained module into ``out_dir`` (a dataset directory)."""
    sample = algo_name in POLICY_ALGOS and cfg.baselines.eval_sample_policy
    played = run_episodes(module, test_env, users, list(cfg.eval.seeds), sample=sample)
    rows = episode_rows(played, run=cfg.run.name, policy=algo_name, split="test", titles=titles)
    episodes = write_episode_rows(rows, out_dir)
    summary = summarize_episodes(pd.read_parquet(episodes))
    summary.update(method=algo_name, label=algo_name.upper(), acting="sample" if sample else "greedy")
    return summary


def _curve_point(algo: Any, sample: bool, seed_dir: Path,
                 validation: tuple[EchoChamberEnv, list[int]]) -> float:
    """Len of the current policy on the validation users of the train simulator (one seed), read
    from a checkpoint exactly as the final evaluation reads it (``seed_dir/point``)."""
    point = seed_dir / "point"
    with atomic_path(point) as tmp:
        algo.save_to_path(tmp)
    env, val_users = validation
    played = run_episodes(load_trained_module(point), env, val_users, [0], sample=sample)
    return float(np.mean(played["length"]))


def _train_one_seed(
    cfg: Config, algo_name: str, train_seed: int, seed_dir: Path, env_config_: dict[str, Any],
    logged_path: Path | None, logged_stats: dict[str, Any] | None, probe: Any, test_env: EchoChamberEnv,
    users: list[int], titles: list[str] | None, logger: Any,
    validation: tuple[EchoChamberEnv, list[int]] | None = None,
) -> dict[str, Any]:
    """Train ``algo_name`` with RLlib seed ``train_seed``, checkpoint it and evaluate it (with
    ``validation``: its learning curve, and early stopping when ``baselines.patience`` is set)."""
    b = cfg.baselines
    budget = budget_for(algo_name, b)
    online = algo_name not in OFFLINE_ALGOS
    config = build_config(
        algo_name,
        b,
        seed=train_seed,
        env_config=env_config_ if online else None,
        logged_path=str(logged_path) if not online else None,
        observation_space=probe.observation_space,
        action_space=probe.action_space,
        logged_steps_per_episode=(
            logged_stats["transitions"] / max(logged_stats["episodes"], 1) if logged_stats else 4.0
        ),
    )
    checkpoint = seed_dir / "checkpoint"
    sample = algo_name in POLICY_ALGOS and b.eval_sample_policy
    tracker = CurveTracker(b.patience)
    keep_best = b.patience is not None

    def at_mark(algo: Any, done: int) -> bool:
        len_mean = _curve_point(algo, sample, seed_dir, validation)
        improved, stop = tracker.add(done, len_mean)
        logger.log({f"{algo_name}/seed{train_seed}/validation_len": len_mean,
                    f"{algo_name}/seed{train_seed}/validation_done": done})
        if keep_best and improved:  # the best point so far is the policy that goes to test
            with atomic_path(checkpoint) as tmp:
                (seed_dir / "point").rename(tmp)
        return stop

    marks = curve_marks(budget.total, b.curve_points) if validation is not None else []
    started = time.perf_counter()
    algo, done = train_algorithm(algo_name, config, budget.total, budget.per_call, online, logger, cfg.run.progress,
                                 marks=marks, at_mark=at_mark if marks else None)
    train_s = time.perf_counter() - started
    if not (keep_best and tracker.best is not None):
        with atomic_path(checkpoint) as tmp:
            algo.save_to_path(tmp)
    shutil.rmtree(seed_dir / "point", ignore_errors=True)
    algo.stop()
    # Drop the algorithm (and its Ray Data iterators) while Ray is still up.
    del algo
    gc.collect()

    started = time.perf_counter()
    summary = evaluate_baseline(cfg, algo_name, load_trained_module(checkpoint), test_env, users, titles,
                                seed_dir / EPISODES_DIR)
    summary["budget"] = {"unit": budget.unit, "planned": budget.total, "done": int(done)}
    if tracker.points:
        summary["curve"] = tracker.points
        summary["evaluated_at"] = tracker.best["done"] if keep_best else int(done)
    summary["train_s"] = train_s
    summary["eval_s"] = time.perf_counter() - started
    summary["train_seed"] = train_seed
    write_json(seed_dir / SUMMARY_FILE, summary)
    logger.log({f"{algo_name}/seed{train_seed}/eval_len_mean": summary["len_mean"]})
    return summary


def _pool_train_seeds(cfg: Config, algo_name: str, per_seed: dict[int, dict[str, Any]],
                      seed_dirs: list[Path]) -> dict[str, Any]:
    """The method's evaluation: every training seed's episodes in one dataset directory, and its
    summary over the seeds (:func:`over_train_seeds`)."""
    pooled_table = pa.concat_tables([pq.read_table(d / EPISODES_DIR, schema=EPISODE_SCHEMA) for d in seed_dirs])
    write_episode_dataset(pooled_table, cfg.layout.eval_episodes(algo_name))
    first = per_seed[min(per_seed)]
    summary = over_train_seeds(per_seed, summarize_episodes(pooled_table.to_pandas()))
    summary.update(method=algo_name, label=algo_name.upper(), acting=first["acting"], budget=first["budget"],
                   train_s=sum(p["train_s"] for p in per_seed.values()),
                   eval_s=sum(p["eval_s"] for p in per_seed.values()))
    write_json(cfg.layout.eval_summary(algo_name), summary)
    return summary


# ------------------------------------------------------------------------------------------ stage
def baselines_stage(cfg: Config) -> dict[str, Any]:
    """Train, checkpoint and evaluate every algorithm of ``cfg.baselines.algos``.

    Returns per algorithm Len and Traj Reward (mean ± std over eval seeds) and the budget used.
    """
    from ulrec.ray_session import init_ray

    # RLlib takes checkpoint and data paths as URIs (a relative path is an error there), and its
    # workers may not share our working directory: every path of this stage is absolute.
    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"root": str(Path(cfg.run.root).resolve())})})
    b = cfg.baselines
    out_root = cfg.layout.baselines
    train_dir = simulator_path(cfg, "train")
    train_model = load_simulator(cfg, "train")
    protocol = train_protocol(cfg)
    base_env_config = env_config(train_dir, protocol)
    probe = make_env(base_env_config)
    users = select_eval_users(cfg, "test")
    test_env = load_env(cfg, "test", max_steps=cfg.eval.max_steps)
    validation = None
    if b.curve_points:  # learning curves on validation users of the train simulator, never test
        validation = (load_env(cfg, "train", max_steps=cfg.eval.max_steps),
                      validation_users(cfg, b.curve_validation_users))
    titles = None
    if _data_file(cfg, "items.parquet") is not None:
        from ulrec.data import load_prepared

        titles = load_prepared(cfg.run_dir).titles

    init_ray(cfg)
    from rollout.engines import make_room

    make_room({"CPU": 1.0}, "the RL baselines")  # RLlib learns in this process; Ray Data asks 0.5 CPU
    results: dict[str, Any] = {}
    with torch_threads(1), ordered_ray_data(), stage_logger(cfg, "baselines", out_root) as logger:
        logged_path = logged_stats = None
        needs_logs = any(a in OFFLINE_ALGOS for a in b.algos) or ("dorl" in b.algos and _data_file(cfg, "train.parquet") is None)
        if needs_logs:
            logged_path, logged_stats = ensure_logged_data(cfg, train_model, out_root / "logged")
            logger.log({f"logged/{k}": v for k, v in logged_stats.items()})
        for algo_name in b.algos:
            algo_dir = out_root / algo_name
            env_configs: list[dict[str, Any]] = []

            def algo_env_config() -> dict[str, Any]:
                # DORL's ensemble is fitted only when a training seed actually runs.
                if not env_configs:
                    env_configs.append(base_env_config)
                    if algo_name == "dorl":
                        from train.baselines.dorl import prepare_dorl

                        sequences = logged_sequences(logged_path) if logged_path is not None else []
                        env_configs[0] = {**base_env_config,
                                          "dorl": prepare_dorl(cfg, train_dir, train_model, sequences, algo_dir / "dorl")}
                return env_configs[0]

            per_seed: dict[int, dict[str, Any]] = {}
            for train_seed in b.train_seeds:
                seed_dir = algo_dir / f"seed{train_seed}"
                per_seed[train_seed] = run_stage(
                    BASELINE_STAGE, cfg, seed_dir,
                    lambda _key: (_train_one_seed(cfg, algo_name, train_seed, seed_dir, algo_env_config(), logged_path,
                                             logged_stats, probe, test_env, users, titles, logger, validation), {}),
                    skipped=lambda _marker: read_json(seed_dir / SUMMARY_FILE), required=(SUMMARY_FILE,),
                    algo=algo_name, train_seed=train_seed,
                    logged=logged_path if algo_name in OFFLINE_ALGOS else None)
            seed_dirs = [algo_dir / f"seed{s}" for s in b.train_seeds]
            summary = run_stage(
                POOLED_STAGE, cfg, cfg.layout.eval_method(algo_name),
                lambda _key: (_pool_train_seeds(cfg, algo_name, per_seed, seed_dirs), {}),
                skipped=lambda _marker: read_json(cfg.layout.eval_summary(algo_name)),
                required=(SUMMARY_FILE, EPISODES_DIR), seed_dirs=seed_dirs)
            write_json(algo_dir / SUMMARY_FILE, summary)
            logger.log({f"{algo_name}/eval_len_mean": summary["len_mean"], f"{algo_name}/eval_len_std": summary["len_std"],
                        f"{algo_name}/eval_reward_mean": summary["reward_mean"]})
            results[algo_name] = summary
        table = {
            name: {
                "Len": f"{s['len_mean']:.2f} ± {s['len_std']:.2f}",
                "Traj Reward": f"{s['reward_mean']:.2f} ± {s['reward_std']:.2f}",
                "budget": s["budget"],
            }
            for name, s in results.items()
        }
        logger.summary({f"{n}/len_mean": s["len_mean"] for n, s in results.items()})
    write_json(out_root / "summary.json", table)
    return table
