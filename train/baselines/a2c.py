"""A2C on RLlib's new API stack (RLlib 2.60 removed its A2C).

Synchronous advantage actor-critic (Mnih et al. 2016): every iteration samples a fresh batch of
env steps with the current policy, computes advantages with RLlib's GAE connector (λ = 1 by
default: bootstrapped n-step returns, the classic A2C target) and takes ONE gradient step on

    loss = −log π(a|s)·A  +  vf_coef·(V(s) − R)²  −  entropy_coef·H(π(·|s))

There is no ratio clipping, KL term or multi-epoch reuse: that is what separates it from PPO.
"""

from __future__ import annotations

from typing import Any

from typing_extensions import Self

from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig, NotProvided
from ray.rllib.connectors.learner import AddOneTsToEpisodesAndTruncate, GeneralAdvantageEstimation
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.learner import ENTROPY_KEY, POLICY_LOSS_KEY, VF_LOSS_KEY
from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from ray.rllib.core.rl_module.apis import ValueFunctionAPI
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.evaluation.postprocessing import Postprocessing
from ray.rllib.execution.rollout_ops import synchronous_parallel_sample
from ray.rllib.utils.metrics import (
    ALL_MODULES,
    ENV_RUNNER_RESULTS,
    ENV_RUNNER_SAMPLING_TIMER,
    LEARNER_RESULTS,
    LEARNER_UPDATE_TIMER,
    NUM_ENV_STEPS_SAMPLED_LIFETIME,
    SYNCH_WORKER_WEIGHTS_TIMER,
    TIMERS,
)

import torch

from train.baselines.module import ItemActorCriticModule


class A2CConfig(AlgorithmConfig):
    def __init__(self, algo_class: type | None = None) -> None:
        super().__init__(algo_class=algo_class or A2C)
        self.lr = 1e-3
        self.gamma = 0.9
        self.train_batch_size_per_learner = 256
        # Each iteration samples exactly one train batch (fresh on-policy data per update).
        self.rollout_fragment_length = "auto"
        self.grad_clip = 40.0
        self.grad_clip_by = "global_norm"
        # A2C specific.
        self.vf_loss_coeff = 0.5
        self.entropy_coeff = 0.01
        self.lambda_ = 1.0

    def training(
        self,
        *,
        vf_loss_coeff: float | Any = NotProvided,
        entropy_coeff: float | Any = NotProvided,
        lambda_: float | Any = NotProvided,
        **kwargs: Any,
    ) -> Self:
        super().training(**kwargs)
        if vf_loss_coeff is not NotProvided:
            self.vf_loss_coeff = vf_loss_coeff
        if entropy_coeff is not NotProvided:
            self.entropy_coeff = entropy_coeff
        if lambda_ is not NotProvided:
            self.lambda_ = lambda_
        return self

    def get_default_rl_module_spec(self) -> RLModuleSpec:
        return RLModuleSpec(module_class=ItemActorCriticModule)

    def get_default_learner_class(self) -> type:
        return A2CTorchLearner


class A2CTorchLearner(TorchLearner):
    def build(self) -> None:
        super().build()
        if self._learner_connector is not None and self.config.add_default_connectors_to_learner_pipeline:
            # One artificial step per episode chunk carries the bootstrap value; GAE at the end
            # of the pipeline writes advantages and value targets into the batch.
            self._learner_connector.prepend(AddOneTsToEpisodesAndTruncate())
            self._learner_connector.append(
                GeneralAdvantageEstimation(gamma=self.config.gamma, lambda_=self.config.lambda_)
            )

    @classmethod
    def rl_module_required_apis(cls) -> list[type]:
        return [ValueFunctionAPI]

    def compute_loss_for_module(
        self, *, module_id: str, config: A2CConfig, batch: dict[str, Any], fwd_out: dict[str, Any]
    ) -> torch.Tensor:
        module = self.module[module_id].unwrapped()
        mask = batch.get(Columns.LOSS_MASK)

        def mean(values: torch.Tensor) -> torch.Tensor:
            return values[mask].mean() if mask is not None else values.mean()

        dist = module.get_train_action_dist_cls().from_logits(fwd_out[Columns.ACTION_DIST_INPUTS])
        logp = dist.logp(batch[Columns.ACTIONS])
        entropy = dist.entropy()
        values = module.compute_values(batch, embeddings=fwd_out.get(Columns.EMBEDDINGS))
        policy_loss = mean(-logp * batch[Postprocessing.ADVANTAGES])
        vf_loss = mean((values - batch[Postprocessing.VALUE_TARGETS]) ** 2)
        mean_entropy = mean(entropy)
        total = policy_loss + config.vf_loss_coeff * vf_loss - config.entropy_coeff * mean_entropy
        self.metrics.log_dict(
            {POLICY_LOSS_KEY: policy_loss, VF_LOSS_KEY: vf_loss, ENTROPY_KEY: mean_entropy},
            key=module_id,
            window=1,
        )
        return total


class A2C(Algorithm):
    @classmethod
    def get_default_config(cls) -> A2CConfig:
        return A2CConfig()

    def training_step(self) -> None:
        with self.metrics.log_time((TIMERS, ENV_RUNNER_SAMPLING_TIMER)):
            episodes, env_runner_results = synchronous_parallel_sample(
                worker_set=self.env_runner_group,
                max_env_steps=self.config.total_train_batch_size,
                sample_timeout_s=self.config.sample_timeout_s,
                _uses_new_env_runners=True,
                _return_metrics=True,
            )
        if not episodes:
            return
        self.metrics.aggregate(env_runner_results, key=ENV_RUNNER_RESULTS)

        with self.metrics.log_time((TIMERS, LEARNER_UPDATE_TIMER)):
            learner_results = self.learner_group.update(
                episodes=episodes,
                timesteps={
                    NUM_ENV_STEPS_SAMPLED_LIFETIME: self.metrics.peek(
                        (ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME)
                    )
                },
            )
            self.metrics.aggregate(learner_results, key=LEARNER_RESULTS)

        with self.metrics.log_time((TIMERS, SYNCH_WORKER_WEIGHTS_TIMER)):
            self.env_runner_group.sync_weights(
                from_worker_or_learner_group=self.learner_group,
                policies=set(learner_results[0].keys()) - {ALL_MODULES},
                inference_only=True,
            )
