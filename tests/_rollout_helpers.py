"""Fakes and fixtures for the rollout tests: a scripted policy, a cheap embedder, a tiny env.

The fakes are shipped to Ray actors by value (see ``register_by_value``), so worker processes
need not import the tests package.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
import zlib
from functools import partial
from pathlib import Path

import numpy as np
import ray.cloudpickle

from rollout.driver import RolloutSources
from ulrec.config import Config
from ulrec.grounding import Grounder
from ulrec.policy import GenerationResult, SamplingConfig
from ulrec.prompts import format_action
from ulrec.simulator import EchoChamberEnv, EnvConfig, MatrixUserModel

TITLES = [
    "Heat (1995)",
    "[REC] (2007)",
    "Amélie, or Le Fabuleux Destin d'Amélie Poulain (2001)",
    'The "Burbs" (1989)',
    "Crouching Tiger, Hidden Dragon [Wo hu cang long] (2000)",
    "千と千尋の神隠し (2001)",
] + [f"Item {k} of the catalogue" for k in range(6, 40)]


def register_by_value() -> None:
    """Pickle this module by value so Ray workers can run its fakes."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class ScriptedPolicy:
    """A stand-in policy: each (prompt, seed) picks a catalogue title with its own RNG and
    writes it exactly, with a misspelling (→ substitution), or unparseably (→ format error)."""

    backend = "fake"

    def __init__(
        self, titles: list[str], *, p_substitute: float = 0.15, p_format_error: float = 0.03, delay_s: float = 0.0
    ) -> None:
        self.titles = titles
        self.p_substitute = p_substitute
        self.p_format_error = p_format_error
        self.delay_s = delay_s
        self.sampling = SamplingConfig()
        self.calls = 0

    def generate(self, prompts, seeds=None, temperature=None):
        self.calls += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        return [self.answer(seed) for seed in seeds or [0] * len(prompts)]

    def answer(self, seed: int) -> GenerationResult:
        rng = random.Random(seed)
        title = rng.choice(self.titles)
        draw = rng.random()
        if draw < self.p_format_error:
            text = "I would suggest something nice"
        elif draw < self.p_format_error + self.p_substitute:
            text = " " + format_action(title + " (director's cut)")
        else:
            text = " " + format_action(title)
        return GenerationResult(text=text, num_tokens=len(text.split()) + 1)

    def close(self) -> None:
        pass


class AsyncScriptedPolicy(ScriptedPolicy):
    """The same answers behind the continuous-batching interface (``policy.engine: async``): each
    prompt is its own request, finishing after ``delay_s`` plus a seeded jitter, so requests of
    concurrent calls complete out of order.

    ``die_once``: a file path; the first instance to reach its ``die_after``-th call creates it and
    its engine dies (``dead``, every call fails), as when AsyncLLM's engine-core process is lost."""

    def __init__(self, titles, *, die_once: str | None = None, die_after: int = 5, **kwargs) -> None:
        super().__init__(titles, **kwargs)
        self.die_once, self.die_after, self.dead = die_once, die_after, False

    async def generate_async(self, prompts, seeds=None, temperature=None):
        self.calls += 1
        if self.die_once and self.calls >= self.die_after and not Path(self.die_once).exists():
            Path(self.die_once).touch()
            self.dead = True
        if self.dead:
            raise RuntimeError("engine core died")
        return list(await asyncio.gather(*(self._one(seed) for seed in seeds or [0] * len(prompts))))

    async def _one(self, seed: int) -> GenerationResult:
        await asyncio.sleep(self.delay_s * (0.5 + random.Random(seed).random()))
        return self.answer(seed)


def hash_embed(texts: list[str], dim: int = 64) -> np.ndarray:
    """Character-trigram hashing: similar strings get close vectors, no model needed."""
    out = np.zeros((len(texts), dim), dtype=np.float32)
    for row, text in enumerate(texts):
        padded = f"  {text.lower()}  "
        for k in range(len(padded) - 2):
            out[row, zlib.crc32(padded[k : k + 3].encode()) % dim] += 1.0
    return out


def scripted_policy_factory(titles: list[str], engine: str = "sync", **kwargs) -> ScriptedPolicy:
    return (AsyncScriptedPolicy if engine == "async" else ScriptedPolicy)(titles, **kwargs)


def hash_grounder_factory(titles: list[str]) -> Grounder:
    return Grounder(titles, embed_fn=hash_embed)


def tiny_user_model(n_users: int, n_items: int, seed: int = 0) -> MatrixUserModel:
    """Rewards mostly >= 2 (users stay a while), random item vectors."""
    rng = np.random.default_rng(seed)
    rewards = rng.choice([1.0, 3.0, 4.0, 5.0], p=[0.1, 0.3, 0.3, 0.3], size=(n_users, n_items))
    vectors = rng.normal(size=(n_items, 8)).astype(np.float32)
    return MatrixUserModel(rewards=rewards, item_vectors=vectors)


def tiny_env(n_users: int, n_items: int, max_steps: int, distance_threshold: float = 0.5) -> EchoChamberEnv:
    return EchoChamberEnv(
        tiny_user_model(n_users, n_items),
        EnvConfig(distance_threshold=distance_threshold, max_steps=max_steps),
    )


def fake_sources(n_users: int, max_steps: int, **policy_kwargs) -> RolloutSources:
    """Scripted policy + hashing grounder + tiny matrix env; histories of 3 to 8 items.
    ``engine="async"`` makes the policy an AsyncPolicy (the replica's continuous path)."""
    rng = random.Random(1)
    histories = {u: [rng.randrange(len(TITLES)) for _ in range(rng.randint(3, 8))] for u in range(n_users)}
    return RolloutSources(
        titles=list(TITLES),
        histories=histories,
        policy_factory=partial(scripted_policy_factory, **policy_kwargs),
        grounder_factory=hash_grounder_factory,
        env_factory=partial(tiny_env, n_users, len(TITLES), max_steps),
    )


def rollout_config(root: Path, **rollout) -> Config:
    """Small actors that fit the tests' 2-CPU Ray session; frequent reports."""
    section = dict(num_shards=2, num_replicas=1, replica_num_cpus=0.5, shard_num_cpus=0.25, lane_size=16,
                   flush_episodes=4, flush_s=0.2, retry_backoff_s=0.2, max_restarts=2)
    section.update(rollout)
    return Config.model_validate({"run": {"root": str(root), "name": "t", "progress": False}, "rollout": section})
