"""BiLLP: a bi-level LLM planner around any policy backend (Shi et al., "Large Language Models are
Learnable Planners for Long-Term Recommendation", SIGIR 2024), the LLM-planner column of the
ULRec paper's Table 1.

What we follow from the original:

- **Macro-learning** (§3.2): a Reflector turns finished episodes into short reflections
  ("why did this user leave, what to do instead"), stored in a memory keyed by the user; at the
  start of every step the Planner retrieves the reflections of the most similar past users and
  writes a high-level plan (one ``Plan k:`` line) conditioned on them.
- **Micro-learning** (§3.3): an Actor turns the plan into the next concrete recommendation, and a
  Critic estimates the value of a step (how likely the user is to stay after it); the actor's
  proposals are judged by the critic.

What we changed, so that it runs on a 2-core CPU with a 135M model and on the same env/protocol:

- The Reflector is a template per exit reason over the episode's own facts (which item, which
  rating, which earlier item it was too close to), not an LLM call: a 135M model does not write
  usable reflections, and a template keeps the memory deterministic and inspectable.
- Retrieval keys are the mean MiniLM title embedding of the user's history (the grounding
  embedder), not an LLM embedding of the trajectory.
- The Critic is a logistic model of P(stay | step) on five features of the proposed item
  (:data:`CRITIC_FEATURES`), fitted on the training rollouts' steps; it is used for value-guided
  choice among ``candidates`` actor proposals (one batched call, derived seeds), not as the
  advantage signal of an actor update: the planner's weights are never trained (the original
  also keeps the LLM frozen and learns through memory).
- No trajectory-level re-planning across episodes within the evaluation: the memory is built once
  from the training rollouts (train simulator) and is read-only on the test simulator, so BiLLP
  sees the same data as ULRec and never learns from test users.

``BiLLPPolicy.generate`` takes the same action-only transcripts as every policy (ending
``Action k:``) and returns one action text per prompt; rows, parsing and grounding do not change.
Its token count is everything it generated (plan + all proposals).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ulrec.policy.base import GenerationResult, Policy, SeedStream
from ulrec.prompts import parse_action, single_line

# ----------------------------------------------------------------------------- transcript parsing
_ACTION_LINE = re.compile(r"^Action (\d+):(.*)$")
_OBS_LINE = re.compile(r"^Observation (\d+):(.*)$")
_REWARD = re.compile(r"reward=(-?\d+(?:\.\d+)?)")
_SUBSTITUTED = re.compile(r"recommended '(.*)' instead \(closest catalogue item\)\.")


@dataclass(frozen=True)
class TranscriptStep:
    """One earlier step as the transcript shows it: the catalogue title the user received (None
    after a format error), the reward shown (None without one) and whether the user stayed."""

    title: str | None
    reward: float | None
    stayed: bool


@dataclass(frozen=True)
class Transcript:
    history: list[str]
    steps: list[TranscriptStep]
    head: str          # everything before the open action line
    open_step: int     # k of the open ``Action k:``


def parse_transcript(prompt: str) -> Transcript:
    """Read a transcript (``ulrec.prompts.PromptBuilder``): the user's history titles, the steps
    taken so far and the open action number.

    This episode's steps are the ``Action k`` / ``Observation k`` lines after the *last*
    ``Action 1:`` line (a template's worked example has its own); the history is the run of
    ``- title`` lines just before that line (``{history}`` ends every header)."""
    head, _, open_line = prompt.rpartition("\n")
    match = _ACTION_LINE.match(open_line)
    if match is None or match.group(2).strip():
        raise ValueError(f"transcript must end with an open 'Action k:' line (got {open_line[-40:]!r})")
    open_step = int(match.group(1))
    lines = prompt.split("\n")
    first = max(i for i, line in enumerate(lines) if line.startswith("Action 1:"))
    history: list[str] = []
    i = first - 1
    while i >= 0 and lines[i].startswith("- "):
        if lines[i] != "- (none)":
            history.append(lines[i][2:])
        i -= 1
    history.reverse()
    steps: list[TranscriptStep] = []
    proposed: str | None = None
    for line in lines[first:-1]:
        action = _ACTION_LINE.match(line)
        if action:
            proposed = parse_action(action.group(2))
            continue
        obs = _OBS_LINE.match(line)
        if obs is None:
            continue
        text = obs.group(2)
        reward = _REWARD.search(text)
        sub = _SUBSTITUTED.search(text)
        if text.strip().startswith("Could not read that action"):
            title = None
        else:
            title = sub.group(1) if sub else proposed
        steps.append(TranscriptStep(title=title, reward=float(reward.group(1)) if reward else None,
                                    stayed="The user stayed" in text))
    return Transcript(history=history, steps=steps, head=head, open_step=open_step)


# ------------------------------------------------------------------------------------ reflections
def reflect(history: Sequence[str], received: Sequence[str], rewards: Sequence[float], exit_reason: str,
            similar_to: str | None = None) -> str:
    """The Reflector (template version): one line on why an episode ended and what to do instead.

    ``received``/``rewards``: the titles the user got and their rewards, in order; the last is the
    exit step unless ``exit_reason`` is ``horizon``. ``similar_to``: for a ``similar`` exit, the
    earlier item it was closest to."""
    liked = [t for t, r in zip(received, rewards) if r >= 4.0]
    liked_txt = f" They liked {', '.join(liked[:3])}." if liked else ""
    likes_hist = f"A user who watched {', '.join(list(history)[-2:])}" if history else "A user"
    n = len(received)
    last = received[-1] if received else "?"
    if exit_reason == "repeat":
        return f"{likes_hist} left at turn {n} when {last} was recommended again.{liked_txt} Never repeat an item."
    if exit_reason == "similar":
        near = f" too close to {similar_to}" if similar_to else " too close to the last few items"
        return (f"{likes_hist} left at turn {n} after {last},{near}.{liked_txt} Change genre or era "
                f"from one turn to the next.")
    if exit_reason == "low_reward":
        rating = f" (rating {rewards[-1]:.1f})" if rewards else ""
        return f"{likes_hist} left at turn {n}: they disliked {last}{rating}.{liked_txt} Recommend items like the ones they liked."
    if exit_reason == "format_error":
        return f"{likes_hist} left at turn {n} because the answer was not a catalogue title. Always write recommend[ exact title ]."
    return f"{likes_hist} stayed all {n} turns.{liked_txt} A varied sequence of well-liked items works."


# ------------------------------------------------------------------------------------------ critic
CRITIC_FEATURES = ("repeat", "similar_recent", "similar_history", "in_history", "item_stay_rate")


def critic_features(item: int, received: Sequence[int], history: Sequence[int], embeddings: np.ndarray,
                    item_stay_rate: float, window: int) -> np.ndarray:
    """The critic's features of recommending ``item`` after ``received`` (items this episode, in
    order) to a user with ``history``: whether it repeats, its largest title similarity (cosine,
    unit embeddings) to the last ``window`` received items and to the history, whether it is in the
    history, and its smoothed stay rate in the training rollouts."""
    vec = embeddings[item]
    recent = [i for i in received[-window:] if i >= 0]
    hist = [i for i in history if i >= 0]
    sim_recent = float(np.max(embeddings[recent] @ vec)) if recent else 0.0
    sim_hist = float(np.max(embeddings[hist] @ vec)) if hist else 0.0
    return np.array([float(item in received), sim_recent, sim_hist, float(item in hist), item_stay_rate],
                    dtype=np.float64)


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-2, iters: int = 50) -> np.ndarray:
    """Weights ``[bias, w...]`` of an L2-regularised logistic regression (Newton's method)."""
    x1 = np.hstack([np.ones((len(x), 1)), np.asarray(x, dtype=np.float64)])
    y = np.asarray(y, dtype=np.float64)
    w = np.zeros(x1.shape[1])
    reg = l2 * np.eye(x1.shape[1])
    reg[0, 0] = 0.0  # the bias is not shrunk
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(x1 @ w)))
        grad = x1.T @ (p - y) + reg @ w
        hess = (x1 * (p * (1 - p))[:, None]).T @ x1 + reg + 1e-9 * np.eye(x1.shape[1])
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-8:
            break
    return w


