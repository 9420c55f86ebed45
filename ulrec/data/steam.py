"""Steam (Kang & McAuley, ICDM 2018; the SASRec Steam files).

Files (plain or gzip): ``steam_reviews.json`` and ``steam_games.json``. Each line is a Python dict
literal (single quotes, True/False), not strict JSON; strict JSON lines are accepted too.

Fields used (checked against public loaders of these files, e.g. the SASRec-style preprocessing
scripts, which read ``username``, ``product_id`` and ``date`` parsed as ``%Y-%m-%d``):
- reviews: ``username`` (user; ``user_id`` when a line has no username), ``product_id`` (item),
  ``date`` ("YYYY-MM-DD", → Unix seconds at 00:00 UTC), ``hours`` (play time).
- games: ``id`` (= product_id), ``app_name`` (title; ``title`` when app_name is absent).

Rating (paper §4.1.1): 5 if hours > ``data.steam_hours_threshold`` (3) else 2. Assumptions, where
the paper is silent: a review without ``hours`` counts as not above the threshold (rating 2;
counted in stats as ``steam_reviews_without_hours``); games lines without an ``id`` are skipped
(the public file has a few; counted as ``metadata_lines_skipped``); reviews of products with no
title are dropped downstream (a title is the only way the policy can name an item).
"""

from __future__ import annotations

import datetime as dt
import html
from pathlib import Path

import pandas as pd

from ulrec.config import Config
from ulrec.data.files import InteractionBuilder, as_float, field, iter_lines, parse_record, resolve_inputs
from ulrec.data.raw import RawDataset
from ulrec.errors import DataError

REVIEW_NAMES = ("steam_reviews.json.gz", "steam_reviews.json")
GAMES_NAMES = ("steam_games.json.gz", "steam_games.json")
_EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()


def parse_date(value: object, path: Path, lineno: int) -> int:
    try:
        day = dt.date.fromisoformat(str(value).strip())
    except ValueError:
        raise DataError(f"{path}:{lineno}: field 'date' is not YYYY-MM-DD ({value!r:.40})") from None
    return (day.toordinal() - _EPOCH_ORDINAL) * 86_400


def read_steam(cfg: Config) -> RawDataset:
    reviews_path, games_path = resolve_inputs(cfg.data.path, cfg.data.meta_path, REVIEW_NAMES, GAMES_NAMES, "steam")
    threshold = cfg.data.steam_hours_threshold
    builder = InteractionBuilder()
    without_hours = 0
    for lineno, line in iter_lines(reviews_path, progress=cfg.run.progress, desc="steam reviews"):
        rec = parse_record(line, reviews_path, lineno)
        user = rec.get("username")
        if user is None or str(user) == "":
            user = rec.get("user_id")
            if user is None or str(user) == "":
                raise DataError(f"{reviews_path}:{lineno}: missing field 'username'")
            user = f"user_id:{user}"  # kept apart from usernames, which are a different namespace
        item = str(field(rec, "product_id", reviews_path, lineno))
        timestamp = parse_date(field(rec, "date", reviews_path, lineno), reviews_path, lineno)
        hours = rec.get("hours")
        if hours is None:
            without_hours += 1
            hours_played = 0.0
        else:
            hours_played = as_float(hours, "hours", reviews_path, lineno)
        builder.add(str(user), item, 5.0 if hours_played > threshold else 2.0, timestamp)

    wanted = builder.item_ids
    items: dict[str, str | None] = {}
    skipped = 0
    for lineno, line in iter_lines(games_path, progress=cfg.run.progress, desc="steam games"):
        rec = parse_record(line, games_path, lineno)
        game_id = rec.get("id")
        if game_id is None or str(game_id) == "":
            skipped += 1
            continue
        game_id = str(game_id)
        if game_id in wanted and game_id not in items:
            title = rec.get("app_name") or rec.get("title")
            items[game_id] = html.unescape(str(title)) if title else None

    return RawDataset(
        name="steam",
        interactions=builder.build(),
        items=pd.DataFrame({"item": list(items), "title": list(items.values())}, columns=["item", "title"]),
        source=reviews_path,
        notes={"steam_reviews_without_hours": without_hours, "metadata_lines_skipped": skipped},
    )
