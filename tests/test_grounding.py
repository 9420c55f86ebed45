"""Grounding: normalised exact match, nearest neighbour by embedding, caches."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from ulrec.errors import InputError
from ulrec.grounding import Grounder, GroundResult, normalize_title

CATALOGUE = [
    "Heat (1995)",
    "Star Wars (1977)",
    "Amélie (2001)",
    '"Burbs, The" (1989)',
    "Crouching Tiger, Hidden Dragon [Wo hu cang long] (2000)",
    "Heat (1995)",  # a duplicate title: the lower id wins
    "Fargo (1996)",
]


class TrigramEmbedder:
    """A deterministic stand-in for a sentence encoder: hashed character trigrams. Counts calls."""

    def __init__(self, dim: int = 256) -> None:
        self.dim = dim
        self.calls: list[list[str]] = []

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            padded = f"  {text.lower()}  "
            for i in range(len(padded) - 2):
                out[row, zlib.crc32(padded[i : i + 3].encode()) % self.dim] += 1.0
        return out

    @property
    def embedded(self) -> list[str]:
        return [t for call in self.calls for t in call]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("heat (1995)", 0),
        ("  HEAT   (1995) ", 0),
        ("'Heat (1995)'", 0),
        ("“Heat (1995)”", 0),
        ("Ｈｅａｔ (1995)", 0),  # full-width letters, NFKC
        ("AMÉLIE (2001)", 2),
        ("Ame\u0301lie (2001)", 2),  # combining accent, NFKC composes it
        ('"burbs, the" (1989)', 3),
        ("crouching tiger, hidden dragon [wo hu cang long] (2000)", 4),
    ],
)
def test_exact_match_after_normalisation(raw, expected):
    embed = TrigramEmbedder()
    grounder = Grounder(CATALOGUE, embed_fn=embed)
    [res] = grounder.ground([raw])
    assert res == GroundResult(expected, CATALOGUE[expected], substituted=False, format_error=False)
    assert embed.calls == []  # exact matches never touch the embedder


def test_normalize_title():
    assert normalize_title("  “The  Matrix”\t") == "the matrix"
    assert normalize_title("ＡＢＣ") == "abc"


def test_format_errors():
    grounder = Grounder(CATALOGUE, embed_fn=TrigramEmbedder())
    results = grounder.ground([None, "", "   ", "''"])
    assert all(r == GroundResult(-1, "", substituted=False, format_error=True) for r in results)
    assert grounder.stats["format_error"] == 4


def test_nearest_neighbour_substitution_keeps_order():
    grounder = Grounder(CATALOGUE, embed_fn=TrigramEmbedder())
    results = grounder.ground(["Star Wars (1978)", "Fargo (1996)", None, "Crouching Tiger Hidden Dragon (2000)"])
    assert [r.item_id for r in results] == [1, 6, -1, 4]
    assert [r.substituted for r in results] == [True, False, False, True]
    assert results[0].title == "Star Wars (1977)"
    assert grounder.stats["substituted"] == 2 and grounder.stats["exact"] == 1


def test_query_cache_embeds_repeats_once_and_evicts():
    embed = TrigramEmbedder()
    grounder = Grounder(CATALOGUE, embed_fn=embed, cache_size=2)
    grounder.ground(["Stars Wars", "Stars Wars", "Hat (1995)"])
    grounder.ground(["Stars Wars"])
    queries = [t for t in embed.embedded if t not in CATALOGUE]
    assert queries.count("Stars Wars") == 1 and queries.count("Hat (1995)") == 1
    assert grounder.stats["cache_hits"] == 1  # the second call; repeats within a call are embedded once too
    grounder.ground(["Fargo 1996", "Amelie"])  # two new entries evict both older ones (capacity 2)
    grounder.ground(["Stars Wars"])
    assert [t for t in embed.embedded if t not in CATALOGUE].count("Stars Wars") == 2


def test_catalogue_embeddings_cached_on_disk(tmp_path):
    first = TrigramEmbedder()
    g1 = Grounder(CATALOGUE, embed_fn=first, embedder_id="trigram-256", cache_dir=tmp_path)
    g1.ensure_index()
    assert len(list(tmp_path.glob("catalogue-*.npy"))) == 1 and first.embedded == CATALOGUE

    second = TrigramEmbedder()
    g2 = Grounder(CATALOGUE, embed_fn=second, embedder_id="trigram-256", cache_dir=tmp_path)
    assert g2.ground(["Star Wars 1977"])[0].item_id == 1
    assert second.embedded == ["Star Wars 1977"]  # the catalogue came from disk

    # Other titles or another embedder: another key.
    Grounder(CATALOGUE[:3], embed_fn=TrigramEmbedder(), embedder_id="trigram-256", cache_dir=tmp_path).ensure_index()
    Grounder(CATALOGUE, embed_fn=TrigramEmbedder(), embedder_id="other", cache_dir=tmp_path).ensure_index()
    assert len(list(tmp_path.glob("catalogue-*.npy"))) == 3
    # An unnamed embedding function is never cached on disk.
    Grounder(CATALOGUE[:2], embed_fn=TrigramEmbedder(), cache_dir=tmp_path).ensure_index()
    assert len(list(tmp_path.glob("catalogue-*.npy"))) == 3


def test_bad_inputs():
    with pytest.raises(InputError, match="no titles"):
        Grounder([])
    bad = Grounder(CATALOGUE, embed_fn=lambda texts: np.zeros(len(texts)))
    with pytest.raises(InputError, match="shape"):
        bad.ground(["nothing like it"])
    with pytest.raises(InputError, match="grounding.embedder"):
        Grounder(CATALOGUE, embedder="/nonexistent/model")


@pytest.mark.slow
def test_real_minilm_embedder(tmp_path):
    """The default offline sentence-transformers model, once (it is small)."""
    from ulrec.config import load_config

    cfg = load_config(None, [f"grounding.cache_dir={tmp_path}"])
    titles = ["Star Wars (1977)", "Toy Story (1995)", "Pulp Fiction (1994)", "Titanic (1997)", "Fargo (1996)"]
    grounder = Grounder.from_config(cfg.grounding, titles)
    results = grounder.ground(["star wars", "Toy Story 2", "the titanic movie", "Fargo (1996)"])
    assert [r.item_id for r in results] == [0, 1, 3, 4]
    assert [r.substituted for r in results] == [True, True, True, False]
    assert len(list(tmp_path.glob("catalogue-*.npy"))) == 1
