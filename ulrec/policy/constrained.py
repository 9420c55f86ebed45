"""Catalogue-constrained decoding for the hf backend: a token trie over every action's tokens.

vLLM constrains with structured outputs (a choice over the same completion strings); this module
does the same for transformers ``generate`` as a :class:`LogitsProcessor`.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from ulrec.prompts import completion_text


def encode_actions(tokenizer, titles: list[str]) -> list[list[int]]:
    """Token ids of ``completion_text(title)`` for every title (no special tokens)."""
    return tokenizer([completion_text(t) for t in titles], add_special_tokens=False)["input_ids"]


def any_tokenization_max_tokens(titles: list[str], max_tokens: int) -> int:
    """``max_tokens`` raised so that the longest catalogue action (and EOS) fits in ANY
    tokenization (at worst one token per UTF-8 byte). vLLM's structured outputs accept every
    tokenization of a choice, and a constrained output cut short would be a malformed action."""
    return max(max_tokens, max(len(completion_text(t).encode("utf-8")) for t in titles) + 1)


class TitleTrie:
    """Token-id trie of ``completion_text(title) + EOS`` for every catalogue title.

    The canonical tokenization of each completion is the only one allowed; a path ends in EOS,
    so a finished path can only be closed.
    """

    def __init__(self, tokenizer, titles: list[str]) -> None:
        if tokenizer.eos_token_id is None:
            raise ValueError("constrained decoding needs a tokenizer with an EOS token")
        self.eos_id = int(tokenizer.eos_token_id)
        self.root: dict[int, dict] = {}
        encoded = encode_actions(tokenizer, titles)
        # Tokens of the longest path, EOS included: max_tokens must reach it.
        self.max_len = max(len(ids) for ids in encoded) + 1
        for ids in encoded:
            node = self.root
            for tok in [*ids, self.eos_id]:
                node = node.setdefault(int(tok), {})

    def allowed(self, generated: list[int]) -> list[int] | None:
        """Token ids allowed after ``generated``; None once the path has left the trie (a
        finished row that is being padded), meaning no constraint."""
        node = self.root
        for tok in generated:
            nxt = node.get(tok)
            if nxt is None:
                return None
            node = nxt
        return list(node.keys()) or None


class TitleTrieLogitsProcessor(LogitsProcessor):
    """Masks every token that would leave the trie. ``prompt_len`` is the (left-padded) prompt
    width of the batch, so the generated part of row i is ``input_ids[i, prompt_len:]``."""

    def __init__(self, trie: TitleTrie, prompt_len: int) -> None:
        self.trie = trie
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        mask = torch.zeros_like(scores)
        generated = input_ids[:, self.prompt_len :].tolist()
        for row, tokens in enumerate(generated):
            allowed = self.trie.allowed(tokens)
            if allowed is None:
                continue
            mask[row] = float("-inf")
            mask[row, allowed] = 0.0
        return scores + mask
