"""A collector separate from the tuned policy (paper §4.1.2): its model, and ReAct collection
whose thoughts never reach the training rows (paper A.5)."""

from __future__ import annotations

import dataclasses
import sys
from functools import partial
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray

sys.path.insert(0, str(Path(__file__).parent))
from _rollout_helpers import ScriptedPolicy, fake_sources, register_by_value, rollout_config  # noqa: E402

from ulrec.config import load_config
from ulrec.errors import InputError
from ulrec.policy import GenerationResult
from ulrec.policy.react import ReActPolicy
from ulrec.prompts import REACT_NOTE, PromptBuilder, StepView, react_action_prompt, react_thought_prompt

THOUGHT = " The user liked dramas; try something new."


def transcript(steps: int = 1) -> str:
    views = [StepView(title=f"T{k}", observation="The user stayed, reward=4.00") for k in range(steps)]
    return PromptBuilder().build(["Heat (1995)"], views)


def test_react_prompts_think_then_act():
    text = transcript(1)
    thought_prompt = react_thought_prompt(text)
    assert thought_prompt.startswith(REACT_NOTE) and thought_prompt.endswith("\nThought 2:")
    head = text[: text.rindex("\nAction 2:")]
    assert thought_prompt == f"{REACT_NOTE}\n\n{head}\nThought 2:"
    assert react_action_prompt(text, "line one\nline two") == thought_prompt + " line one line two\nAction 2:"
    with pytest.raises(InputError, match="open 'Action k:' line"):
        react_thought_prompt("no open action")


class ThinkingPolicy(ScriptedPolicy):
    """The scripted policy, plus a fixed thought for thought prompts; records what it was asked."""

    def __init__(self, titles, **kwargs):
        super().__init__(titles, **kwargs)
        self.asked: list[tuple[str, int | None]] = []

    def generate(self, prompts, seeds=None, temperature=None, max_tokens=None):
        self.asked += [(p, max_tokens) for p in prompts]
        if prompts and prompts[0].rstrip().split("\n")[-1].startswith("Thought"):
            return [GenerationResult(text=THOUGHT, num_tokens=9) for _ in prompts]
        return super().generate(prompts, seeds, temperature)


def test_react_policy_generates_a_thought_then_the_action():
    inner = ThinkingPolicy(["Heat (1995)", "Fargo (1996)"], p_substitute=0.0, p_format_error=0.0)
    policy = ReActPolicy(inner, max_thought_tokens=20)
    prompts = [transcript(0), transcript(2)]
    out = policy.generate(prompts, seeds=[3, 4], temperature=1.0)
    plain = ScriptedPolicy(["Heat (1995)", "Fargo (1996)"], p_substitute=0.0, p_format_error=0.0)
    expected = plain.generate(prompts, seeds=[3, 4])
    assert [o.text for o in out] == [e.text for e in expected]  # the action, not the thought
    assert [o.num_tokens for o in out] == [e.num_tokens + 9 for e in expected]
    asked = [p for p, _ in inner.asked]
    assert asked[:2] == [react_thought_prompt(p) for p in prompts]
    assert asked[2:] == [react_action_prompt(p, THOUGHT) for p in prompts]
    assert [m for _, m in inner.asked] == [20, 20, None, None]
    assert policy.last_thoughts == [THOUGHT, THOUGHT]


def thinking_react_factory(titles):
    return ReActPolicy(ThinkingPolicy(titles), max_thought_tokens=16)


@pytest.fixture(scope="module")
def ray_session():
    register_by_value()
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, object_store_memory=300 * 1024**2, include_dashboard=False)
    yield
    ray.shutdown()


def test_react_rollout_writes_action_only_transcripts(ray_session, tmp_path):
    from rollout.driver import collect_episodes
    from rollout.episode import EpisodeLabels

    cfg = rollout_config(tmp_path)
    sources = fake_sources(20, 5)
    sources = dataclasses.replace(sources, policy_factory=thinking_react_factory)
    out = tmp_path / "episodes"
    collect_episodes(cfg, sources, user_ids=list(range(12)), seeds=[0], temperature=1.0, out_dir=out,
                     labels=EpisodeLabels(run="t", policy="collector", split="train"))
    steps = [s for row in pq.read_table(out).to_pylist() for s in row["steps"]]
    assert steps and all("Thought" not in s["prompt"] and REACT_NOTE not in s["prompt"] for s in steps)
    assert all(s["prompt"].endswith(f"Action {s['step']}:") and "Thought" not in s["raw_output"] for s in steps)
    # the same episodes as a plain (action-only) collector with the same seeds: thinking changed nothing
    # about what was recommended here, because the scripted actions depend only on the seed
    plain_out = tmp_path / "plain"
    collect_episodes(cfg, fake_sources(20, 5), user_ids=list(range(12)), seeds=[0], temperature=1.0,
                     out_dir=plain_out, labels=EpisodeLabels(run="t", policy="collector", split="train"))
    key = lambda t: sorted((r["user_id"], [s["item_id"] for s in r["steps"]]) for r in t.to_pylist())  # noqa: E731
    assert key(pq.read_table(out)) == key(pq.read_table(plain_out))


