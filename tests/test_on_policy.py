"""``kto.on_policy``: stage 2's rows = the collector's + the stage-1 model's own rollouts' rows."""

from __future__ import annotations

import json

import pyarrow as pa

from train.on_policy import ON_POLICY_ROLLOUT_STAGE, combine_rows, on_policy_config
from ulrec.config import load_config
from ulrec.feedback import ROW_SCHEMA
from ulrec.resume import resume_key


def _rows(labels: list[bool], tag: str) -> pa.Table:
    return pa.Table.from_pylist(
        [{"prompt": f"{tag}{i}", "completion": "t", "label": label, "episode_id": tag, "user_id": i,
          "step": i + 1, "reason": None if label else "repeat"} for i, label in enumerate(labels)],
        schema=ROW_SCHEMA,
    )


def test_negatives_only_keeps_every_collector_row_and_only_the_on_policy_exits():
    collector, own = _rows([True, True, False], "c"), _rows([True, False, True, False], "o")
    combined = combine_rows(collector, own, "negatives")
    assert combined.slice(0, 3).equals(collector)  # the collector's rows first, untouched
    tail = combined.slice(3).to_pylist()
    assert [r["prompt"] for r in tail] == ["o1", "o3"] and not any(r["label"] for r in tail)
    assert combine_rows(collector, own, "all").num_rows == 7


def test_the_rollout_runs_at_the_evaluation_temperature_by_default_with_the_tuned_model(tmp_path):
    cfg = load_config(None, ["data.dataset=synthetic", "eval.temperature=0.3", "rollout.temperature=1.0",
                             "rollout.collector.prompt_style=react", "kto.on_policy.enabled=true"])
    rollout_cfg = on_policy_config(cfg)
    assert rollout_cfg.rollout.temperature == 0.3
    assert rollout_cfg.rollout.collector.prompt_style == "action_only" and rollout_cfg.rollout.collector.model is None
    assert cfg.rollout.temperature == 1.0  # the run's own config is not touched
    explicit = load_config(None, ["data.dataset=synthetic", "kto.on_policy.temperature=0.7"])
    assert on_policy_config(explicit).rollout.temperature == 0.7


def test_the_rollout_key_follows_its_temperature_and_model_not_stage_2s_settings(tmp_path, monkeypatch):
    import rollout.driver as driver

    monkeypatch.setattr(driver, "simulator_fingerprint", lambda cfg, split: "sim")
    model = tmp_path / "sft"
    model.mkdir()
    (model / "_stage.json").write_text(json.dumps({"hash": "a"}))

    def key(*overrides: str) -> str:
        cfg = load_config(None, ["data.dataset=synthetic", "kto.on_policy.enabled=true", *overrides])
        return resume_key(ON_POLICY_ROLLOUT_STAGE, on_policy_config(cfg), model_dir=model, users=[1, 2])

    base = key()
    assert key("kto.beta=0.5") == base and key("kto.on_policy.rows=all") == base
    assert key("eval.temperature=0.9") != base and key("kto.on_policy.temperature=0.9") != base
    (model / "_stage.json").write_text(json.dumps({"hash": "b"}))  # another stage-1 model
    assert key() != base
