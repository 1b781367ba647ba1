"""GPT: a small GPT-style decoder without weight tying, sized for pipelining.

The zoo's `transformer` is sized for placement (4 blocks at medium, batch 8); this
one has more blocks and a batch that splits into micro-batches of whole sequences
(GPipe, Huang et al. 2019): a decoder block's work is proportional to the tokens it
sees, so 4 sequences run about as efficiently as 16. The architecture is the zoo
transformer's (token and position embeddings, pre-norm blocks of causal
self-attention and MLP, final norm, an LM head not tied to the embedding), built
from the same modules.

Sizes (`CONFIGS`): `small` for tests; `medium` takes about a third of a second per
training step on one core of the development host; `paper` is GPT-2 small's shape at
sequence length 256 and batch 32 (reference only).
"""

from __future__ import annotations

import torch
from torch import nn

from graphs.zoo import transformer
from graphs.zoo.transformer import GPT, Config

CONFIGS = {
    "small": Config(vocab=256, layers=4, width=64, heads=4, seq_len=32, batch=8),
    "medium": Config(vocab=1024, layers=8, width=192, heads=4, seq_len=64, batch=16),
    "paper": Config(vocab=50257, layers=12, width=768, heads=12, seq_len=256, batch=32),
}
SIZES = tuple(CONFIGS)


def build_model(size: str = "small") -> nn.Module:
    return GPT(CONFIGS[size])


def example_inputs(size: str = "small") -> tuple[torch.Tensor, ...]:
    cfg = CONFIGS[size]
    return (torch.randint(cfg.vocab, (cfg.batch, cfg.seq_len)),)


loss_fn = transformer.loss_fn


def expert_placement(module_path: str, n_devices: int, size: str = "small") -> int | None:
    """Contiguous, even runs of blocks (transformer.split_blocks), the embeddings beside
    the first block, the final norm and LM head beside the last."""
    return transformer.split_blocks(module_path, n_devices, CONFIGS[size].layers)
