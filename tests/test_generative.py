"""Generative experiments through the CLI on small data, the FID code, neural style with random weights."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import DATA, lab_env, read_metrics, run_lab, run_lab_cases
from generative.fid import FID, frechet_distance
from generative.neural_style import StepLBFGS
from lab import data

FAST = ["logger=none", "trainer.progress=false", "trainer.num_threads=1", "trainer.log_every=2"]
TINY_GAN = ["gan.ngf=8", "gan.ndf=8", "gan.grid_samples=16", "data.batch_size=32", "fid.n_fake=200",
            "fid.n_real=200", "fid.epochs=1", "fid.hidden=16", "data.test_subset=200", "fid.batch_size=50"]


def _env(tmp_path: Path) -> dict[str, str]:
    return lab_env(tmp_path, OMP_NUM_THREADS="1")


def _ok(result) -> None:
    assert result.returncode == 0, result.stderr[-3000:]


def _finite(rows: list[dict], key: str) -> list[float]:
    values = [r[key] for r in rows if key in r]
    assert values and all(isinstance(v, float) and math.isfinite(v) for v in values), (key, values)
    return values


def test_dcgan_mnist_trains_logs_samples_fid_animation_and_generates(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _ok(run_lab(tmp_path, "+experiment=dcgan_mnist", *FAST, *TINY_GAN, "data.subset=256",
                "trainer.max_epochs=2", f"hydra.run.dir={run}", env=_env(tmp_path)))
    rows = read_metrics(run)
    for key in ("train/loss_d", "train/loss_g", "train/d_real", "eval/fid"):
        _finite(rows, key)
    assert len([r for r in rows if "eval/fid" in r]) == 2  # one per epoch
    assert len(list((run / "media").glob("samples_*.png"))) == 2
    with Image.open(run / "samples.gif") as gif:
        assert gif.n_frames == 2 and gif.size == (8 * 34 + 2, 2 * 34 + 2)  # 16 samples of 32 px, 8 a row
    summary = json.loads((run / "summary.json").read_text())
    assert summary["main_metric"] == "eval/fid" and summary["best/eval/fid"] == min(_finite(rows, "eval/fid"))
    assert (run / "checkpoints" / "best.pt").is_file()

    gen = tmp_path / "gen"
    _ok(run_lab(tmp_path, "+experiment=dcgan_mnist", *FAST, *TINY_GAN, "mode=generate", "n=9",
                f"checkpoint={run / 'checkpoints' / 'last.pt'}", f"hydra.run.dir={gen}", env=_env(tmp_path)))
    with Image.open(gen / "generated.png") as im:
        assert im.size == (3 * 34 + 2, 3 * 34 + 2)  # 9 samples in a 3x3 grid
        assert np.asarray(im).std() > 5  # not a blank image
    assert json.loads((gen / "summary.json").read_text())["status"] == "generated"

    bad = run_lab(tmp_path, "+experiment=vae_mnist", *FAST, "data.subset=256", "mode=generate",
                  f"checkpoint={run / 'checkpoints' / 'last.pt'}", f"hydra.run.dir={tmp_path / 'bad'}",
                  env=_env(tmp_path))
    assert bad.returncode == 2 and "does not fit" in bad.stderr and "Traceback" not in bad.stderr
    bad = run_lab(tmp_path, "+experiment=mnist_cnn", *FAST, "mode=generate", "checkpoint=x.pt", env=_env(tmp_path))
    assert bad.returncode == 2 and "no generate(n)" in bad.stderr
    bad = run_lab(tmp_path, "+experiment=dcgan_mnist", *FAST, "data.subset=256", "fid.seed=abc",
                  f"hydra.run.dir={tmp_path / 'bad_seed'}", env=_env(tmp_path))
    assert bad.returncode == 2 and "fid.seed='abc' must be an integer" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad_seed" / "metrics.jsonl").exists()  # refused before training


def _write_cifar(root: Path, n: int) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:  # CIFAR's own format: a pickled dict with bytes keys
            pickle.dump({b"labels": rng.integers(0, 10, n).tolist(),
                         b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}, f, protocol=2)


def _write_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    for c in ("cats", "dogs"):
        (root / c).mkdir(parents=True)
        for i in range(40):
            Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


@pytest.mark.parametrize("experiment", ["dcgan_fashion_mnist", "dcgan_cifar10", "dcgan_folder"])
def test_other_dcgan_experiments_train_a_few_steps(tmp_path: Path, experiment: str) -> None:
    extra = ["data.subset=128"]
    if experiment == "dcgan_cifar10":
        _write_cifar(tmp_path / "cifar", 64)
        extra = [f"data.root={tmp_path / 'cifar'}", "data.download=false"]
    if experiment == "dcgan_folder":
        _write_folder(tmp_path / "pets")
        extra = [f"data.path={tmp_path / 'pets'}", "data.test_fraction=0.25", "gan.image_size=32"]
    run = tmp_path / "run"
    _ok(run_lab(tmp_path, f"+experiment={experiment}", *FAST, *TINY_GAN, "trainer.max_steps=2", *extra,
                f"hydra.run.dir={run}", env=_env(tmp_path)))
    rows = read_metrics(run)
    _finite(rows, "train/loss_g")
    _finite(rows, "eval/fid")
    with Image.open(next((run / "media").glob("samples_*.png"))) as im:
        assert im.size == (8 * 34 + 2, 2 * 34 + 2) and np.asarray(im).std() > 1


def test_dcgan_folder_needs_a_path(tmp_path: Path) -> None:
    result = run_lab(tmp_path, "+experiment=dcgan_folder", *FAST, env=_env(tmp_path))
    assert result.returncode == 2 and "data.path" in result.stderr and "Traceback" not in result.stderr


def test_vae_loss_falls_and_logs_its_images_and_probe(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _ok(run_lab(tmp_path, "+experiment=vae_mnist", *FAST, "model.latent_dim=2", "data.subset=2000",
                "data.test_subset=500", "trainer.max_epochs=2", "data.batch_size=64", f"hydra.run.dir={run}",
                env=_env(tmp_path)))
    rows = read_metrics(run)
    train = _finite(rows, "train/loss")
    evals = _finite(rows, "eval/loss")
    assert np.mean(train[-3:]) < 0.75 * train[0] and evals[-1] < evals[0]
    assert 100 < evals[-1] < 400  # nats per 28x28 image (untrained: about 543 = 784 ln 2)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval/loss"] == pytest.approx(summary["eval/reconstruction"] + summary["eval/kl"], rel=1e-5)
    assert 0.2 < summary["eval/probe_accuracy_codes"] <= 1 and 0.5 < summary["eval/probe_accuracy_pixels"] <= 1
    for name in ("reconstructions", "samples", "latent_space"):
        assert len(list((run / "media").glob(f"{name}_*.png"))) == 2, name

    gen = tmp_path / "gen"
    _ok(run_lab(tmp_path, "+experiment=vae_mnist", *FAST, "model.latent_dim=2", "data.subset=2000", "n=4",
                "mode=generate", f"checkpoint={run / 'checkpoints' / 'best.pt'}", f"hydra.run.dir={gen}",
                env=_env(tmp_path)))
    with Image.open(gen / "generated.png") as im:
        assert im.size == (2 * 30 + 2, 2 * 30 + 2)


@pytest.mark.parametrize("experiment", ["autoencoder_mnist", "autoencoder_fashion_mnist", "vae_fashion_mnist"])
def test_autoencoder_experiments_train_a_few_steps(tmp_path: Path, experiment: str) -> None:
    run = tmp_path / "run"
    _ok(run_lab(tmp_path, f"+experiment={experiment}", *FAST, "data.subset=500", "data.test_subset=200",
                "trainer.max_steps=6", "probe.max_iter=10", f"hydra.run.dir={run}", env=_env(tmp_path)))
    summary = json.loads((run / "summary.json").read_text())
    assert math.isfinite(summary["eval/loss"]) and ("eval/kl" in summary) == experiment.startswith("vae")
    assert 0 <= summary["eval/probe_accuracy_codes"] <= 1
    for name in ("reconstructions", "samples", "latent_space"):
        assert list((run / "media").glob(f"{name}_*.png")), name


def test_neural_style_loss_falls_with_random_weights(tmp_path: Path) -> None:
    images, run = DATA / "images", tmp_path / "run"
    common = ["+experiment=neural_style", *FAST, f"style.content={images / 'chelsea.png'}",
              f"style.style={images / 'scream.jpg'}", "style.size=32", "model.arch=vgg16"]
    _ok(run_lab(tmp_path, *common, "model.random_init=true", "style.steps=12", "trainer.eval_every=6",
                f"hydra.run.dir={run}", env=_env(tmp_path)))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval/initial_content_loss"] == 0  # the optimisation starts from the content image
    # L-BFGS without line search (the recipe) descends on its first steps; later ones may overshoot, and where
    # depends on the CPU's arithmetic (AVX512-BF16 and AVX2 diverge at different steps): Adam shows the fall.
    train = _finite(read_metrics(run), "train/loss")
    assert all(b < a for a, b in zip(train[:6], train[1:6])), train
    adam = tmp_path / "adam"
    _ok(run_lab(tmp_path, *common, "model.random_init=true", "style.steps=20", "trainer.eval_every=20",
                "optimizer=adam", "optimizer.lr=0.02", "trainer.precision=32", f"hydra.run.dir={adam}",
                env=_env(tmp_path)))
    adam_summary = json.loads((adam / "summary.json").read_text())
    assert adam_summary["eval/loss"] < 0.5 * adam_summary["eval/initial_loss"]
    with Image.open(run / "stylized.png") as im:
        assert im.size == (32, 21) and im.mode == "RGB"  # chelsea is 451x300: longer side 32
    assert len(list((run / "media").glob("stylized_*.png"))) == 2  # the progression: steps 6 and 12

    refusals = {("model.weights=null",): "model.random_init=true",
                (f"model.weights={tmp_path / 'none.pth'}",): "does not exist",
                ("model.random_init=true", "style.content=nothing.png"): "style.content"}
    results = run_lab_cases(tmp_path, [[*common, *args] for args in refusals])
    for needle, result in zip(refusals.values(), results):
        assert result.returncode == 2 and needle in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_step_lbfgs_gives_the_iterates_of_lbfgs_with_a_closure() -> None:
    """One trainer step per L-BFGS iteration (gradient from the trainer's backward) follows the same path as
    `LBFGS.step(closure)` with max_iter=N and no line search, the PyTorch tutorial's setting."""
    def f(x: torch.Tensor) -> torch.Tensor:
        return (1 - x[0]) ** 2 + 10 * (x[1] - x[0] ** 2) ** 2 + x.square().sum()

    x0 = torch.tensor([-1.2, 1.0, 0.5], dtype=torch.float64)
    ref_x = x0.clone().requires_grad_()
    ref = torch.optim.LBFGS([ref_x], lr=0.5, max_iter=8, history_size=100, line_search_fn=None)

    def closure() -> torch.Tensor:
        ref.zero_grad()
        loss = f(ref_x)
        loss.backward()
        return loss

    ref.step(closure)
    x = x0.clone().requires_grad_()
    opt = StepLBFGS([x], lr=0.5)
    for _ in range(8):
        opt.zero_grad()
        loss = f(x)
        loss.backward()
        opt.loss = loss.item()
        opt.step()
    assert not torch.equal(x.detach(), x0)
    torch.testing.assert_close(x.detach(), ref_x.detach(), rtol=1e-12, atol=1e-12)


def test_frechet_distance_matches_the_closed_form() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 6, generator=g, dtype=torch.float64)
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-8)
    b = a * 2 + 3  # N(3, 4 I) against N(0, I) exactly for these samples: |mu|^2 shift and tr(S) terms
    expected = (b.mean(0) - a.mean(0)).square().sum() + torch.cov(a.T).trace() * (1 + 4 - 2 * 2)
    assert frechet_distance(a, b) == pytest.approx(float(expected), rel=1e-6)


