"""The process environment every entry point starts from (CLI, tests, benchmarks): offline, quiet.

One place for it, so the CLI, ``tests/conftest.py`` and ``benchmarks/`` cannot drift apart. Values
already set by the user win (``setdefault``).
"""

from __future__ import annotations

import os
from typing import Mapping

# Nothing may reach a model hub; tokenizers must not fork threads under Ray; Ray Train's print patch
# and auth token are off for local runs; vLLM on CPU gets a 1 GiB KV cache unless told otherwise.
DEFAULTS: Mapping[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "RAY_AUTH_MODE": "disabled",
}


def apply_defaults(*, quiet_wandb: bool = True, extra: Mapping[str, str] | None = None) -> None:
    """Set the defaults (and ``extra``) where the environment does not already say otherwise.
    W&B stays offline unless an API key is set, and silent unless ``quiet_wandb`` is False."""
    for key, value in {**DEFAULTS, **(extra or {})}.items():
        os.environ.setdefault(key, value)
    if not os.environ.get("WANDB_API_KEY"):
        os.environ.setdefault("WANDB_MODE", "offline")
    if quiet_wandb:
        os.environ.setdefault("WANDB_SILENT", "true")