def stay_probability(weights: np.ndarray, features: np.ndarray) -> np.ndarray:
    """P(stay) of each feature row under ``weights`` (from :func:`fit_logistic`)."""
    z = weights[0] + np.atleast_2d(features) @ weights[1:]
    return 1.0 / (1.0 + np.exp(-z))


# ------------------------------------------------------------------------------------------ memory
STAY_PRIOR = 2.0  # pseudo-count of the item stay rate's prior (the global rate)


@dataclass
class BiLLPMemory:
    """What BiLLP learned from past episodes: reflections keyed by user, and the critic.

    keys[i]: unit mean title embedding of the history of the user of reflections[i].
    critic_weights: bias + one weight per :data:`CRITIC_FEATURES`.
    item_stays / item_counts: per item, stays and recommendations in the training steps.
    """

    reflections: list[str]
    keys: np.ndarray
    critic_weights: np.ndarray
    item_stays: np.ndarray
    item_counts: np.ndarray
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def global_stay_rate(self) -> float:
        total = float(self.item_counts.sum())
        return float(self.item_stays.sum()) / total if total else 0.5

    def item_stay_rate(self, item: int) -> float:
        p0 = self.global_stay_rate
        return float((self.item_stays[item] + STAY_PRIOR * p0) / (self.item_counts[item] + STAY_PRIOR))

    def retrieve(self, query: np.ndarray, k: int) -> list[str]:
        """The reflections of the ``k`` users most similar to ``query`` (a unit history embedding)."""
        if k <= 0 or not self.reflections:
            return []
        scores = self.keys @ query
        order = np.argsort(-scores, kind="stable")[:k]
        return [self.reflections[i] for i in order]

    def describe(self) -> str:
        w = self.critic_weights
        parts = ", ".join(f"{name} {w[i + 1]:+.2f}" for i, name in enumerate(CRITIC_FEATURES))
        return f"{len(self.reflections)} reflections; critic bias {w[0]:+.2f}, {parts}"

    def to_json(self) -> dict[str, Any]:
        return {"reflections": self.reflections, "keys": self.keys.tolist(),
                "critic_features": list(CRITIC_FEATURES), "critic_weights": self.critic_weights.tolist(),
                "item_stays": self.item_stays.tolist(), "item_counts": self.item_counts.tolist(),
                "stats": self.stats}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "BiLLPMemory":
        return cls(reflections=list(data["reflections"]), keys=np.asarray(data["keys"], dtype=np.float32),
                   critic_weights=np.asarray(data["critic_weights"], dtype=np.float64),
                   item_stays=np.asarray(data["item_stays"], dtype=np.float64),
                   item_counts=np.asarray(data["item_counts"], dtype=np.float64), stats=dict(data.get("stats", {})))


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-12)


