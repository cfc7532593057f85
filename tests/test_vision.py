"""The vision zoo: every model's shapes, training through the CLI, optimizers and schedules, transfer learning,
XOR, image folders and CIFAR-100 end to end."""

from __future__ import annotations

import json
import math
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from omegaconf import OmegaConf

from conftest import DATA, REPO, lab_env, run_lab
from lab.config import build
from lab.errors import LabError
from lab.optim import build_scheduler
from vision import transfer
from vision.resnet import resnet18
from vision.vgg import VGG

MODELS = sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml")  # the classifiers (vision/); detectors,
                if "_target_: vision." in p.read_text()                   # segmenters and captioners: their own
                and not re.search(r"vision\.(detectors|segmenters|captioners)\.", p.read_text()))  # test files
OPTIMIZERS = sorted(p.stem for p in (REPO / "conf" / "optimizer").glob("*.yaml")  # torch's (lbfgs: the lab's
                    if "_target_: torch.optim." in p.read_text())                   # one-step L-BFGS for images)
TINY = ["logger=none", "trainer.progress=false", "trainer.num_threads=1", "data.subset=64", "data.test_subset=64",
        "data.batch_size=16", "data.eval_batch_size=64"]


def model_from_conf(name: str, in_channels: int, num_classes: int, image_size: int) -> torch.nn.Module:
    cfg, _ = transfer.split_config(OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml"))
    return build(cfg, "model", in_channels=in_channels, num_classes=num_classes, image_size=image_size)


def summaries(sweep_dir: Path, n: int) -> list[dict]:
    return [json.loads((sweep_dir / str(i) / "summary.json").read_text()) for i in range(n)]


def test_the_zoo_is_complete() -> None:
    wanted = {"mlp", "deep_cnn", "googlenet", "resnet18", "resnet34", "resnet50", "resnet20", "resnet56",
              *(f"vgg{d}{bn}" for d in (11, 13, 16, 19) for bn in ("", "_bn"))}
    assert wanted == set(MODELS)
    assert {"sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw"} == set(OPTIMIZERS)


@pytest.mark.parametrize("name", MODELS)
def test_every_model_gives_logits_for_grey_28_and_colour_32(name: str) -> None:
    torch.manual_seed(0)
    for c, size, classes in ((1, 28, 10), (3, 32, 100)):
        model = model_from_conf(name, c, classes, size).eval()
        with torch.no_grad():
            out = model(torch.randn(2, c, size, size))
        assert out.shape == (2, classes) and torch.isfinite(out).all()


def test_paper_sizes_and_he_initialisation() -> None:
    counts = {n: sum(p.numel() for p in model_from_conf(n, 3, 10, 32).parameters()) for n in ("resnet20", "resnet56")}
    assert round(counts["resnet20"] / 1e6, 2) == 0.27 and round(counts["resnet56"] / 1e6, 2) == 0.85  # He et al.
    torch.manual_seed(0)
    vgg = model_from_conf("vgg16", 3, 10, 32)
    conv = vgg.features[2]  # 64 -> 64, 3x3, a ReLU follows: std sqrt(2 / fan_out)
    assert abs(conv.weight.std().item() / math.sqrt(2 / (64 * 9)) - 1) < 0.05
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in model_from_conf("vgg16", 1, 10, 28).features) == 4


# One model of each architecture and block kind. The other depths (resnet34, resnet56, vgg13-19 with and
# without BN) differ only in their block lists: every model's forward is checked in-process above.
CLI_MODELS = ["deep_cnn", "googlenet", "mlp", "resnet18", "resnet20", "resnet50", "vgg11", "vgg11_bn"]


