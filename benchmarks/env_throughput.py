"""User-steps per second of the batched echo-chamber env against per-user Python loops.

Same process, same user models, same random action streams. Three ways to play episodes:

- batched: ``EchoChamberEnv`` stepping every episode at once (what rollouts use);
- per-user loop: ``reference_episode``, the plain loop of the same rules over the user model's
  public pair API (what a per-user environment does with any user model);
- scalar loop (matrix model only): the authors' style, raw ``R[u, a]`` / ``D[a, b]`` lookups in
  Python, the fastest a per-user loop gets; its episode lengths are checked against the env's.

A user-step is one recommendation to a user whose episode is still running. Loops are timed on a
subset of episodes (each episode is independent, so the rate carries over); the batched env
replays its episodes until at least a second has been timed. Target (issue 3):
≥ 50× over the per-user loop for the matrix model at 10k users.

    python benchmarks/env_throughput.py                       # 1k, 10k, 100k users; matrix + deepfm
    python benchmarks/env_throughput.py --users 10000 --models matrix
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import pandas as pd

from ulrec.config import DeepFMConfig, EnvConfigSection
from ulrec.simulator import EchoChamberEnv, EnvConfig, MatrixUserModel, reference_episode
from ulrec.simulator.calibration import resolve_distance_threshold
from ulrec.simulator.user_models import UserModel


def matrix_model(n_users: int, n_items: int, rng: np.random.Generator) -> MatrixUserModel:
    rewards = rng.uniform(1.0, 5.0, (n_users, n_items)).astype(np.float32)
    vectors = rng.normal(size=(n_items, 16)).astype(np.float32)
    sq = (vectors**2).sum(1)
    distances = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * vectors @ vectors.T, 0)).astype(np.float32)
    np.fill_diagonal(distances, 0)
    return MatrixUserModel(rewards=rewards, distances=distances)


def deepfm_model(n_users: int, n_items: int, rng: np.random.Generator) -> UserModel:
    from ulrec.simulator import DeepFMUserModel

    n = 50_000
    ratings = pd.DataFrame(
        {
            "user_id": rng.integers(0, n_users, n),
            "item_id": rng.integers(0, n_items, n),
            "rating": rng.integers(1, 6, n).astype(np.float32),
        }
    )
    hp = DeepFMConfig(epochs=3, lr=0.01, holdout_fraction=0.0)
    return DeepFMUserModel.fit(ratings, n_users=n_users, n_items=n_items, hparams=hp, progress=False)


def env_config(um: UserModel, max_steps: int) -> EnvConfig:
    # Low exit rates so episodes run long enough for steady-state throughput; every rule is still
    # evaluated on every step.
    tau_d, _ = resolve_distance_threshold(um, EnvConfigSection(distance_quantile=0.01), seed=0)
    return EnvConfig(reward_threshold=1.2, distance_threshold=tau_d, window=4, max_steps=max_steps)


def run_batched(
    um: UserModel, cfg: EnvConfig, users: np.ndarray, actions: np.ndarray, min_seconds: float = 1.0
) -> tuple[float, np.ndarray]:
    """Mean rate over repeated plays of the same episodes, at least ``min_seconds`` in total (one
    play of 1k users takes milliseconds, too short to time on a shared machine)."""
    env = EchoChamberEnv(um, cfg)
    user_steps, elapsed = 0, 0.0
    while elapsed < min_seconds:
        start = time.perf_counter()
        env.reset(users)
        for step_items in actions:
            running = int((~env.done).sum())
            if running == 0:
                break
            env.step(step_items)
            user_steps += running
        elapsed += time.perf_counter() - start
    return user_steps / elapsed, env.lengths.copy()


def run_reference_loop(um: UserModel, cfg: EnvConfig, users: np.ndarray, actions: np.ndarray) -> float:
    user_steps = 0
    start = time.perf_counter()
    for k, user in enumerate(users):
        user_steps += len(reference_episode(um, int(user), actions[:, k].tolist(), cfg).reasons)
    return user_steps / (time.perf_counter() - start)


def run_scalar_loop(
    um: MatrixUserModel, cfg: EnvConfig, users: np.ndarray, actions: np.ndarray
) -> tuple[float, np.ndarray]:
    """The authors' style: one user at a time, raw array lookups."""
    rewards, distances = um.rewards, um.item_distances.matrix
    lengths = np.zeros(len(users), dtype=np.int64)
    user_steps = 0
    start = time.perf_counter()
    for k, user in enumerate(users):
        history: list[int] = []
        for item in actions[:, k].tolist():
            user_steps += 1
            if item in history or rewards[user, item] < cfg.reward_threshold:
                break
            if any(distances[item, prev] < cfg.distance_threshold for prev in history[-cfg.window :]):
                break
            history.append(item)
            if len(history) >= cfg.max_steps:
                break
        lengths[k] = len(history)
    return user_steps / (time.perf_counter() - start), lengths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--models", nargs="+", default=["matrix", "deepfm"], choices=["matrix", "deepfm"])
    parser.add_argument("--steps", type=int, default=30, help="max_steps of every episode")
    parser.add_argument("--model-users", type=int, default=10_000, help="distinct users in the user model")
    parser.add_argument("--items", type=int, default=2_000)
    parser.add_argument("--loop-episodes", type=int, default=2_000, help="episodes timed in the loops (matrix)")
    parser.add_argument("--deepfm-loop-episodes", type=int, default=300)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    rows = []
    for kind in args.models:
        build = matrix_model if kind == "matrix" else deepfm_model
        um = build(args.model_users, args.items, rng)
        cfg = env_config(um, args.steps)
        loop_n = args.loop_episodes if kind == "matrix" else args.deepfm_loop_episodes
        for n in args.users:
            users = np.arange(n) % args.model_users
            actions = rng.integers(0, args.items, (args.steps, n))
            batched, lengths = run_batched(um, cfg, users, actions)
            m = min(n, loop_n)
            loop = run_reference_loop(um, cfg, users[:m], actions[:, :m])
            scalar = None
            if isinstance(um, MatrixUserModel):
                scalar, scalar_lengths = run_scalar_loop(um, cfg, users[:m], actions[:, :m])
                assert np.array_equal(scalar_lengths, lengths[:m]), "scalar loop disagrees with the env"
            rows.append((kind, n, float(lengths.mean()), batched, loop, scalar, m))
            print(f"done {kind} {n}", flush=True)

    print(f"\nCPU cores: {os.cpu_count()}, load average at end: {os.getloadavg()[0]:.1f}; "
          f"{args.items} items, {args.model_users} model users, W=4, max_steps={args.steps}\n")
    print("| model | users | mean Len | batched user-steps/s | per-user loop user-steps/s | ratio "
          "| scalar loop user-steps/s | ratio vs scalar |")
    print("|:--|--:|--:|--:|--:|--:|--:|--:|")
    for kind, n, mean_len, batched, loop, scalar, m in rows:
        scalar_txt = f"{scalar:,.0f} | {batched / scalar:,.1f}×" if scalar else "– | –"
        print(f"| {kind} | {n:,} | {mean_len:.1f} | {batched:,.0f} | {loop:,.0f} (on {m:,}) "
              f"| {batched / loop:,.1f}× | {scalar_txt} |")


if __name__ == "__main__":
    main()