def test_collector_model_and_its_evaluation_row(tmp_path):
    from rollout.driver import collector_model_dir
    from rollout.evaluate import eval_methods, method_model_dir

    cfg = load_config(None, [f"run.root={tmp_path}", "run.name=c"])
    assert collector_model_dir(cfg) == tmp_path / "c" / "model" / "base" and "collector" not in eval_methods(cfg)
    cfg = load_config(None, [f"run.root={tmp_path}", "run.name=c", f"rollout.collector.model={tmp_path}/big",
                             "rollout.collector.prompt_style=react"])
    assert collector_model_dir(cfg) == tmp_path / "big"
    assert eval_methods(cfg)[0] == "collector" and method_model_dir(cfg, "collector") == tmp_path / "big"
    # the tuned model stays the base model
    assert method_model_dir(cfg, "base") == tmp_path / "c" / "model" / "base"


def test_a_planner_collector_plays_alone_first_and_its_memory_comes_from_that(tmp_path, monkeypatch):
    """``rollout.collector.planner=billp``: the model plays the training users alone, BiLLP's memory
    is built from those episodes, then BiLLP on that model plays the same users into the rollouts
    the rows are made from; BiLLP's evaluation reads the same plain episodes."""
    import json

    import rollout.driver as driver
    from rollout.evaluate import billp_memory_rollouts, eval_methods, method_players

    def mark(directory, key):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "_stage.json").write_text(json.dumps({"hash": key}))

    calls, built = [], []

    def fake_rollout(cfg, model_dir, out_dir, users, *, split, policy_name, collector=None, billp=None):
        calls.append((out_dir, policy_name, billp, list(users)))
        out_dir.mkdir(parents=True, exist_ok=True)
        return {"episodes": len(users), "mean_length": 1.5, "mean_reward": 2.0,
                "exit_reasons": {"similar": 1.0}, "grounding": {}}

    class Prepared:
        def user_histories(self, split):
            return {u: [1, 2, 3, 4, 5] for u in range(40)}

    model = tmp_path / "base"
    mark(model, "base-model")
    monkeypatch.setattr(driver, "training_rollout", fake_rollout)
    monkeypatch.setattr(driver, "collector_model_dir", lambda cfg: model)
    monkeypatch.setattr(driver, "check_model_dir", lambda *a, **k: None)
    monkeypatch.setattr("ulrec.data.load_prepared", lambda run_dir: Prepared())
    monkeypatch.setattr("rollout.driver.build_billp_setup",
                        lambda cfg, rollouts, memory_file: built.append((rollouts, memory_file)) or "planner setup")
    args = [f"run.root={tmp_path}", "run.name=c", "wandb.enabled=false", "rollout.num_users=10",
            "eval.methods=[base,ulrec]"]
    cfg = load_config(None, args + ["rollout.collector.planner=billp"])
    mark(cfg.run_dir / "data", "data")
    mark(cfg.run_dir / "simulators", "simulators")
    (cfg.run_dir / "simulators" / "train").mkdir()
    (cfg.run_dir / "simulators" / "train" / "meta.json").write_text("{}")

    summary = driver.rollout_stage(cfg)
    plain, planned = calls
    assert plain[:3] == (cfg.layout.plain_rollouts("train"), "base", None)
    assert planned[:3] == (cfg.layout.rollouts("train"), "billp+base", "planner setup")
    assert plain[3] == planned[3] and len(plain[3]) == 10  # the same users, twice
    assert built == [(cfg.layout.plain_rollouts("train"), cfg.layout.plain_rollouts("train") / "_billp_memory.json")]
    assert summary["plain"]["mean_length"] == 1.5
    assert billp_memory_rollouts(cfg) == cfg.layout.plain_rollouts("train")
    # The planner is the collector: BiLLP's row shows it, and it wraps the engine.
    assert eval_methods(cfg)[0] == "billp" and method_players(cfg, "billp") == (None, True)
    # The planner's settings are inputs of the rollout stage only when it collects.
    assert driver.rollout_stage(cfg)["skipped"] is True
    assert "skipped" not in driver.rollout_stage(load_config(None, args + ["rollout.collector.planner=billp",
                                                                           "billp.candidates=2"]))
    plain_cfg = load_config(None, args)
    assert billp_memory_rollouts(plain_cfg) == plain_cfg.layout.rollouts("train")
    assert eval_methods(plain_cfg) == ["base", "ulrec"] and method_players(plain_cfg, "billp") == (None, True)
    calls.clear()
    driver.rollout_stage(plain_cfg)
    assert [c[:3] for c in calls] == [(plain_cfg.layout.rollouts("train"), "base", None)]
    assert driver.rollout_stage(load_config(None, args + ["billp.candidates=2"]))["skipped"] is True


def test_planner_and_react_collectors_do_not_mix():
    with pytest.raises(Exception, match="choose one"):
        load_config(None, ["rollout.collector.planner=billp", "rollout.collector.prompt_style=react"])
