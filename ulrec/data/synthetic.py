"""A synthetic dataset with titles, for fast tests of the whole pipeline.

Items fall into ``data.synthetic_clusters`` clusters; each title starts with its cluster's theme
word ("Ember: Silent Harbor") so a language model can pick up the clustering from titles alone.
Each user prefers one or two clusters: most of their items come from them and get high ratings,
the rest are rated low. Items have a skewed popularity within their cluster, and each user's
interactions are spread over time from a random start, so the time split leaves some users in
train only, some in test only and many in both. Fully determined by the config and ``run.seed``.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from ulrec.config import Config
from ulrec.data.raw import RawDataset

THEMES = ("Ember", "Tide", "Orbit", "Grove", "Circuit", "Dune", "Frost", "Lantern", "Meadow", "Quarry", "Summit", "Velvet")
ADJECTIVES = (
    "Silent", "Golden", "Hidden", "Broken", "Distant", "Crimson", "Gentle", "Restless", "Hollow", "Bright",
    "Wild", "Quiet", "Ancient", "Little", "Endless", "Secret", "Frozen", "Burning", "Lonely", "Hungry",
)
NOUNS = (
    "Harbor", "Garden", "Engine", "River", "Castle", "Signal", "Forest", "Mirror", "Voyage", "Letter",
    "Bridge", "Island", "Machine", "Song", "Tower", "Market", "Shadow", "Kingdom", "Station", "Promise",
)
T0 = 1_600_000_000  # 2020-09-13, any fixed origin would do
SPAN = 365 * 86_400
FAVOURITE_BOOST = 8.0  # sampling weight of a favourite cluster's items relative to others


def cluster_titles(cluster: int, count: int, rng: np.random.Generator) -> list[str]:
    theme = THEMES[cluster % len(THEMES)]
    if cluster >= len(THEMES):
        theme = f"{theme} {cluster // len(THEMES) + 1}"
    combos = list(itertools.product(ADJECTIVES, NOUNS))
    order = rng.permutation(len(combos))
    titles = []
    for k in range(count):
        adjective, noun = combos[order[k % len(combos)]]
        suffix = f" {k // len(combos) + 1}" if k >= len(combos) else ""
        titles.append(f"{theme}: {adjective} {noun}{suffix}")
    return titles


def generate_synthetic(cfg: Config) -> RawDataset:
    d = cfg.data
    rng = np.random.default_rng(cfg.run.seed)
    n_items = d.synthetic_items
    n_clusters = min(d.synthetic_clusters, n_items)
    cluster_of = np.arange(n_items) % n_clusters
    titles: list[str] = [""] * n_items
    for c in range(n_clusters):
        members = np.flatnonzero(cluster_of == c)
        for item, title in zip(members, cluster_titles(c, len(members), rng)):
            titles[item] = title
    popularity = 1.0 / (1.0 + rng.permutation(n_items)) ** 0.7

    users, items, ratings, timestamps = [], [], [], []
    per_user = min(d.synthetic_interactions_per_user, n_items)
    for u in range(d.synthetic_users):
        favourites = rng.choice(n_clusters, size=min(int(rng.integers(1, 3)), n_clusters), replace=False)
        liked = np.isin(cluster_of, favourites)
        weight = popularity * np.where(liked, FAVOURITE_BOOST, 1.0)
        n = int(rng.integers(max(2, per_user // 2), min(n_items, per_user + per_user // 2) + 1))
        chosen = rng.choice(n_items, size=n, replace=False, p=weight / weight.sum())
        rating = np.where(liked[chosen], rng.normal(4.3, 0.6, n), rng.normal(2.3, 0.9, n))
        start = T0 + int(rng.integers(0, SPAN // 2))
        times = start + np.cumsum(rng.exponential(SPAN / (2 * n), n)).astype(np.int64)
        users.extend([str(u)] * n)
        items.extend(str(i) for i in chosen)
        ratings.append(np.clip(np.rint(rating), 1, 5))
        timestamps.append(times)

    interactions = pd.DataFrame(
        {
            "user": users,
            "item": items,
            "rating": np.concatenate(ratings).astype(np.float32),
            "timestamp": np.concatenate(timestamps).astype(np.int64),
        }
    )
    catalogue = pd.DataFrame({"item": [str(i) for i in range(n_items)], "title": titles, "cluster": cluster_of})
    return RawDataset(name="synthetic", interactions=interactions, items=catalogue, source="<synthetic generator>")
