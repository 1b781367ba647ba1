"""RNNLM: a 2-layer LSTM language model, unrolled over time with one cell per layer.

The paper's RNNLM (Mirhoseini et al. 2017, after Zaremba et al. 2014 and Jozefowicz
et al. 2016) is "a grid of LSTM cells": cell (layer i, step t) needs only cell
(i-1, t) and cell (i, t-1), so with each layer on its own device the layers
pipeline across time steps. That grid is what a placer must see, so the LSTM is
written as per-step `nn.LSTMCell`s (one fx node per cell and step) instead of one
fused `nn.LSTM` (one opaque node for the whole sequence). A layer's cell is called
at every step: its weights are shared across time, which capture records as a
colocation constraint (one layer, one device), as in the paper.

Sizes (`CONFIGS`): `paper` is the paper's setting as we recall it (2 layers, 2048
hidden units, batch 64, 20 unrolled steps); its vocabulary of 10,000 words (Penn
Treebank, as in Zaremba et al.) is our assumption, the paper does not fix it here.
`small` keeps the structure (2 layers, 20 steps) at toy width. No dropout: placed
and unplaced runs must compute identical outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Config:
    vocab: int
    hidden: int  # embedding and LSTM width
    layers: int
    steps: int  # time steps unrolled (tokens per sequence fed to the model)
    batch: int


CONFIGS = {
    "small": Config(vocab=1000, hidden=64, layers=2, steps=20, batch=8),
    "medium": Config(vocab=2000, hidden=512, layers=2, steps=20, batch=32),
    "paper": Config(vocab=10000, hidden=2048, layers=2, steps=20, batch=64),
}
SIZES = tuple(CONFIGS)


class StackedLSTM(nn.Module):
    """LSTM layers advanced one time step per call, so that a loop over steps unrolls
    the (layer, step) grid into the traced graph. `layers.i` is layer i's cell."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.LSTMCell(input_size if i == 0 else hidden_size, hidden_size) for i in range(num_layers))

    def forward(self, x: torch.Tensor, states: list) -> tuple[torch.Tensor, list]:
        """One step: input x (batch, input_size) and each layer's (h, c) (None: zeros)
        -> the top layer's output h and each layer's new (h, c)."""
        new_states = []
        for cell, state in zip(self.layers, states):
            state = cell(x, state)
            x = state[0]
            new_states.append(state)
        return x, new_states


def lstm_layer_device(module_path: str, n_devices: int, num_layers: int,
                      stacks: tuple[str, ...], first: tuple[str, ...], last: tuple[str, ...]) -> int | None:
    """The human expert of the paper (and of GNMT, Wu et al. 2016) for stacked LSTMs:
    layer i of every stack in `stacks` on device i mod n; the modules in `first`
    (embeddings) beside layer 0, those in `last` (attention, softmax) beside the last
    layer. Other paths (the root, containers) are not covered: None."""
    head, _, rest = module_path.partition(".")
    if head in first:
        return 0
    if head in last:
        return (num_layers - 1) % n_devices
    parts = rest.split(".")
    if head in stacks and len(parts) >= 2 and parts[0] == "layers":
        return int(parts[1]) % n_devices
    return None


class RNNLM(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.steps = cfg.steps
        self.embedding = nn.Embedding(cfg.vocab, cfg.hidden)
        self.lstm = StackedLSTM(cfg.hidden, cfg.hidden, cfg.layers)
        self.softmax = nn.Linear(cfg.hidden, cfg.vocab)  # the logits; the softmax itself is in the loss

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (batch, steps + 1) -> logits (batch, steps, vocab) predicting tokens[:, 1:]."""
        x = self.embedding(tokens)
        states = [None] * len(self.lstm.layers)
        outputs = []
        for t in range(self.steps):
            output, states = self.lstm(x[:, t], states)
            outputs.append(output)
        return self.softmax(torch.stack(outputs, dim=1))


def build_model(size: str = "small") -> nn.Module:
    return RNNLM(CONFIGS[size])


def example_inputs(size: str = "small") -> tuple[torch.Tensor, ...]:
    """One batch of token ids; the last token of each sequence is only a target."""
    cfg = CONFIGS[size]
    return (torch.randint(cfg.vocab, (cfg.batch, cfg.steps + 1)),)


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits (batch, positions, vocab), where position t predicts
    tokens[:, t + 1], over every position that has a next token."""
    steps = min(logits.shape[1], tokens.shape[1] - 1)
    return F.cross_entropy(logits[:, :steps].flatten(0, 1), tokens[:, 1:steps + 1].flatten())


def loss_fn(output: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return next_token_loss(output, tokens)


def expert_placement(module_path: str, n_devices: int, size: str = "small") -> int | None:
    """Each LSTM layer on its own device; embedding beside layer 0, softmax beside the last."""
    return lstm_layer_device(module_path, n_devices, CONFIGS[size].layers,
                             stacks=("lstm",), first=("embedding",), last=("softmax",))