def test_fid_is_about_zero_for_two_halves_of_the_test_set_and_large_for_noise(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    torch.set_num_threads(1)
    train, test = data.load("mnist", "train", DATA), data.load("mnist", "test", DATA)
    cfg = OmegaConf.create({"n_fake": 2000, "n_real": 2000, "epochs": 2, "hidden": 50, "batch_size": 100,
                            "lr": 6e-3, "cache_dir": str(tmp_path)})
    perm = torch.randperm(10_000, generator=torch.Generator().manual_seed(0))[:4000]  # MNIST's test halves differ
    halves, labels = test.images[perm].split(2000), test.labels[perm][:2000]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # as inside the trainer's evaluation
        fid = FID(cfg, {"name": "mnist"}, train.images[:5000], train.labels[:5000], halves[0], labels,
                  (0.1307,), (0.3081,), torch.device("cpu"))
    assert fid.accuracy > 0.8
    other = iter((halves[1].float() / 255).split(500))
    same = fid(lambda n: next(other))
    noise = fid(lambda n: torch.rand(n, 1, 28, 28))
    assert same < 0.02 * noise, (same, noise)
    assert len(list(tmp_path.glob("mnist_28px_*.pt"))) == 1  # cached: a second FID loads it
    again = FID(cfg, {"name": "mnist"}, train.images[:5000], train.labels[:5000], halves[0], labels,
                (0.1307,), (0.3081,), torch.device("cpu"))
    assert again.accuracy == fid.accuracy
    reseeded = FID(OmegaConf.merge(cfg, {"seed": 1}), {"name": "mnist"}, train.images[:5000], train.labels[:5000],
                   halves[0], labels, (0.1307,), (0.3081,), torch.device("cpu"))
    assert len(list(tmp_path.glob("mnist_28px_*.pt"))) == 2  # fid.seed, not the run's seed, keys the classifier
    assert reseeded.accuracy > 0.8
