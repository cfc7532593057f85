"""One config schema: every experiment names its task, family groups sit under their own key, the learning
rate is `optimizer.lr` everywhere and reaches what the run builds, and an override of a key that does not
exist is refused in one line."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DATA, REPO, build_task, compose, run_lab_cases
from lab.cli import describe_experiments, experiments

LR = 1.234e-4  # a learning rate no recipe uses


def _cifar10(root: Path) -> None:
    """A tiny CIFAR-10 in its real on-disk format (python pickles of uint8 rows), for dcgan_cifar10."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        batch = {b"batch_label": b"x", b"labels": rng.integers(0, 10, 16).tolist(),
                 b"data": rng.integers(0, 256, (16, 3072), dtype=np.uint8), b"filenames": []}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))


def _folder(root: Path) -> None:
    """Two classes of 64x64 PNGs, for dcgan_folder."""
    from PIL import Image

    for label, value in (("cats", 40), ("dogs", 200)):
        (root / label).mkdir(parents=True)
        for i in range(16):
            Image.fromarray(np.full((64, 64, 3), value + i, np.uint8)).save(root / label / f"{i}.png")


def _coco_captions(root: Path) -> None:
    """COCO captions in their real layout: annotations/captions_{train,val}2017.json beside train2017/ and val2017/."""
    from PIL import Image

    for split in ("train2017", "val2017"):
        (root / split).mkdir(parents=True)
        images, notes = [], []
        for i in range(4):
            Image.fromarray(np.full((48, 64, 3), 30 * i, np.uint8)).save(root / split / f"{i:012d}.jpg")
            images.append({"id": i, "file_name": f"{i:012d}.jpg", "width": 64, "height": 48})
            notes += [{"id": 10 * i + k, "image_id": i, "caption": f"a grey square number {i} seen {k}"}
                      for k in range(2)]
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"captions_{split}.json").write_text(json.dumps({"images": images,
                                                                                 "annotations": notes}))


def _small(name: str, tmp_path: Path) -> list[str]:
    """Overrides that keep each experiment's build small (data, envs, buffers) without touching its optimizer."""
    if name.startswith(("dqn_", "sb3_")):
        return ["agent.num_envs=1", "agent.train_frequency=4", "agent.buffer_size=2000", "agent.eval_num_envs=1",
                "agent.video=false"]
    if name == "neural_style":
        images = DATA / "images"
        return [f"style.content={images / 'chelsea.png'}", f"style.style={images / 'scream.jpg'}", "style.size=32",
                "model.random_init=true"]
    if name == "xor_mlp":
        return []
    if name in ("text_reuters", "text_20ng", "text_reuters_svm", "text_20ng_svm"):
        return ["data.n_train=64", "data.n_test=64", "data.batch_size=16"]
    if name == "text_folder":  # topic<TAB>text files in their real format
        (tmp_path / "texts").mkdir()
        for split in ("train", "test"):
            (tmp_path / "texts" / f"{split}.txt").write_text("earn\tprofit rose\nacq\tbuys the unit\n")
        return [f"data.path={tmp_path / 'texts'}", "data.batch_size=2"]
    small = ["data.subset=64", "data.test_subset=64", "data.batch_size=16"]
    if name == "dcgan_cifar10":
        _cifar10(tmp_path / "cifar")
        return [*small, f"data.root={tmp_path / 'cifar'}", "data.download=false"]
    if name == "dcgan_folder":
        _folder(tmp_path / "pets")
        return [*small, f"data.path={tmp_path / 'pets'}", "data.test_fraction=0.25"]
    if name == "detect_folder":  # a VOC folder in its real layout, written by `python -m lab scenes`
        from vision import scenes

        assert scenes.main([str(tmp_path / "voc"), "--n", "20", "--size", "64", "--root", str(DATA)]) == 0
        return [f"data.path={tmp_path / 'voc'}", "data.test_fraction=0.25", "data.batch_size=4"]
    if name == "caption_folder":
        _coco_captions(tmp_path / "coco")
        return [f"data.path={tmp_path / 'coco'}", "data.image_size=64", "data.batch_size=2", "data.min_freq=1"]
    if name in ("detect_digits", "segment_digits", "caption_digits"):
        return ["data.n_train=32", "data.n_test=8", "data.batch_size=4"]
    if name == "segment_folder":  # images/ + masks/ in their real layout, written by `python -m lab scenes`
        from vision import scenes

        assert scenes.main([str(tmp_path / "seg"), "--n", "12", "--size", "64", "--overlap", "--root", str(DATA)]) == 0
        return [f"data.path={tmp_path / 'seg'}", "data.num_classes=11", "data.channels=1", "data.test_fraction=0.25",
                "data.batch_size=4", "data.crop_size=null"]
    return small


