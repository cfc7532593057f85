"""Semantic segmentation networks: per-pixel class scores (N, classes, H, W) at the input's own size.

    fcn(...)          fully convolutional (Long et al., 2015): 1x1 class scores on a lab backbone's maps at
                      `levels` (FCN-8s: strides 8, 16, 32), each coarser one upsampled and added to the next
                      finer one (the skips), then upsampled to the input
    segnet(...)       encoder-decoder (Badrinarayanan et al., 2015): the decoder unpools with the encoder's
                      max-pool indices (`nn.MaxUnpool2d`), so boundaries come back where they were
    unet(...)         U-Net (Ronneberger et al., 2015): the decoder upsamples (transposed convs) and
                      concatenates the encoder's maps of the same size
    torchvision_model(name=...)   any torchvision segmentation model by name (fcn_resnet50,
                      deeplabv3_resnet50, lraspp_mobilenet_v3_large, ...), no download; `weights=PATH` loads a
                      state dict of it (a head for other classes is skipped)

Every model returns a tensor of logits, whatever the input's height and width (odd ones included): each
upsampling goes to the exact size of the map it joins, and the last one to the input's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lab import checkpoint
from lab.errors import LabError
from vision.detectors import make_body


class FCN(nn.Module):
    """Class scores from each backbone map (1x1 convs), fused coarse to fine by bilinear upsampling and sums.
    `refine=C` adds a full-resolution correction: two 3x3 convs (C channels) on the input, joined with the
    upsampled scores by a 3x3 conv, added to them (its last layer starts at zero, so training starts from the
    plain FCN); the backbone's first map is at stride 2, and a bilinear upsampling blurs what lies between."""

    def __init__(self, body: nn.Module, channels: Sequence[int], num_classes: int, dropout: float = 0.1,
                 in_channels: int = 1, refine: int = 0):
        super().__init__()
        self.body = body
        self.drop = nn.Dropout2d(dropout)
        self.score = nn.ModuleList(nn.Conv2d(c, num_classes, 1) for c in channels)
        self.refine = None
        if refine:
            r = int(refine)
            join = nn.Sequential(*_convs(r + num_classes, r, 1), nn.Conv2d(r, num_classes, 1))
            self.refine = nn.ModuleDict({"image": nn.Sequential(*_convs(in_channels, r, 2)), "join": join})
            nn.init.zeros_(self.refine["join"][-1].weight)
            nn.init.zeros_(self.refine["join"][-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = list(self.body(x).values())
        y = self.score[-1](self.drop(maps[-1]))
        for m, score in zip(reversed(maps[:-1]), reversed(self.score[:-1])):
            skip = score(m)
            y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False) + skip
        y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
        if self.refine is not None:
            y = y + self.refine["join"](torch.cat([self.refine["image"](x), y], 1))
        return y


def fcn(num_classes: int, in_channels: int, backbone: Any, image_size: int = 128,
        levels: Sequence[int] = (8, 16, 32), weights: str | None = None, freeze: bool | int = False,
        dropout: float = 0.1, refine: int = 0) -> FCN:
    """FCN on a lab classifier (`backbone`, as vision/detectors.py cuts one), with skips from `levels`; `refine`
    channels of a full-resolution correction (0: none)."""
    body, channels = make_body(backbone, in_channels, image_size, levels, weights, freeze)
    return FCN(body, channels, num_classes, dropout, in_channels, refine)


def _convs(c_in: int, c_out: int, n: int) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for i in range(n):
        layers += [nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                   nn.ReLU(inplace=True)]
    return layers


class SegNet(nn.Module):
    """Conv-BN-ReLU blocks, each ending in a 2x2 max-pool that keeps its indices; the decoder mirrors them,
    unpooling with those indices to the size each block had."""

    def __init__(self, num_classes: int, in_channels: int, widths: Sequence[int] = (32, 64, 128), convs: int = 2):
        super().__init__()
        widths = [int(w) for w in widths]
        if not widths or convs < 1:
            raise LabError(f"model.widths={widths} and model.convs={convs}: SegNet needs at least one block of "
                           "one conv")
        self.encoder = nn.ModuleList(nn.Sequential(*_convs(c, w, convs))
                                     for c, w in zip([in_channels, *widths[:-1]], widths))
        self.pool = nn.MaxPool2d(2, 2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2, 2)
        outs = [*widths[:-1][::-1], widths[0]]
        self.decoder = nn.ModuleList(nn.Sequential(*_convs(w, o, convs)) for w, o in zip(widths[::-1], outs))
        self.head = nn.Conv2d(widths[0], num_classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sizes, indices = [], []
        for block in self.encoder:
            x = block(x)
            sizes.append(x.shape[-2:])
            x, idx = self.pool(x)
            indices.append(idx)
        for block in self.decoder:
            x = block(self.unpool(x, indices.pop(), output_size=sizes.pop()))
        return self.head(x)


def segnet(num_classes: int, in_channels: int, widths: Sequence[int] = (32, 64, 128), convs: int = 2) -> SegNet:
    return SegNet(num_classes, in_channels, widths, convs)


class UNet(nn.Module):
    """Two 3x3 convs per level; down by max-pool, up by a 2x2 transposed conv, then concatenation with the
    encoder's map of that level (padded to its size when the input's side was odd)."""

    def __init__(self, num_classes: int, in_channels: int, widths: Sequence[int] = (16, 32, 64, 128)):
        super().__init__()
        widths = [int(w) for w in widths]
        if len(widths) < 2:
            raise LabError(f"model.widths={widths}: a U-Net needs at least two levels")
        self.down = nn.ModuleList(nn.Sequential(*_convs(c, w, 2)) for c, w in zip([in_channels, *widths], widths))
        self.up = nn.ModuleList(nn.ConvTranspose2d(w, s, 2, stride=2) for w, s in zip(widths[:0:-1], widths[-2::-1]))
        self.fuse = nn.ModuleList(nn.Sequential(*_convs(2 * s, s, 2)) for s in widths[-2::-1])
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for up, fuse in zip(self.up, self.fuse):
            skip = skips.pop()
            x = up(x)
            x = F.pad(x, (0, skip.shape[-1] - x.shape[-1], 0, skip.shape[-2] - x.shape[-2]))
            x = fuse(torch.cat([skip, x], 1))
        return self.head(x)


def unet(num_classes: int, in_channels: int, widths: Sequence[int] = (16, 32, 64, 128)) -> UNet:
    return UNet(num_classes, in_channels, widths)


class TorchvisionSegmenter(nn.Module):
    """A torchvision segmentation model returning its "out" logits; grey input is repeated to RGB."""

    def __init__(self, net: nn.Module, in_channels: int):
        super().__init__()
        self.net, self.in_channels = net, in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_channels == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.net(x)["out"]


def torchvision_model(name: str, num_classes: int, in_channels: int, weights: str | None = None) -> nn.Module:
    """torchvision's segmentation model `name`, built for `num_classes` without downloading anything;
    `weights=PATH` loads a state dict saved from it (tensors of another shape, a head for other classes,
    are skipped and named)."""
    import torchvision
    from torchvision.models import get_model, list_models

    names = list_models(module=torchvision.models.segmentation)
    if name not in names:
        raise LabError(f"model.name={name!r} is not a torchvision segmentation model; choose one of {', '.join(names)}")
    if in_channels not in (1, 3):
        raise LabError(f"model={name} takes RGB or grey images; data.channels={in_channels}")
    net = get_model(name, weights=None, weights_backbone=None, num_classes=num_classes)
    if weights:
        state = checkpoint.load_weights(weights)
        if all(k.startswith("net.") for k in state):  # a lab checkpoint of this wrapper
            state = {k[4:]: v for k, v in state.items()}
        own = net.state_dict()
        unknown = [k for k in state if k not in own]
        if unknown:
            raise LabError(f"{weights} does not fit {name}: it has {unknown[0]!r} ({len(unknown)} names the model "
                           "lacks); load a state dict saved from the same model")
        skipped = [k for k, v in state.items() if own[k].shape != v.shape]
        fits = {k: v for k, v in state.items() if k not in skipped}
        if not fits:
            raise LabError(f"{weights} holds no tensor of {name}'s shapes; load a state dict saved from it")
        net.load_state_dict(fits, strict=False)
        note = f", skipped {len(skipped)} of another shape ({', '.join(skipped[:4])})" if skipped else ""
        print(f"[lab] {name}: loaded {len(fits)} tensors from {weights}{note}", flush=True)
    return TorchvisionSegmenter(net, in_channels)
