"""Episodes as data: the per-user state a shard keeps, the Parquet row schema, and the summary.

Pure Python (no Ray): the actors only move these records around.

Per-user state is kept small so that 10,000+ users fit in flight: a step stores the raw output,
the grounded item and the env's answer, never the prompt. Prompts are a pure function of the
user's history titles and the earlier steps (:class:`ulrec.prompts.PromptBuilder`), so the exact
prompt the policy saw at step k is rebuilt when the finished episode is written out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import pyarrow as pa

from ulrec.episodes import END_REASONS, EPISODE_SCHEMA, STEP_REASONS, STEP_TYPE, episode_row as _episode_row, episodes_table, step_row  # noqa: F401
from ulrec.prompts import PromptBuilder, StepView, observation_text, parse_action

# The episode format lives in ulrec.episodes; these names are what the rollout code reads.
EXIT_REASONS = END_REASONS  # how an episode ends ("horizon" is a truncation, not an exit)

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def generation_seed(seed: int, user_id: int, step: int) -> int:
    """The sampling seed of one request, fixed by (episode seed, user, step).

    Independent of batching, shard and replica, so an episode redone after a failure (or a request
    retried on another replica) samples the same way.
    """
    h = _splitmix64(seed & _MASK64)
    h = _splitmix64(h ^ (user_id & _MASK64))
    h = _splitmix64(h ^ (step & _MASK64))
    return int(h & 0x7FFFFFFF)


@dataclass(frozen=True, slots=True)
class GroundedAction:
    """One policy answer after parsing and grounding (what a replica returns per prompt).

    item_id is -1 and title "" on a format error (unparseable output).
    """

    raw_output: str
    num_tokens: int
    item_id: int
    title: str
    substituted: bool
    format_error: bool


@dataclass(slots=True)
class StepRecord:
    """One taken step, without its prompt (rebuilt on write-out)."""

    raw_output: str
    item_id: int
    substituted: bool
    reward: float
    live: bool
    reason: str


@dataclass(slots=True)
class EpisodeState:
    """One (user, seed) episode inside a shard."""

    user_id: int
    seed: int
    history: tuple[int, ...]  # the item ids shown as the user's history (already the last N)
    steps: list[StepRecord] = field(default_factory=list)
    num_generated_tokens: int = 0

    @property
    def key(self) -> tuple[int, int]:
        return (self.user_id, self.seed)

    @property
    def exit_reason(self) -> str | None:
        if not self.steps or self.steps[-1].reason == "stay":
            return None
        return self.steps[-1].reason

    def next_seed(self) -> int:
        return generation_seed(self.seed, self.user_id, len(self.steps) + 1)


def step_view(step: StepRecord, titles: Sequence[str]) -> StepView:
    """How an earlier step appears in later prompts, including a substitution note."""
    proposed = parse_action(step.raw_output)
    if step.item_id < 0:
        return StepView(
            title=None,
            observation=observation_text(stayed=step.live, reward=None, format_error=True),
            raw_output=step.raw_output,
        )
    return StepView(
        title=proposed,
        observation=observation_text(
            stayed=step.live,
            reward=step.reward,
            proposed_title=proposed,
            recommended_title=titles[step.item_id],
            substituted=step.substituted,
        ),
        raw_output=step.raw_output,
    )


def history_titles(state: EpisodeState, titles: Sequence[str]) -> list[str]:
    return [titles[i] for i in state.history]


def next_prompt(state: EpisodeState, builder: PromptBuilder, titles: Sequence[str]) -> str:
    """The prompt for the episode's next action (earlier steps with their observations)."""
    views = [step_view(s, titles) for s in state.steps]
    return builder.build(history_titles(state, titles), views)


def episode_prompts(state: EpisodeState, builder: PromptBuilder, titles: Sequence[str]) -> list[str]:
    """The prompt of every taken step, exactly as the policy saw it."""
    history = history_titles(state, titles)
    views = [step_view(s, titles) for s in state.steps]
    return [builder.build(history, views[:k]) for k in range(len(views))]


