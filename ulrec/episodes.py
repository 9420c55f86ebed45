"""The episode format, once: how episodes end, their Parquet schema, the row builders, the on-disk form.

Every producer of episodes — LLM rollouts (``rollout/``), the RL baselines (``train/baselines/``),
the tests — builds rows with :func:`step_row` / :func:`episode_row` and writes them as a Parquet
dataset directory (``runs/<name>/eval/<method>/episodes/``); every reader (evaluation, report,
feedback rows) reads that form with :func:`read_episodes`.

Reasons are named for who ended the episode:

- ``ENV_EXITS``: the simulated user left (the exit protocol of ``ulrec.simulator.env``);
- ``POLICY_EXITS``: the policy's answer could not be read, so the episode stops there;
- ``USER_EXITS`` = both: the step that ended the episode is unpaired negative feedback;
- ``TRUNCATED`` ("horizon"): the episode reached ``max_steps``; the user did not leave;
- ``END_REASONS``: every way an episode ends; a step's reason is ``"stay"`` or one of these.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import pyarrow as pa

ENV_EXITS = ("repeat", "low_reward", "similar")
POLICY_EXITS = ("format_error",)
USER_EXITS = ENV_EXITS + POLICY_EXITS
TRUNCATED = "horizon"
END_REASONS = USER_EXITS + (TRUNCATED,)
STAY = "stay"
STEP_REASONS = (STAY,) + END_REASONS

STEP_TYPE = pa.struct(
    [
        ("step", pa.int64()),
        ("prompt", pa.string()),
        ("raw_output", pa.string()),
        ("item_id", pa.int64()),
        ("title", pa.string()),
        ("substituted", pa.bool_()),
        ("reward", pa.float64()),
        ("live", pa.bool_()),
        ("reason", pa.string()),
    ]
)

# One row per (user, seed) episode.
EPISODE_SCHEMA = pa.schema(
    [
        ("run", pa.string()),
        ("policy", pa.string()),
        ("split", pa.string()),
        ("user_id", pa.int64()),
        ("seed", pa.int64()),
        ("length", pa.int64()),
        ("total_reward", pa.float64()),
        ("exit_reason", pa.string()),
        ("num_generated_tokens", pa.int64()),
        ("steps", pa.list_(STEP_TYPE)),
    ]
)


def step_row(
    step: int, *, item_id: int, title: str, reward: float, live: bool, reason: str,
    prompt: str = "", raw_output: str = "", substituted: bool = False,
) -> dict[str, Any]:
    """One step of an episode (``STEP_TYPE``); policies without text leave prompt/output empty."""
    if reason not in STEP_REASONS:
        raise ValueError(f"step {step}: unknown reason {reason!r} (one of {STEP_REASONS})")
    return {"step": int(step), "prompt": prompt, "raw_output": raw_output, "item_id": int(item_id),
            "title": title, "substituted": bool(substituted), "reward": float(reward), "live": bool(live),
            "reason": reason}


def episode_row(
    *, run: str, policy: str, split: str, user_id: int, seed: int, length: int, total_reward: float,
    exit_reason: str, steps: Sequence[dict[str, Any]], num_generated_tokens: int = 0,
) -> dict[str, Any]:
    """One finished episode (``EPISODE_SCHEMA``)."""
    if exit_reason not in END_REASONS:
        raise ValueError(f"episode of user {user_id} is not finished (reason {exit_reason!r})")
    return {"run": run, "policy": policy, "split": split, "user_id": int(user_id), "seed": int(seed),
            "length": int(length), "total_reward": float(total_reward), "exit_reason": exit_reason,
            "num_generated_tokens": int(num_generated_tokens), "steps": list(steps)}


def episodes_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=EPISODE_SCHEMA)


def write_episodes(rows: Iterable[dict[str, Any]] | pa.Table, directory: str | Path) -> Path:
    """Episodes as a Parquet dataset directory, written whole or not at all."""
    import pyarrow.parquet as pq

    from ulrec.io import atomic_path

    table = rows if isinstance(rows, pa.Table) else episodes_table(rows)
    with atomic_path(directory) as tmp:
        Path(tmp).mkdir(parents=True)
        pq.write_table(table, Path(tmp) / "part-00000.parquet")
    return Path(directory)


def read_episodes(directory: str | Path):
    """Episodes of a dataset directory (or a single Parquet file) as a DataFrame."""
    import pandas as pd

    return pd.read_parquet(directory)
