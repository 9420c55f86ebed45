"""Offline value-based baselines on RLlib's new API stack: discrete CQL, BCQ, SQN and CRR.

All four learn from logged episodes (Parquet rows of RLlib's episode format, read through
``config.offline_data(input_read_episodes=True)``) with the item-embedding :class:`ItemQModule`.
They share RLlib's DQN machinery — config, target networks, the double-Q TD loss of
``DQNTorchLearner`` — and differ only in what their learner adds to it:

  CQL  TD loss + cql_alpha · E[logsumexp_a Q(s,a) − Q(s,a_logged)]           (Kumar et al. 2020)
  BCQ  TD loss whose next action is the argmax of Q over items the imitation head finds plausible
       (π_b(a|s)/max π_b ≥ threshold), + imitation cross-entropy; acts the same way
                                                                             (Fujimoto et al. 2019)
  SQN  TD loss + supervised next-item cross-entropy head; recommends with the supervised head
       (EasyRL4Rec's default "shead")                                        (Xin et al. 2020)
  CRR  critic with the policy-expected target, actor trained by advantage-weighted regression
       with weights exp(A/β) clipped at ratio_upper_bound, + a CQL penalty on the critic
       (EasyRL4Rec/Tianshou's discrete CRR)                                 (Wang et al. 2020)

Offline methods use 1-step targets: n-step returns from another policy's data are biased.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from typing_extensions import Self

from ray.rllib.algorithms.algorithm_config import NotProvided
from ray.rllib.algorithms.dqn import DQN, DQNConfig
from ray.rllib.algorithms.dqn.torch.dqn_torch_learner import DQNTorchLearner
from ray.rllib.connectors.common.add_observations_from_episodes_to_batch import (
    AddObservationsFromEpisodesToBatch,
)
from ray.rllib.connectors.learner import AddNextObservationsFromEpisodesToTrainBatch
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.training_data import TrainingData
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.utils.metrics import (
    LEARNER_RESULTS,
    LEARNER_UPDATE_TIMER,
    NUM_ENV_STEPS_SAMPLED_LIFETIME,
    OFFLINE_SAMPLING_TIMER,
    TIMERS,
)

from train.baselines.module import (
    IMITATION_LOGITS,
    IMITATION_NEXT_LOGITS,
    MASKED_SCORE,
    POLICY_LOGITS,
    QF_NEXT_PREDS,
    QF_PREDS,
    QF_TARGET_NEXT_PREDS,
    TARGET_POLICY_NEXT_LOGITS,
    ItemQModule,
)


class OfflineQConfig(DQNConfig):
    """DQNConfig for learning from logged episodes only (no env runners)."""

    # Module heads and acting mode of the algorithm (auto-included into model_config).
    heads: tuple[str, ...] = ("q",)
    act: str = "q"

    def __init__(self, algo_class: type | None = None) -> None:
        super().__init__(algo_class=algo_class or OfflineQ)
        self._is_online = False
        self.input_read_episodes = True
        self.n_step = 1
        self.double_q = True
        self.dueling = False
        self.lr = 1e-3
        self.gamma = 0.9
        self.train_batch_size_per_learner = 64
        # Gradient updates per algo.train() call (one call = one progress tick).
        self.dataset_num_iters_per_learner = 100
        # In logged transitions (= updates × batch size), as DQN counts sampled steps.
        self.target_network_update_freq = 64 * 100
        # Algorithm specific (EasyRL4Rec / Tianshou defaults).
        self.cql_alpha = 10.0
        self.bcq_threshold = 0.6
        self.imitation_logits_penalty = 1e-2
        self.crr_beta = 1.0
        self.crr_ratio_upper_bound = 20.0
        self.crr_min_q_weight = 10.0

    def training(
        self,
        *,
        cql_alpha: float | Any = NotProvided,
        bcq_threshold: float | Any = NotProvided,
        imitation_logits_penalty: float | Any = NotProvided,
        crr_beta: float | Any = NotProvided,
        crr_ratio_upper_bound: float | Any = NotProvided,
        crr_min_q_weight: float | Any = NotProvided,
        **kwargs: Any,
    ) -> Self:
        super().training(**kwargs)
        for name, value in (
            ("cql_alpha", cql_alpha),
            ("bcq_threshold", bcq_threshold),
            ("imitation_logits_penalty", imitation_logits_penalty),
            ("crr_beta", crr_beta),
            ("crr_ratio_upper_bound", crr_ratio_upper_bound),
            ("crr_min_q_weight", crr_min_q_weight),
        ):
            if value is not NotProvided:
                setattr(self, name, value)
        return self

    @property
    def _model_config_auto_includes(self) -> dict[str, Any]:
        return super()._model_config_auto_includes | {
            "heads": list(self.heads),
            "act": self.act,
            "bcq_threshold": self.bcq_threshold,
        }

    def get_default_rl_module_spec(self) -> RLModuleSpec:
        return RLModuleSpec(module_class=ItemQModule, model_config=self.model_config)

    def build_learner_connector(self, input_observation_space, input_action_space, device=None):
        # The OfflinePreLearner turns logged episodes into train batches with this pipeline, so
        # the next observations (for TD targets) must be added here, not only in the Learner.
        pipeline = super().build_learner_connector(
            input_observation_space=input_observation_space,
            input_action_space=input_action_space,
            device=device,
        )
        pipeline.insert_after(AddObservationsFromEpisodesToBatch, AddNextObservationsFromEpisodesToTrainBatch())
        return pipeline


class OfflineQ(DQN):
    """DQN's learner stack driven by RLlib's OfflineData instead of env runners (as MARWIL/CQL)."""

    @classmethod
    def get_default_config(cls) -> OfflineQConfig:
        return OfflineQConfig()

    def training_step(self) -> None:
        iters = self.config.dataset_num_iters_per_learner
        return_iterator = self.config.num_learners > 0 or iters != 1
        with self.metrics.log_time((TIMERS, OFFLINE_SAMPLING_TIMER)):
            batch_or_iterator = self.offline_data.sample(
                num_samples=self.config.train_batch_size_per_learner,
                num_shards=self.config.num_learners,
                return_iterator=return_iterator,
            )
            training_data = (
                TrainingData(data_iterators=batch_or_iterator)
                if return_iterator
                else TrainingData(batch=batch_or_iterator)
            )
        self.metrics.log_value(
            NUM_ENV_STEPS_SAMPLED_LIFETIME,
            self.config.train_batch_size_per_learner * iters * max(1, self.config.num_learners),
            reduce="lifetime_sum",
        )
        with self.metrics.log_time((TIMERS, LEARNER_UPDATE_TIMER)):
            learner_results = self.learner_group.update(
                training_data=training_data,
                minibatch_size=self.config.train_batch_size_per_learner,
                num_iters=iters,
                timesteps={NUM_ENV_STEPS_SAMPLED_LIFETIME: self.metrics.peek(NUM_ENV_STEPS_SAMPLED_LIFETIME)},
                **self.offline_data.iter_batches_kwargs,
            )
            self.metrics.aggregate(learner_results, key=LEARNER_RESULTS)


def _selected(values: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    return values.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)


class CQLLearner(DQNTorchLearner):
    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out) -> torch.Tensor:
        td_loss = super().compute_loss_for_module(module_id=module_id, config=config, batch=batch, fwd_out=fwd_out)
        q = fwd_out[QF_PREDS]
        penalty = (torch.logsumexp(q, dim=-1) - _selected(q, batch[Columns.ACTIONS])).mean()
        self.metrics.log_value((module_id, "cql_penalty"), penalty, window=1)
        return td_loss + config.cql_alpha * penalty


def _imitation_loss(learner: DQNTorchLearner, module_id: str, config: OfflineQConfig, batch, fwd_out) -> torch.Tensor:
    logits = fwd_out[IMITATION_LOGITS]
    cross_entropy = F.cross_entropy(logits, batch[Columns.ACTIONS].long())
    learner.metrics.log_value((module_id, "imitation_loss"), cross_entropy, window=1)
    return cross_entropy + config.imitation_logits_penalty * logits.pow(2).mean()


class BCQLearner(DQNTorchLearner):
    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out) -> torch.Tensor:
        # Double-Q picks the next action by argmax of QF_NEXT_PREDS: restrict that argmax to items
        # the imitation head finds plausible. The mask only steers the argmax; the TD target reads
        # the (unmasked) target network at the chosen item.
        with torch.no_grad():
            logp = torch.log_softmax(fwd_out[IMITATION_NEXT_LOGITS], dim=-1)
            implausible = logp - logp.max(dim=-1, keepdim=True).values < math.log(max(config.bcq_threshold, 1e-12))
        fwd_out = dict(fwd_out)
        fwd_out[QF_NEXT_PREDS] = fwd_out[QF_NEXT_PREDS].detach().masked_fill(implausible, MASKED_SCORE)
        td_loss = super().compute_loss_for_module(module_id=module_id, config=config, batch=batch, fwd_out=fwd_out)
        return td_loss + _imitation_loss(self, module_id, config, batch, fwd_out)


class SQNLearner(DQNTorchLearner):
    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out) -> torch.Tensor:
        td_loss = super().compute_loss_for_module(module_id=module_id, config=config, batch=batch, fwd_out=fwd_out)
        return td_loss + _imitation_loss(self, module_id, config, batch, fwd_out)


class CRRLearner(DQNTorchLearner):
    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out) -> torch.Tensor:
        actions = batch[Columns.ACTIONS]
        q = fwd_out[QF_PREDS]
        q_taken = _selected(q, actions)
        with torch.no_grad():
            next_policy = torch.softmax(fwd_out[TARGET_POLICY_NEXT_LOGITS], dim=-1)
            next_value = (next_policy * fwd_out[QF_TARGET_NEXT_PREDS]).sum(dim=-1)
            not_done = 1.0 - batch[Columns.TERMINATEDS].float()
            target = batch[Columns.REWARDS] + config.gamma ** batch["n_step"] * not_done * next_value
        critic_loss = 0.5 * F.mse_loss(q_taken, target)

        log_policy = torch.log_softmax(fwd_out[POLICY_LOGITS], dim=-1)
        with torch.no_grad():
            advantage = q_taken - (log_policy.exp() * q).sum(dim=-1)
            weight = torch.exp(advantage / config.crr_beta).clamp(0.0, config.crr_ratio_upper_bound)
        actor_loss = -(_selected(log_policy, actions) * weight).mean()
        cql_penalty = (torch.logsumexp(q, dim=-1) - q_taken).mean()
        self.metrics.log_dict(
            {"critic_loss": critic_loss, "actor_loss": actor_loss, "cql_penalty": cql_penalty,
             "advantage_weight_mean": weight.mean()},
            key=module_id,
            window=1,
        )
        return actor_loss + critic_loss + config.crr_min_q_weight * cql_penalty


class CQLConfig(OfflineQConfig):
    def get_default_learner_class(self) -> type:
        return CQLLearner


class BCQConfig(OfflineQConfig):
    heads = ("q", "imitation")
    act = "bcq"

    def get_default_learner_class(self) -> type:
        return BCQLearner


class SQNConfig(OfflineQConfig):
    heads = ("q", "imitation")
    act = "imitation"

    def get_default_learner_class(self) -> type:
        return SQNLearner


class CRRConfig(OfflineQConfig):
    heads = ("q", "policy")
    act = "policy"

    def get_default_learner_class(self) -> type:
        return CRRLearner
