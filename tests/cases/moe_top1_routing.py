"""Case: a mixture-of-experts layer with top-1 routing, each expert fed the rows routed to it.

Scenario: `rows = (route == e).nonzero().squeeze(-1)`, then `index_select` and `index_add`:
the size of each expert's batch depends on tensor values, which torch.export records as an
unbacked size (`u0`). Placer costs every node by its output's size; it crashed with an
internal error (GuardOnDataDependentSymNode) where it should capture the model with torch.fx,
whose sizes are the example batch's.
Source: new-user trial 5 (2026-12-01); the routing of Switch Transformers (Fedus et al.,
JMLR 2022), as in e.g. https://github.com/huggingface/transformers/blob/main/src/transformers/models/switch_transformers/modeling_switch_transformers.py
Model: own code; embedding-free: a projection, one MoE layer of 4 experts, a head.
"""
import torch
import torch.nn as nn

D, EXPERTS, BATCH = 32, 4, 16
CAPTURE = "fx"  # torch.export cannot size the experts' batches


class MoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(D, EXPERTS)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))
                                     for _ in range(EXPERTS))

    def forward(self, x):
        weight, route = self.gate(x).softmax(-1).max(-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows = (route == e).nonzero().squeeze(-1)
            out = out.index_add(0, rows, expert(x.index_select(0, rows)) * weight.index_select(0, rows)[:, None])
        return out


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.moe = MoE()
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        h = self.inp(x).relu()
        return self.head(h + self.moe(h))


def build_model():
    torch.manual_seed(0)
    return Net()


def example_inputs():
    g = torch.Generator().manual_seed(5)
    return (torch.randn(BATCH, D, generator=g),)
