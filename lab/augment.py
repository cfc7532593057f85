"""Batched data augmentation on the training device: each sample gets its own random draw."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def augmenter(crop_padding: int = 0, hflip: float = 0.0):
    """A batch transform doing the configured augmentations (identity when none are on)."""

    def apply(x: torch.Tensor) -> torch.Tensor:
        return random_hflip(random_crop(x, crop_padding), hflip)

    return apply