@dataclass(frozen=True, slots=True)
class EpisodeLabels:
    """Columns that are the same for every episode of one rollout."""

    run: str
    policy: str
    split: str


def episode_row(
    state: EpisodeState,
    *,
    length: int,
    total_reward: float,
    labels: EpisodeLabels,
    builder: PromptBuilder,
    titles: Sequence[str],
) -> dict:
    """The Parquet row of a finished episode (see EPISODE_SCHEMA)."""
    reason = state.exit_reason
    if reason not in EXIT_REASONS:
        raise ValueError(f"episode of user {state.user_id} is not finished (last reason {reason!r})")
    prompts = episode_prompts(state, builder, titles)
    steps = [
        step_row(k, prompt=prompt, raw_output=s.raw_output, item_id=s.item_id,
                 title=titles[s.item_id] if s.item_id >= 0 else "", substituted=s.substituted,
                 reward=s.reward, live=s.live, reason=s.reason)
        for k, (s, prompt) in enumerate(zip(state.steps, prompts), start=1)
    ]
    return _episode_row(run=labels.run, policy=labels.policy, split=labels.split, user_id=state.user_id,
                        seed=state.seed, length=length, total_reward=total_reward, exit_reason=reason,
                        num_generated_tokens=state.num_generated_tokens, steps=steps)


def rows_to_table(rows: list[dict]) -> pa.Table:
    return episodes_table(rows)


@dataclass
class RolloutSummary:
    """Running totals over finished episodes; ``as_dict`` is what run_rollout returns."""

    episodes: int = 0
    total_length: int = 0
    total_reward: float = 0.0
    generated_tokens: int = 0
    steps: int = 0
    exact: int = 0
    substituted: int = 0
    format_errors: int = 0
    exit_reasons: dict[str, int] = field(default_factory=lambda: {r: 0 for r in EXIT_REASONS})

    def add(self, table: pa.Table) -> None:
        """Count the episodes of one Arrow block (EPISODE_SCHEMA)."""
        if table.num_rows == 0:
            return
        cols = table.select(["length", "total_reward", "exit_reason", "num_generated_tokens"]).to_pydict()
        self.episodes += table.num_rows
        self.total_length += sum(cols["length"])
        self.total_reward += sum(cols["total_reward"])
        self.generated_tokens += sum(cols["num_generated_tokens"])
        for reason in cols["exit_reason"]:
            self.exit_reasons[reason] += 1
        steps = table.column("steps").combine_chunks().flatten()
        item_ids = steps.field("item_id").to_pylist()
        substituted = steps.field("substituted").to_pylist()
        self.add_steps(item_ids, substituted)

    def add_steps(self, item_ids: Iterable[int], substituted: Iterable[bool]) -> None:
        for item, sub in zip(item_ids, substituted):
            self.steps += 1
            if item < 0:
                self.format_errors += 1
            elif sub:
                self.substituted += 1
            else:
                self.exact += 1

    @property
    def mean_length(self) -> float:
        return self.total_length / self.episodes if self.episodes else 0.0

    def as_dict(self, wall_s: float) -> dict:
        n, steps = self.episodes, self.steps
        return {
            "episodes": n,
            "steps": steps,
            "mean_length": self.mean_length,
            "mean_reward": self.total_reward / n if n else 0.0,
            "exit_reasons": {r: (c / n if n else 0.0) for r, c in self.exit_reasons.items()},
            "grounding": {
                "exact": self.exact / steps if steps else 0.0,
                "substituted": self.substituted / steps if steps else 0.0,
                "format_error": self.format_errors / steps if steps else 0.0,
            },
            "generated_tokens": self.generated_tokens,
            "tokens_per_s": self.generated_tokens / wall_s if wall_s > 0 else 0.0,
            "steps_per_s": steps / wall_s if wall_s > 0 else 0.0,
            "wall_s": wall_s,
        }
