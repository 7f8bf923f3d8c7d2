"""Text towers: a Transformer (learned positions, padding mask, EOS or mean pooling) and CBOW (mean of word
embeddings), the two the proposal names. Input tokens (B, L) long with pad id 0; output (B, width)."""

from __future__ import annotations

import torch
from torch import nn

from probloss.models._blocks import Block, init_weights
from probloss.registry import ENCODERS

PAD_ID = 0


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x (B, L, W), mask (B, L) bool -> (B, W) mean over real tokens (an all-pad row gives zeros)."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


@ENCODERS.register("transformer")
class TextTransformer(nn.Module):
    """Token embedding + learned positions -> pre-norm blocks (padding masked, bidirectional) -> LN -> pool.

    Args:
        vocab_size: number of token ids.
        max_len: longest token sequence (size of the position table).
        width, depth, heads, mlp_ratio: block sizes.
        pool: "eos" (the last real token, which the tokenizers make the EOS) or "mean" (over real tokens).
    """

    modality = "text"
    config_keys = ("width", "depth", "heads", "mlp_ratio", "pool")

    def __init__(self, vocab_size: int = 259, max_len: int = 16, width: int = 64, depth: int = 2, heads: int = 4,
                 mlp_ratio: float = 4.0, pool: str = "eos"):
        super().__init__()
        if pool not in ("eos", "mean"):
            raise ValueError(f"text pool must be 'eos' or 'mean', got {pool!r}")
        self.pool, self.width = pool, width
        self.embed = nn.Embedding(vocab_size, width)
        self.pos = nn.Parameter(torch.zeros(1, max_len, width))
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        init_weights(self)
        nn.init.normal_(self.pos, std=0.01)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = tokens != PAD_ID  # (B, L) True at real tokens
        mask[:, 0] = True  # an all-pad row would give NaN attention; let it attend to its first position
        x = self.embed(tokens) + self.pos[:, : tokens.shape[1]]  # (B, L, W)
        for block in self.blocks:
            x = block(x, mask)
        x = self.norm(x)
        if self.pool == "mean":
            return masked_mean(x, mask)
        last = mask.long().cumsum(1).argmax(1)  # (B,) index of the last real token (the EOS)
        return x[torch.arange(len(x)), last]


@ENCODERS.register("cbow")
class CBOW(nn.Module):
    """Continuous bag of words: the mean of the token embeddings (padding excluded), then LayerNorm.

    Order-blind by construction, so it cannot tell "a red circle left of a blue square" from its relation-reversed
    negative: the baseline the hard-negative probes are meant to expose.
    """

    modality = "text"
    config_keys = ("width",)

    def __init__(self, vocab_size: int = 259, max_len: int = 16, width: int = 64):
        super().__init__()
        self.width = width
        self.embed = nn.Embedding(vocab_size, width)
        nn.init.normal_(self.embed.weight, std=1.0)
        self.norm = nn.LayerNorm(width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.norm(masked_mean(self.embed(tokens), tokens != PAD_ID))
