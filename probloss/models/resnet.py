"""A small ResNet-style CNN image tower (He et al., "Deep Residual Learning", CVPR 2016).

GroupNorm instead of BatchNorm: contrastive batches are split across ranks, and batch statistics would couple
samples (and leak information between positives) in ways that differ between 1 and 64 devices.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from probloss.registry import ENCODERS


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = _norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = _norm(cout)
        self.skip = None
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _norm(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm2(self.conv2(F.relu(self.norm1(self.conv1(x)))))
        return F.relu(y + (x if self.skip is None else self.skip(x)))


@ENCODERS.register("resnet")
class ResNet(nn.Module):
    """Conv stem, then stages of basic blocks (channels width, 2 width, 4 width, ...; stride 2 from the second
    stage on), then global average pooling.

    Args:
        image_size: accepted for a uniform tower interface; any size works.
        width: channels of the stem and first stage.
        blocks: basic blocks per stage.
        stem_stride: stride of the 3x3 stem (1 for 32-64 px images, 2 or more for large images).

    Input (B, 3, H, W) float; output (B, width * 2 ** (len(blocks) - 1)).
    """

    modality = "image"
    config_keys = ("width", "blocks", "stem_stride")

    def __init__(self, image_size: int = 32, width: int = 16, blocks: Sequence[int] = (1, 1, 1), stem_stride: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, stem_stride, 1, bias=False), _norm(width), nn.ReLU())
        layers, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * 2**i
            for j in range(int(n)):
                layers.append(BasicBlock(cin, cout, stride=2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.stages = nn.Sequential(*layers)
        self.width = cin

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(images)).mean(dim=(2, 3))  # (B, width)
