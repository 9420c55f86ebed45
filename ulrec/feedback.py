"""Unpaired user feedback → training rows (paper §3, Appendix A.1/A.5).

One episode (a row of the rollout Parquet; see the rollout contract) becomes:

* **positives** (``label=True``): every accepted (live) step of an episode with at least
  ``min_accepted_steps`` accepted steps. A ``horizon`` step is live: the user stayed and the episode
  was only truncated.
* **one negative** (``label=False``): the step that made the user exit, only when its 1-based step
  index is ``>= min_negative_step``. This does not depend on ``min_accepted_steps``: an exit at step
  2 after one accepted step is still a negative. A format-error exit is skipped unless
  ``format_errors_as_negatives`` (then the completion is the policy's raw output).

The prompt is exactly what the policy saw (``step.prompt``, ending ``Action k:``) and the completion
is ``completion_text(title)`` of the *grounded* catalogue item, i.e. what the user actually received.
Trainers append EOS. These are pure functions; ``train/rows.py`` applies them with Ray Data.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import pyarrow as pa

from ulrec.config import FeedbackConfig
from ulrec.episodes import STAY, TRUNCATED, USER_EXITS
from ulrec.errors import DataError
from ulrec.prompts import completion_text

# A step that ended the episode by an exit is a negative; a kept or truncated one is live.
EXIT_REASONS = frozenset(USER_EXITS)
LIVE_REASONS = frozenset({STAY, TRUNCATED})

# The rows' columns: prompt/completion/label are what the trainers read; the rest trace a row back
# to its episode and step.
ROW_SCHEMA = pa.schema(
    [
        ("prompt", pa.string()),
        ("completion", pa.string()),
        ("label", pa.bool_()),
        ("episode_id", pa.string()),
        ("user_id", pa.int64()),
        ("step", pa.int64()),
        ("reason", pa.string()),
    ]
)


def episode_id(episode: Mapping[str, Any]) -> str:
    """A readable id naming the episode's run, policy, split, user and sampling seed."""
    parts = [str(episode.get(k, "")) for k in ("run", "policy", "split")]
    return "/".join(parts + [f"u{int(episode['user_id'])}", f"s{int(episode.get('seed', 0))}"])


def _steps_in_order(episode: Mapping[str, Any], eid: str) -> list[Mapping[str, Any]]:
    steps = episode.get("steps")
    if steps is None:
        raise DataError(f"episode {eid}: missing 'steps'")
    steps = sorted(steps, key=lambda s: int(s["step"]))
    if [int(s["step"]) for s in steps] != list(range(1, len(steps) + 1)):
        raise DataError(f"episode {eid}: step indices are not 1..{len(steps)}")
    for s in steps[:-1]:
        if not s["live"]:
            raise DataError(f"episode {eid}: step {s['step']} is not live but is not the last step")
    for s in steps:
        if s["live"] and s["reason"] not in LIVE_REASONS:
            raise DataError(f"episode {eid}: live step {s['step']} has reason {s['reason']!r}")
    return steps


def episode_to_rows(episode: Mapping[str, Any], cfg: FeedbackConfig) -> list[dict[str, Any]]:
    """The training rows of one episode (positives first, then at most one negative)."""
    if "user_id" not in episode:
        raise DataError("episode: missing 'user_id'")
    eid = episode_id(episode)
    try:
        return _rows(episode, eid, cfg)
    except KeyError as exc:
        raise DataError(f"episode {eid}: missing field {exc}") from None


def _rows(episode: Mapping[str, Any], eid: str, cfg: FeedbackConfig) -> list[dict[str, Any]]:
    steps = _steps_in_order(episode, eid)
    live = [s for s in steps if s["live"]]
    length = episode.get("length")
    if length is not None and int(length) != len(live):
        raise DataError(f"episode {eid}: length={length} but {len(live)} live steps")
    user_id = int(episode["user_id"])

    def row(step: Mapping[str, Any], completion: str, label: bool) -> dict[str, Any]:
        return {
            "prompt": step["prompt"],
            "completion": completion,
            "label": label,
            "episode_id": eid,
            "user_id": user_id,
            "step": int(step["step"]),
            "reason": step["reason"],
        }

    rows: list[dict[str, Any]] = []
    if len(live) >= cfg.min_accepted_steps:
        for step in live:
            if not step["title"]:
                raise DataError(f"episode {eid}: live step {step['step']} has no grounded title")
            rows.append(row(step, completion_text(step["title"]), True))

    last = steps[-1] if steps else None
    if last is not None and not last["live"] and int(last["step"]) >= cfg.min_negative_step:
        reason = last["reason"]
        if reason not in EXIT_REASONS:
            raise DataError(f"episode {eid}: exit step {last['step']} has reason {reason!r}")
        if reason == "format_error":
            if cfg.format_errors_as_negatives:
                rows.append(row(last, last["raw_output"], False))
        elif not last["title"]:
            raise DataError(f"episode {eid}: exit step {last['step']} ({reason}) has no grounded title")
        else:
            rows.append(row(last, completion_text(last["title"]), False))
    return rows


def episodes_to_rows(episodes: Sequence[Mapping[str, Any]], cfg: FeedbackConfig) -> list[dict[str, Any]]:
    """All rows of several episodes, in episode order."""
    return [r for ep in episodes for r in episode_to_rows(ep, cfg)]


def episodes_table_to_rows(table: pa.Table, cfg: FeedbackConfig) -> pa.Table:
    """Batch form for Ray Data ``map_batches(batch_format="pyarrow")``: episodes in, rows out."""
    rows = episodes_to_rows(table.to_pylist(), cfg)
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
