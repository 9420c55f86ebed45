"""One RLModule family for every baseline: item embeddings, a window encoder, heads tied to items.

The state is EasyRL4Rec's: the mean embedding of the last W recommended items with their rewards
appended, through an MLP (``baselines.hidden``). Every per-item head scores all items at once as
``proj_head(state) · item_embedding + bias_head``, so the output layer is the item table itself and
catalogues of 10k–200k items cost one (n_items × d) table, never a (hidden × n_items) matrix.

Heads (chosen per algorithm with ``model_config["heads"]``):
  q          action values (DQN, CQL, BCQ, SQN, CRR's critic)
  policy     logits of a categorical policy (A2C, DORL, CRR's actor)
  imitation  logits of the behaviour policy / next-item classifier (BCQ, SQN)
  value      state value V(s) (A2C, DORL)

Items already recommended (the observation window and, when the observation carries it, every
item of the episode) are masked only when *acting*: value targets and losses see raw scores
(large negative masks inside DQN's loss break learning, NOTES.md).
"""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import torch
from torch import nn

from ray.rllib.algorithms.dqn.default_dqn_rl_module import (
    QF_NEXT_PREDS,
    QF_PREDS,
    QF_TARGET_NEXT_PREDS,
)
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.utils import make_target_network
from ray.rllib.core.rl_module.apis import (
    InferenceOnlyAPI,
    QNetAPI,
    TargetNetworkAPI,
    ValueFunctionAPI,
)
from ray.rllib.core.rl_module.torch.torch_rl_module import TorchRLModule
from ray.rllib.utils.schedules.scheduler import Scheduler

# Observation keys of the Gymnasium view (ulrec/simulator/gym_env.py).
OBS_ITEMS = "items"
OBS_REWARDS = "rewards"
# Optional: every item recommended so far in the episode, padded with the sentinel n_items.
OBS_SEEN = "seen"

SCORE_HEADS = ("q", "policy", "imitation")
ALL_HEADS = SCORE_HEADS + ("value",)
# How a module picks items: argmax/epsilon-greedy on Q, the policy, the imitation head, or BCQ's
# Q restricted to items the imitation head finds plausible.
ACT_MODES = ("q", "policy", "imitation", "bcq")

# Score given to masked items when acting (finite, so softmax/entropy stay NaN-free).
MASKED_SCORE = -1e9

# Extra forward_train outputs besides RLlib's Q keys.
POLICY_LOGITS = "policy_logits"
POLICY_NEXT_LOGITS = "policy_next_logits"
IMITATION_LOGITS = "imitation_logits"
IMITATION_NEXT_LOGITS = "imitation_next_logits"
TARGET_POLICY_NEXT_LOGITS = "target_policy_next_logits"


