"""Case: a model that returns one of its parameters beside its result.

Scenario: `return self.head(h), self.log_std`, as a Gaussian policy returns its mean and
its learned log standard deviation (or a model its learned temperature). The captured
graph's output reads the parameter itself, which no device computes: every placed
forward failed with "internal error: KeyError: 'log_std'".
Source: new-user trial 5 (2026-12-01); the policy shape of e.g. CleanRL's continuous PPO
(https://github.com/vwxyzjn/cleanrl/blob/master/cleanrl/ppo_continuous_action.py, `actor_logstd`).
Model: own code; a two-layer MLP policy head.
"""
import torch
import torch.nn as nn

D, ACTIONS, BATCH = 32, 4, 16


class Policy(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(D, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh())
        self.head = nn.Linear(64, ACTIONS)
        self.log_std = nn.Parameter(torch.full((ACTIONS,), -0.5))

    def forward(self, x):
        return self.head(self.body(x)), self.log_std


def build_model():
    torch.manual_seed(0)
    return Policy()


def example_inputs():
    g = torch.Generator().manual_seed(3)
    return (torch.randn(BATCH, D, generator=g),)
