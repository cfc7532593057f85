"""GoogLeNet (Szegedy et al., "Going Deeper with Convolutions", 2014) from torchvision's Inception block.

Each Inception block runs four branches side by side and concatenates them: 1x1; 1x1 -> 3x3; 1x1 ->
"5x5" (a 3x3 in torchvision's block, a known deviation kept for weight compatibility); 3x3 max-pool ->
1x1. The nine blocks and their widths are the paper's table 1. For small images (`stem="auto"` under
64 px) the ImageNet stem (7x7/2, pool, 1x1, 3x3, pool) becomes one 3x3 conv to 192 channels, so a
28 or 32 px image reaches the first block at full size. No auxiliary classifiers. Every conv is
conv -> BatchNorm -> ReLU with He initialisation.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.googlenet import BasicConv2d, Inception

from lab.errors import LabError

# (in, 1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj); "M" is a 3x3 stride-2 max-pool.
BLOCKS = [(192, 64, 96, 128, 16, 32, 32), (256, 128, 128, 192, 32, 96, 64), "M",
          (480, 192, 96, 208, 16, 48, 64), (512, 160, 112, 224, 24, 64, 64), (512, 128, 128, 256, 24, 64, 64),
          (512, 112, 144, 288, 32, 64, 64), (528, 256, 160, 320, 32, 128, 128), "M",
          (832, 256, 160, 320, 32, 128, 128), (832, 384, 192, 384, 48, 128, 128)]


class GoogLeNet(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32, dropout: float = 0.2,
                 stem: str = "auto"):
        super().__init__()
        if stem not in ("auto", "small", "imagenet"):
            raise LabError(f"model.stem={stem!r} is unknown; use auto, small or imagenet")
        if stem == "small" or (stem == "auto" and image_size < 64):
            self.stem = BasicConv2d(in_channels, 192, kernel_size=3, padding=1)
        else:
            self.stem = nn.Sequential(
                BasicConv2d(in_channels, 64, kernel_size=7, stride=2, padding=3), nn.MaxPool2d(3, 2, ceil_mode=True),
                BasicConv2d(64, 64, kernel_size=1), BasicConv2d(64, 192, kernel_size=3, padding=1),
                nn.MaxPool2d(3, 2, ceil_mode=True))
        self.inception = nn.Sequential(*[nn.MaxPool2d(3, 2, padding=1) if b == "M" else Inception(*b) for b in BLOCKS])
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(1024, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inception(self.stem(x))
        return self.fc(self.dropout(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)))
