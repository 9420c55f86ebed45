"""Starting or joining Ray from the config (shared by rollout/, train/ and serve/)."""

from __future__ import annotations

import os

import ray

from ulrec.config import Config

# Settings that actor processes must see too. Local workers inherit the driver's environment, but
# on a cluster they are started by other nodes' raylets, so they travel in the runtime env.
_FORWARDED_ENV = (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TOKENIZERS_PARALLELISM",
    "WANDB_MODE",
    "VLLM_CPU_KVCACHE_SPACE",
    "VLLM_CPU_OMP_THREADS_BIND",
    "VLLM_ENABLE_V1_MULTIPROCESSING",
)


def init_ray(cfg: Config) -> None:
    """Start a local Ray instance or join ``cfg.ray.address``; a no-op when Ray is already up.

    A local instance gets ``cfg.ray.num_cpus`` and ``cfg.ray.object_store_memory``; when joining an
    existing cluster those belong to the cluster and are not passed.
    """
    if ray.is_initialized():
        return
    env_vars = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
    kwargs: dict = {
        "include_dashboard": cfg.ray.include_dashboard,
        "runtime_env": {"env_vars": env_vars} if env_vars else None,
        "log_to_driver": True,
    }
    if cfg.ray.address is None:
        kwargs["num_cpus"] = cfg.ray.num_cpus
        kwargs["object_store_memory"] = cfg.ray.object_store_memory
    else:
        kwargs["address"] = cfg.ray.address
    ray.init(**kwargs)
