"""A ReAct collector around any policy backend: a thought line, then the action (paper §4.1.2).

``ReActPolicy.generate(transcripts)`` takes the same action-only transcripts as every policy
(ending ``Action k:``) and returns the same kind of answers (the action's text), so rollouts,
parsing, grounding and rows do not change: per prompt it first generates one ``Thought k:`` line
(at most ``max_thought_tokens``), then the action after it, both with the request's seed. The
thought is not returned: rows keep only actions and observations (paper A.5).
"""

from __future__ import annotations

from ulrec.policy.base import GenerationResult, Policy
from ulrec.prompts import react_action_prompt, react_thought_prompt


class ReActPolicy:
    backend: str

    def __init__(self, inner: Policy, max_thought_tokens: int = 64) -> None:
        self.inner = inner
        self.backend = f"react+{inner.backend}"
        self.sampling = inner.sampling
        self.max_thought_tokens = max_thought_tokens
        self.last_thoughts: list[str] = []

    def generate(
        self, prompts: list[str], seeds: list[int] | None = None, temperature: float | None = None
    ) -> list[GenerationResult]:
        if not prompts:
            return []
        thoughts = self.inner.generate([react_thought_prompt(p) for p in prompts], seeds=seeds,
                                       temperature=temperature, max_tokens=self.max_thought_tokens)
        self.last_thoughts = [t.text for t in thoughts]
        actions = self.inner.generate([react_action_prompt(p, t.text) for p, t in zip(prompts, thoughts)],
                                      seeds=seeds, temperature=temperature)
        return [GenerationResult(text=a.text, num_tokens=a.num_tokens + t.num_tokens)
                for a, t in zip(actions, thoughts)]

    def close(self) -> None:
        self.inner.close()
