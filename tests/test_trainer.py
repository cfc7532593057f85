"""The trainer with a task of two optimizers (a GAN-like update), precisions, config checks."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from lab.devices import native_bf16, resolve_device, resolve_precision
from lab.distributed import DistInfo
from lab.errors import LabError
from lab.logger import RunLogger
from lab.task import RunContext, Task
from lab.trainer import Optimizers, Trainer, check_config, check_task, run_precision

REPO = Path(__file__).resolve().parents[1]


class TwoPhase(Task):
    """A discriminator step, then a generator step through the discriminator, every step."""

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        torch.manual_seed(0)
        self.gen = nn.Linear(4, 4)
        self.disc = nn.Linear(4, 1)
        self.batches = [(torch.randn(16, 4),) for _ in range(5)]

    def optimizers(self, total_steps):
        return {"disc": torch.optim.Adam(self.disc.parameters(), 1e-2),
                "gen": torch.optim.Adam(self.gen.parameters(), 1e-2)}

    def train_data(self):
        return self.batches

    def training_step(self, batch, optim):
        (x,) = batch
        fake = self.gen(x)
        d_loss = (self.disc(fake.detach()) - 1).pow(2).mean() + self.disc(x).pow(2).mean()
        optim.step("disc", d_loss)
        g_loss = self.disc(fake).pow(2).mean()
        optim.step("gen", g_loss)
        return {"d_loss": d_loss, "g_loss": g_loss}


def make_trainer(tmp_path: Path, **overrides) -> Trainer:
    cfg = OmegaConf.merge(OmegaConf.load(REPO / "conf/trainer/default.yaml"),
                          {"progress": False, "log_every": 1, "device": "cpu", **overrides})
    logger = RunLogger(OmegaConf.create({"backend": "none"}), tmp_path, {})
    cpu = torch.device("cpu")
    ctx = RunContext(cpu, DistInfo(), logger, tmp_path, 0, precision=run_precision(cfg.precision, cpu),
                     grad_clip=cfg.grad_clip)
    return Trainer(cfg, ctx, {}), ctx


def hand_written_loop(ref: TwoPhase, steps: int):
    """TwoPhase's training by hand, yielding after each step its index."""
    d_opt = torch.optim.Adam(ref.disc.parameters(), 1e-2)
    g_opt = torch.optim.Adam(ref.gen.parameters(), 1e-2)
    for n, (x,) in enumerate((ref.batches + ref.batches)[:steps]):
        fake = ref.gen(x)
        d_opt.zero_grad()
        ((ref.disc(fake.detach()) - 1).pow(2).mean() + ref.disc(x).pow(2).mean()).backward()
        d_opt.step()
        g_opt.zero_grad()
        ref.disc(fake).pow(2).mean().backward()
        g_opt.step()
        yield n


def test_two_optimizers_match_a_hand_written_loop(tmp_path: Path) -> None:
    trainer, ctx = make_trainer(tmp_path, max_steps=7, max_epochs=None)
    task = TwoPhase(None, ctx)
    ref = copy.deepcopy(task)
    summary = trainer.fit(task)
    assert summary["step"] == 7 and summary["epoch"] == 1  # 5 batches an epoch

    for _ in hand_written_loop(ref, 7):
        pass
    for a, b in zip(task.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b)

    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert set(state["optimizers"]) == {"disc", "gen"}
    assert all(s["state"][0]["step"] == 7 for s in state["optimizers"].values())
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert '"train/d_loss"' in rows[0] and '"train/lr_gen"' in rows[0]


class Episodes(TwoPhase):
    """Reports episode returns as an agent does: none on some steps, several on others."""

    RETURNS = [[1.0, 2.0, 3.0], [], [10.0]]

    def training_step(self, batch, optim):
        out = super().training_step(batch, optim)
        returns = self.RETURNS[len(self.batches_seen)]
        self.batches_seen.append(batch)
        return {**out, "episode_return": returns} if returns else out


def test_a_list_metric_averages_over_its_samples(tmp_path: Path) -> None:
    """A list is several samples (episodes that ended this step): the log's mean is over all of them,
    not over the steps that reported any."""
    trainer, ctx = make_trainer(tmp_path, max_steps=3, log_every=3)
    task = Episodes(None, ctx)
    task.batches_seen = []
    summary = trainer.fit(task)
    assert summary["train/episode_return"] == pytest.approx(16 / 4)  # not (2 + 10) / 2