def catalogue_item(grounder, title: str | None) -> int:
    """The catalogue item of a title the transcript shows (exact match), -1 when there is none."""
    item = grounder.exact_item(title) if title is not None else None
    return -1 if item is None else item


def history_key(history: Sequence[int], embeddings: np.ndarray) -> np.ndarray:
    """The retrieval key of a user: unit mean embedding of the history items (zeros without one)."""
    items = [i for i in history if i >= 0]
    if not items:
        return np.zeros(embeddings.shape[1], dtype=np.float32)
    return _unit(embeddings[items].mean(axis=0)).astype(np.float32)


def build_memory(episodes: Sequence[dict[str, Any]], grounder, critic_window: int, l2: float = 1e-2) -> BiLLPMemory:
    """Macro- and micro-learning from finished episodes (``ulrec.episodes`` rows, e.g. the training
    rollouts): one reflection per episode, and the critic fitted on every step (label: stayed).

    ``grounder`` (``ulrec.grounding.Grounder``) gives the catalogue, its title embeddings and the
    title → item match, the same ones :class:`BiLLPPolicy` reads at run time. The item stay rate of
    a training step leaves that step out, so the critic does not learn to trust a feature that
    memorised its own label."""
    titles, embeddings = grounder.titles, grounder.catalogue_embeddings()
    n_items = len(titles)
    stays = np.zeros(n_items)
    counts = np.zeros(n_items)
    parsed = []
    for ep in episodes:
        steps = sorted(ep["steps"], key=lambda s: s["step"])
        if not steps:
            continue
        history = [catalogue_item(grounder, t) for t in parse_transcript(steps[0]["prompt"]).history]
        parsed.append((ep, steps, history))
        for s in steps:
            if s["item_id"] >= 0:
                stays[s["item_id"]] += float(s["live"])
                counts[s["item_id"]] += 1
    if not parsed:
        raise ValueError("BiLLP memory: no episodes with steps to learn from")
    p0 = float(stays.sum() / counts.sum()) if counts.sum() else 0.5
    rows, labels, reflections, keys = [], [], [], []
    for ep, steps, history in parsed:
        received: list[int] = []
        for s in steps:
            item = s["item_id"]
            if item >= 0:
                loo_stays, loo_counts = stays[item] - float(s["live"]), counts[item] - 1
                rate = (loo_stays + STAY_PRIOR * p0) / (loo_counts + STAY_PRIOR)
                rows.append(critic_features(item, received, history, embeddings, rate, critic_window))
                labels.append(float(s["live"]))
            received.append(item)
        got = [titles[s["item_id"]] if s["item_id"] >= 0 else "(unreadable)" for s in steps]
        similar_to = None
        last = steps[-1]["item_id"]
        if ep["exit_reason"] == "similar" and last >= 0:
            earlier = [i for i in received[:-1][-critic_window:] if i >= 0]
            if earlier:
                similar_to = titles[earlier[int(np.argmax(embeddings[earlier] @ embeddings[last]))]]
        reflections.append(reflect([titles[i] for i in history if i >= 0], got, [s["reward"] for s in steps],
                                   ep["exit_reason"], similar_to))
        keys.append(history_key(history, embeddings))
    x, y = np.asarray(rows), np.asarray(labels)
    if len(set(labels)) < 2:
        # Every step stayed (or none did): no contrast to learn from; the critic is the base rate.
        weights = np.zeros(len(CRITIC_FEATURES) + 1)
        weights[0] = float(np.log((y.mean() + 1e-3) / (1 - y.mean() + 1e-3)))
    else:
        weights = fit_logistic(x, y, l2=l2)
    accuracy = float(((stay_probability(weights, x) >= 0.5) == (y >= 0.5)).mean())
    stats = {"episodes": len(parsed), "steps": int(len(y)), "stay_rate": float(y.mean()),
             "critic_train_accuracy": accuracy}
    return BiLLPMemory(reflections=reflections, keys=np.asarray(keys, dtype=np.float32), critic_weights=weights,
                       item_stays=stays, item_counts=counts, stats=stats)


