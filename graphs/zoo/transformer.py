"""Transformer: a GPT-style decoder-only language model.

Not one of the paper's benchmarks (Mirhoseini et al. 2017 predates them); it stands
for today's models: token and position embeddings, N pre-norm blocks of causal
self-attention and MLP, a final layer norm and the LM head. The head is not tied to
the token embedding (GPT-2 ties them), so that the expert's layer split is free to put
them on different devices.

Sizes (`CONFIGS`): `paper` is GPT-2 small's shape (12 layers, width 768, 12 heads,
vocabulary 50,257) at sequence length 512 and batch 8; `small` is 2 layers of width 64
at sequence length 32, batch 4.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from graphs.zoo.rnnlm import next_token_loss


@dataclass(frozen=True)
class Config:
    vocab: int
    layers: int
    width: int
    heads: int
    seq_len: int
    batch: int


CONFIGS = {
    "small": Config(vocab=512, layers=2, width=64, heads=4, seq_len=32, batch=4),
    "medium": Config(vocab=2000, layers=4, width=256, heads=4, seq_len=128, batch=8),
    "paper": Config(vocab=50257, layers=12, width=768, heads=12, seq_len=512, batch=8),
}
SIZES = tuple(CONFIGS)


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (batch, seq, width) each -> (batch, heads, seq, head width); no sizes are read
        # from x, so the trace holds no shape arithmetic.
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).flatten(2))


class MLP(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, 4 * width)
        self.act = nn.GELU()
        self.proj = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab, cfg.width)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.width)
        self.register_buffer("positions", torch.arange(cfg.seq_len), persistent=False)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.width)
        self.lm_head = nn.Linear(cfg.width, cfg.vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (batch, seq_len) -> logits (batch, seq_len, vocab); position t predicts
        token t + 1. The length is fixed, like the unrolled LSTMs' (no shape-dependent trace)."""
        x = self.wte(tokens) + self.wpe(self.positions)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def build_model(size: str = "small") -> nn.Module:
    return GPT(CONFIGS[size])


def example_inputs(size: str = "small") -> tuple[torch.Tensor, ...]:
    cfg = CONFIGS[size]
    return (torch.randint(cfg.vocab, (cfg.batch, cfg.seq_len)),)


def loss_fn(output: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return next_token_loss(output, tokens)


def expert_placement(module_path: str, n_devices: int, size: str = "small") -> int | None:
    """Contiguous runs of blocks split evenly over the devices (`split_blocks`)."""
    return split_blocks(module_path, n_devices, CONFIGS[size].layers)


def split_blocks(module_path: str, n_devices: int, layers: int) -> int | None:
    """The device of a GPT's module when its `layers` blocks run in contiguous, even
    runs (block i on device floor(i * n_devices / layers)); the embeddings beside the
    first block, the final norm and LM head beside the last. The root and the
    `blocks` container are not covered: None."""
    head, _, rest = module_path.partition(".")
    if head in ("wte", "wpe"):
        return 0
    if head in ("ln_f", "lm_head"):
        return (layers - 1) * n_devices // layers
    if head == "blocks" and rest:
        return int(rest.split(".")[0]) * n_devices // layers
    return None
