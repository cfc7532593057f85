"""The run logger: metrics.jsonl, W&B offline, media files, resume trimming, secrets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from conftest import SMALL, lab_env, run_lab
from lab.logger import RunLogger, wandb_key_configured


def test_metrics_media_and_resume_trimming(tmp_path: Path) -> None:
    log = RunLogger(OmegaConf.create({"backend": "none"}), tmp_path, {})
    log.start()
    for step in (1, 2, 3):
        log.log({"train/loss": torch.tensor(1.0 / step), "eval/x": float("nan")}, step=step)
    log.step = 3
    img = log.log_image("eval/grid", torch.rand(3, 16, 16))
    vid = log.log_video("eval/video", np.zeros((5, 16, 16, 3), dtype=np.uint8), fps=5)
    grid = log.log_grid("eval/samples", torch.rand(10, 1, 8, 8), nrow=5)
    from PIL import Image

    assert Image.open(grid).size == (5 * 10 + 2, 2 * 10 + 2)  # 5 x 2 tiles of 8 px with 2 px padding
    tab = log.log_table("eval/table", ["a", "b"], [[1, "x"], [2, "y"]])
    log.finish()
    assert img.stat().st_size > 0 and vid.stat().st_size > 0 and img.name == "eval_grid_00000003.png"
    assert tab.read_text().splitlines() == ["a,b", "1,x", "2,y"]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[0]["eval/x"] == "nan"
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "train/lo')  # a torn line from a killed process
    log = RunLogger(OmegaConf.create({"backend": "none"}), tmp_path, {})
    log.start(resume_step=2)
    log.finish()
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert log.last["train/loss"] == 0.5


def test_wandb_offline_media_and_resume_id(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = OmegaConf.create({"backend": "wandb", "project": "t", "init_timeout": 30})
    log = RunLogger(cfg, tmp_path, {"lr": 0.1})
    log.start()
    log.log({"train/loss": 1.0}, step=1)
    log.log_image("eval/img", np.zeros((8, 8, 3), dtype=np.uint8))
    log.log_video("eval/video", np.zeros((4, 16, 16, 3), dtype=np.uint8), fps=4)
    run_id = log.run_id
    log.finish()
    assert run_id and len(list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))) == 1
    log = RunLogger(cfg, tmp_path, {"lr": 0.1})
    log.start(resume_step=1, run_id=run_id)
    assert log.run_id == run_id
    log.finish()


def test_key_detection(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert not wandb_key_configured()
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    os.chmod(tmp_path / "netrc", 0o600)
    assert wandb_key_configured()


def test_api_key_never_reaches_the_run_directory(tmp_path: Path) -> None:
    secret = "0123456789abcdef0123456789abcdef01234567"
    env = lab_env(tmp_path, WANDB_API_KEY=secret, WANDB_MODE="offline")
    run_dir = tmp_path / "run"
    p = run_lab(tmp_path, "+experiment=mnist_cnn", "trainer.max_steps=5", f"hydra.run.dir={run_dir}",
                *[a for a in SMALL if a != "logger=none"], env=env)
    assert p.returncode == 0, p.stderr
    assert list((run_dir / "wandb").glob("offline-run-*"))
    for f in run_dir.rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f
    assert secret not in p.stdout + p.stderr


def test_wandb_failure_falls_back_to_offline_within_the_timeout(tmp_path: Path, monkeypatch) -> None:
    import time

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef0123456789abcdef01234567")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there: init cannot reach W&B
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = OmegaConf.create({"backend": "wandb", "project": "t", "mode": "online", "init_timeout": 5})
    log = RunLogger(cfg, tmp_path, {})
    t0 = time.perf_counter()
    log.start()
    assert time.perf_counter() - t0 < 60
    assert log.wandb is not None and log.wandb.settings.mode == "offline"
    log.log({"train/loss": 1.0}, step=1)
    log.finish()
    assert (tmp_path / "metrics.jsonl").read_text().count("train/loss") == 1


def test_wandb_charts_use_the_task_step_axis_and_checkpoints_become_artifacts(tmp_path: Path, monkeypatch) -> None:
    """An agent's charts are against env_steps, the main metric's summary keeps its best value, and
    `logger.log_checkpoints=true` uploads checkpoints (here: a recording stand-in for the W&B run)."""
    calls: list[tuple] = []

    class Recorder:
        id = "abc123"

        def define_metric(self, name, **kw):
            calls.append(("define_metric", name, kw))

        def log_artifact(self, art, aliases):
            calls.append(("log_artifact", art.type, [f.path for f in art.manifest.entries.values()], aliases))

    monkeypatch.setattr(RunLogger, "_start_wandb", lambda self, run_id: setattr(self, "wandb", Recorder()))
    cfg = OmegaConf.create({"backend": "wandb", "group": "dqn_pong", "log_checkpoints": True})
    log = RunLogger(cfg, tmp_path, {})
    log.start(step_metric="env_steps", main_metric="eval/episode_return", main_mode="max")
    log.run_id = log.wandb.id
    ckpt = tmp_path / "last.pt"
    torch.save({"w": torch.zeros(2)}, ckpt)
    log.log_checkpoint(ckpt, ["latest"])
    log.log_checkpoint(tmp_path / "missing.pt", ["best"])  # nothing to upload: skipped
    assert ("define_metric", "*", {"step_metric": "env_steps"}) in calls
    assert ("define_metric", "eval/episode_return", {"step_metric": "env_steps", "summary": "max"}) in calls
    assert [c for c in calls if c[0] == "log_artifact"] == [("log_artifact", "model", ["last.pt"], ["latest"])]
    log.wandb = None
    log.finish()


def test_overlays_save_the_drawn_png_and_give_wandb_raw_images_with_boxes_and_masks(tmp_path: Path,
                                                                                     monkeypatch) -> None:
    """log_overlay: the file is the drawn image; W&B gets each raw image as a wandb.Image with its native box
    overlays (a recording stand-in for the W&B run); a malformed overlay is skipped, not fatal."""
    import wandb

    from vision.detection import wandb_boxes

    logged: list[dict] = []

    class Recorder:
        id = "xyz"

        def define_metric(self, name, **kw):
            pass

        def log(self, row):
            logged.append(row)

    monkeypatch.setattr(RunLogger, "_start_wandb", lambda self, run_id: setattr(self, "wandb", Recorder()))
    log = RunLogger(OmegaConf.create({"backend": "wandb"}), tmp_path, {})
    log.start()
    log.step = 7
    raw = torch.zeros(1, 16, 16, dtype=torch.uint8)
    boxes = {"predictions": wandb_boxes(torch.tensor([[2.0, 3.0, 9.0, 12.0]]), torch.tensor([1]), ("a", "b"),
                                        torch.tensor([0.75])),
             "ground_truth": wandb_boxes(torch.tensor([[2.0, 3.0, 10.0, 12.0]]), torch.tensor([1]), ("a", "b"))}
    drawn = torch.full((3, 16, 32), 255, dtype=torch.uint8)
    path = log.log_overlay("eval/detections", drawn, [{"image": raw, "boxes": boxes, "caption": "scene 0"}])
    from PIL import Image

    assert path.name == "eval_detections_00000007.png" and Image.open(path).size == (32, 16)
    (row,) = logged
    (image,) = row["eval/detections"]
    assert row["step"] == 7 and isinstance(image, wandb.Image) and set(image._boxes) == {"predictions",
                                                                                          "ground_truth"}
    bad = log.log_overlay("eval/bad", drawn, [{"image": raw, "boxes": {"p": {"box_data": [{"position": {}}]}}}])
    assert bad.exists() and len(logged) == 1  # W&B refused the overlay: the file is kept, the run goes on
    from vision.segmentation import wandb_masks  # segmentation: W&B's mask overlays, each class named

    truth = torch.zeros(16, 16, dtype=torch.uint8)
    truth[2:9, 3:7], truth[0, 0] = 2, 255
    log.log_overlay("eval/segmentations", drawn, [{"image": raw, "masks": wandb_masks(truth.clone(), truth,
                                                                                      ("bg", "a", "b"))}])
    (masked,) = logged[-1]["eval/segmentations"]
    assert isinstance(masked, wandb.Image) and set(masked._masks) == {"predictions", "ground_truth"}
    assert masked._masks["ground_truth"]._val["class_labels"] == {0: "bg", 1: "a", 2: "b", 255: "ignore"}
    log.wandb = None
    log.finish()
