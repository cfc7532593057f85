"""Batched data augmentation on the training device: each sample gets its own random draw.

`augmenter(**data.augment)` builds the transform a task applies to every training batch, before
normalisation (pixels stay in 0..255). Keys, all off by default:

    crop_padding: 4      zero-pad by 4 pixels, crop back at a random offset
    hflip: 0.5           mirror left-right with this probability
    rotate: 10           rotate by a uniform angle in [-10, 10] degrees
    translate: 0.1       shift by up to 10% of the width and height
    scale: 0.1           zoom by a factor in [0.9, 1.1]
    brightness: 0.2      multiply the pixels by a factor in [0.8, 1.2]

Rotation, translation and scale are one affine warp (bilinear, zeros outside the image). Labels are
untouched: only the images change.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lab.errors import LabError


def random_crop(x: torch.Tensor, padding: int) -> torch.Tensor:
    """Pad by `padding` (zeros) and crop back to the original size at a random offset per sample."""
    if padding <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n, 1, 1), device=x.device)
    dx = torch.randint(0, 2 * padding + 1, (n, 1, 1), device=x.device)
    rows = (torch.arange(h, device=x.device).view(1, h, 1) + dy).expand(n, h, w)
    cols = (torch.arange(w, device=x.device).view(1, 1, w) + dx).expand(n, h, w)
    flat = rows * (w + 2 * padding) + cols  # (n, h, w) indices into each padded image
    out = padded.flatten(2).gather(2, flat.flatten(1).unsqueeze(1).expand(-1, x.shape[1], -1))
    return out.view_as(x)


def random_hflip(x: torch.Tensor, p: float = 0.5) -> torch.Tensor:
    """Mirror each sample left-right with probability `p`."""
    if p <= 0:
        return x
    flip = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < p
    return torch.where(flip, x.flip(-1), x)


def random_affine(x: torch.Tensor, degrees: float = 0.0, translate: float = 0.0, scale: float = 0.0) -> torch.Tensor:
    """Rotate by up to `degrees`, shift by up to `translate` of the size, zoom by 1 +- `scale`; float out."""
    if degrees <= 0 and translate <= 0 and scale <= 0:
        return x
    n, dev = x.shape[0], x.device

    def uniform(r: float) -> torch.Tensor:
        return (torch.rand(n, device=dev) * 2 - 1) * r

    angle = uniform(math.radians(degrees))
    zoom = 1 + uniform(scale)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    tx, ty = uniform(2 * translate), uniform(2 * translate)  # grid coordinates span [-1, 1]
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_brightness(x: torch.Tensor, amount: float) -> torch.Tensor:
    """Multiply each sample by a factor in [1 - amount, 1 + amount], clamped to 0..255; float out."""
    if amount <= 0:
        return x
    factor = 1 + (torch.rand(x.shape[0], 1, 1, 1, device=x.device) * 2 - 1) * amount
    return (x.float() * factor).clamp(0, 255)


def augmenter(crop_padding: int = 0, hflip: float = 0.0, rotate: float = 0.0, translate: float = 0.0,
              scale: float = 0.0, brightness: float = 0.0) -> Callable[[torch.Tensor], torch.Tensor]:
    """A batch transform doing the configured augmentations (identity when none are on)."""
    limits = {"crop_padding": (crop_padding, 64), "hflip": (hflip, 1), "rotate": (rotate, 180),
              "translate": (translate, 0.5), "scale": (scale, 0.9), "brightness": (brightness, 1)}
    for name, (value, top) in limits.items():
        if not 0 <= value <= top:
            raise LabError(f"data.augment.{name}={value} must be between 0 and {top}")

    def apply(x: torch.Tensor) -> torch.Tensor:
        x = random_hflip(random_crop(x, crop_padding), hflip)
        return random_brightness(random_affine(x, rotate, translate, scale), brightness)

    return apply


def from_config(options: dict | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """`augmenter(**data.augment)`, with an unknown key refused in one line."""
    options = dict(options or {})
    known = ("crop_padding", "hflip", "rotate", "translate", "scale", "brightness")
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise LabError(f"data.augment.{unknown[0]} is not an augmentation; use {', '.join(known)}")
    return augmenter(**options)