# --------------------------------------------------------------------------------------- prompting
GUIDANCE_HEAD = "Lessons from similar users:"
PLAN_NOTE = ("Before the next action, write a one-line plan that starts with 'Plan k:' (k is the turn): "
             "what kind of item to recommend next and why, following the lessons.")


def guidance_text(reflections: Sequence[str]) -> str:
    if not reflections:
        return ""
    return GUIDANCE_HEAD + "\n" + "\n".join(f"- {single_line(r)}" for r in reflections) + "\n\n"


def planner_prompt(transcript: Transcript, reflections: Sequence[str]) -> str:
    """The Planner's prompt: guidance, the note, the transcript without its open action, ``Plan k:``."""
    return f"{guidance_text(reflections)}{PLAN_NOTE}\n\n{transcript.head}\nPlan {transcript.open_step}:"


def actor_prompt(transcript: Transcript, reflections: Sequence[str], plan: str | None) -> str:
    """The Actor's prompt: guidance, the transcript, the plan line (when planning), ``Action k:``."""
    k = transcript.open_step
    plan_line = f"Plan {k}: {single_line(plan)}\n" if plan is not None else ""
    return f"{guidance_text(reflections)}{transcript.head}\n{plan_line}Action {k}:"


def candidate_seed(seed: int, j: int) -> int:
    """The sampling seed of proposal ``j`` of a request with ``seed`` (proposal 0 keeps it)."""
    if j == 0:
        return int(seed)
    return int((seed * 1_000_003 + j * 7_919 + 12_345) % (2**31 - 1))


