"""``policy.tensor_parallel_size``: what the engine is asked for, and the replica resources it
needs (no GPU here: the engine itself is not started)."""

from __future__ import annotations

import pytest

from ulrec.config import ConfigError, load_config
from ulrec.errors import InputError
from ulrec.policy.vllm_engine import _engine_kwargs


def test_one_gpu_engines_are_unchanged():
    kwargs = _engine_kwargs(load_config(None, []).policy, "/m")
    assert kwargs["tensor_parallel_size"] == 1 and "distributed_executor_backend" not in kwargs


def test_a_tensor_parallel_engine_runs_one_worker_process_per_gpu_of_its_replica():
    cfg = load_config(None, ["policy.tensor_parallel_size=4", "rollout.replica_num_gpus=4"])
    kwargs = _engine_kwargs(cfg.policy, "/m")
    assert kwargs["tensor_parallel_size"] == 4 and kwargs["distributed_executor_backend"] == "mp"


@pytest.mark.parametrize("overrides, message", [
    (["policy.tensor_parallel_size=2"], "needs GPU replicas: set rollout.replica_num_gpus=2"),
    (["policy.tensor_parallel_size=2", "rollout.replica_num_gpus=1"], "rollout.replica_num_gpus must be 2"),
    (["policy.tensor_parallel_size=2", "rollout.replica_num_gpus=2", "serve.replica_num_gpus=1"],
     "serve.replica_num_gpus must be 2"),
])
def test_replicas_must_hold_every_gpu_their_engine_spans(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_serve_replicas_hold_the_engine_s_gpus():
    from serve.app import _policy_options

    cfg = load_config(None, ["policy.tensor_parallel_size=2", "rollout.replica_num_gpus=2"])
    with pytest.raises(InputError, match="serve.replica_num_gpus must be 2"):
        _policy_options(cfg)
    cfg = load_config(None, ["policy.tensor_parallel_size=2", "rollout.replica_num_gpus=2", "serve.replica_num_gpus=2"])
    assert _policy_options(cfg)["ray_actor_options"]["num_gpus"] == 2
