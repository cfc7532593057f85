"""A multilayer perceptron: flatten -> [fc -> (BatchNorm) -> ReLU -> dropout] per hidden layer -> fc.

`hidden=[]` is a single linear layer (logistic regression): it cannot learn XOR, one hidden layer
can (conf/experiment/xor_mlp.yaml). He initialisation for the layers a ReLU follows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
                 hidden: Sequence[int] = (256, 128), dropout: float = 0.0, batch_norm: bool = False):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        d = in_channels * image_size * image_size
        for h in hidden:
            fc = nn.Linear(d, h)
            nn.init.kaiming_normal_(fc.weight, nonlinearity="relu")
            nn.init.zeros_(fc.bias)
            layers += [fc, *([nn.BatchNorm1d(h)] if batch_norm else []), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            d = h
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(d, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))
