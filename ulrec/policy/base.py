"""The policy interface shared by both backends, and the sampling rules they both follow."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from ulrec.errors import InputError


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling settings; temperature 0 means greedy decoding.

    ``seed`` seeds the per-request seeds drawn when a call passes none (see
    :meth:`SeedStream.take`), so a sequence of calls is reproducible either way.
    """

    temperature: float = 0.5
    top_p: float = 1.0
    max_tokens: int = 48
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise InputError(f"temperature must be >= 0 (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.max_tokens < 1:
            raise InputError(f"max_tokens must be >= 1 (got {self.max_tokens})")

    @classmethod
    def from_policy_config(cls, policy_cfg) -> "SamplingConfig":
        return cls(
            temperature=policy_cfg.temperature,
            top_p=policy_cfg.top_p,
            max_tokens=policy_cfg.max_tokens,
            seed=policy_cfg.seed,
        )


@dataclass(frozen=True)
class GenerationResult:
    """One completion: the text before the first newline / EOS (neither included), and the number
    of tokens the engine generated for it (the stopping token included)."""

    text: str
    num_tokens: int


@runtime_checkable
class Policy(Protocol):
    """A text policy: prompts in, completions out. Same semantics on every backend:

    - ``seeds[i]`` fixes request i's randomness: the same prompt, seed and settings give the same
      completion on the same backend (seeds are not comparable across backends);
    - ``temperature`` overrides the configured one for this call (0 = greedy);
    - generation stops at EOS, at a newline, or after ``max_tokens`` tokens (the configured
      value, or the call's ``max_tokens``).
    """

    backend: str
    sampling: SamplingConfig

    def generate(
        self, prompts: list[str], seeds: list[int] | None = None, temperature: float | None = None,
        max_tokens: int | None = None,
    ) -> list[GenerationResult]: ...

    def close(self) -> None: ...


@runtime_checkable
class AsyncPolicy(Protocol):
    """A policy on a continuously batching engine (``policy.engine: async``): ``generate_async``
    sends each prompt as its own request and awaits them all; concurrent calls share the engine's
    running batch. Same semantics as :class:`Policy` otherwise (seeds, temperature, stops)."""

    backend: str
    sampling: SamplingConfig

    async def generate_async(
        self, prompts: list[str], seeds: list[int] | None = None, temperature: float | None = None,
        max_tokens: int | None = None,
    ) -> list[GenerationResult]: ...

    def close(self) -> None: ...


class SeedStream:
    """Per-request seeds for calls that pass none: a reproducible stream from the base seed."""

    def __init__(self, seed: int) -> None:
        self._rng = np.random.default_rng(seed)

    def take(self, n: int) -> list[int]:
        return [int(s) for s in self._rng.integers(0, 2**31 - 1, size=n)]


def check_request(prompts: list[str], seeds: list[int] | None, temperature: float | None) -> None:
    """Raise InputError for malformed generate() arguments."""
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise InputError("prompts must be a list of strings")
    if seeds is not None and len(seeds) != len(prompts):
        raise InputError(f"seeds has {len(seeds)} entries for {len(prompts)} prompts")
    if temperature is not None and temperature < 0:
        raise InputError(f"temperature must be >= 0 (got {temperature})")


def fit_prompt(token_ids: list[int], max_model_len: int, max_tokens: int, bos_id: int | None) -> list[int]:
    """Keep a prompt within the context: drop the oldest tokens (after BOS) when it is too long.

    A long episode's transcript can outgrow a small model's context; the newest steps and the
    open ``Action k:`` matter most, so the start of the prompt goes first.
    """
    limit = max_model_len - max_tokens
    if limit < 2:
        raise InputError(f"max_tokens ({max_tokens}) leaves no room for a prompt in {max_model_len} positions")
    if len(token_ids) <= limit:
        return token_ids
    if bos_id is not None and token_ids and token_ids[0] == bos_id:
        return [bos_id] + token_ids[len(token_ids) - limit + 1 :]
    return token_ids[len(token_ids) - limit :]


def cut_at_newline(text: str) -> str:
    """The completion text up to its first newline (the stop string, excluded)."""
    return text.split("\n", 1)[0]
