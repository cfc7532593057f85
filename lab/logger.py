"""Run logging: `metrics.jsonl` always, Weights & Biases when enabled, media as files and in W&B.

W&B never kills or hangs a run: online when a key is configured, offline otherwise (with a
one-line notice), `WANDB_MODE` wins, init is bounded by `logger.init_timeout` and any W&B
failure falls back to offline, then to local files only.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lab import io, media
from lab.errors import LabError


def _notice(msg: str) -> None:
    print(f"[lab] {msg}", file=sys.stderr, flush=True)


def wandb_key_configured() -> bool:
    """True when W&B has an API key: `WANDB_API_KEY` or a `~/.netrc` entry from `wandb login`."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].rstrip("/")
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _scalar(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep them visible as strings
    return v


def _file_stem(key: str, step: int) -> str:
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', key)}_{step:08d}"


class RunLogger:
    """Writes metrics and media of one run. Every method is a no-op on non-zero DDP ranks."""

    def __init__(self, cfg: Any, run_dir: str | Path, config: dict[str, Any], enabled: bool = True):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.config = config
        self.enabled = enabled
        self.step = 0
        self.wandb = None  # the wandb run, when W&B is on
        self.run_id: str | None = None
        self.last: dict[str, Any] = {}
        self.rows = 0  # rows in metrics.jsonl (a checkpoint records it: a resume keeps exactly those)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.media_dir = self.run_dir / "media"
        self._file = None

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self, resume_step: int | None = None, run_id: str | None = None, step_metric: str = "step",
              main_metric: str | None = None, main_mode: str = "max", resume_rows: int | None = None) -> None:
        """Open `metrics.jsonl` and W&B, whose charts use `step_metric` as their x-axis and whose summary keeps the
        best `main_metric` (max or min). On resume, keep the first `resume_rows` rows (what the checkpoint had
        logged; a checkpoint without the count: the rows up to `resume_step`), so each row is there once."""
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.metrics_path.unlink(missing_ok=True)
        elif self.metrics_path.exists():
            lines = [ln for ln in self.metrics_path.read_text().splitlines() if _step_of(ln) != math.inf]
            kept = (lines[:resume_rows] if resume_rows is not None
                    else [ln for ln in lines if _step_of(ln) <= resume_step])
            io.write_text(self.metrics_path, "".join(ln + "\n" for ln in kept))
            for ln in kept:
                self.last.update(json.loads(ln))
            self.rows = len(kept)
        self._file = open(self.metrics_path, "a", buffering=1)
        if self.cfg.get("backend") == "wandb":
            self._start_wandb(run_id)
        if self.wandb is not None:
            try:
                self.wandb.define_metric("step")
                if step_metric != "step":
                    self.wandb.define_metric(step_metric)
                self.wandb.define_metric("*", step_metric=step_metric)
                if main_metric:
                    self.wandb.define_metric(main_metric, step_metric=step_metric, summary=main_mode)
            except Exception as e:  # noqa: BLE001
                _notice(f"W&B define_metric failed ({e}); charts use W&B's own step.")

    def _start_wandb(self, run_id: str | None) -> None:
        import wandb

        # wandb takes the lab's `agents` package for the LLM SDK of that name and suggests Weave tracing
        os.environ.setdefault("WANDB_DISABLE_WEAVE", "true")
        mode = os.environ.get("WANDB_MODE") or self.cfg.get("mode")
        if not mode:
            mode = "online" if wandb_key_configured() else "offline"
            if mode == "offline":
                _notice("W&B: no API key configured, logging offline (upload later with `wandb sync`).")
        kwargs = dict(
            project=self.cfg.get("project"), entity=self.cfg.get("entity"), name=self.cfg.get("name"),
            group=self.cfg.get("group"), tags=list(self.cfg.get("tags") or []), config=self.config,
            dir=str(self.run_dir), id=run_id, resume="allow" if run_id else None,
            settings=wandb.Settings(init_timeout=float(self.cfg.get("init_timeout", 60)), console="off",
                                    silent=True),
        )
        for attempt in dict.fromkeys([mode, "offline"]):
            try:
                self.wandb = wandb.init(mode=attempt, **kwargs)
                break
            except Exception as e:  # noqa: BLE001 - any W&B failure must not stop the run
                _notice(f"W&B init in {attempt} mode failed ({type(e).__name__}: {str(e)[:200]}).")
        if self.wandb is None:
            _notice("W&B is off for this run; metrics are still in metrics.jsonl.")
            return
        self.run_id = self.wandb.id

    def finish(self) -> None:
        if self._file:
            self._file.close()
            self._file = None
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception as e:  # noqa: BLE001
                _notice(f"W&B finish failed ({e}); local files are complete.")
            self.wandb = None

    # ---- metrics ---------------------------------------------------------------------------
    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Append one JSON line `{"step": ..., **metrics}` and send the same to W&B."""
        if not self.enabled:
            return
        step = self.step if step is None else step
        row = {"step": step, **{k: _scalar(v) for k, v in metrics.items()}}
        self.last.update(row)
        if self._file:
            try:
                self._file.write(json.dumps(row) + "\n")
                self.rows += 1
            except OSError as e:
                raise LabError(f"could not append to {self.metrics_path} ({e.strerror or e}); its rows up to the last "
                               "checkpoint are kept: free disk space, then resume=true continues the run") from None
        self._wandb_log(row)

    def _wandb_log(self, row: dict[str, Any]) -> None:
        if self.wandb is None:
            return
        try:
            self.wandb.log(row)
        except Exception as e:  # noqa: BLE001
            _notice(f"W&B log failed ({e}); turning W&B off, local files continue.")
            self.wandb = None

    def summary(self, extra: dict[str, Any]) -> dict[str, Any]:
        """Write `summary.json` atomically: the last value of every metric plus `extra`."""
        out = {**self.last, **{k: _scalar(v) for k, v in extra.items()}}
        if self.enabled:
            io.write_json(self.run_dir / "summary.json", out, hint="the checkpoints and metrics.jsonl are written: "
                          "free disk space, then resume=true writes the summary")
            if self.wandb is not None:
                try:
                    self.wandb.summary.update({k: v for k, v in extra.items() if k.startswith("best/")})
                except Exception:  # noqa: BLE001
                    pass
        return out

    def log_checkpoint(self, path: Path, aliases: list[str]) -> None:
        """Upload a checkpoint as a W&B model artifact when `logger.log_checkpoints=true` (offline: on `wandb sync`)."""
        if self.wandb is None or not self.cfg.get("log_checkpoints") or not Path(path).exists():
            return
        import wandb

        try:
            art = wandb.Artifact(f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', str(self.cfg.get('group') or 'run'))}-"
                                 f"{self.run_id}", type="model", metadata={"file": Path(path).name})
            art.add_file(str(path))
            self.wandb.log_artifact(art, aliases=aliases)
        except Exception as e:  # noqa: BLE001
            _notice(f"W&B checkpoint artifact skipped ({e}); the file is {path}.")

    # ---- media: each is a file in <run_dir>/media and, with W&B on, a W&B media object --------
    def log_image(self, key: str, image: Any, caption: str | None = None, step: int | None = None) -> Path | None:
        """Save an image (matplotlib Figure, HWC/CHW array or tensor, uint8 or float in [0,1])."""
        if not self.enabled:
            return None
        step = self.step if step is None else step
        path = self.media_dir / f"{_file_stem(key, step)}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        if hasattr(image, "savefig"):
            import matplotlib.pyplot as plt

            image.savefig(path, dpi=100, bbox_inches="tight")
            plt.close(image)
        else:
            from PIL import Image

            Image.fromarray(media.to_uint8_hwc(image)).save(path)
        self._media(key, "Image", path, step, caption=caption)
        return path

    def log_overlay(self, key: str, drawn: Any, overlays: list[dict[str, Any]], step: int | None = None) -> Path | None:
        """Save `drawn` (images with their boxes or masks painted in) as the PNG, and give W&B each raw image
        with its native overlays: `overlays` = [{"image": ..., "boxes": ..., "masks": ..., "caption": ...}]
        (`wandb.Image`'s arguments), so classes and scores can be toggled there."""
        if not self.enabled:
            return None
        step = self.step if step is None else step
        path = self.media_dir / f"{_file_stem(key, step)}.png"
        media.save_png(path, drawn)
        if self.wandb is not None:
            import wandb

            try:
                objs = [wandb.Image(media.to_uint8_hwc(o["image"]), boxes=o.get("boxes"), masks=o.get("masks"),
                                    caption=o.get("caption")) for o in overlays]
            except Exception as e:  # noqa: BLE001 - a malformed overlay must not end the run
                _notice(f"W&B overlays for {key} skipped ({e}); the file is {path}.")
                return path
            self._wandb_log({"step": step, key: objs})
        return path

    def log_grid(self, key: str, images: torch.Tensor, nrow: int = 8, caption: str | None = None,
                 step: int | None = None) -> Path | None:
        """Save a batch of images (N, C, H, W; float in [0,1] or uint8) as one tiled PNG."""
        return self.log_image(key, media.grid(images, nrow), caption, step)

    def log_video(self, key: str, frames: Any, fps: int = 30, step: int | None = None) -> Path | None:
        """Save frames (T, H, W, C) uint8 as an mp4."""
        if not self.enabled:
            return None
        import imageio.v2 as imageio

        step = self.step if step is None else step
        path = self.media_dir / f"{_file_stem(key, step)}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        frames = np.asarray(frames, dtype=np.uint8)
        imageio.mimwrite(path, list(frames), fps=fps, macro_block_size=1)
        self._media(key, "Video", path, step, format="mp4")
        return path

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int | None = None,
                  images: list[Any] | None = None) -> Path | None:
        """Save a table as CSV. `images` (one per row: HWC/CHW array or tensor) become a first column of
        `wandb.Image`s in W&B; the CSV keeps the other columns."""
        if not self.enabled:
            return None
        import csv
        import io as stdio

        step = self.step if step is None else step
        path = self.media_dir / f"{_file_stem(key, step)}.csv"
        buf = stdio.StringIO()
        csv.writer(buf).writerows([columns, *rows])
        io.write_text(path, buf.getvalue())
        if self.wandb is not None:
            import wandb

            if images is not None:
                try:
                    columns, rows = ["picture", *columns], [[wandb.Image(media.to_uint8_hwc(x)), *r]
                                                           for x, r in zip(images, rows)]
                except Exception as e:  # noqa: BLE001 - e.g. wandb[media] extras missing
                    _notice(f"W&B images for {key} skipped ({e}); the table goes without them.")
            self._wandb_log({"step": step, key: wandb.Table(columns=columns, data=rows)})
        return path

    def _media(self, key: str, kind: str, path: Path, step: int, **kw: Any) -> None:
        if self.wandb is None:
            return
        import wandb

        try:
            obj = getattr(wandb, kind)(str(path), **kw)
        except Exception as e:  # noqa: BLE001 - e.g. wandb[media] extras missing
            _notice(f"W&B {kind} for {key} skipped ({e}); the file is {path}.")
            return
        self._wandb_log({"step": step, key: obj})


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf  # a torn last line from a killed run is dropped
