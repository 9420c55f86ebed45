"""Amazon Book (Ni, Li & McAuley, EMNLP 2019; the 2018 Amazon Review Data, "Books").

Files (plain or gzip), JSON lines (Python dict literals, as in the 2014 release, are accepted too):
- reviews: ``Books_5.json`` (5-core) or ``Books.json``; fields ``reviewerID`` (user), ``asin``
  (item), ``overall`` (rating 1–5), ``unixReviewTime`` (Unix seconds).
- metadata: ``meta_Books.json``; fields ``asin`` and ``title`` (HTML entities unescaped).

The paper keeps users and items with at least 90 interactions (set ``data.min_user_interactions``
and ``data.min_item_interactions``; configs/amazon.yaml does). Metadata lines without an ``asin``
are skipped (counted as ``metadata_lines_skipped``); the first line for an asin wins; reviews of
books with no title are dropped downstream.
"""

from __future__ import annotations

import html

import pandas as pd

from ulrec.config import Config
from ulrec.data.files import InteractionBuilder, as_float, as_timestamp, field, iter_lines, parse_record, resolve_inputs
from ulrec.data.raw import RawDataset

REVIEW_NAMES = ("Books_5.json.gz", "Books_5.json", "Books.json.gz", "Books.json")
META_NAMES = ("meta_Books.json.gz", "meta_Books.json")


def read_amazon_book(cfg: Config) -> RawDataset:
    reviews_path, meta_path = resolve_inputs(cfg.data.path, cfg.data.meta_path, REVIEW_NAMES, META_NAMES, "amazon-book")
    builder = InteractionBuilder()
    for lineno, line in iter_lines(reviews_path, progress=cfg.run.progress, desc="amazon reviews"):
        rec = parse_record(line, reviews_path, lineno)
        builder.add(
            str(field(rec, "reviewerID", reviews_path, lineno)),
            str(field(rec, "asin", reviews_path, lineno)),
            as_float(field(rec, "overall", reviews_path, lineno), "overall", reviews_path, lineno),
            as_timestamp(field(rec, "unixReviewTime", reviews_path, lineno), "unixReviewTime", reviews_path, lineno),
        )

    wanted = builder.item_ids
    items: dict[str, str | None] = {}
    skipped = 0
    for lineno, line in iter_lines(meta_path, progress=cfg.run.progress, desc="amazon metadata"):
        rec = parse_record(line, meta_path, lineno)
        asin = rec.get("asin")
        if asin is None or str(asin) == "":
            skipped += 1
            continue
        asin = str(asin)
        if asin in wanted and asin not in items:
            title = rec.get("title")
            items[asin] = html.unescape(str(title)) if title else None

    return RawDataset(
        name="amazon-book",
        interactions=builder.build(),
        items=pd.DataFrame({"item": list(items), "title": list(items.values())}, columns=["item", "title"]),
        source=reviews_path,
        notes={"metadata_lines_skipped": skipped},
    )
