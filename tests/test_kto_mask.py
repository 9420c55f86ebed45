"""The title-token mask: the character rule, and real tokenizers trained here (no downloads)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ulrec.kto_mask import title_span, title_token_mask
from ulrec.prompts import completion_text

sys.path.insert(0, str(Path(__file__).parent))
from _train_helpers import TITLES, byte_level_bpe, unigram_metaspace, wordpiece  # noqa: E402

HARD_TITLES = TITLES + ["Alien [ 1979 ]", "Léon: The Professional", "[REC] ²", "Crouching Tiger, 卧虎藏龙"]


@pytest.mark.parametrize("title", HARD_TITLES)
@pytest.mark.parametrize("eos", ["", "</s>"])
def test_title_span_is_exactly_the_title(title, eos):
    completion = completion_text(title) + eos
    start, end = title_span(completion)
    assert completion[start:end] == title


@pytest.mark.parametrize("text", ["", " recommend Heat", " recommend[ ]", " recommend[  ]", "Heat ]", " recommend[Heat]"])
def test_no_title_span_without_the_format(text):
    assert title_span(text) is None


def test_mask_from_hand_made_offsets():
    completion = " recommend[ AB ]</s>"  # title "AB" = characters 12..14
    offsets = [(0, 10), (10, 11), (11, 13), (13, 14), (14, 16), (16, 20)]
    assert title_token_mask(completion, offsets, "</s>") == [False, False, True, True, False, False]
    # a token straddling "[ " and the title's first letter counts as title
    assert title_token_mask(completion, [(0, 10), (10, 13), (13, 14), (14, 16)]) == [False, True, True, False]
    # zero-width special tokens and tokens reaching back into the prompt never count
    assert title_token_mask(completion, [(0, 0), (-4, 10), (12, 12), (12, 14)]) == [False, False, False, True]


def test_unformatted_completion_counts_every_token_but_eos():
    completion = " recommend Heat</s>"
    offsets = [(0, 10), (10, 15), (15, 19)]
    assert title_token_mask(completion, offsets, "</s>") == [True, True, False]


TOKENIZERS = {"byte_level_bpe": byte_level_bpe, "wordpiece": wordpiece, "unigram": unigram_metaspace}


@pytest.fixture(scope="module", params=sorted(TOKENIZERS))
def tokenizer(request):
    return TOKENIZERS[request.param]()


@pytest.mark.parametrize("title", HARD_TITLES)
def test_real_tokenizers_mark_exactly_the_title_tokens(tokenizer, title):
    completion = completion_text(title) + tokenizer.eos_token
    enc = tokenizer(completion, return_offsets_mapping=True, add_special_tokens=False)
    offsets = enc["offset_mapping"]
    mask = title_token_mask(completion, offsets, tokenizer.eos_token)
    start, end = title_span(completion)
    marked = [(s, e) for (s, e), m in zip(offsets, mask) if m]
    assert marked, "some token must be a title token"
    # every title character lies in a marked token (a title token may be [UNK] but still covers it)
    covered = {i for s, e in marked for i in range(s, e)}
    assert set(range(start, end)) - {i for i in range(start, end) if completion[i] == " "} <= covered
    # the marked tokens cover a contiguous text that is the title plus at most bracket/space chars
    text = completion[min(s for s, _ in marked) : max(e for _, e in marked)]
    assert title in text and set(text.replace(title, "", 1)) <= set("[] ")
    # the format word, the closing bracket and EOS are never title tokens
    for (s, e), m in zip(offsets, mask):
        if e <= start or s >= end:
            assert not m, f"format token {completion[s:e]!r} marked"
    assert not mask[-1], "EOS marked"


def test_byte_level_bpe_merges_bracket_with_title_and_counts_it():
    tok = byte_level_bpe()
    completion = completion_text("The Matrix (1999)") + tok.eos_token
    enc = tok(completion, return_offsets_mapping=True, add_special_tokens=False)
    mask = title_token_mask(completion, enc["offset_mapping"], tok.eos_token)
    start, end = title_span(completion)
    pieces = [(completion[s:e], m) for (s, e), m in zip(enc["offset_mapping"], mask)]
    straddling = [(p, m) for (p, m), (s, e) in zip(pieces, enc["offset_mapping"]) if s < start < e or s < end < e]
    # the corpus makes BPE merge across the bracket boundary, so this case is really exercised
    assert straddling, pieces
    assert all(m for _, m in straddling)