@pytest.mark.parametrize("precision", ["32", "bf16", "fp16"])
def test_each_precision_trains(tmp_path: Path, precision: str) -> None:
    trainer, ctx = make_trainer(tmp_path, max_steps=5, precision=precision, grad_clip=1.0)
    task = TwoPhase(None, ctx)
    before = [p.detach().clone() for p in task.parameters()]
    summary = trainer.fit(task)
    assert torch.isfinite(torch.tensor(summary["train/g_loss"]))
    assert all(not torch.equal(a, b) for a, b in zip(before, task.parameters()))
    assert summary["train/grad_norm_gen"] > 0  # clipping measured the norm (after unscaling, for fp16)


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_where_it_is_native(monkeypatch, capsys, tmp_path: Path, native: bool) -> None:
    """On an AVX2-only CPU bf16 is emulated (a DQN update measured ~10x slower than float32): auto picks 32
    there, and an explicit bf16 still runs but says why it is slow."""
    monkeypatch.setattr("lab.devices.native_bf16", lambda device: native)
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bf16" if native else "32")
    assert f"auto: {'bf16' if native else '32'}" in capsys.readouterr().out
    assert resolve_precision("bf16", cpu) == "bf16"
    assert ("emulated" in capsys.readouterr().out) is not native
    assert resolve_precision("32", cpu) == "32" and resolve_precision("fp16", cpu) == "fp16"
    trainer, _ = make_trainer(tmp_path, precision="auto", max_steps=1)
    assert trainer.precision == ("bf16" if native else "32")


def test_native_bf16_follows_the_cpu() -> None:
    """An AVX2-only CPU has no oneDNN bf16 kernels; an AVX512 one has them (emulated on AVX512 without BF16,
    at about float32 speed)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability in ("AVX2", "DEFAULT"):
        assert not native_bf16(torch.device("cpu"))
    elif capability.startswith("AVX512"):
        assert native_bf16(torch.device("cpu"))
    assert not native_bf16(torch.device("meta"))


def test_a_forward_after_a_step_sees_the_updated_weights(tmp_path: Path) -> None:
    """Autocast caches the low-precision copy of each weight until the outermost autocast exits, and the
    trainer's wraps a whole training_step: a GAN's generator step must go through the updated
    discriminator, and an agent acting after an update must act with the new weights."""
    trainer, _ = make_trainer(tmp_path, precision="bf16", grad_clip=None, max_steps=1)
    torch.manual_seed(0)
    net, x = nn.Linear(4, 4), torch.randn(8, 4)
    optim = Optimizers({"net": torch.optim.SGD(net.parameters(), lr=0.5)}, torch.device("cpu"), "bf16", None)
    with trainer.autocast():
        before_step = net(x)
        optim.step("net", before_step.pow(2).mean())
        after_step = net(x)
    with trainer.autocast():
        fresh = net(x)
    assert not torch.allclose(before_step, fresh)
    torch.testing.assert_close(after_step, fresh, rtol=0, atol=0)


def test_unknown_optimizer_name_is_a_clear_error(tmp_path: Path) -> None:
    trainer, ctx = make_trainer(tmp_path, max_steps=2)
    task = TwoPhase(None, ctx)
    task.training_step = lambda batch, optim: optim.step("critic", task.gen(batch[0]).sum())
    with pytest.raises(LabError, match="'critic'.*defines"):
        trainer.fit(task)


@pytest.mark.parametrize("key,value,needle", [
    ("precision", "fp8", "trainer.precision"), ("precision", 16, "trainer.precision"),
    ("device", "gpu", "trainer.device"), ("max_steps", 0, "positive integer"),
    ("grad_clip", -1, "grad_clip"), ("log_every", 1.5, "positive integer"), ("ema", 1.0, "trainer.ema"),
    ("ema", 0.0, "trainer.ema"), ("ema", "0.9", "trainer.ema"),
])
def test_check_config_refuses(key: str, value, needle: str) -> None:
    cfg = OmegaConf.merge(OmegaConf.load(REPO / "conf/trainer/default.yaml"), {"max_steps": 5, key: value})
    with pytest.raises(LabError, match=needle):
        check_config(cfg)


def test_check_config_needs_a_budget() -> None:
    with pytest.raises(LabError, match="budget"):
        check_config(OmegaConf.load(REPO / "conf/trainer/default.yaml"))


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto").type in ("cpu", "mps")
        with pytest.raises(LabError, match="no CUDA device"):
            resolve_device("cuda:0")


def test_compile_trains_and_checkpoints_plain_weights(tmp_path: Path) -> None:
    trainer, ctx = make_trainer(tmp_path, max_steps=3, compile=True)
    task = TwoPhase(None, ctx)
    summary = trainer.fit(task)
    assert summary["step"] == 3 and torch.isfinite(torch.tensor(summary["train/d_loss"]))
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert set(state["task"]) == {"gen.weight", "gen.bias", "disc.weight", "disc.bias"}  # no _orig_mod. prefix


def test_capability_flags_are_checked_once_before_the_task_is_built(tmp_path: Path, capsys) -> None:
    """A task declares what it cannot do (`single_process`, `fp32_only`); the trainer refuses it in one line,
    and `trainer.precision=auto` resolves to 32 for an fp32-only task on any machine."""
    class Lonely(TwoPhase):
        single_process = "it keeps one image"
        fp32_only = True

    logger = RunLogger(OmegaConf.create({"backend": "none"}), tmp_path, {})
    cpu = torch.device("cpu")
    check_task(Lonely, RunContext(cpu, DistInfo(), logger, tmp_path, 0))  # one process, float32: fine
    ddp = DistInfo(rank=0, local_rank=0, world_size=2)
    with pytest.raises(LabError, match=r"^Lonely runs in one process \(it keeps one image\); drop torchrun$"):
        check_task(Lonely, RunContext(cpu, ddp, logger, tmp_path, 0))
    with pytest.raises(LabError, match=r"trainer.precision=bf16: Lonely trains in float32 only; set trainer.prec"):
        check_task(Lonely, RunContext(cpu, DistInfo(), logger, tmp_path, 0, precision="bf16"))
    assert run_precision("auto", cpu, Lonely) == "32" and "Lonely trains in float32" in capsys.readouterr().out
    check_task(TwoPhase, RunContext(cpu, ddp, logger, tmp_path, 0, precision="bf16"))  # no flags: anything goes


def test_a_one_cycle_schedule_of_a_few_steps_still_cycles() -> None:
    from omegaconf import OmegaConf

    from lab.optim import build_scheduler

    cfg = OmegaConf.create({"name": "onecycle", "pct_start": 0.2})
    for steps in (3, 5, 9):  # pct_start * steps = 1 or less: torch's warm-up would be zero steps long
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.AdamW([p], lr=1e-2)
        sched = build_scheduler(cfg, opt, steps)
        lrs = []
        for _ in range(steps):
            lrs.append(opt.param_groups[0]["lr"])  # the rate this step trains with
            opt.step()
            sched.step()
        assert max(lrs) == pytest.approx(1e-2) and lrs[0] < 1e-3 and lrs[-1] < 1e-4, (steps, lrs)
    for steps in (1, 2):  # a smoke test's run: no warm-up left, but it runs
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
        sched = build_scheduler(cfg, opt, steps)
        for _ in range(steps):
            opt.step()
            sched.step()


class Scored(TwoPhase):
    """Evaluates the generator's weights as they are at evaluation time (and keeps what it saw)."""

    main_metric = "eval/score"

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.seen = []

    def evaluate(self):
        self.seen.append(self.gen.weight.detach().clone())
        return {"score": float(len(self.seen))}  # rises: every evaluation writes best.pt


