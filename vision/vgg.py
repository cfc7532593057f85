"""VGG (Simonyan & Zisserman, 2014): stacks of 3x3 convs and max-pools, with or without BatchNorm.

The layer lists are torchvision's (`cfgs` A/B/D/E = VGG 11/13/16/19) and `features` keeps torchvision's
layer indices, so `vgg16().features` state dicts load (vision/transfer.py). Sized for small images:
max-pools that would shrink a 28 px map below 1 px become identities (28 px: 4 pools, 32 px: 5), and
the classifier is global average pool -> fc(hidden) -> ReLU -> dropout -> fc(classes) instead of
ImageNet's 25088 -> 4096 -> 4096. He initialisation for every conv and the hidden fc.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchvision.models.vgg import cfgs

from lab.errors import LabError

DEPTHS = {11: "A", 13: "B", 16: "D", 19: "E"}


class VGG(nn.Module):
    def __init__(self, depth: int = 16, batch_norm: bool = False, in_channels: int = 3, num_classes: int = 10,
                 image_size: int = 32, hidden: int = 512, dropout: float = 0.5):
        super().__init__()
        if depth not in DEPTHS:
            raise LabError(f"model.depth={depth}: VGG comes in depths {', '.join(map(str, DEPTHS))}")
        pools, seen, layers, c = min(5, int(math.log2(image_size))), 0, [], in_channels
        for v in cfgs[DEPTHS[depth]]:
            if v == "M":
                seen += 1
                layers.append(nn.MaxPool2d(2) if seen <= pools else nn.Identity())
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), *([nn.BatchNorm2d(v)] if batch_norm else []),
                           nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(c, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                        nn.Linear(hidden, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d) or m is self.classifier[0]:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))
