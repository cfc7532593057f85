"""What the image tasks that predict many things per image (detection, segmentation) share: one optimizer over
the model's trainable parameters, the model's size in `model.txt` and in the first evaluation's metrics, and
the images of `mode=predict`'s input folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lab import io
from lab.data import IMAGE_SUFFIXES
from lab.errors import LabError
from lab.optim import build_optimizer, build_scheduler
from lab.task import Task


class ImageTask(Task):
    """A task with `self.model`, `self.loader` (batches of (images, targets)) and `self.info`."""

    main_mode = "max"
    progress_keys = ("loss",)

    def describe(self, data_info: dict[str, Any]) -> None:
        """`self.info`: the model's parameters and `data_info`; `model.txt`: the network and its size."""
        params = sum(p.numel() for p in self.model.parameters())
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.info = {"model/params": params, "model/trainable_params": trainable, **data_info}
        if self.ctx.dist.is_main:
            self.ctx.run_dir.mkdir(parents=True, exist_ok=True)
            io.write_text(self.ctx.run_dir / "model.txt",
                          f"{self.model}\n\nparameters: {params:,} (trainable: {trainable:,})\n")

    def log_info_once(self) -> None:
        if "model/params" not in self.ctx.logger.last:  # once per run, a resumed one included
            self.ctx.logger.log(self.info)

    def optimizers(self, total_steps: int | None) -> dict:
        opt = build_optimizer(self.cfg.optimizer, [p for p in self.model.parameters() if p.requires_grad])
        return {"model": (opt, build_scheduler(self.cfg.get("scheduler"), opt, total_steps))}

    def train_data(self) -> Any:
        return self.loader

    def samples_in(self, batch: Any) -> int:
        return len(batch[0])


def augment_steps(spec: Any, keys: tuple[str, ...], channels: int, family: str) -> tuple[dict, list, list]:
    """`data.augment` checked against `keys`, and the torchvision.transforms.v2 steps both families share:
    (spec, colour steps that go first, geometric steps that go last: flips and quarter turns)."""
    from torchvision.transforms import v2

    spec = dict(spec or {})
    unknown = sorted(set(spec) - set(keys))
    if unknown:
        raise LabError(f"data.augment has unknown keys {unknown}; {family} takes {', '.join(keys)}")
    first: list[Any] = []
    if spec.get("photometric"):
        if channels != 3:
            raise LabError("data.augment.photometric needs RGB images (data.channels=3)")
        first.append(v2.RandomPhotometricDistort(p=float(spec["photometric"])))
    last: list[Any] = []
    if spec.get("hflip"):
        last.append(v2.RandomHorizontalFlip(float(spec["hflip"])))
    if spec.get("vflip"):
        last.append(v2.RandomVerticalFlip(float(spec["vflip"])))
    if spec.get("rotate90"):  # a quarter, half or three-quarter turn: boxes and masks stay exact
        turns = [v2.RandomRotation((a, a), expand=True) for a in (90, 180, 270)]
        last.append(v2.RandomApply([v2.RandomChoice(turns)], p=float(spec["rotate90"])))
    return spec, first, last


def input_images(folder: Path | str) -> list[Path]:
    """The image files of `mode=predict`'s `input=DIR` (other files ignored), sorted; one line when there are none."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise LabError(f"input={folder} is not a folder; pass input=DIR, a folder of images")
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise LabError(f"input={folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files
