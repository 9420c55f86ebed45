"""Engines that live across stages (``rollout.keep_engines``).

Inside a :func:`kept_engines` scope (``ulrec run`` and ``ulrec eval`` open one), a rollout leaves its
policy replicas running, and the next rollout with the same replica settings reuses them: each
replica loads the next model's weights into the engine it has (``PolicyReplica.use_model``)
instead of a new actor starting a new engine and grounder. Where an engine cannot switch (another
architecture or tokenizer, a backend without in-place loading, a wrapped policy such as BiLLP) the
replicas are replaced, with one line in the log saying why.

Training runs beside kept replicas only where the cluster has room for both (on a GPU cluster,
replicas on ``policy_gpu`` nodes and trainers on ``trainer_gpu`` nodes); otherwise
:func:`make_room` releases them first, so a job is never left waiting for resources they hold.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from rollout.replica import ModelRef

log = logging.getLogger("ulrec.rollout")

_POOL: "EnginePool | None" = None


class EnginePool:
    """The replicas one scope keeps, with the settings (``key``) they were started with."""

    def __init__(self) -> None:
        self.key: Any = None
        self.replicas: list = []
        self.demand: dict[str, float] = {}  # what the kept replicas hold, all together
        # Objects the replicas were created with (the catalogue): Ray needs them to restart one.
        self.pinned: Any = None

    def replicas_for(self, key: Any, model: ModelRef, demand: Mapping[str, float],
                     start: Callable[[], list], timeout_s: float, pinned: Any = None) -> tuple[list, str]:
        """Replicas serving ``model``: the kept ones when they were started with ``key`` and can
        switch to it, else new ones from ``start()`` (created with the object refs ``pinned``).
        Returns them and what happened."""
        how = "started"
        if self.replicas and key == self.key:
            try:
                ray.get([r.reset_stats.remote() for r in self.replicas], timeout=timeout_s)
                before = ray.get(self.replicas[0].serving.remote(), timeout=timeout_s)
                blockers = ray.get([r.use_model.remote(model) for r in self.replicas], timeout=timeout_s)
            except (RayActorError, GetTimeoutError) as exc:
                blockers = [f"a kept replica did not answer ({type(exc).__name__})"]
            blocker = next((b for b in blockers if b), None)
            if blocker is None:
                return self.replicas, "kept" if before == model else "switched"
            how = f"replaced: {blocker}"
            log.info("policy replicas replaced, not switched to %s: %s", model.path, blocker)
        self.close()
        self.replicas, self.key, self.demand, self.pinned = start(), key, dict(demand), pinned
        return self.replicas, how

    def close(self) -> None:
        for replica in self.replicas:
            ray.kill(replica, no_restart=True)
        self.replicas, self.key, self.demand, self.pinned = [], None, {}, None


@contextmanager
def kept_engines(enabled: bool = True) -> Iterator[EnginePool | None]:
    """A scope in which rollouts keep their replicas for the next rollout; they end with it.
    Nested scopes share the outer one."""
    global _POOL
    if not enabled or _POOL is not None:
        yield _POOL
        return
    _POOL = EnginePool()
    try:
        yield _POOL
    finally:
        pool, _POOL = _POOL, None
        if ray.is_initialized():
            pool.close()


def active_pool() -> EnginePool | None:
    return _POOL


def fits_beside(held: Mapping[str, float], demand: Mapping[str, float], total: Mapping[str, float]) -> bool:
    """Whether ``demand`` fits in the cluster's ``total`` resources while ``held`` stays taken."""
    return all(held.get(k, 0.0) + v <= total.get(k, 0.0) + 1e-9 for k, v in demand.items() if v > 0)


def make_room(demand: Mapping[str, float], what: str) -> None:
    """Release the kept replicas unless ``demand`` (a job's resources: Ray Train workers, RLlib)
    fits beside them."""
    pool = _POOL
    if pool is None or not pool.replicas:
        return
    if not fits_beside(pool.demand, demand, ray.cluster_resources()):
        log.info("policy replicas released for %s (needs %s; the replicas hold %s)", what, dict(demand), pool.demand)
        pool.close()
