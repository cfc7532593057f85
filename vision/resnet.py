"""ResNets (He et al., "Deep Residual Learning for Image Recognition", 2015), built from torchvision's blocks.

- `resnet18`, `resnet34`, `resnet50`: torchvision's ImageNet ResNet (BasicBlock x [2,2,2,2] and [3,4,6,3],
  Bottleneck x [3,4,6,3]) with its parameter names, so torchvision state dicts load (vision/transfer.py).
  For small images (`stem="auto"` and under 64 px) the 7x7 stride-2 conv and the max-pool become one
  3x3 stride-1 conv, as in the paper's CIFAR nets: a 28 or 32 px image keeps 28/32 px in the first stage.
- `resnet20`, `resnet56`: the CIFAR ResNets of the paper's section 4.2: conv3x3(16), three stages of
  n BasicBlocks with 16, 32 and 64 channels (depth = 6n + 2), global average pool, fc. Shortcuts that
  change shape are the paper's option A (stride-2 subsampling, zero-padded channels): no parameters,
  0.27M weights for ResNet-20 and 0.85M for ResNet-56, as in its table 6.
He initialisation (fan-out, ReLU) for every conv, as torchvision does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from lab.errors import LabError


def _stem(model: ResNet, in_channels: int, image_size: int, stem: str) -> ResNet:
    if stem not in ("auto", "small", "imagenet"):
        raise LabError(f"model.stem={stem!r} is unknown; use auto, small (3x3, stride 1) or imagenet (7x7 + pool)")
    if stem == "small" or (stem == "auto" and image_size < 64):
        model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


def resnet18(in_channels: int = 3, num_classes: int = 10, image_size: int = 32, stem: str = "auto") -> ResNet:
    return _stem(ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes), in_channels, image_size, stem)


def resnet34(in_channels: int = 3, num_classes: int = 10, image_size: int = 32, stem: str = "auto") -> ResNet:
    return _stem(ResNet(BasicBlock, [3, 4, 6, 3], num_classes=num_classes), in_channels, image_size, stem)


def resnet50(in_channels: int = 3, num_classes: int = 10, image_size: int = 32, stem: str = "auto") -> ResNet:
    return _stem(ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes), in_channels, image_size, stem)


class PadShortcut(nn.Module):
    """Option A shortcut: take every other pixel, zero-pad the new channels."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.extra = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class CifarResNet(nn.Module):
    def __init__(self, depth: int = 20, in_channels: int = 3, num_classes: int = 10, image_size: int = 32,
                 width: int = 16):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise LabError(f"model.depth={depth}: a CIFAR ResNet has depth 6n+2 (20, 32, 44, 56, 110)")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages, cin = [], width
        for i, planes in enumerate((width, 2 * width, 4 * width)):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n):
                shortcut = PadShortcut(planes - cin) if j == 0 and (stride != 1 or cin != planes) else None
                blocks.append(BasicBlock(cin, planes, stride if j == 0 else 1, downsample=shortcut))
                cin = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet20(in_channels: int = 3, num_classes: int = 10, image_size: int = 32, width: int = 16) -> CifarResNet:
    return CifarResNet(20, in_channels, num_classes, image_size, width)


def resnet56(in_channels: int = 3, num_classes: int = 10, image_size: int = 32, width: int = 16) -> CifarResNet:
    return CifarResNet(56, in_channels, num_classes, image_size, width)
