"""What one recommendation request does, without Ray or HTTP (so it is tested directly).

1. Build the same transcript as the rollouts (:class:`ulrec.prompts.PromptBuilder`): the user's
   history, then one ``Action k: recommend[ title ]`` / ``Observation k: ...`` pair per item
   already recommended in this session (the user stayed, with their reward when the client sent
   one), ending at ``Action k:``.
2. Sample ``k`` completions of it (distinct seeds), parse and ground each.
3. A slot whose item was already recommended in this session, or already taken by another slot
   of this answer, or whose output did not parse, is resampled for up to ``resample_rounds`` more
   rounds (not at temperature 0, where a resample would repeat itself); a slot still unfilled
   falls back to the nearest catalogue item by embedding that is neither recommended nor taken.

Each answer says which path it took (``source``: generated / resampled / fallback), so the caller
can tell model choices from fallbacks.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Awaitable, Callable, Literal, Protocol

import numpy as np

from ulrec.errors import InputError
from ulrec.grounding import GroundResult
from ulrec.policy import GenerationResult
from ulrec.prompts import PromptBuilder, StepView, observation_text, parse_action

Source = Literal["generated", "resampled", "fallback"]


class RecommendationError(InputError):
    """A well-formed request that cannot be answered (e.g. fewer unrecommended items than ``k``);
    ``field`` names the request field at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class SessionItem:
    """An item already recommended in this session, and the reward the user gave it (if known)."""

    item_id: int
    reward: float | None = None


@dataclass(frozen=True)
class Query:
    """A resolved request: history titles (any text), session items (catalogue ids)."""

    history: list[str]
    session: list[SessionItem]
    k: int = 1
    temperature: float | None = None
    seed: int | None = None


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    seed: int
    temperature: float


@dataclass(frozen=True)
class Recommendation:
    item_id: int
    title: str
    raw_output: str
    substituted: bool
    format_error: bool
    source: Source

    def to_dict(self) -> dict:
        return asdict(self)


class SessionGrounder(Protocol):
    """What serving needs from grounding: :class:`serve.grounding.ServeGrounder` (the rollouts'
    Grounder plus a nearest-item search that skips excluded items)."""

    titles: list[str]

    def ground(self, raw_titles: list[str | None]) -> list[GroundResult]: ...

    def nearest_allowed(self, text: str, excluded: set[int]) -> int: ...


class ThreadedGrounding:
    """Runs a grounder's calls on one worker thread: grounding may embed text (a model call), which
    must not block the event loop (requests keep joining generate batches meanwhile), and the
    grounder's caches are not thread-safe, hence one thread."""

    def __init__(self, grounder: SessionGrounder) -> None:
        self.grounder = grounder
        self.titles = grounder.titles
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ground")

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def ground(self, raw_titles: list[str | None]) -> list[GroundResult]:
        return await self._call(self.grounder.ground, raw_titles)

    async def nearest_allowed(self, text: str, excluded: set[int]) -> int:
        return await self._call(self.grounder.nearest_allowed, text, set(excluded))


GenerateFn = Callable[[list[GenerationRequest]], Awaitable[list[GenerationResult]]]
GroundFn = Callable[[list[str | None]], Awaitable[list[GroundResult]]]
NearestFn = Callable[[str, set[int]], Awaitable[int]]


def sample_seed(base: int, round_index: int, slot: int) -> int:
    """The seed of one sample: distinct per (request seed, round, slot), reproducible."""
    return int(np.random.SeedSequence([base, round_index, slot]).generate_state(1)[0] % (2**31 - 1))


class Recommender:
    """Answers :class:`Query` objects over the catalogue ``titles``.

    generate(requests) -> completions; ground(parsed titles) -> GroundResults;
    nearest_allowed(text, excluded) -> item id. All async: in Serve, ``generate`` and ``ground``
    feed the replica's dynamic batchers, so concurrent requests share engine and embedder calls.
    """

    def __init__(
        self,
        titles: list[str],
        builder: PromptBuilder,
        *,
        generate: GenerateFn,
        ground: GroundFn,
        nearest_allowed: NearestFn,
        default_temperature: float,
        resample_rounds: int = 2,
        rng_seed: int | None = None,
    ) -> None:
        self.titles = titles
        self.builder = builder
        self.generate = generate
        self.ground = ground
        self.nearest_allowed = nearest_allowed
        self.default_temperature = default_temperature
        self.resample_rounds = resample_rounds
        # Seeds for requests that bring none: fresh randomness per request.
        self._rng = np.random.default_rng(rng_seed)

    def prompt(self, query: Query) -> str:
        steps = [
            StepView(title=self.titles[s.item_id], observation=observation_text(stayed=True, reward=s.reward))
            for s in query.session
        ]
        return self.builder.build(query.history, steps)

    def _check(self, query: Query) -> None:
        for i, s in enumerate(query.session):
            if not 0 <= s.item_id < len(self.titles):
                raise RecommendationError(f"recommended.{i}", f"unknown item id {s.item_id}")
        excluded = {s.item_id for s in query.session}
        left = len(self.titles) - len(excluded)
        if query.k > left:
            raise RecommendationError("k", f"only {left} catalogue items are not yet recommended (asked {query.k})")

    async def recommend(self, query: Query) -> list[Recommendation]:
        self._check(query)
        temperature = self.default_temperature if query.temperature is None else query.temperature
        base_seed = int(self._rng.integers(0, 2**31 - 1)) if query.seed is None else query.seed
        prompt = self.prompt(query)
        taken = {s.item_id for s in query.session}
        chosen: list[Recommendation | None] = [None] * query.k
        last_output: list[tuple[str, str | None]] = [("", None)] * query.k  # (raw, parsed title)
        rounds = 1 + (self.resample_rounds if temperature > 0 else 0)
        for round_index in range(rounds):
            open_slots = [i for i, c in enumerate(chosen) if c is None]
            if not open_slots:
                break
            outputs = await self.generate(
                [GenerationRequest(prompt, sample_seed(base_seed, round_index, i), temperature) for i in open_slots]
            )
            parsed = [parse_action(out.text) for out in outputs]
            grounded = await self.ground(parsed)
            for slot, out, title, g in zip(open_slots, outputs, parsed, grounded):
                last_output[slot] = (out.text, title)
                if g.format_error or g.item_id in taken:
                    continue
                taken.add(g.item_id)
                chosen[slot] = Recommendation(
                    item_id=g.item_id,
                    title=g.title,
                    raw_output=out.text,
                    substituted=g.substituted,
                    format_error=False,
                    source="generated" if round_index == 0 else "resampled",
                )
        for slot in [i for i, c in enumerate(chosen) if c is None]:
            raw, title = last_output[slot]
            # Nearest to what the model wrote; with nothing readable, to the latest history item.
            anchor = title or raw.strip() or (query.history[-1] if query.history else "")
            item = await self.nearest_allowed(anchor, set(taken))
            taken.add(item)
            chosen[slot] = Recommendation(
                item_id=item,
                title=self.titles[item],
                raw_output=raw,
                substituted=True,
                format_error=title is None,
                source="fallback",
            )
        return [c for c in chosen if c is not None]
