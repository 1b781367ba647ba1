"""NMT: an attentional LSTM encoder-decoder, unrolled over time like the RNNLM.

The paper's NMT benchmark (Mirhoseini et al. 2017: Bahdanau et al. 2015 style, WMT14
English-German) is an encoder and a decoder of stacked LSTMs joined by attention.
Both stacks are `StackedLSTM`s (see rnnlm): one fx node per cell and step, so that
the (layer, step) grid can pipeline across devices. At each decoder step, Luong
"general" global attention (Luong et al. 2015) reads all encoder top-layer states;
the decoder's first state is the encoder's last, layer by layer. No input feeding:
a decoder layer at step t then waits only for layer below and its own step t-1,
which keeps the grid pipelinable (GNMT, Wu et al. 2016, makes the same choice).

Sizes (`CONFIGS`):
- `paper`: 2 layers, 1024 hidden units, batch 128; `paper4`: 4 layers, batch 64
  (the paper's 2-layer NMT; the 4-layer one is from its follow-up, Mirhoseini et al.
  2018, "A Hierarchical Model for Device Placement"). The batch sizes are as we
  recall them and uncertain; source and target length 50 (tensorflow/nmt's default
  maximum training length) and a 32,000-token vocabulary on each side (GNMT's
  wordpiece vocabulary size) are our assumptions.
- `small`: the same structure at toy width and 10 steps each side.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from graphs.zoo.rnnlm import StackedLSTM, lstm_layer_device, next_token_loss


@dataclass(frozen=True)
class Config:
    vocab: int  # each side
    hidden: int  # embedding, LSTM and attention width
    layers: int  # per stack
    source_steps: int
    target_steps: int
    batch: int


CONFIGS = {
    "small": Config(vocab=1000, hidden=64, layers=2, source_steps=10, target_steps=10, batch=8),
    "medium": Config(vocab=2000, hidden=384, layers=2, source_steps=16, target_steps=16, batch=32),
    "paper": Config(vocab=32000, hidden=1024, layers=2, source_steps=50, target_steps=50, batch=128),
    "paper4": Config(vocab=32000, hidden=1024, layers=4, source_steps=50, target_steps=50, batch=64),
}
SIZES = tuple(CONFIGS)


class LuongAttention(nn.Module):
    """score(h_t, h_s) = h_t . W_a h_s over the encoder states h_s; returns the
    attentional state tanh(W_c [context; h_t]) that the softmax layer reads."""

    def __init__(self, hidden: int):
        super().__init__()
        self.score = nn.Linear(hidden, hidden, bias=False)  # W_a, applied to the query
        self.combine = nn.Linear(2 * hidden, hidden, bias=False)  # W_c

    def forward(self, query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """query (batch, hidden), memory (batch, source_steps, hidden) -> (batch, hidden)."""
        scores = torch.bmm(memory, self.score(query).unsqueeze(2))  # (batch, source_steps, 1)
        weights = torch.softmax(scores, dim=1)
        context = torch.bmm(weights.transpose(1, 2), memory).squeeze(1)
        return torch.tanh(self.combine(torch.cat([context, query], dim=1)))


class NMT(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.source_steps, self.target_steps = cfg.source_steps, cfg.target_steps
        self.source_embedding = nn.Embedding(cfg.vocab, cfg.hidden)
        self.target_embedding = nn.Embedding(cfg.vocab, cfg.hidden)
        self.encoder = StackedLSTM(cfg.hidden, cfg.hidden, cfg.layers)
        self.decoder = StackedLSTM(cfg.hidden, cfg.hidden, cfg.layers)
        self.attention = LuongAttention(cfg.hidden)
        self.softmax = nn.Linear(cfg.hidden, cfg.vocab)  # the logits; the softmax itself is in the loss

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """source (batch, source_steps), target (batch, target_steps + 1) -> logits
        (batch, target_steps, vocab): step t reads target[:, t] and predicts target[:, t + 1]."""
        x = self.source_embedding(source)
        states = [None] * len(self.encoder.layers)
        encoded = []
        for s in range(self.source_steps):
            output, states = self.encoder(x[:, s], states)
            encoded.append(output)
        memory = torch.stack(encoded, dim=1)

        y = self.target_embedding(target)
        attentional = []
        for t in range(self.target_steps):
            output, states = self.decoder(y[:, t], states)
            attentional.append(self.attention(output, memory))
        return self.softmax(torch.stack(attentional, dim=1))


def build_model(size: str = "small") -> nn.Module:
    return NMT(CONFIGS[size])


def example_inputs(size: str = "small") -> tuple[torch.Tensor, ...]:
    """A batch of source sentences and of target sentences (token ids, fixed length);
    the last target token is only predicted, never read."""
    cfg = CONFIGS[size]
    return (torch.randint(cfg.vocab, (cfg.batch, cfg.source_steps)),
            torch.randint(cfg.vocab, (cfg.batch, cfg.target_steps + 1)))


def loss_fn(output: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return next_token_loss(output, target)


def expert_placement(module_path: str, n_devices: int, size: str = "small") -> int | None:
    """Layer i of encoder and decoder on device i mod n (GNMT's layer-per-GPU layout);
    embeddings beside layer 0, attention and softmax beside the last layer."""
    return lstm_layer_device(module_path, n_devices, CONFIGS[size].layers,
                             stacks=("encoder", "decoder"), first=("source_embedding", "target_embedding"),
                             last=("attention", "softmax"))
