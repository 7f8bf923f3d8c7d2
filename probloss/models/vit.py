"""Vision Transformer image tower (Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021)."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from probloss.models._blocks import Block, init_weights
from probloss.models.linear import Linear
from probloss.registry import ENCODERS


@ENCODERS.register("vit")
class ViT(nn.Module):
    """Patchify (einops) -> linear patch embedding + learned positions -> pre-norm blocks -> LN -> pool.

    Args:
        image_size: side of the square input images.
        patch_size: side of a patch; must divide image_size.
        width: token width, also the pooled feature size.
        depth: number of blocks.
        heads: attention heads.
        mlp_ratio: MLP hidden width / width.
        pool: "cls" (a learned class token) or "mean" (mean over patch tokens).

    Input (B, 3, H, W) float; output (B, width).
    """

    modality = "image"
    config_keys = ("patch_size", "width", "depth", "heads", "mlp_ratio", "pool")

    def __init__(self, image_size: int = 32, patch_size: int = 8, width: int = 64, depth: int = 2, heads: int = 4,
                 mlp_ratio: float = 4.0, pool: str = "cls"):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"patch_size {patch_size} does not divide image_size {image_size}")
        if pool not in ("cls", "mean"):
            raise ValueError(f"ViT pool must be 'cls' or 'mean', got {pool!r}")
        self.patch_size, self.pool, self.width = patch_size, pool, width
        n_patches = (image_size // patch_size) ** 2
        self.patch_embed = Linear(3 * patch_size**2, width)
        self.cls = nn.Parameter(torch.zeros(1, 1, width)) if pool == "cls" else None
        self.pos = nn.Parameter(torch.zeros(1, n_patches + (pool == "cls"), width))
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        init_weights(self)
        nn.init.trunc_normal_(self.pos, std=0.02)
        if self.cls is not None:
            nn.init.trunc_normal_(self.cls, std=0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        x = self.patch_embed(rearrange(images, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=p, p2=p))  # (B, N, W)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(len(x), -1, -1), x], dim=1)  # (B, 1 + N, W)
        x = x + self.pos
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return x[:, 0] if self.cls is not None else x.mean(dim=1)
