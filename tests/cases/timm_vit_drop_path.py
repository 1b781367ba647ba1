"""Case: a timm-style vision transformer: patch embedding, class token and learned
position embedding parameters, pre-norm blocks with attention dropout
(F.scaled_dot_product_attention(dropout_p=... if self.training)), LayerScale and
stochastic depth (DropPath: a per-sample Bernoulli mask drawn in forward, only in
training), then a head on the class token.

Scenario: the blocks of timm's VisionTransformer / ConvNeXt, whose train-mode forward
draws random masks in several places and whose eval-mode forward draws none; placed
and unplaced must draw the same masks under one seed and agree in eval mode.
Model: own code after timm's `Block`, `LayerScale`, `DropPath` and `Attention`.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGE, PATCH, WIDTH, HEADS, DEPTH, CLASSES, BATCH = 32, 8, 64, 4, 4, 10, 4


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability `p`."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float = 1e-1):
        super().__init__()
        self.gamma = nn.Parameter(init * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, attn_drop: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, attn_drop=0.1)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(0.1), nn.Linear(2 * dim, dim))
        self.ls2 = LayerScale(dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class TinyViT(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, WIDTH, PATCH, stride=PATCH)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, WIDTH))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, 1 + (IMAGE // PATCH) ** 2, WIDTH))
        self.blocks = nn.Sequential(*[Block(WIDTH, HEADS, drop_path=0.1 * i / DEPTH) for i in range(DEPTH)])
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, images):
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


def build_model():
    torch.manual_seed(0)
    return TinyViT()


def example_inputs():
    g = torch.Generator().manual_seed(21)
    return (torch.randn(BATCH, 3, IMAGE, IMAGE, generator=g),)


def loss_fn(logits, images):
    return F.cross_entropy(logits, torch.arange(logits.shape[0]) % CLASSES)