def obs_parts(obs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(items (B, W) int64, rewards (B, W) float32) of a batched observation dict."""
    return obs[OBS_ITEMS].long(), obs[OBS_REWARDS].float()


def seen_mask(obs: dict[str, torch.Tensor], n_items: int) -> torch.Tensor:
    """(B, n_items) bool: items in the window or (if given) anywhere earlier in the episode."""
    ids = obs[OBS_ITEMS].long()
    if OBS_SEEN in obs:
        ids = torch.cat([ids, obs[OBS_SEEN].long()], dim=-1)
    ids = ids.clamp(0, n_items)  # the sentinel lands in the extra last column, dropped below
    mask = torch.zeros(ids.shape[0], n_items + 1, dtype=torch.bool, device=ids.device)
    mask.scatter_(1, ids, True)
    return mask[:, :n_items]


class ItemScorer(nn.Module):
    """Item table + window encoder + heads tied to the item table."""

    def __init__(
        self,
        n_items: int,
        window: int,
        embedding_dim: int,
        hidden: list[int],
        heads: tuple[str, ...],
    ) -> None:
        super().__init__()
        self.n_items = n_items
        self.window = window
        # Row n_items is the padding sentinel of short windows: a fixed zero vector.
        self.item_emb = nn.Embedding(n_items + 1, embedding_dim, padding_idx=n_items)
        nn.init.normal_(self.item_emb.weight[:n_items], std=0.1)
        layers: list[nn.Module] = []
        width = embedding_dim + window + 1  # mean item vector, window rewards, window fill
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        self.mlp = nn.Sequential(*layers)
        score_heads = [h for h in heads if h in SCORE_HEADS]
        self.proj = nn.ModuleDict({h: nn.Linear(width, embedding_dim) for h in score_heads})
        self.bias = nn.ParameterDict({h: nn.Parameter(torch.zeros(n_items)) for h in score_heads})
        self.value = nn.Linear(width, 1) if "value" in heads else None

    def encode(self, items: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
        valid = items != self.n_items
        count = valid.sum(dim=-1, keepdim=True).float()
        mean = self.item_emb(items).sum(dim=1) / count.clamp(min=1.0)
        features = torch.cat([mean, rewards * valid, count / max(self.window, 1)], dim=-1)
        return self.mlp(features)

    def scores(self, state: torch.Tensor, head: str) -> torch.Tensor:
        """(B, n_items) scores of one tied head."""
        items = self.item_emb.weight[: self.n_items]
        return self.proj[head](state) @ items.T + self.bias[head]

    def values(self, state: torch.Tensor) -> torch.Tensor:
        return self.value(state).squeeze(-1)


class ItemRecModule(TorchRLModule):
    """Shared setup and acting of the family; subclasses add the RLlib APIs their learners need.

    model_config keys: embedding_dim, hidden, heads (subset of ALL_HEADS), act (one of
    ACT_MODES), epsilon (schedule for epsilon-greedy acting with Q heads), bcq_threshold.
    """

    def setup(self) -> None:
        if not isinstance(self.action_space, gym.spaces.Discrete):
            raise ValueError(f"ItemRecModule needs a Discrete action space, got {self.action_space}")
        cfg = self.model_config or {}
        self.n_items = int(self.action_space.n)
        window = int(self.observation_space[OBS_ITEMS].shape[0])
        self.heads = tuple(cfg.get("heads", ("q",)))
        unknown = set(self.heads) - set(ALL_HEADS)
        if unknown:
            raise ValueError(f"unknown heads {sorted(unknown)} (known: {ALL_HEADS})")
        self.act_mode = cfg.get("act", "q")
        if self.act_mode not in ACT_MODES:
            raise ValueError(f"unknown act mode {self.act_mode!r} (known: {ACT_MODES})")
        needed = {"q": ("q",), "policy": ("policy",), "imitation": ("imitation",), "bcq": ("q", "imitation")}
        missing = [h for h in needed[self.act_mode] if h not in self.heads]
        if missing:
            raise ValueError(f"act mode {self.act_mode!r} needs heads {missing}")
        self.bcq_log_threshold = math.log(max(cfg.get("bcq_threshold", 0.6), 1e-12))
        self.net = ItemScorer(
            n_items=self.n_items,
            window=window,
            embedding_dim=int(cfg.get("embedding_dim", 32)),
            hidden=list(cfg.get("hidden", [64, 64])),
            heads=self.heads,
        )
        self.epsilon_schedule = Scheduler(
            fixed_value_or_schedule=cfg.get("epsilon", 0.0), framework="torch"
        )

    # ------------------------------------------------------------------------------ acting
    def action_scores(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, n_items) scores the module acts on, with already-recommended items masked."""
        net = self.net
        state = net.encode(*obs_parts(obs))
        if self.act_mode == "bcq":
            q = net.scores(state, "q")
            logp = torch.log_softmax(net.scores(state, "imitation"), dim=-1)
            implausible = logp - logp.max(dim=-1, keepdim=True).values < self.bcq_log_threshold
            scores = q.masked_fill(implausible, MASKED_SCORE)
            # Masking seen items after the threshold keeps the plausibility test on all items;
            # fall back to plain Q where every plausible item was already recommended.
            masked = seen_mask(obs, self.n_items)
            scores = scores.masked_fill(masked, MASKED_SCORE)
            none_left = (scores <= MASKED_SCORE).all(dim=-1, keepdim=True)
            return torch.where(none_left, q.masked_fill(masked, MASKED_SCORE), scores)
        scores = net.scores(state, self.act_mode)
        return scores.masked_fill(seen_mask(obs, self.n_items), MASKED_SCORE)

    def _forward_inference(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        scores = self.action_scores(batch[Columns.OBS])
        return {Columns.ACTIONS: scores.argmax(dim=-1)}

    def _forward_exploration(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        scores = self.action_scores(batch[Columns.OBS])
        if self.act_mode == "policy":
            dist = torch.distributions.Categorical(logits=scores)
            return {Columns.ACTIONS: dist.sample()}
        greedy = scores.argmax(dim=-1)
        t = kwargs.get("t")
        epsilon = self.epsilon_schedule.update(t) if t is not None else self.epsilon_schedule.get_current_value()
        allowed = (scores > MASKED_SCORE).float()
        allowed[allowed.sum(dim=-1) == 0] = 1.0
        random = torch.multinomial(allowed, num_samples=1).squeeze(-1)
        explore = torch.rand(greedy.shape, device=greedy.device) < float(epsilon)
        return {Columns.ACTIONS: torch.where(explore, random, greedy)}

    # ---------------------------------------------------------------------------- training
    def _head_outputs(self, net: ItemScorer, state: torch.Tensor) -> dict[str, torch.Tensor]:
        return {h: net.scores(state, h) for h in self.heads if h in SCORE_HEADS}


class ItemQModule(ItemRecModule, QNetAPI, TargetNetworkAPI, InferenceOnlyAPI):
    """Q head (+ optional policy/imitation heads) with a target copy: DQN, CQL, BCQ, SQN, CRR."""

    def make_target_networks(self) -> None:
        self._target_net = make_target_network(self.net)

    def get_target_network_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.net, self._target_net)]

    def get_non_inference_attributes(self) -> list[str]:
        return ["_target_net"]

    def compute_q_values(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        state = self.net.encode(*obs_parts(batch[Columns.OBS]))
        return {QF_PREDS: self.net.scores(state, "q")}

    def forward_target(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        state = self._target_net.encode(*obs_parts(batch[Columns.OBS]))
        return {QF_PREDS: self._target_net.scores(state, "q")}

    def _forward_train(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        """Raw (unmasked) scores of every head on obs and next obs; target Q (and target policy)
        on next obs. Keys follow RLlib's DQN so its learner works unchanged."""
        obs, next_obs = batch[Columns.OBS], batch[Columns.NEXT_OBS]
        n = obs[OBS_ITEMS].shape[0]
        both = {k: torch.cat([obs[k], next_obs[k]], dim=0) for k in (OBS_ITEMS, OBS_REWARDS)}
        heads = self._head_outputs(self.net, self.net.encode(*obs_parts(both)))
        out: dict[str, Any] = {}
        names = {"q": (QF_PREDS, QF_NEXT_PREDS), "policy": (POLICY_LOGITS, POLICY_NEXT_LOGITS),
                 "imitation": (IMITATION_LOGITS, IMITATION_NEXT_LOGITS)}
        for head, scores in heads.items():
            out[names[head][0]], out[names[head][1]] = scores[:n], scores[n:]
        with torch.no_grad():
            target_state = self._target_net.encode(*obs_parts(next_obs))
            out[QF_TARGET_NEXT_PREDS] = self._target_net.scores(target_state, "q")
            if "policy" in self.heads:
                out[TARGET_POLICY_NEXT_LOGITS] = self._target_net.scores(target_state, "policy")
        return out


class ItemActorCriticModule(ItemRecModule, ValueFunctionAPI):
    """Policy + value heads on one encoder: A2C and DORL.

    The policy acts on masked logits, and its training loss uses the same masked distribution the
    actions were sampled from (an on-policy gradient needs the behaviour distribution; only
    value-based losses must stay unmasked).
    """

    def compute_values(self, batch: dict[str, Any], embeddings: Any = None) -> torch.Tensor:
        state = embeddings if embeddings is not None else self.net.encode(*obs_parts(batch[Columns.OBS]))
        return self.net.values(state)

    def _forward_train(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        obs = batch[Columns.OBS]
        state = self.net.encode(*obs_parts(obs))
        logits = self.net.scores(state, "policy").masked_fill(seen_mask(obs, self.n_items), MASKED_SCORE)
        return {Columns.ACTION_DIST_INPUTS: logits, Columns.EMBEDDINGS: state}
