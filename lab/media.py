"""Images for files and dashboards: uint8 conversion, PNG grids, GIF animations, and `mode=generate` output."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lab import io


def to_uint8_hwc(image: Any) -> np.ndarray:
    """An image as HWC uint8 for saving: accepts CHW/HWC, tensor/array, float in [0,1] or uint8."""
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu().numpy() if image.dtype != torch.uint8 else image.cpu().numpy()
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = a.transpose(1, 2, 0)
    if a.dtype != np.uint8:
        a = (np.clip(a, 0, 1) * 255).round().astype(np.uint8)
    return a[..., 0] if a.ndim == 3 and a.shape[-1] == 1 else a


def grid(images: torch.Tensor, nrow: int = 8) -> torch.Tensor:
    """A batch (N, C, H, W; float in [0, 1] or uint8) tiled into one (C, H', W') image on white padding."""
    from torchvision.utils import make_grid

    images = images.detach().cpu()
    images = images.float() / 255 if images.dtype == torch.uint8 else images.float().clamp(0, 1)
    return make_grid(images, nrow=nrow, padding=2, pad_value=1.0)


def save_png(path: Path, image: Any) -> None:
    """Write a PNG atomically (any image `to_uint8_hwc` takes)."""
    from PIL import Image

    io.write_atomic(path, lambda f: Image.fromarray(to_uint8_hwc(image)).save(f, format="PNG"), "wb")


def save_animation(path: Path, frames: list[Path], fps: int) -> None:
    """A looping GIF of PNG frames, written atomically (Pillow; no extra dependency)."""
    from PIL import Image

    images = [Image.open(f).convert("RGB") for f in frames]
    io.write_atomic(path, lambda f: images[0].save(f, format="GIF", save_all=True, append_images=images[1:],
                                              duration=int(1000 / fps), loop=0), "wb")


def write_generated(run_dir: Path, logger: Any, images: torch.Tensor) -> dict[str, Any]:
    """`mode=generate`: N new samples in [0, 1] as one square grid, `generated.png` in the run directory (and
    in the logger's media); the summary's entries."""
    n = len(images)
    nrow = int(math.ceil(math.sqrt(n)))
    path = run_dir / "generated.png"
    save_png(path, grid(images, nrow))
    logger.log_grid("generated", images, nrow=nrow)
    return {"generated": str(path), "n": n}
