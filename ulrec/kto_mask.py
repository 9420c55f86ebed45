"""Which completion tokens are the item title (paper Appendix A.1).

ULRec's KTO log-ratio counts only the title's tokens: the format tokens (``recommend[``, ``]``, the
spaces around the title) and EOS appear in every completion, and letting KTO push on them collapses
the output format. The authors hard-coded Llama-3 token ids; here the title is located by
*characters* and each token is judged by its character offsets (``tokenizer(...,
return_offsets_mapping=True)``), so the rule holds for any tokenizer.

Rule: a token is a title token when its character span overlaps the title span, the characters
between ``recommend[ `` and the last `` ]`` of the completion. A token that straddles the boundary
(byte-level BPE may merge ``[``, a space and the title's first letters into one token) counts as
title: its probability depends on the title's first characters, and after SFT the bracket part is
near-certain, so it adds the title's information and ~0 for the format. Zero-width tokens (special
tokens added by the tokenizer) never count. Titles may contain brackets and any unicode: the span
ends at the *last* `` ]``.

A completion without the action format (a raw format-error output kept as a negative) has no
title; then every token of its text counts (the whole output is what is being discouraged), EOS
still excluded.
"""

from __future__ import annotations

from typing import Sequence

from ulrec.prompts import format_action

# The text around the title in an action, derived from the one format definition.
_OPEN, _CLOSE = format_action("\0").split("\0")


def title_span(completion: str) -> tuple[int, int] | None:
    """Character span ``[start, end)`` of the title in ``completion``, or None without the format."""
    opening = completion.find(_OPEN)
    if opening < 0:
        return None
    start = opening + len(_OPEN)
    end = completion.rfind(_CLOSE)
    if end <= start:
        return None
    return start, end


def title_token_mask(
    completion: str,
    offsets: Sequence[tuple[int, int]],
    eos_token: str | None = None,
) -> list[bool]:
    """True for each token (given by its ``(start, end)`` character offsets in ``completion``) that
    belongs to the title. ``completion`` may end with ``eos_token`` as text (TRL appends it); EOS is
    never a title token. Offsets may start before 0 when a token straddles the prompt boundary."""
    span = title_span(completion)
    if span is None:
        text_end = len(completion)
        if eos_token and completion.endswith(eos_token):
            text_end -= len(eos_token)
        span = (0, text_end)
    lo, hi = span
    return [end > start and start < hi and end > lo for start, end in offsets]
