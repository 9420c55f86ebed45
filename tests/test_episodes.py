"""The one episode format: reasons, row builders, and the on-disk form every producer writes."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from ulrec.episodes import (
    END_REASONS, ENV_EXITS, EPISODE_SCHEMA, STEP_REASONS, TRUNCATED, USER_EXITS, episode_row, read_episodes,
    step_row, write_episodes,
)


def test_reasons_say_who_ended_the_episode():
    assert set(ENV_EXITS) < set(USER_EXITS) and "format_error" in USER_EXITS
    assert TRUNCATED not in USER_EXITS and TRUNCATED in END_REASONS  # the horizon is not an exit
    assert STEP_REASONS == ("stay",) + END_REASONS
    from ulrec import evaluation, feedback
    from ulrec.simulator import env

    # the layers read the same sets
    assert env.EXIT_REASONS == ENV_EXITS and evaluation.EXIT_REASONS == END_REASONS
    assert feedback.EXIT_REASONS == set(USER_EXITS)


def test_rows_round_trip_through_a_dataset_directory(tmp_path):
    steps = [step_row(1, item_id=3, title="A", reward=4.0, live=True, reason="stay"),
             step_row(2, item_id=3, title="A", reward=4.0, live=False, reason="repeat")]
    row = episode_row(run="r", policy="p", split="test", user_id=7, seed=0, length=1, total_reward=4.0,
                      exit_reason="repeat", steps=steps)
    out = write_episodes([row], tmp_path / "episodes")
    assert out.is_dir() and pq.read_schema(next(out.glob("*.parquet"))).equals(EPISODE_SCHEMA, check_metadata=False)
    frame = read_episodes(out)
    assert frame["exit_reason"].tolist() == ["repeat"] and len(frame["steps"][0]) == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left


def test_builders_reject_what_the_schema_cannot_mean():
    with pytest.raises(ValueError, match="unknown reason"):
        step_row(1, item_id=0, title="", reward=0.0, live=True, reason="bored")
    with pytest.raises(ValueError, match="not finished"):
        episode_row(run="r", policy="p", split="test", user_id=1, seed=0, length=0, total_reward=0.0,
                    exit_reason="stay", steps=[])
