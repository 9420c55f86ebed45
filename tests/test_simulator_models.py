"""User models: matrix (explicit, published files), rating-column distances, DeepFM; save/load."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from ulrec.config import DeepFMConfig
from ulrec.errors import DataError, InputError
from ulrec.simulator import MatrixUserModel, load_user_model, rating_column_distances
from ulrec.simulator import user_models


def brute_force_column_distances(users, items, ratings, n_users, n_items):
    dense = np.zeros((n_users, n_items))
    np.add.at(dense, (users, items), ratings)
    return np.linalg.norm(dense[:, :, None] - dense[:, None, :], axis=0)


# ------------------------------------------------------------------------------------------ matrix
def test_matrix_rewards_and_vector_distances():
    rng = np.random.default_rng(0)
    r = rng.uniform(1, 5, (4, 6))
    v = rng.normal(size=(6, 3))
    um = MatrixUserModel(rewards=r, item_vectors=v)
    got = um.reward(np.array([0, 3, 3]), np.array([5, 0, 5]))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, r[[0, 3, 3], [5, 0, 5]], rtol=1e-6)
    a, b = np.array([0, 1, 2, 5]), np.array([1, 1, 4, 0])
    np.testing.assert_allclose(um.distance(a, b), np.linalg.norm(v[a] - v[b], axis=1), rtol=1e-5)
    assert um.n_users == 4 and um.n_items == 6
    assert um.known_users().tolist() == [0, 1, 2, 3]


def test_sparse_item_vectors_match_dense():
    rng = np.random.default_rng(1)
    v = rng.normal(size=(7, 5)) * (rng.uniform(size=(7, 5)) < 0.4)
    r = np.ones((2, 7))
    dense = MatrixUserModel(rewards=r, item_vectors=v)
    sparse = MatrixUserModel(rewards=r, item_vectors=sp.csr_matrix(v))
    a, b = np.repeat(np.arange(7), 7), np.tile(np.arange(7), 7)
    np.testing.assert_allclose(sparse.distance(a, b), dense.distance(a, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["distances", "dense_vectors", "sparse_vectors"])
def test_matrix_save_load_round_trip(tmp_path, kind):
    rng = np.random.default_rng(2)
    r = rng.uniform(0, 5, (5, 4)).astype(np.float32)
    v = rng.normal(size=(4, 3)).astype(np.float32)
    extra = {
        "distances": {"distances": np.linalg.norm(v[:, None] - v[None], axis=2)},
        "dense_vectors": {"item_vectors": v},
        "sparse_vectors": {"item_vectors": sp.csr_matrix(v)},
    }[kind]
    um = MatrixUserModel(rewards=r, users=[1, 3], **extra)
    um.save(tmp_path / "sim")
    back = load_user_model(tmp_path / "sim")
    assert isinstance(back, MatrixUserModel)
    users, items = np.array([0, 1, 4, 2]), np.array([3, 0, 1, 2])
    np.testing.assert_array_equal(back.reward(users, items), um.reward(users, items))
    a, b = np.array([0, 1, 2, 3]), np.array([3, 2, 1, 1])
    np.testing.assert_allclose(back.distance(a, b), um.distance(a, b), rtol=1e-6)
    assert back.known_users().tolist() == [1, 3]


def test_load_user_model_errors(tmp_path):
    with pytest.raises(DataError, match="meta.json"):
        load_user_model(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"kind": "nope"}))
    with pytest.raises(DataError, match="unknown user model kind"):
        load_user_model(tmp_path)


# ------------------------------------------------------------------------------- published files
def write_published(directory, dataset="toy", n_users=5, n_items=4, seed=0):
    rng = np.random.default_rng(seed)
    mats = {}
    for split in ("train", "test"):
        r = rng.integers(1, 6, (n_users, n_items)).astype(np.float64)
        d = rng.uniform(200, 1300, (n_items, n_items))
        d = (d + d.T) / 2
        np.fill_diagonal(d, 0)
        np.save(directory / f"{dataset}_{split}.npy", r)
        with open(directory / f"{split}_distance_mat.pickle", "wb") as fh:
            pickle.dump(d, fh)
        mats[split] = (r, d)
    records = [
        {"userid_encoded": 4, "pos_seq_name": ["Half-Life", "Portal"], "target_item": "Dota 2"},
        {"userid_encoded": 1, "pos_seq_name": ["Doom"], "target_item": "Quake"},
    ]
    (directory / "test.json").write_text(json.dumps(records))
    return mats


def test_from_published_reads_the_authors_files(tmp_path):
    mats = write_published(tmp_path)
    um = MatrixUserModel.from_published(tmp_path, "toy", "test")
    r, d = mats["test"]
    assert (um.n_users, um.n_items) == r.shape
    np.testing.assert_array_equal(um.reward(np.array([4, 1]), np.array([0, 3])), r[[4, 1], [0, 3]].astype(np.float32))
    np.testing.assert_allclose(um.distance(np.array([0, 2]), np.array([1, 3])), d[[0, 2], [1, 3]], rtol=1e-6)
    assert um.known_users().tolist() == [4, 1]
    assert um.histories == [["Half-Life", "Portal"], ["Doom"]]
    train = MatrixUserModel.from_published(tmp_path, "toy", "train")
    assert train.users is None  # no train.json: every row is a user
    np.testing.assert_array_equal(train.reward(np.array([0]), np.array([0])), mats["train"][0][:1, :1].ravel())


def test_published_model_saves_as_reference(tmp_path):
    write_published(tmp_path)
    um = MatrixUserModel.from_published(tmp_path, "toy", "test")
    um.save(tmp_path / "sim")
    assert not (tmp_path / "sim" / "rewards.npy").exists()
    back = load_user_model(tmp_path / "sim")
    np.testing.assert_array_equal(back.reward(np.arange(5), np.full(5, 2)), um.reward(np.arange(5), np.full(5, 2)))
    assert back.known_users().tolist() == [4, 1]


def test_from_published_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="toy_test.npy"):
        MatrixUserModel.from_published(tmp_path, "toy", "test")
    write_published(tmp_path)
    (tmp_path / "test_distance_mat.pickle").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="test_distance_mat.pickle"):
        MatrixUserModel.from_published(tmp_path, "toy", "test")
    with open(tmp_path / "test_distance_mat.pickle", "wb") as fh:
        pickle.dump(np.zeros((3, 3)), fh)  # 3 items vs 4 reward columns
    with pytest.raises(DataError, match="distances"):
        MatrixUserModel.from_published(tmp_path, "toy", "test")
    with pytest.raises(InputError, match="split"):
        MatrixUserModel.from_published(tmp_path, "toy", "valid")


# ------------------------------------------------------------------------------- rating columns
@pytest.mark.parametrize("dense_limit", [8192, 0])
def test_rating_column_distances_match_brute_force(monkeypatch, dense_limit):
    monkeypatch.setattr(user_models, "DENSE_DISTANCE_MAX_ITEMS", dense_limit)
    rng = np.random.default_rng(3)
    n_users, n_items = 9, 6
    pairs = rng.choice(n_users * n_items, 25, replace=False)
    users, items = pairs // n_items, pairs % n_items
    ratings = rng.integers(1, 6, 25).astype(np.float32)
    dist = rating_column_distances(users, items, ratings, n_users, n_items)
    assert isinstance(dist, user_models.DenseDistances if dense_limit else user_models.VectorDistances)
    expected = brute_force_column_distances(users, items, ratings, n_users, n_items)
    a, b = np.repeat(np.arange(n_items), n_items), np.tile(np.arange(n_items), n_items)
    np.testing.assert_allclose(dist.pairs(a, b), expected[a, b], rtol=1e-5, atol=1e-4)


# -------------------------------------------------------------------------------------- DeepFM
def synthetic_ratings(n_users=60, n_items=40, per_user=25, seed=0) -> pd.DataFrame:
    """Ratings driven by user and item biases: a model that learns anything beats the mean."""
    rng = np.random.default_rng(seed)
    ub, ib = rng.normal(0, 1.0, n_users), rng.normal(0, 1.0, n_items)
    rows = [(u, i) for u in range(n_users) for i in rng.choice(n_items, per_user, replace=False)]
    u, i = np.array(rows).T
    rating = np.clip(np.rint(3 + ub[u] + ib[i] + rng.normal(0, 0.3, len(u))), 1, 5)
    return pd.DataFrame({"user_id": u, "item_id": i, "rating": rating.astype(np.float32)})


TINY = DeepFMConfig(embedding_dim=4, hidden_units=[8], epochs=15, batch_size=128, lr=0.02, holdout_fraction=0.2)


@pytest.fixture(scope="module")
def deepfm():
    from ulrec.simulator import DeepFMUserModel

    return DeepFMUserModel.fit(synthetic_ratings(), n_users=70, n_items=40, hparams=TINY, seed=0, progress=False)


def test_deepfm_fit_beats_mean_baseline(deepfm):
    report = deepfm.fit_report
    assert report["n_holdout"] == 300 and report["n_train"] == 1200
    assert report["rmse"] < 0.8 * report["baseline_rmse"]


def test_deepfm_rewards_clipped_to_rating_range_and_known_users(deepfm):
    users = np.repeat(np.arange(70), 40)
    items = np.tile(np.arange(40), 70)
    reward = deepfm.reward(users, items)
    assert reward.dtype == np.float32 and reward.shape == (2800,)
    assert reward.min() >= 1.0 and reward.max() <= 5.0
    assert deepfm.known_users().tolist() == list(range(60))  # users 60..69 have no ratings
    with pytest.raises(InputError, match="user_ids"):
        deepfm.reward(np.array([70]), np.array([0]))


def test_deepfm_distance_is_l2_between_item_embeddings(deepfm):
    emb = deepfm.item_embeddings()
    assert emb.shape == (40, 4)
    a, b = np.array([0, 5, 7]), np.array([1, 5, 30])
    np.testing.assert_allclose(deepfm.distance(a, b), np.linalg.norm(emb[a] - emb[b], axis=1), rtol=1e-5)


def test_deepfm_scores_in_batches_like_one_batch(deepfm):
    users, items = np.arange(60), np.arange(60) % 40
    whole = deepfm.reward(users, items)
    deepfm.hparams = deepfm.hparams.model_copy(update={"batch_score_size": 7})
    try:
        np.testing.assert_allclose(deepfm.reward(users, items), whole, rtol=1e-6)
    finally:
        deepfm.hparams = deepfm.hparams.model_copy(update={"batch_score_size": TINY.batch_score_size})


def test_deepfm_save_load_round_trip(deepfm, tmp_path):
    deepfm.save(tmp_path / "sim")
    back = load_user_model(tmp_path / "sim")
    users, items = np.arange(60), (np.arange(60) * 7) % 40
    np.testing.assert_array_equal(back.reward(users, items), deepfm.reward(users, items))
    np.testing.assert_array_equal(back.distance(items, items[::-1]), deepfm.distance(items, items[::-1]))
    assert back.fit_report == deepfm.fit_report
    assert back.known_users().tolist() == deepfm.known_users().tolist()


def test_deepfm_rounding_and_rating_columns(tmp_path):
    from ulrec.simulator import DeepFMUserModel

    ratings = synthetic_ratings(n_users=20, n_items=10, per_user=6, seed=4)
    hp = TINY.model_copy(update={"epochs": 3, "round_rewards": True})
    um = DeepFMUserModel.fit(ratings, n_users=20, n_items=10, hparams=hp, distance="rating_columns", progress=False)
    reward = um.reward(np.arange(20), np.arange(20) % 10)
    np.testing.assert_array_equal(reward, np.rint(reward))
    expected = brute_force_column_distances(
        ratings.user_id.to_numpy(), ratings.item_id.to_numpy(), ratings.rating.to_numpy(), 20, 10
    )
    a, b = np.repeat(np.arange(10), 10), np.tile(np.arange(10), 10)
    np.testing.assert_allclose(um.distance(a, b), expected[a, b], rtol=1e-5, atol=1e-4)
    um.save(tmp_path / "sim")
    back = load_user_model(tmp_path / "sim")
    np.testing.assert_allclose(back.distance(a, b), um.distance(a, b))
    np.testing.assert_array_equal(back.reward(np.arange(20), np.arange(20) % 10), reward)


def test_deepfm_bad_ratings():
    from ulrec.simulator import DeepFMUserModel

    bad = synthetic_ratings(n_users=5, n_items=5, per_user=2)
    with pytest.raises(InputError, match="ratings.item_id"):
        DeepFMUserModel.fit(bad, n_users=5, n_items=3, hparams=TINY, progress=False)
    with pytest.raises(InputError, match="rating"):
        DeepFMUserModel.fit(bad.drop(columns="rating"), n_users=5, n_items=5, hparams=TINY, progress=False)
    nan = bad.assign(rating=np.nan)
    with pytest.raises(InputError, match="NaN"):
        DeepFMUserModel.fit(nan, n_users=5, n_items=5, hparams=TINY, progress=False)
