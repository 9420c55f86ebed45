"""Policy replicas: one engine each, batching the prompts that many user shards send.

A replica is an asyncio actor. ``act`` queues a shard's prompts and awaits their answers; one
batching loop takes whatever is waiting (up to ``max_batch_size`` prompts of one temperature) and
runs the engine on it in a worker thread, so requests keep arriving while the engine works.

Parsing and grounding happen here, after generation, in a second thread: the next batch is already
generating while the previous one is grounded, so the engine never waits on the embedder. Doing it
in the replica (not in every shard) means one embedding model and one FAISS index per replica,
next to the accelerator the replica holds, instead of one per shard: shards stay light enough for
thousands of users, and only small answers (item id, title) travel back.

With an engine that batches continuously (``policy.engine: async``, an ``AsyncPolicy``) there is
no batching loop: each ``act`` call's prompts go straight into the engine's running batch (one
request per prompt, each with its own seed and temperature), and the call's answers are grounded on
the same grounding thread while the engine keeps generating for the other calls.

A replica knows which model directory it serves. Kept between rollouts (``rollout.keep_engines``),
it switches to the next model's weights in place (``use_model``) where the engine can; every
``act`` names the model it wants, so a replica that Ray restarted (its factory builds the first
model) switches before it answers.
"""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import ray

from rollout.episode import GroundedAction
from ulrec.policy import AsyncPolicy, GenerationResult, Policy
from ulrec.prompts import parse_action


class TitleGrounder(Protocol):
    """What a replica needs from ulrec.grounding.Grounder."""

    def ground(self, raw_titles: list[str | None]) -> list[Any]: ...


def parse_and_ground(results: Sequence[GenerationResult], grounder: TitleGrounder) -> list[GroundedAction]:
    """Parse each completion's ``recommend[ title ]`` and map the title to a catalogue item.

    Unparseable completions (and titles that normalise to nothing) become format errors, item -1.
    """
    grounded = grounder.ground([parse_action(r.text) for r in results])
    actions = []
    for res, g in zip(results, grounded, strict=True):
        if g.format_error or g.item_id < 0:
            actions.append(GroundedAction(res.text, res.num_tokens, -1, "", False, True))
        else:
            item = int(g.item_id)
            actions.append(GroundedAction(res.text, res.num_tokens, item, g.title, bool(g.substituted), False))
    return actions


@dataclass(frozen=True)
class ModelRef:
    """A model a replica serves: its directory, and its content's version (a checkpoint
    retrained at the same path is another model)."""

    path: str
    version: str


@dataclass
class _Request:
    prompts: list[str]
    seeds: list[int]
    temperature: float
    future: asyncio.Future = field(repr=False)