class BiLLPPolicy:
    """Planner → Actor proposals → Critic choice, around any policy backend (see the module doc).

    grounder: maps proposal titles to catalogue items (``ulrec.grounding.Grounder``; its catalogue
    embeddings are the critic's and the memory's). plan_tokens 0 skips the plan line (constrained
    decoding can only write actions)."""

    backend: str

    def __init__(self, inner: Policy, memory: BiLLPMemory, grounder, *, reflections: int = 2,
                 plan_tokens: int = 32, candidates: int = 4, critic_window: int = 4) -> None:
        self.inner = inner
        self.memory = memory
        self.grounder = grounder
        self.backend = f"billp+{inner.backend}"
        self.sampling = inner.sampling
        self.reflections = reflections
        self.plan_tokens = plan_tokens
        self.candidates = max(1, candidates)
        self.critic_window = critic_window
        self.last_plans: list[str] = []
        self.last_scores: list[list[float]] = []
        # Seeds for calls that pass none (the replica always passes them).
        self._seeds = SeedStream(inner.sampling.seed)

    def _items(self, titles: Sequence[str | None]) -> list[int]:
        return [catalogue_item(self.grounder, t) for t in titles]

    def generate(self, prompts: list[str], seeds: list[int] | None = None, temperature: float | None = None,
                 max_tokens: int | None = None) -> list[GenerationResult]:
        if not prompts:
            return []
        if seeds is None:
            seeds = self._seeds.take(len(prompts))
        emb = self.grounder.catalogue_embeddings()
        parsed = [parse_transcript(p) for p in prompts]
        histories = [self._items(t.history) for t in parsed]
        received = [self._items([s.title for s in t.steps]) for t in parsed]
        guidance = [self.memory.retrieve(history_key(h, emb), self.reflections) for h in histories]
        plan_tokens = [0] * len(prompts)
        plans: list[str | None] = [None] * len(prompts)
        if self.plan_tokens > 0:
            out = self.inner.generate([planner_prompt(t, g) for t, g in zip(parsed, guidance)], seeds=seeds,
                                      temperature=temperature, max_tokens=self.plan_tokens)
            plans = [o.text for o in out]
            plan_tokens = [o.num_tokens for o in out]
        k = self.candidates
        actor = [actor_prompt(t, g, p) for t, g, p in zip(parsed, guidance, plans)]
        proposals = self.inner.generate([a for a in actor for _ in range(k)],
                                        seeds=[candidate_seed(s, j) for s in seeds for j in range(k)],
                                        temperature=temperature, max_tokens=max_tokens)
        grounded = self.grounder.ground([parse_action(p.text) for p in proposals])
        results, self.last_scores = [], []
        for i in range(len(prompts)):
            scores = []
            for j in range(k):
                g = grounded[i * k + j]
                if g.format_error or g.item_id < 0:
                    scores.append(-1.0)  # below any probability: an unreadable answer ends the episode
                    continue
                x = critic_features(g.item_id, received[i], histories[i], emb,
                                    self.memory.item_stay_rate(g.item_id), self.critic_window)
                scores.append(float(stay_probability(self.memory.critic_weights, x)[0]))
            best = int(np.argmax(scores))  # first of equals: proposal 0 unless another is better
            tokens = plan_tokens[i] + sum(proposals[i * k + j].num_tokens for j in range(k))
            results.append(GenerationResult(text=proposals[i * k + best].text, num_tokens=tokens))
            self.last_scores.append(scores)
        self.last_plans = [p or "" for p in plans]
        return results

    def close(self) -> None:
        self.inner.close()


def save_memory(memory: BiLLPMemory, path) -> None:
    from ulrec.io import write_json

    write_json(path, memory.to_json())


def load_memory(path) -> BiLLPMemory:
    from pathlib import Path

    return BiLLPMemory.from_json(json.loads(Path(path).read_text(encoding="utf-8")))
