"""What the towers share: the images they take (``MEAN``, ``STD``) and the pre-norm Transformer blocks of the ViT
and the text Transformer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from probloss.models.linear import Linear

# Every image tower takes images normalised to [-1, 1] (the data loader writes them so): x_pixel = x * STD + MEAN.
MEAN, STD = 0.5, 0.5


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = Linear(width, 3 * width)
        self.out = Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, W); mask (B, N) bool, True = a real token that may be attended to."""
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, N) broadcast over heads, queries
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out(rearrange(y, "b h n d -> b n (h d)"))


class Block(nn.Module):
    """x + Attn(LN(x)), then x + MLP(LN(x)) (pre-norm, as in ViT and GPT-2)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(Linear(width, hidden), nn.GELU(), Linear(hidden, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


def init_weights(module: nn.Module) -> None:
    """Transformer init: truncated-normal(0.02) linear and embedding weights, zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.trunc_normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
