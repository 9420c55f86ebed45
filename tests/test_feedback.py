"""Feedback → rows: the pure rule on hand-made episodes, and the Ray Data stage that applies it."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ulrec.config import FeedbackConfig, load_config
from ulrec.errors import DataError
from ulrec.feedback import ROW_SCHEMA, episode_to_rows, episodes_table_to_rows
from ulrec.tracking import read_metrics

sys.path.insert(0, str(Path(__file__).parent))
from _train_helpers import TITLES, episode  # noqa: E402


def step(k: int, title: str, live: bool, reason: str, raw: str | None = None, substituted: bool = False) -> dict:
    return {
        "step": k,
        "prompt": f"P{k}\nAction {k}:",
        "raw_output": raw if raw is not None else f" recommend[ {title} ]",
        "item_id": -1 if reason == "format_error" else k,
        "title": title,
        "substituted": substituted,
        "reward": 4.0 if live else 1.0,
        "live": live,
        "reason": reason,
    }


def make_episode(steps: list[dict], user_id: int = 7) -> dict:
    live = [s for s in steps if s["live"]]
    return {
        "run": "r",
        "policy": "base",
        "split": "train",
        "user_id": user_id,
        "seed": 3,
        "length": len(live),
        "total_reward": sum(s["reward"] for s in live),
        "exit_reason": "horizon" if steps[-1]["live"] else steps[-1]["reason"],
        "steps": steps,
    }


CFG = FeedbackConfig()


def test_positives_and_exit_negative_exact_rows():
    ep = make_episode(
        [
            step(1, "Heat (1995)", True, "stay", raw=" recommend[ Heat ]", substituted=True),
            step(2, "Fargo (1996)", True, "stay"),
            step(3, "Fargo 2 [Extended]", False, "similar", raw=" recommend[ Fargo II ]", substituted=True),
        ]
    )
    eid = "r/base/train/u7/s3"
    assert episode_to_rows(ep, CFG) == [
        # the completion is the grounded title the user received, not the raw output
        {"prompt": "P1\nAction 1:", "completion": " recommend[ Heat (1995) ]", "label": True,
         "episode_id": eid, "user_id": 7, "step": 1, "reason": "stay"},
        {"prompt": "P2\nAction 2:", "completion": " recommend[ Fargo (1996) ]", "label": True,
         "episode_id": eid, "user_id": 7, "step": 2, "reason": "stay"},
        {"prompt": "P3\nAction 3:", "completion": " recommend[ Fargo 2 [Extended] ]", "label": False,
         "episode_id": eid, "user_id": 7, "step": 3, "reason": "similar"},
    ]


def test_one_accepted_step_gives_only_the_negative():
    ep = make_episode([step(1, "A", True, "stay"), step(2, "A", False, "repeat")])
    rows = episode_to_rows(ep, CFG)
    assert [(r["step"], r["label"], r["completion"]) for r in rows] == [(2, False, " recommend[ A ]")]


def test_exit_at_step_one_gives_nothing():
    assert episode_to_rows(make_episode([step(1, "A", False, "low_reward")]), CFG) == []


def test_horizon_episode_is_all_positives():
    ep = make_episode([step(1, "A", True, "stay"), step(2, "B", True, "stay"), step(3, "C", True, "horizon")])
    rows = episode_to_rows(ep, CFG)
    assert [(r["step"], r["label"]) for r in rows] == [(1, True), (2, True), (3, True)]


def test_format_error_exit_skipped_unless_configured():
    ep = make_episode(
        [step(1, "A", True, "stay"), step(2, "B", True, "stay"), step(3, "", False, "format_error", raw=" recommend A")]
    )
    assert [r["label"] for r in episode_to_rows(ep, CFG)] == [True, True]
    rows = episode_to_rows(ep, FeedbackConfig(format_errors_as_negatives=True))
    assert rows[-1]["label"] is False and rows[-1]["completion"] == " recommend A" and rows[-1]["step"] == 3


def test_thresholds_from_config():
    ep = make_episode([step(1, "A", True, "stay"), step(2, "B", True, "stay"), step(3, "C", False, "repeat")])
    rows = episode_to_rows(ep, FeedbackConfig(min_accepted_steps=3, min_negative_step=4))
    assert rows == []
    rows = episode_to_rows(ep, FeedbackConfig(min_accepted_steps=1, min_negative_step=3))
    assert [r["label"] for r in rows] == [True, True, False]


def test_steps_are_read_in_step_order():
    ep = make_episode([step(2, "B", True, "stay"), step(3, "C", False, "repeat"), step(1, "A", True, "stay")])
    assert [r["step"] for r in episode_to_rows(ep, CFG)] == [1, 2, 3]


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda ep: ep.update(length=5), "length=5"),
        (lambda ep: ep["steps"][0].update(live=False, reason="repeat"), "not the last step"),
        (lambda ep: ep["steps"][1].update(reason="repeat"), "live step 2 has reason"),
        (lambda ep: ep["steps"][2].update(reason="stay"), "exit step 3 has reason"),
        (lambda ep: ep["steps"][0].pop("prompt"), "missing field 'prompt'"),
        (lambda ep: ep["steps"][1].update(step=5), "step indices"),
        (lambda ep: ep["steps"][0].update(title=""), "no grounded title"),
    ],
)
def test_malformed_episodes_raise_data_error(corrupt, message):
    ep = make_episode([step(1, "A", True, "stay"), step(2, "B", True, "stay"), step(3, "C", False, "repeat")])
    bad = copy.deepcopy(ep)
    corrupt(bad)
    with pytest.raises(DataError, match=message):
        episode_to_rows(bad, CFG)


def test_batch_form_matches_rule_and_keeps_schema():
    episodes = [episode(u, TITLES[:3], "repeat") for u in range(3)] + [episode(9, TITLES[:1], "similar")]
    table = pa.Table.from_pylist(episodes)
    out = episodes_table_to_rows(table, CFG)
    assert out.schema == ROW_SCHEMA
    assert out.to_pylist() == [r for ep in episodes for r in episode_to_rows(ep, CFG)]
    empty = episodes_table_to_rows(table.slice(0, 0), CFG)
    assert empty.num_rows == 0 and empty.schema == ROW_SCHEMA


# ------------------------------------------------------------------------------- the Ray Data stage
@pytest.fixture(scope="module")
def ray_session():
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, object_store_memory=300 * 1024**2, include_dashboard=False)
    yield
    ray.shutdown()


def _write_episodes(directory: Path, episodes: list[dict]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(episodes), directory / "part-0.parquet")


@pytest.mark.slow
def test_rows_stage_writes_counts_and_skips_when_done(tmp_path, ray_session):
    from train.rows import rows_stage

    cfg = load_config(None, [f"run.root={tmp_path}", "run.name=t", "run.progress=false", "wandb.enabled=false"])
    round1 = [episode(u, TITLES[: 2 + u % 3], "repeat" if u % 2 else None) for u in range(6)]
    round2 = [episode(100 + u, TITLES[4:6], "low_reward") for u in range(2)] + [episode(200, TITLES[:1], "similar")]
    _write_episodes(cfg.run_dir / "rollouts" / "train", round1)
    _write_episodes(tmp_path / "round2", round2)

    stats = rows_stage(cfg, rollout_dirs=[cfg.run_dir / "rollouts" / "train", tmp_path / "round2"])
    expected = [r for ep in round1 + round2 for r in episode_to_rows(ep, CFG)]
    assert stats["episodes"] == 9
    assert stats["positives"] == sum(r["label"] for r in expected)
    assert stats["negatives"] == len(expected) - stats["positives"]
    assert stats["episodes_used"] == len({r["episode_id"] for r in expected})
    assert stats["negatives_by_reason"] == {"low_reward": 2, "repeat": 3}

    rows_dir = cfg.run_dir / "rows"
    kto = pq.read_table(rows_dir / "kto.parquet").to_pylist()
    key = lambda r: (r["episode_id"], r["step"])  # noqa: E731
    assert kto == sorted(expected, key=key)
    assert pq.read_table(rows_dir / "sft.parquet").to_pylist() == [r for r in kto if r["label"]]
    logged = read_metrics(rows_dir / "metrics.jsonl")
    assert logged[0]["positives"] == stats["positives"] and logged[0]["negatives/repeat"] == 3

    mtime = (rows_dir / "kto.parquet").stat().st_mtime_ns
    again = rows_stage(cfg, rollout_dirs=[cfg.run_dir / "rollouts" / "train", tmp_path / "round2"])
    assert again == {**stats, "skipped": True} and (rows_dir / "kto.parquet").stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_rows_stage_reports_bad_input_as_data_error(tmp_path, ray_session):
    from train.rows import rows_stage

    cfg = load_config(None, [f"run.root={tmp_path}", "run.name=t", "run.progress=false", "wandb.enabled=false"])
    with pytest.raises(DataError, match="rollouts not found"):
        rows_stage(cfg)
    bad = episode(1, TITLES[:3], "repeat")
    bad["length"] = 9
    _write_episodes(cfg.run_dir / "rollouts" / "train", [bad])
    with pytest.raises(DataError, match="length=9"):
        rows_stage(cfg)
    (cfg.run_dir / "rollouts" / "train" / "part-0.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="part-0.parquet"):
        rows_stage(cfg)
    assert not (cfg.run_dir / "rows" / "kto.parquet").exists()