@ray.remote
class PolicyReplica:
    """One policy engine plus a grounder, serving ``act`` calls from any number of shards.

    ``policy_factory(titles)`` and ``grounder_factory(titles)`` build the engine and the grounder
    inside the actor (so an actor restarted after a failure builds fresh ones); see
    ``rollout.driver.RolloutSources``.
    """

    def __init__(
        self,
        policy_factory: Callable[[list[str]], Policy],
        grounder_factory: Callable[[list[str]], TitleGrounder],
        titles: list[str],
        max_batch_size: int,
        model: ModelRef | None = None,
    ) -> None:
        self.policy = policy_factory(titles)
        self.model = model  # what policy_factory loads; None: unnamed (never switched)
        self.continuous = isinstance(self.policy, AsyncPolicy)
        self.grounder = grounder_factory(titles)
        self.max_batch_size = max_batch_size
        self._queue: list[_Request] = []
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._grounding: set[asyncio.Task] = set()
        # One thread each: the engine is not re-entrant, and grounding must not wait behind it.
        self._generate_pool = ThreadPoolExecutor(1, thread_name_prefix="generate")
        self._ground_pool = ThreadPoolExecutor(1, thread_name_prefix="ground")
        # batches: engine calls (continuous: act calls); generate_s: seconds the engine was busy.
        self._stats = {"batches": 0, "prompts": 0, "tokens": 0, "generate_s": 0.0, "swaps": 0, "swap_s": 0.0}
        self._in_flight, self._busy_since = 0, 0.0
        self._swap_lock = asyncio.Lock()  # concurrent use_model calls for one model: one switch

    def ready(self) -> str:
        return self.policy.backend

    def stats(self) -> dict:
        """The counters above, plus the engine's prefix-cache token counts where it reports them."""
        prefix_cache = getattr(self.policy, "prefix_cache", None)
        return dict(self._stats, **({"prefix_cache": prefix_cache()} if prefix_cache else {}))

    def serving(self) -> ModelRef | None:
        return self.model

    def reset_stats(self) -> None:
        """Zero the counters (a kept replica starts each rollout's figures afresh)."""
        self._stats = dict.fromkeys(self._stats, 0)
        reset = getattr(self.policy, "reset_prefix_cache_counts", None)
        if reset:
            reset()

    async def use_model(self, model: ModelRef) -> str | None:
        """Serve ``model`` from now on, switching weights in place; returns None when it does, else
        why it cannot (the caller then starts a new replica). Call between rollouts."""
        from ulrec.policy.weights import swap_blocker

        async with self._swap_lock:
            if model == self.model:
                return None
            swap = getattr(self.policy, "swap_weights_async" if self.continuous else "swap_weights", None)
            if swap is None or self.model is None:
                return f"the {self.policy.backend} backend cannot switch weights in place"
            blocker = swap_blocker(self.model.path, model.path)
            if blocker:
                return blocker
            started = time.perf_counter()
            if self.continuous:
                await swap(model.path)
            else:  # on the engine's thread: never beside a generate call
                await asyncio.get_running_loop().run_in_executor(self._generate_pool, swap, model.path)
            self.model = model
            self._stats["swaps"] += 1
            self._stats["swap_s"] += time.perf_counter() - started
            return None

    async def act(self, prompts: list[str], seeds: list[int], temperature: float,
                  model: ModelRef | None = None) -> list[GroundedAction]:
        """Generate, parse and ground one answer per prompt (order kept), with ``model``'s weights
        when given."""
        if not prompts:
            return []
        if model is not None and model != self.model:
            blocker = await self.use_model(model)
            if blocker:
                raise RuntimeError(f"replica serves {self.model}, cannot switch to {model}: {blocker}")
        if self.continuous:
            return await self._act_continuous(prompts, seeds, temperature)
        if self._loop_task is None:
            self._wakeup = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._batch_loop())
        loop = asyncio.get_running_loop()
        chunks = []
        for start in range(0, len(prompts), self.max_batch_size):
            req = _Request(
                prompts[start : start + self.max_batch_size],
                seeds[start : start + self.max_batch_size],
                temperature,
                loop.create_future(),
            )
            self._queue.append(req)
            chunks.append(req.future)
        self._wakeup.set()
        answers = await asyncio.gather(*chunks)
        return [a for chunk in answers for a in chunk]

    async def _act_continuous(self, prompts: list[str], seeds: list[int], temperature: float) -> list[GroundedAction]:
        if self._in_flight == 0:
            self._busy_since = time.perf_counter()
        self._in_flight += 1
        try:
            results = await self.policy.generate_async(prompts, seeds, temperature)
        except Exception:
            if getattr(self.policy, "dead", False):
                # The engine (a child process) is gone for good: end this actor so Ray restarts it
                # with a fresh engine, as it would a replica whose in-process engine died.
                os._exit(1)
            raise
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._stats["generate_s"] += time.perf_counter() - self._busy_since
        self._stats["batches"] += 1
        self._stats["prompts"] += len(prompts)
        self._stats["tokens"] += sum(r.num_tokens for r in results)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._ground_pool, parse_and_ground, results, self.grounder)

    def _take_batch(self) -> list[_Request]:
        """FIFO requests of the first request's temperature, up to max_batch_size prompts."""
        temperature = self._queue[0].temperature
        batch, size, rest = [], 0, []
        for req in self._queue:
            fits = size + len(req.prompts) <= self.max_batch_size or not batch
            if req.temperature == temperature and fits:
                batch.append(req)
                size += len(req.prompts)
            else:
                rest.append(req)
        self._queue = rest
        return batch

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = self._take_batch()
            prompts = [p for req in batch for p in req.prompts]
            seeds = [s for req in batch for s in req.seeds]
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(
                    self._generate_pool, self.policy.generate, prompts, seeds, batch[0].temperature
                )
            except Exception as exc:  # noqa: BLE001 - the callers get the error, the loop goes on
                for req in batch:
                    if not req.future.done():
                        req.future.set_exception(exc)
                continue
            self._stats["batches"] += 1
            self._stats["prompts"] += len(prompts)
            self._stats["tokens"] += sum(r.num_tokens for r in results)
            self._stats["generate_s"] += time.perf_counter() - started
            task = loop.create_task(self._finish(batch, results))
            self._grounding.add(task)
            task.add_done_callback(self._grounding.discard)

    async def _finish(self, batch: list[_Request], results: list[GenerationResult]) -> None:
        loop = asyncio.get_running_loop()
        try:
            actions = await loop.run_in_executor(self._ground_pool, parse_and_ground, results, self.grounder)
        except Exception as exc:  # noqa: BLE001
            for req in batch:
                if not req.future.done():
                    req.future.set_exception(exc)
            return
        start = 0
        for req in batch:
            if not req.future.done():
                req.future.set_result(actions[start : start + len(req.prompts)])
            start += len(req.prompts)

    def close(self) -> None:
        self.policy.close()
