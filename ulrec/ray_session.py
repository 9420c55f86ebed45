"""Starting or joining a Ray session from the config, and waiting for actors (used by rollout/, train/ and serve/;
Ray-agnostic otherwise: nothing here knows about those layers)."""

from __future__ import annotations

import os
import time

import ray
from ray.exceptions import ActorUnavailableError

from ulrec.config import Config

# Settings that actor processes must see too. Local workers inherit the driver's environment, but
# on a cluster they are started by other nodes' raylets, so they travel in the runtime env.
_FORWARDED_ENV = (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TOKENIZERS_PARALLELISM",
    "WANDB_MODE",
    "WANDB_SILENT",
    "VLLM_CPU_KVCACHE_SPACE",
    "VLLM_CPU_OMP_THREADS_BIND",
    "VLLM_ENABLE_V1_MULTIPROCESSING",
)


def init_ray(cfg: Config) -> None:
    """Start a local Ray instance or join ``cfg.ray.address``; a no-op when Ray is already up.

    A local instance gets ``cfg.ray.num_cpus`` and ``cfg.ray.object_store_memory``; when joining a
    cluster (``cfg.ray.address``, else ``RAY_ADDRESS``) those belong to the cluster and are not passed.
    """
    if ray.is_initialized():
        return
    env_vars = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
    kwargs: dict = {
        "include_dashboard": cfg.ray.include_dashboard,
        "runtime_env": {"env_vars": env_vars} if env_vars else None,
        "log_to_driver": True,
    }
    if cfg.ray.address is None and "RAY_ADDRESS" not in os.environ:
        # "local": always a fresh instance of our size, never a cluster that happens to be up
        # on this machine (joining one and passing num_cpus is an error in Ray).
        kwargs["address"] = "local"
        kwargs["num_cpus"] = cfg.ray.num_cpus
        kwargs["object_store_memory"] = cfg.ray.object_store_memory
    else:
        # An explicit address, else the RAY_ADDRESS that `ray job submit` sets for its jobs.
        kwargs["address"] = cfg.ray.address or os.environ["RAY_ADDRESS"]
    ray.init(**kwargs)


def wait_until_alive(actor, timeout_s: float = 600.0) -> None:
    """Block until a restarting actor answers ``ready()``.

    Raises ActorDiedError when the actor is dead for good (restarts used up) and TimeoutError
    when it does not come back within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    delay = 0.1
    while True:
        try:
            ray.get(actor.ready.remote())
            return
        except ActorUnavailableError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"actor {actor} did not restart within {timeout_s:.0f} s") from None
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