def _peak(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate the optimizer was configured with: a one-cycle schedule's peak, a warm-up's target,
    or the plain lr."""
    group = optimizer.param_groups[0]
    return group.get("max_lr", group.get("initial_lr", group["lr"]))


@pytest.mark.parametrize("name", experiments())
def test_optimizer_lr_reaches_what_every_experiment_builds(name: str, tmp_path: Path) -> None:
    """`optimizer.lr=X` is the learning rate (or the schedule's peak) of every optimizer the run builds."""
    task = build_task(tmp_path, name, f"optimizer.lr={LR}", *_small(name, tmp_path))
    try:
        named = task.optimizers(100)
        if not named:  # SB3 owns its optimizer
            optimizers = [task.model.policy.optimizer]
        else:
            optimizers = [v[0] if isinstance(v, tuple) else v for v in named.values()]
        assert optimizers and all(_peak(o) == pytest.approx(LR) for o in optimizers), name
        assert all(len(o.param_groups) == 1 for o in optimizers)
    finally:
        task.close()


def test_every_experiment_names_its_task_and_family_groups_have_their_own_key() -> None:
    for path in sorted((REPO / "conf" / "experiment").glob("*.yaml")):
        assert re.search(r"^task: \w+(\.\w+)+$", path.read_text(), re.M), f"{path.name} does not name its task"
    for group in ("agent", "gan", "style"):
        for path in (REPO / "conf" / group).glob("*.yaml"):
            assert path.read_text().startswith(f"# @package {group}\n"), path
    packaged = [p.relative_to(REPO / "conf") for p in (REPO / "conf").rglob("*.yaml")
                if "@package _global_" in p.read_text()]
    assert {p.parts[0] for p in packaged} == {"experiment", "hparams_search"}, packaged
    # the old spellings of the learning rate are gone from every config
    for path in (REPO / "conf").rglob("*.yaml"):
        text = path.read_text()
        assert not re.search(r"max_lr|learning_rate|adam_eps", text), path
    assert "lr" not in compose("dcgan_mnist").gan and "lr" not in compose("vae_mnist").model


def test_inheriting_experiments_differ_only_where_they_say() -> None:
    """sb3_dqn_<env> is SB3 with RL Zoo's settings over dqn_<env>'s env, budget and evaluation; dqn_acrobot is
    dqn_cartpole's recipe on another env; vae_mnist is autoencoder_mnist with a variational model."""
    from omegaconf import OmegaConf

    for env in ("cartpole", "acrobot", "lunarlander"):
        dqn, sb3 = compose(f"dqn_{env}"), compose(f"sb3_dqn_{env}")
        assert OmegaConf.to_container(dqn.env) == OmegaConf.to_container(sb3.env)
        assert [dqn.agent[k] == sb3.agent[k] for k in ("total_timesteps", "eval_every", "eval_episodes")] == [True] * 3
        assert sb3.task == "agents.sb3_dqn.SB3DQN" and sb3.trainer.num_threads is None
        assert sb3.agent.n_step == 1 and not sb3.agent.double and sb3.scheduler.end_factor == 1.0  # RL Zoo's
    assert compose("sb3_dqn_cartpole").optimizer.lr == 2.3e-3 and compose("sb3_dqn_acrobot").optimizer.lr == 6.3e-4
    cartpole = compose("dqn_cartpole")
    for env in ("acrobot", "lunarlander"):
        other = compose(f"dqn_{env}")
        assert other.optimizer == cartpole.optimizer and other.scheduler == cartpole.scheduler
        same = {k for k in cartpole.agent if k not in ("total_timesteps", "eval_every", "log_every")}
        assert {k: other.agent[k] for k in same} == {k: cartpole.agent[k] for k in same}, env
    ae, vae = compose("autoencoder_mnist"), compose("vae_mnist")
    assert not ae.model.variational and vae.model.variational
    assert {k: v for k, v in vae.model.items() if k != "variational"} == \
        {k: v for k, v in ae.model.items() if k != "variational"}


def test_listing_groups_experiments_by_family_with_their_descriptions() -> None:
    groups = describe_experiments()
    assert set(groups) == {"Reinforcement learning (agents/)", "Generative models (generative/)", "Vision (vision/)",
                           "Text (text/)"}
    names = {n for g in groups.values() for n, _ in g}
    assert names == set(experiments())
    rl = dict(groups["Reinforcement learning (agents/)"])
    assert rl["dqn_pong"].startswith("DQN on Pong") and "sb3_dqn_cartpole" in rl
    assert all(d and not d.startswith("@package") for g in groups.values() for _, d in g)


def test_unknown_keys_are_refused_in_one_line_and_known_ones_take_effect(tmp_path: Path) -> None:
    typo, sweep, added, group = run_lab_cases(tmp_path, [
        ["+experiment=mnist_cnn", "logger=none", "optimizer.lrr=3e-4"],
        ["-m", "+experiment=mnist_cnn,xor_mlp", "logger=none", "scheduler.max_lr=0.1"],
        ["+experiment=xor_mlp", "+scheduler.name=onecycle", "+scheduler.max_lr=0.1",
         f"hydra.run.dir={tmp_path / 'added'}"],
        ["+experiment=mnist_cnn", "logger=none", "optimizer={lr: 0.001, lrr: 1}"],
    ])
    for r in (typo, sweep):
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and "is not a key of this config" in lines[0]
    assert "optimizer.lrr" in typo.stderr and "+optimizer.lrr=" in typo.stderr
    # a whole group's new value with a key the group lacks: how to replace the group
    assert group.returncode == 2 and len(group.stderr.strip().splitlines()) == 1, group.stderr
    assert "optimizer.lrr" in group.stderr and "'~optimizer' '+optimizer={...}'" in group.stderr
    assert not list(tmp_path.glob("outputs")) and not list(tmp_path.glob("multirun"))  # refused before any run
    # an added key that the run would ignore is refused by the code that owns it
    assert added.returncode == 2 and "peaks at optimizer.lr" in added.stderr, added.stderr
