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
