"""The RL search's policy-gradient step (placer.rl.trainer calls it once a round): advantages
from rewards, then REINFORCE's one step or PPO's clipped epochs, each with the entropy bonus and
the self-imitation term that keeps the policy sampling around each micro-batch count's incumbent."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from graphs.problem import Candidate
from placer.rl.policy import Sample, Seq2SeqPolicy, microbatch_indices

if TYPE_CHECKING:  # the trainer imports this module: its types only for hints here
    from placer.rl.trainer import Learner, TrainConfig

__all__ = ["advantage", "reinforce_update", "ppo_update"]


def advantage(rewards: torch.Tensor, learner: Learner, config: TrainConfig,
              groups: torch.Tensor | None = None) -> torch.Tensor:
    """Each sample's advantage [n]: above its group's top quantile only (risk-seeking), or
    normalized within its group, or against the moving baseline (of the whole batch).
    `groups` [n]: which samples compare with which (the micro-batch count they were drawn
    for); None: the whole batch is one group. A group of one sample has advantage 0."""
    if config.top_quantile is None and not config.normalize_advantages:
        return _moving_baseline(rewards, learner, config)
    groups = torch.zeros(len(rewards), dtype=torch.long) if groups is None else groups
    advantages = torch.zeros_like(rewards)
    for group in groups.unique():
        members = groups == group
        advantages[members] = _within(rewards[members], config)
    return advantages


def _within(rewards: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """Advantages [n] of one group's rewards [n]: above the top quantile, or normalized."""
    if config.top_quantile is not None:
        threshold = torch.quantile(rewards, config.top_quantile)
        above = (rewards - threshold).clamp(min=0.0)
        scale = above.max()
        return above / scale if scale > 0 else above
    centred = rewards - rewards.mean()
    spread = float(rewards.std(unbiased=False)) if len(rewards) > 1 else 0.0
    return centred / max(spread, config.advantage_floor, 1e-8)


def _moving_baseline(rewards: torch.Tensor, learner: Learner, config: TrainConfig) -> torch.Tensor:
    """Rewards less the moving average of past batch means (which this batch then updates)."""
    if learner.baseline is None:
        learner.baseline = float(rewards.mean())
    advantages = rewards - learner.baseline
    learner.baseline = config.baseline_decay * learner.baseline + (1 - config.baseline_decay) * float(rewards.mean())
    return advantages


def reinforce_update(policy: Seq2SeqPolicy, optimizer: torch.optim.Optimizer, sample: Sample,
                     advantages: torch.Tensor, config: TrainConfig, best: Sequence[Candidate | None],
                     goal: float) -> None:
    """One step on the policy gradient, advantage * grad log p, plus the entropy bonus (and
    the self-imitation term on `best`: per sample, the incumbent of its micro-batch count,
    pulled up while the policy gives it less than `goal` per group)."""
    logp, entropy = policy.log_prob(sample.placements, sample.microbatches)
    loss = -(advantages * logp).mean() - config.entropy_coef * entropy.mean() / policy.problem.n_groups
    _step(optimizer, loss + _self_imitation(policy, best, config, goal))


def ppo_update(policy: Seq2SeqPolicy, optimizer: torch.optim.Optimizer, sample: Sample,
               advantages: torch.Tensor, config: TrainConfig, best: Sequence[Candidate | None],
               goal: float) -> None:
    """`ppo_epochs` steps on the clipped surrogate objective (Schulman et al. 2017), plus the
    entropy bonus (and the self-imitation term on `best`: per sample, the incumbent of its
    micro-batch count, pulled up while the policy gives it less than `goal` per group)."""
    for _ in range(config.ppo_epochs):
        logp, entropy = policy.log_prob(sample.placements, sample.microbatches)
        ratio = torch.exp(logp - sample.logp)
        clipped = torch.clamp(ratio, 1 - config.ppo_clip, 1 + config.ppo_clip)
        objective = torch.min(ratio * advantages, clipped * advantages)
        loss = -objective.mean() - config.entropy_coef * entropy.mean() / policy.problem.n_groups
        _step(optimizer, loss + _self_imitation(policy, best, config, goal))


def _self_imitation(policy: Seq2SeqPolicy, best: Sequence[Candidate | None], config: TrainConfig,
                    goal: float) -> torch.Tensor:
    """config.self_imitation times the mean over `best` (one incumbent per sample, None
    where its count has none) of the per-group negative log-likelihood of each incumbent,
    counting only those the policy gives less than `goal` per group (above it the term is
    0: the policy keeps sampling around the incumbent instead of collapsing onto it)."""
    present = [c for c in best if c is not None]
    if not present or config.self_imitation == 0:
        return torch.zeros(())
    unique = list(dict.fromkeys(present))
    logp, _ = policy.log_prob(torch.tensor([c.placement for c in unique]),
                              microbatch_indices([c.microbatches for c in unique]))
    per_group = logp / policy.problem.n_groups
    below = (per_group.detach().exp() < goal).float()
    share = torch.tensor([present.count(c) / len(best) for c in unique])
    return -config.self_imitation * (share * below * per_group).sum()


def _step(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
