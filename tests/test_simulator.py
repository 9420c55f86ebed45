"""Exit protocol and batched environment: hand-made cases, bad inputs, and a property test
holding the batched env to the plain per-user loop."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ulrec.errors import InputError
from ulrec.simulator import (
    EchoChamberEnv,
    EnvConfig,
    MatrixUserModel,
    exit_reason,
    reference_episode,
)

FAR, CLOSE, TAU_D = 100.0, 1.0, 10.0


def user_model(n_items: int = 8, close: tuple[tuple[int, int], ...] = (), rewards: dict | None = None,
               n_users: int = 3) -> MatrixUserModel:
    """Every reward 4 (except ``rewards[(u, i)]``); all items FAR apart except ``close`` pairs."""
    r = np.full((n_users, n_items), 4.0)
    for (u, i), v in (rewards or {}).items():
        r[u, i] = v
    d = np.full((n_items, n_items), FAR)
    np.fill_diagonal(d, 0.0)
    for a, b in close:
        d[a, b] = d[b, a] = CLOSE
    return MatrixUserModel(rewards=r, distances=d)


def play(um: MatrixUserModel, items: list[int], user: int = 0, **cfg) -> tuple[EchoChamberEnv, list]:
    config = EnvConfig(**{"distance_threshold": TAU_D, "window": 4, "max_steps": 100, **cfg})
    env = EchoChamberEnv(um, config)
    env.reset(np.array([user]))
    results = [env.step(np.array([i])) for i in items]
    return env, results


def reasons(results) -> list[str]:
    return [str(r.reason[0]) for r in results]


# ------------------------------------------------------------------------------------- each rule
def test_accepted_steps_count_in_len_and_reward():
    env, res = play(user_model(rewards={(0, 1): 3.0}), [0, 1, 2])
    assert reasons(res) == ["stay"] * 3
    assert [bool(r.live[0]) for r in res] == [True] * 3
    assert env.lengths[0] == 3 and env.total_rewards[0] == pytest.approx(11.0)
    assert not env.done[0] and env.exit_reasons[0] == ""


def test_repeat_anywhere_earlier_exits_and_exit_step_counts_in_neither():
    # Item 0 is 3 steps back, outside a window of 1: still a repeat.
    env, res = play(user_model(), [0, 1, 2, 0], window=1)
    assert reasons(res) == ["stay", "stay", "stay", "repeat"]
    assert not res[-1].live[0] and res[-1].done[0]
    assert res[-1].reward[0] == pytest.approx(4.0)  # reported, but not counted
    assert env.lengths[0] == 3 and env.total_rewards[0] == pytest.approx(12.0)
    assert env.exit_reasons[0] == "repeat"


def test_low_reward_is_strictly_below_threshold():
    env, res = play(user_model(rewards={(0, 1): 2.0, (0, 2): 1.99}), [0, 1, 2])
    assert reasons(res) == ["stay", "stay", "low_reward"]
    assert env.lengths[0] == 2 and env.total_rewards[0] == pytest.approx(6.0)


def test_low_reward_on_step_one_exits_with_len_zero():
    env, res = play(user_model(rewards={(0, 0): 1.0}), [0])
    assert reasons(res) == ["low_reward"]
    assert env.lengths[0] == 0 and env.total_rewards[0] == 0.0 and env.done[0]


def test_similar_item_in_window_exits():
    env, res = play(user_model(close=((0, 1),)), [0, 1])
    assert reasons(res) == ["stay", "similar"]
    assert env.exit_reasons[0] == "similar" and env.lengths[0] == 1


def test_distance_equal_to_threshold_is_not_similar():
    _, res = play(user_model(close=((0, 1),)), [0, 1], distance_threshold=CLOSE)
    assert reasons(res) == ["stay", "stay"]


# ------------------------------------------------------------------------------------ rule order
def test_repeat_beats_similar():
    # An immediate repeat is also at distance 0 < τ_d from the previous item: it is a repeat.
    _, res = play(user_model(), [0, 0])
    assert reasons(res) == ["stay", "repeat"]


def test_repeated_item_with_low_reward_is_repeat():
    # With fixed rewards an accepted item can never come back low, so the model is edited between
    # steps to make one recommendation break all three rules at once.
    um = user_model()
    env = EchoChamberEnv(um, EnvConfig(distance_threshold=TAU_D))
    env.reset(np.array([0]))
    env.step(np.array([0]))
    um.rewards[0, 0] = 1.0  # now low AND repeated AND distance 0 (similar)
    res = env.step(np.array([0]))
    assert res.reason[0] == "repeat"


def test_low_reward_beats_similar():
    _, res = play(user_model(close=((0, 1),), rewards={(0, 1): 1.0}), [0, 1])
    assert reasons(res) == ["stay", "low_reward"]


# ------------------------------------------------------------------------------- window boundary
def test_item_exactly_window_back_counts():
    # window 2: at step 3 the last two items are steps 2 and 1; item 0 is exactly 2 back.
    _, res = play(user_model(close=((0, 3),)), [0, 1, 3], window=2)
    assert reasons(res) == ["stay", "stay", "similar"]


def test_item_window_plus_one_back_does_not_count():
    _, res = play(user_model(close=((0, 3),)), [0, 1, 2, 3], window=2)
    assert reasons(res) == ["stay"] * 4


def test_window_zero_disables_similarity():
    _, res = play(user_model(close=((0, 1),)), [0, 1], window=0)
    assert reasons(res) == ["stay", "stay"]


# --------------------------------------------------------------------------------------- horizon
def test_horizon_truncates_after_max_steps_accepted_steps():
    env, res = play(user_model(), [0, 1, 2, 3], max_steps=3)
    assert reasons(res) == ["stay", "stay", "horizon", "done"]
    assert [bool(r.live[0]) for r in res] == [True, True, True, False]
    assert env.lengths[0] == 3 and env.total_rewards[0] == pytest.approx(12.0)
    assert env.exit_reasons[0] == "horizon" and env.done[0]


def test_exit_on_the_last_step_is_an_exit_not_horizon():
    env, res = play(user_model(rewards={(0, 2): 0.0}), [0, 1, 2], max_steps=3)
    assert reasons(res) == ["stay", "stay", "low_reward"]
    assert env.lengths[0] == 2 and env.exit_reasons[0] == "low_reward"


def test_max_steps_one():
    env, res = play(user_model(), [5, 6], max_steps=1)
    assert reasons(res) == ["horizon", "done"] and env.lengths[0] == 1


# ---------------------------------------------------------------------------------------- legacy
def test_legacy_skips_reward_check_on_step_one_only():
    env, res = play(user_model(rewards={(0, 0): 1.0, (0, 2): 1.0}), [0, 1, 2], legacy=True)
    assert reasons(res) == ["stay", "stay", "low_reward"]
    assert env.lengths[0] == 2 and env.total_rewards[0] == pytest.approx(5.0)


def test_legacy_has_no_repeat_rule():
    # Outside the window a repeat is allowed; inside it the item is at distance 0 → similar.
    _, res = play(user_model(), [0, 1, 0], legacy=True, window=1)
    assert reasons(res) == ["stay", "stay", "stay"]
    _, res = play(user_model(), [0, 1, 0], legacy=True, window=2)
    assert reasons(res) == ["stay", "stay", "similar"]


# ------------------------------------------------------------------------------- batch and done
def test_batch_of_users_each_follow_their_own_rules():
    um = user_model(close=((4, 5),), rewards={(1, 2): 0.5})
    env = EchoChamberEnv(um, EnvConfig(distance_threshold=TAU_D, window=4, max_steps=2))
    env.reset(np.array([0, 1, 2, 0]))
    r1 = env.step(np.array([0, 0, 4, 7]))
    assert list(r1.reason) == ["stay"] * 4
    r2 = env.step(np.array([1, 2, 5, 7]))
    assert list(r2.reason) == ["horizon", "low_reward", "similar", "repeat"]
    assert list(r2.live) == [True, False, False, False]
    assert env.lengths.tolist() == [2, 1, 1, 1]
    assert env.total_rewards.tolist() == pytest.approx([8.0, 4.0, 4.0, 4.0])
    assert env.exit_reasons.tolist() == ["horizon", "low_reward", "similar", "repeat"]
    assert env.done.all()


def test_done_users_items_are_ignored_even_out_of_range():
    um = user_model(rewards={(0, 0): 0.0})
    env = EchoChamberEnv(um, EnvConfig(distance_threshold=TAU_D))
    env.reset(np.array([0, 1]))
    first = env.step(np.array([0, 0]))
    assert list(first.reason) == ["low_reward", "stay"]
    second = env.step(np.array([-1, 1]))  # user 0 is done: -1 is never looked at
    assert list(second.reason) == ["done", "stay"]
    assert list(second.live) == [False, True]
    assert second.reward[0] == 0.0
    assert env.lengths.tolist() == [0, 2]
    assert env.exit_reasons.tolist() == ["low_reward", ""]


def test_reset_starts_fresh_episodes():
    um = user_model()
    env = EchoChamberEnv(um, EnvConfig(distance_threshold=TAU_D))
    env.reset(np.array([0]))
    env.step(np.array([0]))
    env.reset(np.array([0]))
    res = env.step(np.array([0]))  # not a repeat in the new episode
    assert res.reason[0] == "stay" and env.lengths[0] == 1
    assert env.accepted_items(0).tolist() == [0]


def test_accepts_torch_tensors():
    import torch
    um = user_model()
    env = EchoChamberEnv(um, EnvConfig(distance_threshold=TAU_D))
    env.reset(torch.tensor([0, 1]))
    res = env.step(torch.tensor([2, 2]))
    assert list(res.reason) == ["stay", "stay"]


# ------------------------------------------------------------------------------------ bad inputs
def test_item_out_of_range_names_the_argument():
    env = EchoChamberEnv(user_model(n_items=8), EnvConfig(distance_threshold=TAU_D))
    env.reset(np.array([0, 1]))
    with pytest.raises(InputError, match="item_ids"):
        env.step(np.array([0, 8]))
    with pytest.raises(InputError, match="item_ids"):
        env.step(np.array([-1, 0]))
    with pytest.raises(InputError, match="item_ids"):
        env.step(np.array([0]))  # wrong shape
    with pytest.raises(InputError, match="item_ids"):
        env.step(np.array([0.0, 1.0]))  # not integers


def test_bad_user_ids_and_step_before_reset():
    env = EchoChamberEnv(user_model(n_users=3), EnvConfig(distance_threshold=TAU_D))
    with pytest.raises(InputError, match="reset"):
        env.step(np.array([0]))
    with pytest.raises(InputError, match="user_ids"):
        env.reset(np.array([3]))
    with pytest.raises(InputError, match="user_ids"):
        env.reset(np.array([[0, 1]]))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"distance_threshold": -1.0}, "distance_threshold"),
        ({"distance_threshold": 1.0, "reward_threshold": -0.5}, "reward_threshold"),
        ({"distance_threshold": float("nan")}, "distance_threshold"),
        ({"distance_threshold": 1.0, "window": -1}, "window"),
        ({"distance_threshold": 1.0, "max_steps": 0}, "max_steps"),
        ({"distance_threshold": 1.0, "max_steps": 2.5}, "max_steps"),
    ],
)
def test_bad_env_config_names_the_field(kwargs, name):
    with pytest.raises(InputError, match=name):
        EnvConfig(**kwargs)


def test_bad_matrices_name_the_argument():
    r = np.full((2, 3), 4.0)
    d = np.zeros((3, 3))
    with pytest.raises(InputError, match="rewards"):
        MatrixUserModel(rewards=np.where(np.eye(2, 3) > 0, np.nan, r), distances=d)
    with pytest.raises(InputError, match="rewards"):
        MatrixUserModel(rewards=np.array([1.0, 2.0]), distances=d)
    with pytest.raises(InputError, match="distances"):
        MatrixUserModel(rewards=r, distances=np.full((3, 3), np.inf))
    with pytest.raises(InputError, match="distances"):
        MatrixUserModel(rewards=r, distances=np.zeros((3, 4)))
    with pytest.raises(InputError, match="distances"):
        MatrixUserModel(rewards=r, distances=np.zeros((4, 4)))  # 4 items vs 3 reward columns
    with pytest.raises(InputError, match="distances"):
        MatrixUserModel(rewards=r, distances=-np.ones((3, 3)))
    with pytest.raises(InputError, match="item_vectors"):
        MatrixUserModel(rewards=r, item_vectors=np.ones((2, 5)))
    with pytest.raises(InputError, match="exactly one"):
        MatrixUserModel(rewards=r, distances=d, item_vectors=np.ones((3, 2)))
    um = MatrixUserModel(rewards=r, distances=d)
    with pytest.raises(InputError, match="differ in length"):
        um.reward(np.array([0, 1]), np.array([0]))
    with pytest.raises(InputError, match="items_b"):
        um.distance(np.array([0]), np.array([3]))


# ------------------------------------------------------------------------------- the pure rules
def test_exit_reason_rule_order_and_horizon():
    cfg = EnvConfig(distance_threshold=5.0, max_steps=3)
    assert exit_reason(step=2, repeated=True, reward=0.0, window_distances=[0.0], config=cfg) == "repeat"
    assert exit_reason(step=2, repeated=False, reward=1.0, window_distances=[0.0], config=cfg) == "low_reward"
    assert exit_reason(step=2, repeated=False, reward=3.0, window_distances=[9.0, 4.9], config=cfg) == "similar"
    assert exit_reason(step=2, repeated=False, reward=3.0, window_distances=[5.0], config=cfg) == "stay"
    assert exit_reason(step=3, repeated=False, reward=3.0, window_distances=[], config=cfg) == "horizon"
    legacy = EnvConfig(distance_threshold=5.0, legacy=True)
    assert exit_reason(step=1, repeated=False, reward=0.0, window_distances=[], config=legacy) == "stay"
    assert exit_reason(step=2, repeated=True, reward=3.0, window_distances=[], config=legacy) == "stay"


def test_reference_episode_matches_hand_made_case():
    um = user_model(close=((0, 3),), rewards={(0, 1): 3.0})
    trace = reference_episode(um, 0, [0, 1, 3, 4, 5], EnvConfig(distance_threshold=TAU_D, window=2))
    assert trace.reasons == ["stay", "stay", "similar"]
    assert trace.live == [True, True, False]
    assert trace.length == 2 and trace.total_reward == pytest.approx(7.0)


# -------------------------------------------------------------------------------- property test
@st.composite
def scenarios(draw):
    n_users = draw(st.integers(1, 4))
    n_items = draw(st.integers(2, 7))
    rewards = np.array(
        draw(st.lists(st.integers(0, 5), min_size=n_users * n_items, max_size=n_users * n_items)),
        dtype=np.float64,
    ).reshape(n_users, n_items)
    if draw(st.booleans()):
        raw = np.array(draw(st.lists(st.integers(0, 20), min_size=n_items**2, max_size=n_items**2)), dtype=float)
        d = raw.reshape(n_items, n_items)
        d = np.triu(d, 1) + np.triu(d, 1).T
        um = MatrixUserModel(rewards=rewards, distances=d)
    else:
        v = np.array(draw(st.lists(st.integers(-3, 3), min_size=2 * n_items, max_size=2 * n_items)), dtype=float)
        um = MatrixUserModel(rewards=rewards, item_vectors=v.reshape(n_items, 2))
    config = EnvConfig(
        reward_threshold=float(draw(st.integers(0, 4))),
        distance_threshold=float(draw(st.integers(0, 12))),
        window=draw(st.integers(0, 4)),
        max_steps=draw(st.integers(1, 8)),
        legacy=draw(st.booleans()),
    )
    n_episodes = draw(st.integers(1, 6))
    users = np.array(draw(st.lists(st.integers(0, n_users - 1), min_size=n_episodes, max_size=n_episodes)))
    n_steps = draw(st.integers(1, 10))
    actions = np.array(
        draw(st.lists(st.integers(0, n_items - 1), min_size=n_steps * n_episodes, max_size=n_steps * n_episodes))
    ).reshape(n_steps, n_episodes)
    return um, config, users, actions


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_batched_env_matches_per_user_loop(scenario):
    um, config, users, actions = scenario
    env = EchoChamberEnv(um, config)
    env.reset(users)
    results = [env.step(a) for a in actions]
    for k, user in enumerate(users):
        trace = reference_episode(um, int(user), actions[:, k].tolist(), config)
        for t, res in enumerate(results):
            if t < len(trace.reasons):
                assert res.reason[k] == trace.reasons[t]
                assert bool(res.live[k]) == trace.live[t]
                assert float(res.reward[k]) == pytest.approx(trace.rewards[t], abs=0)
            else:
                assert res.reason[k] == "done" and not res.live[k] and res.reward[k] == 0.0
        assert env.lengths[k] == trace.length
        assert env.total_rewards[k] == trace.total_reward
        finished = trace.reasons and trace.reasons[-1] != "stay"
        assert bool(env.done[k]) == bool(finished)
        assert env.exit_reasons[k] == (trace.reasons[-1] if finished else "")


def test_nearest_neighbour_distances_and_threshold():
    """τ_d as a quantile of each item's distance to its closest other item (near-duplicates)."""
    from ulrec.config import EnvConfigSection
    from ulrec.simulator.calibration import nearest_neighbour_distances, resolve_distance_threshold
    from ulrec.simulator.user_models import MatrixUserModel

    # items on a line at 0, 1, 3, 7, 15: nearest neighbours 1, 1, 2, 4, 8
    vectors = np.array([[0.0], [1.0], [3.0], [7.0], [15.0]], dtype=np.float32)
    model = MatrixUserModel(rewards=np.ones((2, 5), dtype=np.float32), item_vectors=vectors)
    np.testing.assert_allclose(nearest_neighbour_distances(model, max_pairs=100), [1, 1, 2, 4, 8])
    section = EnvConfigSection(distance_quantile=0.5, distance_reference="nearest_neighbour")
    threshold, _ = resolve_distance_threshold(model, section)
    assert threshold == pytest.approx(2.0)
    pairs = EnvConfigSection(distance_quantile=0.5, distance_reference="pairs")
    assert resolve_distance_threshold(model, pairs)[0] > threshold  # pair distances run larger
