"""User shards: batched environments over a slice of the episodes, driving them through replicas.

A shard splits its episodes into *lanes* of at most ``lane_size`` episodes; each lane is one
batched :class:`~ulrec.simulator.env.EchoChamberEnv` stepped in lock-step. Lanes run as asyncio
tasks, each with at most one request at a replica, so while one lane waits for generation the
others build prompts and step their envs: the replicas always have work queued.

:class:`Lane` is the step logic (no Ray): prompts for the live episodes, then one env step with
the grounded items. Finished episodes leave as Parquet rows at once (their prompts are rebuilt
from the compact step records), so a shard only keeps the small state of running episodes.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from rollout.episode import (
    EpisodeLabels,
    EpisodeState,
    GroundedAction,
    StepRecord,
    episode_row,
    next_prompt,
    rows_to_table,
)
from ulrec.prompts import PromptBuilder
from ulrec.simulator.env import EchoChamberEnv

# (user_id, seed, history item ids): how the driver hands an episode to a shard.
EpisodeSpec = tuple[int, int, tuple[int, ...]]


class Lane:
    """A group of episodes stepped together in one batched env.

    Bookkeeping beyond the env: a format error ends an episode here, with no item recommended.
    The batched env has no way to end one row without a step, so such a row gets a placeholder
    item while the env still runs it and its answers are ignored; Len and Traj Reward are counted
    from this lane's step records.
    """

    def __init__(
        self,
        env: EchoChamberEnv,
        episodes: list[EpisodeState],
        builder: PromptBuilder,
        titles: Sequence[str],
    ) -> None:
        self.env = env
        self.episodes = episodes
        self.builder = builder
        self.titles = titles
        self.running = np.ones(len(episodes), dtype=bool)
        env.reset(np.array([e.user_id for e in episodes], dtype=np.int64))

    @property
    def num_running(self) -> int:
        return int(self.running.sum())

    def requests(self) -> tuple[list[int], list[str], list[int]]:
        """Rows, prompts and sampling seeds of the running episodes' next actions."""
        rows = np.flatnonzero(self.running).tolist()
        prompts = [next_prompt(self.episodes[r], self.builder, self.titles) for r in rows]
        seeds = [self.episodes[r].next_seed() for r in rows]
        return rows, prompts, seeds

    def apply(self, rows: list[int], actions: Sequence[GroundedAction]) -> list[EpisodeState]:
        """Record the answers for ``rows`` and step the env; return the episodes that ended."""
        finished: list[EpisodeState] = []
        items = self._placeholder_items()
        stepped: list[tuple[int, GroundedAction]] = []
        for row, action in zip(rows, actions, strict=True):
            episode = self.episodes[row]
            episode.num_generated_tokens += action.num_tokens
            if action.format_error:
                episode.steps.append(StepRecord(action.raw_output, -1, False, 0.0, False, "format_error"))
                self.running[row] = False
                finished.append(episode)
            else:
                items[row] = action.item_id
                stepped.append((row, action))
        if stepped:
            result = self.env.step(items)
            for row, action in stepped:
                reason = str(result.reason[row])
                self.episodes[row].steps.append(
                    StepRecord(
                        action.raw_output,
                        action.item_id,
                        action.substituted,
                        float(result.reward[row]),
                        bool(result.live[row]),
                        reason,
                    )
                )
                if reason != "stay":
                    self.running[row] = False
                    finished.append(self.episodes[row])
        return finished

    def _placeholder_items(self) -> np.ndarray:
        """Items for rows that take no real step: ignored by the env (done) or by this lane.

        A row ended here by a format error may still be running in the env; it gets its last
        accepted item, which the env ends as a repeat, so it soon stops costing anything.
        """
        items = np.zeros(len(self.episodes), dtype=np.int64)
        for row in np.flatnonzero(~self.running & ~self.env.done):
            accepted = [s.item_id for s in self.episodes[row].steps if s.live]
            items[row] = accepted[-1] if accepted else 0
        return items


def finished_row(episode: EpisodeState, labels: EpisodeLabels, builder: PromptBuilder, titles: Sequence[str]) -> dict:
    """The Parquet row of an episode that ended (Len, Traj Reward from its accepted steps)."""
    accepted = [s for s in episode.steps if s.live]
    return episode_row(
        episode,
        length=len(accepted),
        total_reward=float(sum(s.reward for s in accepted)),
        labels=labels,
        builder=builder,
        titles=titles,
    )


@dataclass(frozen=True)
class ShardReport:
    """What a shard streams to the driver: finished episodes plus progress counters."""

    episodes: pa.Table  # EPISODE_SCHEMA rows (possibly none)
    running: int  # episodes of this shard still running
    steps: int  # steps taken since the previous report