def test_every_kind_of_model_trains_through_the_cli(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    p = run_lab(tmp_path, "-m", "+experiment=classify", f"model={','.join(CLI_MODELS)}", *TINY, "trainer.max_steps=2",
                "data.batch_size=4", "data.test_subset=16", f"hydra.sweep.dir={sweep}", timeout=400)
    assert p.returncode == 0, p.stderr[-2000:]
    assert set(CLI_MODELS) <= set(MODELS)
    for name, summary in zip(CLI_MODELS, summaries(sweep, len(CLI_MODELS))):
        assert summary["step"] == 2 and summary["status"] == "completed", name
        assert math.isfinite(summary["train/loss"]) and 0 <= summary["eval/accuracy"] <= 1, name
        assert summary["model/params"] > 0
    run = sweep / "0"
    assert {"curves_00000002.png", "eval_confusion_matrix_00000002.png", "eval_confusion_matrix_00000002.csv",
            "eval_misclassified_00000002.png"} <= {f.name for f in (run / "media").iterdir()}
    rows = (run / "media" / "eval_confusion_matrix_00000002.csv").read_text().splitlines()
    assert len(rows) == 11 and sum(int(v) for r in rows[1:] for v in r.split(",")[1:]) == 16  # every test image
    assert "parameters:" in (run / "model.txt").read_text()


def test_each_optimizer_config_learns_with_a_one_cycle_schedule() -> None:
    """Every conf/optimizer/*.yaml, as classify uses it (one-cycle peak = its lr), trains an MLP on Fashion-MNIST."""
    from lab import data
    from lab.optim import build_optimizer
    from vision.mlp import MLP

    cfg = {"name": "fashion_mnist", "root": str(DATA), "download": False, "subset": 1500, "test_subset": 500}
    train, test = data.from_config(cfg, "train"), data.from_config(cfg, "test")
    norm = data.normalizer(train.spec.mean, train.spec.std, "cpu")
    for name in OPTIMIZERS:
        torch.manual_seed(0)
        model = MLP(1, 10, 28)
        root = OmegaConf.create({"optimizer": OmegaConf.load(REPO / "conf" / "optimizer" / f"{name}.yaml"),
                                 "scheduler": {"name": "onecycle"}})  # peaks at optimizer.lr
        opt = build_optimizer(root.optimizer, model.parameters())
        sched = build_scheduler(root.scheduler, opt, 60)
        for x, y in data.TensorLoader(train.images, train.labels, 50, transform=norm):
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            sched.step()
        accuracy = (model(norm(test.images)).argmax(1) == test.labels).float().mean().item()
        assert type(opt).__name__ == root.optimizer._target_.split(".")[-1]
        assert accuracy > 0.6, (name, accuracy)  # chance is 0.1; 30 steps


def test_schedules_warmup_milestones_and_no_momentum_for_plain_sgd() -> None:
    def lrs(cfg: dict, **opt) -> tuple[list[float], torch.optim.Optimizer]:
        optim = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, **opt)
        sched = build_scheduler(OmegaConf.create(cfg), optim, 100)
        out = []
        for _ in range(100):
            out.append(optim.param_groups[0]["lr"])
            optim.step()
            sched.step()
        return out, optim

    cos, _ = lrs({"name": "cosine", "warmup": 0.1})
    assert cos[0] == pytest.approx(1e-3) and max(cos) == pytest.approx(0.1) and cos.index(max(cos)) == 10
    assert cos[-1] < 1e-3
    step, _ = lrs({"name": "step", "milestones": [0.5, 0.75]})
    assert step[49] == pytest.approx(0.1) and step[50] == pytest.approx(0.01) and step[75] == pytest.approx(0.001)
    one, plain = lrs({"name": "onecycle"})  # peaks at the optimizer's lr
    assert max(one) == pytest.approx(0.1, rel=1e-3) and plain.param_groups[0]["momentum"] == 0  # stays plain SGD
    _, heavy = lrs({"name": "onecycle", "pct_start": 0.5}, momentum=0.9)
    assert heavy.param_groups[0]["momentum"] == pytest.approx(0.95, rel=1e-3)  # cycled back up at the end
    with pytest.raises(LabError, match="unknown"):
        lrs({"name": "exponential"})
    with pytest.raises(LabError, match="peaks at optimizer.lr"):  # the old spelling is refused, not ignored
        lrs({"name": "onecycle", "max_lr": 0.1})