def test_ema_evaluates_and_keeps_the_averaged_weights_and_resumes(tmp_path: Path) -> None:
    """trainer.ema: evaluation and best.pt see the warmed-up moving average of the weights, the networks train
    on their own weights, last.pt keeps both, and a resumed run continues the same average."""
    decay, steps = 0.9, 7
    trainer, ctx = make_trainer(tmp_path / "a", max_steps=steps, eval_every=steps, eval_each_epoch=False, ema=decay)
    task = Scored(None, ctx)
    ref = copy.deepcopy(task)
    trainer.fit(task)

    mean = None
    for n in hand_written_loop(ref, steps):
        w = ref.gen.weight.detach()
        mean = w.clone() if mean is None else torch.lerp(mean, w, 1 - min(decay, (1 + n) / (10 + n)))
    torch.testing.assert_close(task.gen.weight, ref.gen.weight)  # training ran on the plain weights
    torch.testing.assert_close(task.seen[0], mean)  # the evaluation saw the average
    assert not torch.allclose(mean, ref.gen.weight, atol=1e-4)
    best = torch.load(tmp_path / "a" / "checkpoints" / "best.pt", weights_only=True)
    last = torch.load(tmp_path / "a" / "checkpoints" / "last.pt", weights_only=True)
    torch.testing.assert_close(best["task"]["gen.weight"], mean)
    torch.testing.assert_close(last["task"]["gen.weight"], ref.gen.weight)
    torch.testing.assert_close(last["ema"]["nets"]["gen"]["weight"], mean)
    assert last["ema"]["updates"] == steps
    from lab.checkpoint import load_weights

    torch.testing.assert_close(load_weights(tmp_path / "a" / "checkpoints" / "last.pt")["gen.weight"], mean)

    # Interrupted after 4 steps, then resumed to 7: the same average.
    trainer, ctx = make_trainer(tmp_path / "b", max_steps=4, eval_every=steps, eval_each_epoch=False, ema=decay)
    part = Scored(None, ctx)
    trainer.fit(part)
    trainer, ctx = make_trainer(tmp_path / "b", max_steps=steps, eval_every=steps, eval_each_epoch=False, ema=decay)
    resumed = Scored(None, ctx)
    trainer.fit(resumed, resume=True)
    torch.testing.assert_close(resumed.seen[-1], mean)

    trainer, ctx = make_trainer(tmp_path / "c", max_steps=2)  # no average: a resume cannot invent one
    trainer.fit(Scored(None, ctx))
    trainer, ctx = make_trainer(tmp_path / "c", max_steps=3, ema=decay)
    with pytest.raises(LabError, match="written without trainer.ema; resume with trainer.ema=null"):
        trainer.fit(Scored(None, ctx), resume=True)
