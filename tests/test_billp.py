"""BiLLP (ulrec.policy.billp): transcripts read back, reflections, the critic, the memory, and the
planner → actor proposals → critic choice on a scripted backend."""

from __future__ import annotations

import numpy as np
import pytest

from ulrec.grounding import Grounder
from ulrec.policy import GenerationResult
from ulrec.policy.billp import (
    CRITIC_FEATURES,
    GUIDANCE_HEAD,
    PLAN_NOTE,
    BiLLPMemory,
    BiLLPPolicy,
    build_memory,
    candidate_seed,
    critic_features,
    fit_logistic,
    parse_transcript,
    reflect,
    stay_probability,
)
from ulrec.prompts import PromptBuilder, StepView, format_action, observation_text

TITLES = ["Heat (1995)", "Fargo (1996)", "Alien (1979)", "Aliens (1986)", "Babe (1995)", "Big (1988)"]


def _embeddings() -> np.ndarray:
    # Alien and Aliens nearly the same title vector; the others orthogonal.
    emb = np.eye(len(TITLES), dtype=np.float32)
    emb[3] = _unit(np.array([0, 0, 1.0, 0.2, 0, 0], dtype=np.float32))
    return emb


def _unit(v):
    return v / np.linalg.norm(v)


def grounder() -> Grounder:
    emb = _embeddings()
    lookup = {t: emb[i] for i, t in enumerate(TITLES)}
    return Grounder(TITLES, embed_fn=lambda texts: np.stack([lookup.get(t, emb[0]) for t in texts]))


def _view(title: str, reward: float, stayed: bool, received: str | None = None) -> StepView:
    return StepView(title=title, observation=observation_text(
        stayed=stayed, reward=reward, proposed_title=title, recommended_title=received or title,
        substituted=received is not None))


@pytest.mark.parametrize("template", [None, "configs/prompts/compact.txt"])
def test_transcript_round_trip(template):
    builder = PromptBuilder.from_file(template, 3) if template else PromptBuilder(None, 3)
    steps = [_view("Heat (1995)", 4.0, True), _view("Fargo (1997)", 3.0, True, received="Fargo (1996)"),
             StepView(title=None, observation=observation_text(stayed=True, reward=None, format_error=True),
                      raw_output="I think")]
    t = parse_transcript(builder.build(["Babe (1995)", "Big (1988)"], steps))
    assert t.history == ["Babe (1995)", "Big (1988)"]  # not the worked example's history
    assert [s.title for s in t.steps] == ["Heat (1995)", "Fargo (1996)", None]  # what was received
    assert [s.reward for s in t.steps] == [4.0, 3.0, None]
    assert t.open_step == 4
    empty = parse_transcript(builder.build([], []))
    assert empty.history == [] and empty.steps == [] and empty.open_step == 1
    with pytest.raises(ValueError, match="open 'Action k:'"):
        parse_transcript("no action here")


def test_reflections_name_the_cause():
    assert "again" in reflect(["Heat (1995)"], ["Babe (1995)", "Babe (1995)"], [4, 4], "repeat")
    line = reflect([], ["Alien (1979)", "Aliens (1986)"], [4.5, 4.0], "similar", similar_to="Alien (1979)")
    assert "too close to Alien (1979)" in line and "They liked Alien (1979), Aliens (1986)" in line
    assert "disliked Big (1988) (rating 1.0)" in reflect([], ["Big (1988)"], [1.0], "low_reward")
    assert "stayed all 2 turns" in reflect([], ["Heat (1995)", "Big (1988)"], [4, 4], "horizon")


def test_critic_features_and_logistic_fit():
    emb = _embeddings()
    x = critic_features(3, received=[0, 2], history=[4], embeddings=emb, item_stay_rate=0.7, window=4)
    assert dict(zip(CRITIC_FEATURES, x)) == pytest.approx(
        {"repeat": 0.0, "similar_recent": float(emb[2] @ emb[3]), "similar_history": 0.0, "in_history": 0.0,
         "item_stay_rate": 0.7})
    assert critic_features(0, [0], [], emb, 0.5, 4)[0] == 1.0  # a repeat
    assert critic_features(2, [2, 1, 4, 5, 0], [], emb, 0.5, 4)[1] == 0.0  # Alien fell out of the window
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(400, 2))
    labels = (rng.random(400) < 1 / (1 + np.exp(-(0.5 + 2 * feats[:, 0] - 1 * feats[:, 1])))).astype(float)
    w = fit_logistic(feats, labels, l2=1e-3)
    assert w == pytest.approx([0.5, 2.0, -1.0], abs=0.5)
    assert stay_probability(w, np.array([[3.0, 0.0]]))[0] > 0.95


def _episode(history: list[int], items: list[int], lives: list[bool], rewards: list[float], reason: str) -> dict:
    builder = PromptBuilder(None, 3)
    views, steps = [], []
    for k, (item, live, reward) in enumerate(zip(items, lives, rewards), start=1):
        prompt = builder.build([TITLES[i] for i in history], views)
        steps.append({"step": k, "prompt": prompt, "raw_output": " " + format_action(TITLES[item]), "item_id": item,
                      "title": TITLES[item], "substituted": False, "reward": reward, "live": live,
                      "reason": "stay" if live else reason})
        views.append(_view(TITLES[item], reward, live))
    return {"steps": steps, "exit_reason": reason if not lives[-1] else "horizon"}