class _ReplicaRouter:
    """Sends a lane's prompts to the replica that served the lane before (its *home*), so the
    prefix cache holding that lane's transcripts is reused; a lane gets a new home — the least
    loaded replica as this shard sees it — on its first request, when its home is down (retrying
    there while Ray restarts it) or when its home has more than ``slack`` prompts outstanding
    beyond the least-loaded replica."""

    def __init__(self, replicas: list, attempts: int, backoff_s: float, slack: int = 0, model=None) -> None:
        self.replicas = replicas
        self.model = model  # the ModelRef every request names (None: whatever the replica serves)
        self.outstanding = [0] * len(replicas)
        self.down_until = [0.0] * len(replicas)
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.slack = slack
        self.home: dict[int, int] = {}
        self.moves = 0  # lanes sent away from their home (down or overloaded)
        self._tiebreak = itertools.count()

    def _least_loaded(self, now: float) -> int:
        turn = next(self._tiebreak)
        n = len(self.replicas)
        return min(range(n), key=lambda i: (self.down_until[i] > now, self.outstanding[i], (i - turn) % n))

    def _pick(self, lane: int | None = None) -> int:
        now = time.monotonic()
        best = self._least_loaded(now)
        home = self.home.get(lane) if lane is not None else None
        if home is not None:
            usable = self.down_until[home] <= now
            if usable and self.outstanding[home] <= self.outstanding[best] + self.slack:
                return home
            self.moves += 1
        if lane is not None:
            self.home[lane] = best
        return best

    async def act(self, prompts: list[str], seeds: list[int], temperature: float,
                  lane: int | None = None) -> list[GroundedAction]:
        failures = 0
        while True:
            i = self._pick(lane)
            self.outstanding[i] += len(prompts)
            try:
                return await self.replicas[i].act.remote(prompts, seeds, temperature, self.model)
            except RayActorError as exc:
                # A replica that is restarting (ActorUnavailableError) comes back however long its
                # engine takes to start (an AsyncLLM replica: ~1 min on 2 cores); only other
                # failures use up attempts.
                if not isinstance(exc, ActorUnavailableError):
                    failures += 1
                    if failures >= self.attempts:
                        raise
                attempt = max(failures, 1)
                # Let Ray restart it; meanwhile the lane moves to another replica at once, and
                # waits only when every replica is down.
                now = time.monotonic()
                self.down_until[i] = now + self.backoff_s * attempt
                if lane is not None and self.home.get(lane) == i:
                    del self.home[lane]
                    self.moves += 1
                if all(until > now for until in self.down_until):
                    await asyncio.sleep(min(self.backoff_s * attempt, 5.0))
            finally:
                self.outstanding[i] -= len(prompts)


@ray.remote
class UserShard:
    """Runs the episodes it is given against the policy replicas and streams them back.

    ``env_factory()`` builds the shard's env once (its user model is loaded from the saved
    simulator); every lane gets its own :class:`EchoChamberEnv` over that user model.
    """

    def __init__(
        self,
        env_factory: Callable[[], EchoChamberEnv],
        builder: PromptBuilder,
        titles: list[str],
        labels: EpisodeLabels,
        replicas: list,
        *,
        temperature: float,
        lane_size: int,
        flush_episodes: int,
        flush_s: float,
        request_attempts: int,
        retry_backoff_s: float,
        model=None,
        lane_affinity: bool = True,
    ) -> None:
        template_env = env_factory()
        self.user_model = template_env.user_model
        self.env_config = template_env.config
        self.builder = builder
        self.titles = titles
        self.labels = labels
        self.temperature = temperature
        self.lane_size = lane_size
        self.flush_episodes = flush_episodes
        self.flush_s = flush_s
        # A lane stays on its replica unless that one has a lane's worth of prompts more queued.
        self.router = _ReplicaRouter(replicas, request_attempts, retry_backoff_s, slack=lane_size, model=model)
        self.lane_affinity = lane_affinity  # off: every request to the least-loaded replica

    def ready(self) -> bool:
        return True

    async def run(self, specs: list[EpisodeSpec]):
        """Play ``specs``; yield :class:`ShardReport` batches as episodes finish (an async
        generator: the driver consumes it as a Ray streaming generator)."""
        episodes = [EpisodeState(int(u), int(s), tuple(h)) for u, s, h in specs]
        lanes = [
            Lane(
                EchoChamberEnv(self.user_model, self.env_config),
                episodes[i : i + self.lane_size],
                self.builder,
                self.titles,
            )
            for i in range(0, len(episodes), self.lane_size)
        ]
        outbox: list[dict] = []
        counters = {"steps": 0}
        changed = asyncio.Event()

        async def drive(lane: Lane, lane_id: int) -> None:
            while lane.num_running:
                rows, prompts, seeds = lane.requests()
                actions = await self.router.act(prompts, seeds, self.temperature,
                                                lane=lane_id if self.lane_affinity else None)
                for episode in lane.apply(rows, actions):
                    outbox.append(finished_row(episode, self.labels, self.builder, self.titles))
                counters["steps"] += len(rows)
                changed.set()

        tasks = [asyncio.create_task(drive(lane, k)) for k, lane in enumerate(lanes)]
        last_flush = time.monotonic()
        try:
            while True:
                pending = [t for t in tasks if not t.done()]
                for t in tasks:
                    if t.done() and t.exception() is not None:
                        raise t.exception()
                if not pending:
                    break
                changed.clear()
                try:
                    await asyncio.wait_for(changed.wait(), timeout=self.flush_s)
                except asyncio.TimeoutError:
                    pass
                due = time.monotonic() - last_flush >= self.flush_s
                if len(outbox) >= self.flush_episodes or (due and (outbox or counters["steps"])):
                    yield self._report(outbox, counters, lanes)
                    last_flush = time.monotonic()
            yield self._report(outbox, counters, lanes)
        finally:
            for t in tasks:
                t.cancel()

    def _report(self, outbox: list[dict], counters: dict, lanes: list[Lane]) -> ShardReport:
        """Empties ``outbox`` and the step counter into one report."""
        report = ShardReport(rows_to_table(outbox), sum(lane.num_running for lane in lanes), counters["steps"])
        outbox.clear()
        counters["steps"] = 0
        return report
