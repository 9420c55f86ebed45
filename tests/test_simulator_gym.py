"""The Gymnasium view of one simulated user."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from ulrec.errors import InputError
from ulrec.simulator import MatrixUserModel
from ulrec.simulator.gym_env import ENV_ID, EchoChamberGymEnv

N_ITEMS = 6


def user_model() -> MatrixUserModel:
    r = np.full((3, N_ITEMS), 4.0)
    r[:, 5] = 1.0  # item 5 is disliked by everyone
    d = np.full((N_ITEMS, N_ITEMS), 100.0)
    np.fill_diagonal(d, 0.0)
    d[0, 1] = d[1, 0] = 1.0  # items 0 and 1 are near-duplicates
    r[2, 2] = 3.0
    return MatrixUserModel(rewards=r, distances=d, users=[0, 2])


def make(**overrides) -> EchoChamberGymEnv:
    config = {"user_model": user_model(), "distance_threshold": 10.0, "window": 2, "max_steps": 4}
    return EchoChamberGymEnv({**config, **overrides})


def test_passes_gymnasium_env_checker():
    check_env(make(), skip_render_check=True)


def test_spaces_and_padded_observation():
    env = make()
    assert env.action_space == gym.spaces.Discrete(N_ITEMS)
    obs, info = env.reset(seed=0, options={"user_id": 2})
    assert info["user_id"] == 2
    assert obs["items"].tolist() == [N_ITEMS, N_ITEMS] and obs["rewards"].tolist() == [0.0, 0.0]
    obs, reward, terminated, truncated, info = env.step(2)
    assert reward == 3.0 and not terminated and not truncated and info["reason"] == "stay"
    assert obs["items"].tolist() == [N_ITEMS, 2] and obs["rewards"].tolist() == [0.0, 3.0]
    obs, *_ = env.step(3)
    obs, *_ = env.step(4)
    assert obs["items"].tolist() == [3, 4]  # the last W accepted items, oldest first
    assert env.observation_space.contains(obs)


@pytest.mark.parametrize(
    "actions, reason",
    [([0, 0], "repeat"), ([0, 5], "low_reward"), ([0, 1], "similar")],
)
def test_exit_terminates_with_zero_reward(actions, reason):
    env = make()
    env.reset(seed=0, options={"user_id": 0})
    *_, info = env.step(actions[0])
    obs, reward, terminated, truncated, info = env.step(actions[1])
    assert terminated and not truncated and reward == 0.0
    assert info["reason"] == reason and info["length"] == 1 and info["total_reward"] == 4.0
    with pytest.raises(InputError, match="reset"):
        env.step(2)


def test_truncated_at_max_steps():
    env = make()
    env.reset(seed=0, options={"user_id": 0})
    outcomes = [env.step(a)[1:4] for a in (0, 2, 3, 4)]
    assert outcomes[-1] == (4.0, False, True)
    assert all(o == (4.0, False, False) for o in outcomes[:-1])


def test_reset_draws_from_the_given_users_reproducibly():
    env = make(users=[1, 2])
    drawn = [env.reset(seed=s)[1]["user_id"] for s in range(20)]
    assert set(drawn) <= {1, 2} and len(set(drawn)) == 2
    again = [make(users=[1, 2]).reset(seed=s)[1]["user_id"] for s in range(20)]
    assert again == drawn
    default = {make().reset(seed=s)[1]["user_id"] for s in range(20)}
    assert default <= {0, 2}  # the user model's known users


def test_registered_and_built_from_a_saved_user_model(tmp_path):
    user_model().save(tmp_path / "sim")
    config = {"user_model_dir": str(tmp_path / "sim"), "distance_threshold": 10.0, "max_steps": 3}
    env = gym.make(ENV_ID, **config)
    obs, _ = env.reset(seed=1)
    assert obs["items"].shape == (4,)  # default window 4
    by_module = gym.make("ulrec.simulator.gym_env:" + ENV_ID, config=config)
    assert by_module.unwrapped.user_model.n_items == N_ITEMS
    # What RLlib's SingleAgentEnvRunner does with a registered id and an env_config dict.
    vec = gym.make_vec("ulrec.simulator.gym_env:" + ENV_ID, num_envs=2, vectorization_mode="sync", **config)
    obs, _ = vec.reset(seed=0)
    assert obs["items"].shape == (2, 4)
    _, reward, terminated, truncated, _ = vec.step(np.array([0, 1]))
    assert reward.shape == (2,) and not truncated.any()
    vec.close()


def test_bad_env_config():
    with pytest.raises(InputError, match="user_model"):
        EchoChamberGymEnv({"distance_threshold": 1.0})
    with pytest.raises(InputError, match="distance_threshold"):
        EchoChamberGymEnv({"user_model": user_model()})
    with pytest.raises(InputError, match="unknown env_config"):
        make(colour="red")
    with pytest.raises(InputError, match="distance_threshold"):
        make(distance_threshold=-1.0)
    env = make()
    env.reset(seed=0)
    with pytest.raises(InputError, match="item_ids"):
        env.step(N_ITEMS)
