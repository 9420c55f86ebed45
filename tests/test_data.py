"""Dataset layer: readers on small fixture files in the real formats, filtering, the time split,
the synthetic generator, bad input (API and CLI), and the real MovieLens-100k."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ulrec.cli import main
from ulrec.config import Config, load_config
from ulrec.data import PreparedData, load_prepared, load_stats, prepare_data, read_raw, stats_table
from ulrec.data import prepare as prepare_module
from ulrec.data.movielens import RECBOLE_WHEEL, movie_title
from ulrec.data.process import k_core, latest_per_pair, process, raw_id_order, unique_titles
from ulrec.data.raw import RawDataset
from ulrec.errors import DataError, InputError


def make_cfg(tmp_path: Path, **data) -> Config:
    return Config.model_validate({"run": {"root": str(tmp_path / "runs"), "progress": False}, "data": data})


def write_lines(path: Path, lines: list[str], gz: bool = False) -> Path:
    text = "".join(line + "\n" for line in lines)
    if gz:
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


# ------------------------------------------------------------------------------------- fixtures
def write_ml100k(folder: Path) -> Path:
    """RecBole atomic files: 4 users, 4 items (one film listed twice, one title with a trailing article)."""
    folder.mkdir(parents=True, exist_ok=True)
    ratings = [
        (1, 1, 5, 100), (1, 2, 3, 200), (1, 3, 4, 300),
        (2, 1, 4, 150), (2, 4, 2, 250), (2, 2, 5, 350),
        (3, 3, 1, 120), (3, 4, 5, 220),
        (10, 1, 3, 400), (10, 2, 4, 500),
    ]
    write_lines(
        folder / "ml-100k.inter",
        ["user_id:token\titem_id:token\trating:float\ttimestamp:float"] + [f"{u}\t{i}\t{r}\t{t}" for u, i, r, t in ratings],
    )
    write_lines(
        folder / "ml-100k.item",
        [
            "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq",
            "1\tToy Story\t1995\tAnimation Children's Comedy",
            "2\tIce Storm, The\t1997\tDrama",
            "3\tChasing Amy\t1997\tDrama Romance",
            "4\tChasing Amy\t1997\tDrama Romance",
        ],
    )
    write_lines(
        folder / "ml-100k.user",
        ["user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token"]
        + [f"{u}\t30\tF\twriter\t0000{u}" for u in (1, 2, 3, 10)],
    )
    return folder


STEAM_REVIEWS = [
    "{'username': 'alice', 'hours': 10.5, 'products': 3, 'product_id': '100', 'page_order': 0, 'date': '2017-12-17', 'text': 'fun', 'early_access': False, 'page': 1}",
    "{'username': 'alice', 'hours': 3.0, 'products': 3, 'product_id': '200', 'page_order': 1, 'date': '2017-12-18', 'text': 'ok', 'early_access': False, 'page': 1}",
    "{'username': 'bob', 'products': 1, 'product_id': '100', 'page_order': 2, 'date': '2018-01-02', 'text': 'no hours', 'early_access': True, 'page': 1}",
    "{'user_id': '7656119', 'hours': 0.2, 'products': 9, 'product_id': '200', 'page_order': 3, 'date': '2018-01-03', 'text': 'meh', 'early_access': False, 'page': 2, 'compensation': 'Product received for free'}",
    "{'username': 'bob', 'hours': 55.0, 'products': 1, 'product_id': '300', 'page_order': 4, 'date': '2018-02-01', 'text': 'untitled game', 'early_access': False, 'page': 2}",
]
STEAM_GAMES = [
    "{'publisher': 'Kotoshiro', 'genres': ['Action', 'Casual'], 'app_name': 'Lost Summoner Kitty', 'title': 'Lost Summoner Kitty', 'url': 'http://store.steampowered.com/app/100/', 'release_date': '2018-01-04', 'tags': ['Strategy'], 'price': 4.99, 'early_access': False, 'id': '100', 'developer': 'Kotoshiro'}",
    "{'genres': ['Indie'], 'title': 'Ironbound &amp; Co', 'url': 'http://store.steampowered.com/app/200/', 'id': '200'}",
    "{'app_name': 'A game without an id', 'url': 'http://store.steampowered.com/'}",
]


def write_steam(folder: Path, gz: bool) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".json.gz" if gz else ".json"
    return (
        write_lines(folder / f"steam_reviews{suffix}", STEAM_REVIEWS, gz),
        write_lines(folder / f"steam_games{suffix}", STEAM_GAMES, gz),
    )


def amazon_review(user: str, asin: str, overall: float, t: int) -> str:
    return json.dumps(
        {
            "overall": overall, "verified": True, "reviewTime": "03 30, 2005", "reviewerID": user, "asin": asin,
            "style": {"Format:": " Paperback"}, "reviewerName": "R", "reviewText": "text", "summary": "s",
            "unixReviewTime": t,
        }
    )


def write_amazon(folder: Path, gz: bool) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".json.gz" if gz else ".json"
    reviews = [
        amazon_review("A2", "000100039X", 5.0, 1112140800),
        amazon_review("A1", "0001055178", 4.0, 1112140900),
        amazon_review("A1", "000100039X", 2.0, 1112141000),
        amazon_review("A3", "B000NOMETA", 3.0, 1112141100),
    ]
    meta = [
        json.dumps({"category": ["Books"], "title": "The Prophet &amp; Me", "asin": "000100039X", "brand": "X"}),
        # The 2014 metadata release uses Python literals; accepted too.
        "{'asin': '0001055178', 'title': 'Master Georgie', 'salesRank': {'Books': 1}}",
    ]
    return (
        write_lines(folder / f"Books_5{suffix}", reviews, gz),
        write_lines(folder / f"meta_Books{suffix}", meta, gz),
    )


# --------------------------------------------------------------------------------------- readers
def test_ml100k_reader_on_atomic_files(tmp_path: Path) -> None:
    folder = write_ml100k(tmp_path / "ml")
    cfg = make_cfg(tmp_path, path=str(folder), min_user_interactions=1, min_item_interactions=1)
    raw = read_raw(cfg)
    assert len(raw.interactions) == 10
    assert raw.interactions["rating"].dtype == np.float32 and raw.interactions["timestamp"].dtype == np.int64
    assert raw.interactions["user"].astype(str).tolist()[:3] == ["1", "1", "1"]

    stats = prepare_data(cfg)
    assert (stats["ratings_before_filter"], stats["users_before_filter"], stats["items_before_filter"]) == (10, 4, 4)
    data = load_prepared(cfg.run_dir)
    # Items sorted by raw id; article moved to the front, year appended, duplicate film disambiguated.
    assert data.items["raw_item_id"].tolist() == ["1", "2", "3", "4"]
    assert data.titles == ["Toy Story (1995)", "The Ice Storm (1997)", "Chasing Amy (1997)", "Chasing Amy (1997) (2)"]
    assert data.items["raw_title"].tolist()[1] == "Ice Storm, The"
    # Users sorted numerically by raw id (10 after 3), their attributes kept.
    assert data.users["raw_user_id"].tolist() == ["1", "2", "3", "10"]
    assert data.users["occupation"].tolist() == ["writer"] * 4


def test_movie_title_rules() -> None:
    assert movie_title("Good, The Bad and The Ugly, The", "1966") == "The Good, The Bad and The Ugly (1966)"
    assert movie_title("Horseman on the Roof, The (Hussard sur le toit, Le)", "1995") == (
        "The Horseman on the Roof (Hussard sur le toit, Le) (1995)"
    )
    assert movie_title("unkonwn", "unkonwn") == "unkonwn"


@pytest.mark.parametrize("gz", [True, False])
def test_steam_reader(tmp_path: Path, gz: bool) -> None:
    reviews, games = write_steam(tmp_path / "steam", gz)
    cfg = make_cfg(tmp_path, dataset="steam", path=str(reviews), min_user_interactions=1, min_item_interactions=1)
    raw = read_raw(cfg)
    inter = raw.interactions.astype({"user": str, "item": str})
    # hours > 3 → 5, else 2 (3.0 exactly is not above; a review without hours counts as not above).
    assert inter["rating"].tolist() == [5.0, 2.0, 2.0, 2.0, 5.0]
    assert inter["user"].tolist() == ["alice", "alice", "bob", "user_id:7656119", "bob"]
    day = int(dt.datetime(2017, 12, 17, tzinfo=dt.timezone.utc).timestamp())
    assert inter["timestamp"].tolist()[:2] == [day, day + 86_400]
    assert raw.notes == {"steam_reviews_without_hours": 1, "metadata_lines_skipped": 1}

    stats = prepare_data(cfg)
    data = load_prepared(cfg.run_dir)
    # Game 300 has no metadata: its review is dropped; the title falls back to 'title', unescaped.
    assert stats["untitled_interactions_removed"] == 1
    assert data.titles == ["Lost Summoner Kitty", "Ironbound & Co"]
    assert stats["ratings_before_filter"] == 5 and stats["interactions"] == 4


def test_steam_folder_and_default_meta(tmp_path: Path) -> None:
    write_steam(tmp_path / "steam", gz=True)
    cfg = make_cfg(tmp_path, dataset="steam", path=str(tmp_path / "steam"), min_user_interactions=1, min_item_interactions=1)
    assert read_raw(cfg).source == tmp_path / "steam" / "steam_reviews.json.gz"


@pytest.mark.parametrize("gz", [True, False])
def test_amazon_reader(tmp_path: Path, gz: bool) -> None:
    reviews, meta = write_amazon(tmp_path / "amazon", gz)
    cfg = make_cfg(
        tmp_path, dataset="amazon-book", path=str(reviews), meta_path=str(meta),
        min_user_interactions=1, min_item_interactions=1,
    )
    raw = read_raw(cfg)
    assert raw.interactions["rating"].tolist() == [5.0, 4.0, 2.0, 3.0]
    assert raw.interactions["timestamp"].tolist()[0] == 1112140800
    stats = prepare_data(cfg)
    data = load_prepared(cfg.run_dir)
    assert data.items["raw_item_id"].tolist() == ["000100039X", "0001055178"]
    assert data.titles == ["The Prophet & Me", "Master Georgie"]
    assert stats["untitled_interactions_removed"] == 1
    assert data.users["raw_user_id"].tolist() == ["A1", "A2"]


# ------------------------------------------------------------------------------------ processing
def raw_frame(rows: list[tuple[str, str, float, int]], titles: dict[str, str] | None = None) -> RawDataset:
    inter = pd.DataFrame(rows, columns=["user", "item", "rating", "timestamp"]).astype(
        {"rating": np.float32, "timestamp": np.int64}
    )
    names = sorted({r[1] for r in rows})
    titles = titles or {n: f"Title {n}" for n in names}
    return RawDataset(name="hand", interactions=inter, items=pd.DataFrame({"item": list(titles), "title": list(titles.values())}), source="hand.json")


def test_k_core_cascade() -> None:
    # min 2/2. Item i3 has one interaction → removed → u3 drops to one item → removed → i4 (u1, u3)
    # drops to one → removed. u1 keeps i1, i2.
    rows = [("u1", "i1"), ("u1", "i2"), ("u1", "i4"), ("u2", "i1"), ("u2", "i2"), ("u3", "i3"), ("u3", "i4")]
    users = np.array([int(u[1]) for u, _ in rows])
    items = np.array([int(i[1]) for _, i in rows])
    keep = k_core(users, items, 2, 2)
    assert [rows[k] for k in np.flatnonzero(keep)] == [("u1", "i1"), ("u1", "i2"), ("u2", "i1"), ("u2", "i2")]
    # Without the cascade (one pass), u3 and i4 would have survived.
    assert k_core(users, items, 1, 1).all()

    cfg = make_cfg(Path("/unused"), min_user_interactions=2, min_item_interactions=2, train_fraction=0.5)
    out = process(raw_frame([(u, i, 4.0, t) for t, (u, i) in enumerate(rows)]), cfg.data)
    assert out.stats["users"] == 2 and out.stats["items"] == 2 and out.stats["interactions"] == 4


def test_latest_per_pair_keeps_latest_and_later_on_ties() -> None:
    users = np.array([0, 0, 0, 1, 1])
    items = np.array([5, 5, 6, 5, 5])
    ts = np.array([30, 10, 20, 7, 7])
    assert latest_per_pair(users, items, ts).tolist() == [True, False, True, False, True]


def test_unique_titles_deterministic_and_case_insensitive() -> None:
    assert unique_titles(["Heat", "heat", "Heat (2)", "Up"]) == ["Heat", "heat (3)", "Heat (2)", "Up"]
    assert unique_titles(["A", "A", "A"]) == ["A", "A (2)", "A (3)"]


def test_raw_id_order_numeric_or_string() -> None:
    assert raw_id_order(["10", "9", "100"]).tolist() == [1, 0, 2]
    assert raw_id_order(["b", "10", "a"]).tolist() == [1, 2, 0]


def test_time_split_order_and_shared_ids(tmp_path: Path) -> None:
    rows = [
        # user, item, rating, timestamp — file order matters for the tie at t=5 (x before w).
        ("carol", "x", 4.0, 5), ("carol", "w", 3.0, 5), ("carol", "y", 5.0, 1),
        ("dave", "x", 2.0, 2), ("dave", "y", 4.0, 9),
        ("erin", "w", 1.0, 8), ("erin", "z", 5.0, 7),
        ("frank", "z", 3.0, 3), ("frank", "y", 4.0, 6),
    ]
    cfg = make_cfg(tmp_path, min_user_interactions=1, min_item_interactions=1, train_fraction=0.5)
    out = process(raw_frame(rows), cfg.data)
    ts = sorted(r[3] for r in rows)
    threshold = ts[int(np.floor(0.5 * (len(ts) - 1)))]
    assert out.stats["split_timestamp"] == threshold == 5
    assert (out.train["timestamp"] <= threshold).all() and (out.test["timestamp"] > threshold).all()
    assert len(out.train) + len(out.test) == len(rows)
    assert out.train["rating"].dtype == np.float32 and out.test["timestamp"].dtype == np.int64

    user_id = dict(zip(out.users["raw_user_id"], out.users["user_id"]))
    item_id = dict(zip(out.items["raw_item_id"], out.items["item_id"]))
    assert list(user_id) == ["carol", "dave", "erin", "frank"] and list(item_id) == ["w", "x", "y", "z"]
    # dave and frank are in both splits with one id each; erin only in test.
    assert out.stats["users_in_both"] == 2 and out.stats["train_users"] == 3 and out.stats["test_users"] == 3

    prepared = PreparedData(items=out.items, users=out.users, train=out.train, test=out.test, stats=out.stats)
    train_hist = prepared.user_histories("train")
    # carol: y (t=1), then x and w tied at t=5 in file order.
    assert train_hist[user_id["carol"]] == [item_id["y"], item_id["x"], item_id["w"]]
    assert train_hist[user_id["dave"]] == [item_id["x"]]
    assert prepared.user_histories("test")[user_id["dave"]] == [item_id["y"]]
    assert prepared.user_histories("test")[user_id["erin"]] == [item_id["z"], item_id["w"]]
    assert prepared.user_histories("train", max_len=2)[user_id["carol"]] == [item_id["x"], item_id["w"]]
    with pytest.raises(InputError, match="split"):
        prepared.user_histories("valid")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="max_len"):
        prepared.user_histories("train", max_len=0)


# ------------------------------------------------------------------------------------- synthetic
def test_synthetic_generator(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, dataset="synthetic")  # 200 users, 120 items, 6 clusters
    a, b = read_raw(cfg), read_raw(cfg)
    pd.testing.assert_frame_equal(a.interactions, b.interactions)
    other = read_raw(cfg.model_copy(update={"run": cfg.run.model_copy(update={"seed": 1})}))
    assert not a.interactions.equals(other.interactions)

    assert a.items["title"].is_unique and len(a.items) == 120
    assert a.items["title"].str.split(":").str[0].nunique() == 6  # the theme word names the cluster
    inter = a.interactions.merge(a.items[["item", "cluster"]], on="item")
    assert not inter.duplicated(["user", "item"]).any()
    # Users concentrate on one or two clusters (uniform picks would give a top-2 share near 0.45)...
    top2 = inter.groupby("user")["cluster"].agg(lambda c: c.value_counts(normalize=True).iloc[:2].sum())
    assert top2.mean() > 0.6
    # ...and rate them higher.
    cluster_share = inter.groupby(["user", "cluster"])["item"].transform("size") / inter.groupby("user")["item"].transform("size")
    preferred = cluster_share >= 0.25
    assert inter.loc[preferred, "rating"].mean() > inter.loc[~preferred, "rating"].mean() + 1


def test_prepare_synthetic_end_to_end_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = make_cfg(tmp_path, dataset="synthetic")
    stats = prepare_data(cfg)
    folder = cfg.run_dir / "data"
    assert sorted(p.name for p in folder.iterdir()) == [
        "_stage.json", "interactions.parquet", "items.parquet", "stats.json", "test.parquet", "train.parquet", "users.parquet",
    ]
    assert stats == load_stats(cfg)
    data = load_prepared(cfg.run_dir)
    assert data.items["item_id"].tolist() == list(range(stats["items"]))
    assert data.users["user_id"].tolist() == list(range(stats["users"]))
    assert len(data.train) == stats["train_interactions"] and len(data.test) == stats["test_interactions"]
    assert set(data.train["item_id"]) | set(data.test["item_id"]) <= set(range(stats["items"]))
    assert stats["users_in_both"] > 0 and stats["train_users"] + stats["test_users"] - stats["users_in_both"] == stats["users"]
    table = stats_table(stats)
    assert f"| synthetic | {stats['users']:,} | {stats['items']:,} | {stats['train_interactions']:,} |" in table

    # Same inputs: skipped without reading anything.
    def no_read(_cfg: Config) -> RawDataset:
        raise AssertionError("re-read although the stage was done")

    monkeypatch.setitem(prepare_module.READERS, "synthetic", no_read)
    assert prepare_data(cfg) == {**stats, "skipped": True}
    monkeypatch.undo()
    # Changed inputs: prepared again.
    changed = prepare_data(cfg.model_copy(update={"data": cfg.data.model_copy(update={"train_fraction": 0.8})}))
    assert changed["train_interactions"] > stats["train_interactions"]
    # A failing re-prepare leaves the previous output intact.
    with pytest.raises(DataError, match="no interactions left"):
        prepare_data(cfg.model_copy(update={"data": cfg.data.model_copy(update={"min_user_interactions": 10_000})}))
    assert load_stats(cfg) == changed
    assert [p.name for p in cfg.run_dir.iterdir()] == ["data"]  # no temporary leftovers


def test_load_prepared_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="items.parquet: not found"):
        load_prepared(tmp_path / "nothing")
    with pytest.raises(DataError, match="stats.json: not found"):
        load_stats(make_cfg(tmp_path))


# ------------------------------------------------------------------------------------- bad input
def _missing_file(tmp: Path) -> tuple[list[str], str]:
    return ["data.dataset=steam", f"data.path={tmp / 'steam_reviews.json.gz'}"], "steam_reviews.json.gz: file not found"


def _truncated_gzip(tmp: Path) -> tuple[list[str], str]:
    reviews, _ = write_steam(tmp / "steam", gz=True)
    blob = reviews.read_bytes()
    reviews.write_bytes(blob[: len(blob) // 2])
    return ["data.dataset=steam", f"data.path={reviews}"], "steam_reviews.json.gz: truncated or corrupt gzip file"


def _malformed_line(tmp: Path) -> tuple[list[str], str]:
    reviews, _ = write_steam(tmp / "steam", gz=True)
    write_lines(reviews, STEAM_REVIEWS[:2] + ["{'username': 'bob', 'product_id': "] + STEAM_REVIEWS[2:], gz=True)
    return ["data.dataset=steam", f"data.path={reviews}"], "steam_reviews.json.gz:3: malformed line"


def _missing_field(tmp: Path) -> tuple[list[str], str]:
    reviews, meta = write_amazon(tmp / "amazon", gz=False)
    lines = reviews.read_text().splitlines()
    record = json.loads(lines[1])
    del record["asin"]
    lines[1] = json.dumps(record)
    write_lines(reviews, lines)
    return ["data.dataset=amazon-book", f"data.path={reviews}"], "Books_5.json:2: missing field 'asin'"


def _bad_utf8(tmp: Path) -> tuple[list[str], str]:
    reviews, _ = write_steam(tmp / "steam", gz=False)
    lines = reviews.read_bytes().splitlines(keepends=True)
    lines[3] = lines[3].replace(b"meh", b"m\xffh")
    reviews.write_bytes(b"".join(lines))
    return ["data.dataset=steam", f"data.path={reviews}"], "steam_reviews.json:4: not valid UTF-8 text"


def _bad_atomic_line(tmp: Path) -> tuple[list[str], str]:
    folder = write_ml100k(tmp / "ml")
    with open(folder / "ml-100k.inter", "a") as f:
        f.write("4\t1\t5\n")
    return [f"data.path={folder}"], "ml-100k.inter:12: malformed line (3 fields, header has 4)"


def _bad_number(tmp: Path) -> tuple[list[str], str]:
    folder = write_ml100k(tmp / "ml")
    with open(folder / "ml-100k.inter", "a") as f:
        f.write("4\t1\tfive\t600\n")
    return [f"data.path={folder}"], "ml-100k.inter:12: field 'rating' is not a number"


def _empty_after_filter(tmp: Path) -> tuple[list[str], str]:
    folder = write_ml100k(tmp / "ml")
    return [f"data.path={folder}", "data.min_user_interactions=50"], "ml-100k.inter: no interactions left after filtering"


def _wheel_mismatch(tmp: Path) -> tuple[list[str], str]:
    cache = tmp / "cache"
    cache.mkdir(parents=True)
    (cache / RECBOLE_WHEEL).write_bytes(b"not the wheel")
    return [f"data.cache_dir={cache}"], f"{RECBOLE_WHEEL}: sha256 mismatch"


BAD_INPUTS = [_missing_file, _truncated_gzip, _malformed_line, _missing_field, _bad_utf8, _bad_atomic_line, _bad_number,
              _empty_after_filter, _wheel_mismatch]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=lambda f: f.__name__.strip("_"))
def test_bad_input_api(tmp_path: Path, case) -> None:
    overrides, expected = case(tmp_path / "in")
    cfg = load_config(None, [f"run.root={tmp_path / 'runs'}", "run.progress=false", *overrides])
    with pytest.raises(DataError) as err:
        prepare_data(cfg)
    assert expected in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("case", BAD_INPUTS, ids=lambda f: f.__name__.strip("_"))
def test_bad_input_cli(tmp_path: Path, case, capsys: pytest.CaptureFixture[str]) -> None:
    overrides, expected = case(tmp_path / "in")
    capsys.readouterr()
    rc = main(["data", "prepare", f"run.root={tmp_path / 'runs'}", "run.progress=false", *overrides])
    captured = capsys.readouterr()
    assert rc != 0
    assert captured.err.count("\n") == 1 and captured.err.startswith("ulrec: error: ") and expected in captured.err
    assert captured.out == ""
    assert not (tmp_path / "runs").exists()


def test_missing_path_is_a_config_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["data", "prepare", f"run.root={tmp_path / 'runs'}", "data.dataset=amazon-book"])
    assert rc == 2 and "data.path must name the amazon-book interactions file" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- real ml-100k
def test_real_movielens_100k(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Fetches the RecBole wheel from PyPI once into the cache (ULREC_CACHE_DIR or ~/.cache/ulrec)."""
    cache = os.environ.get("ULREC_CACHE_DIR", "~/.cache/ulrec")
    rc = main(["data", "prepare", f"run.root={tmp_path / 'runs'}", f"data.cache_dir={cache}", "run.progress=false"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "| ml-100k | 100,000 | 943 | 1,682 |" in out
    cfg = make_cfg(tmp_path, cache_dir=cache)
    stats = load_stats(cfg)
    assert (stats["ratings_before_filter"], stats["users_before_filter"], stats["items_before_filter"]) == (100_000, 943, 1_682)
    data = load_prepared(cfg.run_dir)
    assert data.titles[0] == "Toy Story (1995)" and len(set(map(str.casefold, data.titles))) == len(data.titles)
    assert stats["train_interactions"] + stats["test_interactions"] == stats["interactions"]
    # Every user rated >= 20 films, so the 5-core keeps all 943 and drops only rarely rated films.
    assert stats["users"] == 943 and stats["items"] < 1_682