def _training_episodes() -> list[dict]:
    # Users with a Heat history leave when an item comes back; those with Babe leave on Aliens
    # after Alien. Varied items keep them.
    eps = []
    for k in range(12):
        a, b = [4, 5, 1][k % 3], [5, 1, 4][k % 3]
        eps.append(_episode([0], [a, b, a], [True, True, False], [4, 4, 4], "repeat"))
        eps.append(_episode([4], [2, 3], [True, False], [4, 4], "similar"))
        eps.append(_episode([1], [5, 0, 2, 1], [True, True, True, True], [4, 4, 4, 4], "horizon"))
    return eps


def test_memory_learns_the_exits_and_retrieves_similar_users():
    emb = _embeddings()
    memory = build_memory(_training_episodes(), grounder(), critic_window=4)
    w = dict(zip(("bias",) + CRITIC_FEATURES, memory.critic_weights))
    assert w["repeat"] < -1.0 and w["similar_recent"] < 0  # repeats and near neighbours end episodes
    assert memory.stats["episodes"] == 36 and memory.stats["critic_train_accuracy"] > 0.9
    assert len(memory.reflections) == 36
    heat_user = memory.retrieve(emb[0], 2)
    assert all("watched Heat (1995)" in r and "again" in r for r in heat_user)
    babe_user = memory.retrieve(emb[4], 1)[0]
    assert "too close to Alien (1979)" in babe_user
    again = BiLLPMemory.from_json(memory.to_json())
    assert again.describe() == memory.describe() and again.retrieve(emb[4], 1) == [babe_user]


class ScriptedBackend:
    """Answers plans with a fixed line and actions with one title per seed; records the calls."""

    backend = "scripted"

    def __init__(self, by_seed: dict[int, str]):
        from ulrec.policy import SamplingConfig

        self.sampling = SamplingConfig()
        self.by_seed = by_seed
        self.calls: list[tuple[list[str], list[int], int | None]] = []

    def generate(self, prompts, seeds=None, temperature=None, max_tokens=None):
        self.calls.append((list(prompts), list(seeds), max_tokens))
        if prompts[0].rstrip().split("\n")[-1].startswith("Plan"):
            return [GenerationResult(" something new and well liked", 7) for _ in prompts]
        return [GenerationResult(" " + format_action(self.by_seed.get(s, "Heat (1995)")), 5) for s in seeds]


def test_policy_plans_proposes_and_the_critic_picks_the_step_that_keeps_the_user():
    memory = build_memory(_training_episodes(), grounder(), critic_window=4)
    seed = 11
    # Proposal 0 repeats Fargo, 1 is Aliens right after Alien, 2 is unreadable, 3 is Big: the critic
    # must pick Big.
    by_seed = {candidate_seed(seed, 0): "Fargo (1996)", candidate_seed(seed, 1): "Aliens (1986)",
               candidate_seed(seed, 3): "Big (1988)"}
    backend = ScriptedBackend(by_seed)
    policy = BiLLPPolicy(backend, memory, grounder(), reflections=1, plan_tokens=16, candidates=4, critic_window=4)
    prompt = PromptBuilder(None, 3).build(["Babe (1995)"], [_view("Fargo (1996)", 4, True), _view("Alien (1979)", 4, True)])
    backend.generate = _unreadable_for(backend, candidate_seed(seed, 2))
    out = policy.generate([prompt], seeds=[seed], temperature=0.5)
    assert out[0].text == " " + format_action("Big (1988)")
    assert out[0].num_tokens == 7 + 3 * 5 + 3  # the plan and every proposal count
    plan_call, act_call = backend.calls
    assert plan_call[2] == 16 and plan_call[1] == [seed]
    assert plan_call[0][0].startswith(GUIDANCE_HEAD) and PLAN_NOTE in plan_call[0][0]
    assert plan_call[0][0].endswith("\nPlan 3:")
    assert act_call[1] == [candidate_seed(seed, j) for j in range(4)]
    assert act_call[0][0].endswith("Plan 3: something new and well liked\nAction 3:")
    scores = policy.last_scores[0]
    assert scores[2] == -1.0 and scores[3] > max(scores[0], scores[1])
    # Without planning (constrained decoding): one call, proposals only.
    backend.calls.clear()
    quiet = BiLLPPolicy(backend, memory, grounder(), reflections=0, plan_tokens=0, candidates=2)
    quiet.generate([prompt], seeds=[seed])
    assert len(backend.calls) == 1 and not backend.calls[0][0][0].startswith(GUIDANCE_HEAD)


def _unreadable_for(backend: ScriptedBackend, bad_seed: int):
    plain = ScriptedBackend.generate.__get__(backend)

    def generate(prompts, seeds=None, temperature=None, max_tokens=None):
        out = plain(prompts, seeds, temperature, max_tokens)
        return [GenerationResult("I would suggest", 3) if s == bad_seed else o for o, s in zip(out, seeds)]

    return generate


def test_billp_without_training_rollouts_is_a_one_line_error(tmp_path):
    from rollout.evaluate import billp_setup
    from ulrec.config import load_config
    from ulrec.errors import UlrecError

    cfg = load_config(None, [f"run.root={tmp_path}", "data.dataset=synthetic"])
    with pytest.raises(UlrecError, match=r"billp: no training rollouts at .*rollouts/train \(run `ulrec rollout` first\)"):
        billp_setup(cfg, tmp_path / "eval" / "billp")
