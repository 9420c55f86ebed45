"""DQN: RLlib's own algorithm and learner, with our item-embedding Q module.

Double Q-learning with n-step returns (EasyRL4Rec: double, 3-step). RLlib's DQN loss reads the
module's ``qf_preds`` / ``qf_next_preds`` / ``qf_target_next_preds``, which ItemQModule provides
without any action masking (masking happens only when acting).
"""

from __future__ import annotations

from ray.rllib.algorithms.dqn import DQNConfig
from ray.rllib.core.rl_module.rl_module import RLModuleSpec

from train.baselines.module import ItemQModule


class RecDQNConfig(DQNConfig):
    """DQNConfig whose default module is ItemQModule (model_config still auto-includes epsilon)."""

    def get_default_rl_module_spec(self) -> RLModuleSpec:
        return RLModuleSpec(module_class=ItemQModule, model_config=self.model_config)