def test_xor_needs_a_hidden_layer(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    p = run_lab(tmp_path, "-m", "+experiment=xor_mlp", "model.hidden=[8],[]", f"hydra.sweep.dir={sweep}")
    assert p.returncode == 0, p.stderr[-2000:]
    hidden, linear = summaries(sweep, 2)
    assert hidden["eval/accuracy"] == 1.0 and hidden["eval/loss"] < 0.05
    assert linear["best/eval/accuracy"] <= 0.75  # no line separates XOR: at most 3 of 4 points


# ---- transfer learning ------------------------------------------------------------------------

def test_torchvision_state_dicts_load_by_path_and_the_head_is_new(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tv = torchvision.models.vgg11(weights=None)
    torch.save(tv.features.state_dict(), tmp_path / "vgg11_features.pth")  # one part of a model
    ours = VGG(11, in_channels=3, num_classes=7, image_size=32)
    loaded = transfer.load_pretrained(ours, str(tmp_path / "vgg11_features.pth"))
    assert len(loaded) == 16 and torch.equal(ours.features[0].weight, tv.features[0].weight)
    tv_resnet = torchvision.models.resnet18(weights=None)
    torch.save(tv_resnet.state_dict(), tmp_path / "resnet18.pth")  # a whole model: all but the fc head load
    net = resnet18(3, 5, 32, stem="imagenet")
    loaded = transfer.load_pretrained(net, str(tmp_path / "resnet18.pth"))
    assert "fc.weight" not in loaded and torch.equal(net.layer4[1].conv2.weight, tv_resnet.layer4[1].conv2.weight)
    assert net.fc.out_features == 5 and torch.equal(net.bn1.running_var, tv_resnet.bn1.running_var)


def test_mismatched_state_dicts_are_refused_in_one_line(tmp_path: Path) -> None:
    torch.save(torchvision.models.vgg16(weights=None).features.state_dict(), tmp_path / "vgg16.pth")
    with pytest.raises(LabError, match="does not fit VGG: it has 'features.2.weight'.*choose the model") as e:
        transfer.load_pretrained(VGG(11), str(tmp_path / "vgg16.pth"))
    assert "\n" not in str(e.value)
    with pytest.raises(LabError, match=r"features.0.weight is \[64, 3, 3, 3\].*\[64, 1, 3, 3\].*data.channels"):
        transfer.load_pretrained(VGG(16, in_channels=1), str(tmp_path / "vgg16.pth"))
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(LabError, match="conv1.weight.*model.stem=imagenet"):
        transfer.load_pretrained(resnet18(3, 10, 32), str(tmp_path / "r18.pth"))  # the small 3x3 stem

    class Evil:
        def __reduce__(self):
            return (print, ("this ran",))

    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(LabError, match="not a loadable state dict"):
        transfer.load_pretrained(VGG(16), str(tmp_path / "evil.pth"))  # weights_only: no code runs
    with pytest.raises(LabError, match="not a file"):
        transfer.load_pretrained(VGG(16), str(tmp_path / "missing.pth"))


def test_freezing_leaves_gradients_only_in_the_head() -> None:
    net = resnet18(1, 10, 28)
    frozen_bn = transfer.freeze_backbone(net)
    net(torch.randn(4, 1, 28, 28)).sum().backward()
    assert net.fc.weight.grad is not None and net.fc.bias.grad is not None
    assert all(p.grad is None and not p.requires_grad for n, p in net.named_parameters() if not n.startswith("fc."))
    assert len(frozen_bn) == 20  # every BatchNorm of the backbone: kept in eval mode by the task


def test_transfer_through_the_cli_with_the_hed_vgg16_file(tmp_path: Path) -> None:
    """The experiment's file loads by path; frozen, the backbone leaves training exactly as loaded."""
    weights = DATA / "weights" / "vgg16_hed_features.pth"
    if not weights.is_file():
        pytest.skip(f"{weights} is not here (see the data README)")
    run = tmp_path / "run"
    p = run_lab(tmp_path, "+experiment=fashion_transfer", "model.freeze=true", *TINY, "data.test_subset=8",
                "trainer.max_steps=3", "data.batch_size=8", f"hydra.run.dir={run}", timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "loaded 26 tensors" in p.stdout
    file = torch.load(weights, weights_only=True)
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["task"]
    assert all(torch.equal(state[f"model.features.{k}"], v) for k, v in file.items())  # trained 3 steps, unchanged
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model/trainable_params"] == 512 * 512 + 512 + 512 * 10 + 10  # the new head only
    assert summary["model/params"] == summary["model/trainable_params"] + sum(v.numel() for v in file.values())


# ---- data sets end to end ----------------------------------------------------------------------

def test_image_folder_end_to_end(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls, channel in (("red", 0), ("blue", 2)):
        (tmp_path / "flowers" / cls).mkdir(parents=True)
        for i in range(30):
            a = rng.integers(0, 60, (20, 24, 3), dtype=np.uint8)
            a[..., channel] = 200
            Image.fromarray(a).save(tmp_path / "flowers" / cls / f"{i}.png")
    run = tmp_path / "run"
    p = run_lab(tmp_path, "+experiment=classify", "model=mlp", "data=folder", f"data.path={tmp_path / 'flowers'}",
                "data.image_size=16", "data.test_fraction=0.2", "data.batch_size=8", "logger=none",
                "trainer.progress=false", "trainer.max_epochs=3", f"hydra.run.dir={run}")
    assert p.returncode == 0, p.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval/accuracy"] == 1.0  # red against blue; 12 held-out images
    last = sorted((run / "media").glob("eval_confusion_matrix_*.csv"))[-1].read_text().splitlines()
    assert last[0].endswith(",blue,red")  # classes: the sub-folders, sorted
    counts = [[int(v) for v in row.split(",")[1:]] for row in last[1:]]
    assert counts[0][1] == counts[1][0] == 0 and counts[0][0] + counts[1][1] == 12


def test_cifar100_end_to_end_on_files_in_its_format(tmp_path: Path) -> None:
    folder = tmp_path / "data" / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 64), ("test", 32)):
        with open(folder / split, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"batch_label": b"x",
                         b"fine_labels": rng.integers(0, 100, n).tolist(), b"coarse_labels": [0] * n,
                         b"filenames": []}, f, protocol=2)
    run = tmp_path / "run"
    p = run_lab(tmp_path, "+experiment=classify", "model=resnet20", "data=cifar100", "data.batch_size=16",
                "data.augment.crop_padding=4", "logger=none", "trainer.progress=false", "trainer.max_steps=4",
                f"hydra.run.dir={run}", env=lab_env(tmp_path, LAB_DATA_DIR=str(tmp_path / "data")))
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads((run / "summary.json").read_text())["step"] == 4
    assert len((run / "media" / "eval_confusion_matrix_00000004.csv").read_text().splitlines()) == 101
