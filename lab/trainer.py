"""The common trainer: device, precision, compile, DDP, the training loop, evaluation,
checkpoint and resume, signals, progress and logging. Tasks know models and losses only.

    step = 0
    for each epoch, for each batch:
        metrics = task.training_step(batch, optim)   # under autocast; optim.step does the rest
        every log_every steps: log train/ and perf/ metrics
        trainer.ema: the averaged weights take this step in
        every eval_every steps (and at epoch ends, and at the end): log eval/, save best.pt
        every checkpoint_every steps (and on SIGINT/SIGTERM, and at the end): save last.pt
"""

from __future__ import annotations

import contextlib
import math
import re
import signal
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from lab import checkpoint, distributed
from lab import ema as weight_average
from lab.devices import DEVICE_SPEC, PRECISIONS, autocast, resolve_precision
from lab.errors import LabError
from lab.task import RunContext, Task


def check_config(cfg: DictConfig) -> None:
    """Refuse bad trainer settings before anything runs."""
    if str(cfg.precision) not in (*PRECISIONS, "auto"):
        raise LabError(f"trainer.precision={cfg.precision!r} is not supported; use one of auto, 32, bf16, fp16")
    if not re.fullmatch(DEVICE_SPEC, str(cfg.device)):
        raise LabError(f"trainer.device={cfg.device!r} is not a device; use auto, cpu, cuda, cuda:N or mps")
    for key in ("max_steps", "max_epochs", "log_every", "eval_every", "checkpoint_every", "num_threads"):
        value = cfg.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise LabError(f"trainer.{key}={value!r} must be a positive integer or null")
    if cfg.get("grad_clip") is not None and not (isinstance(cfg.grad_clip, (int, float)) and cfg.grad_clip > 0):
        raise LabError(f"trainer.grad_clip={cfg.grad_clip!r} must be a positive number or null")
    stop_at = cfg.get("stop_at")
    if stop_at is not None and (isinstance(stop_at, bool) or not isinstance(stop_at, (int, float))):
        raise LabError(f"trainer.stop_at={stop_at!r} must be a number (the main metric's target) or null")
    weight_average.check(cfg.get("ema"))
    if cfg.max_steps is None and cfg.max_epochs is None:
        raise LabError("set a budget: trainer.max_steps=N or trainer.max_epochs=N")


def metrics_line(metrics: dict[str, Any]) -> str:
    """`key=value, ...` for the numbers among `metrics` (floats to 4 significant digits, counters whole): one
    line for the console."""
    return ", ".join(f"{k}={v}" if isinstance(v, int) else f"{k}={v:.4g}" for k, v in metrics.items()
                     if isinstance(v, (int, float)))


class Optimizers:
    """What a task's `training_step` calls to update: `optim.step("name", loss)`."""

    def __init__(self, named: dict[str, Any], device: torch.device, precision: str, grad_clip: float | None):
        self.named: dict[str, tuple[torch.optim.Optimizer, Any]] = {
            k: (v if isinstance(v, tuple) else (v, None)) for k, v in named.items()}
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self.grad_clip = grad_clip
        self.grad_norms: dict[str, torch.Tensor] = {}

    def step(self, name: str, loss: torch.Tensor) -> None:
        if name not in self.named:
            raise LabError(f"training_step asked for optimizer {name!r}; the task defines {list(self.named)}")
        opt, sched = self.named[name]
        opt.zero_grad(set_to_none=True)  # before backward: a later phase may leave grads here (GANs)
        with torch.autocast(self.device_type, enabled=False):
            (self.scaler.scale(loss) if self.scaler else loss).backward()
        if self.grad_clip:
            if self.scaler:
                self.scaler.unscale_(opt)
            params = [p for g in opt.param_groups for p in g["params"]]
            self.grad_norms[name] = nn.utils.clip_grad_norm_(params, self.grad_clip)
        if self.scaler:
            self.scaler.step(opt)
        else:
            opt.step()
        # Autocast keeps the low-precision copy of each weight until the outermost autocast exits, which is
        # after the whole training_step: drop the copies, or a later forward (a GAN's generator step through
        # D, an agent acting after an update) would run on the weights from before this step.
        torch.clear_autocast_cache()
        if sched is not None:
            sched.step()

    def grad_norm_metrics(self) -> dict[str, torch.Tensor]:
        """The clipped gradients' norms of this step, `grad_norm` (or `grad_norm_NAME` for several optimizers)."""
        several = len(self.named) > 1
        return {f"grad_norm_{k}" if several else "grad_norm": v for k, v in self.grad_norms.items()}

    def end_step(self) -> None:
        if self.scaler:
            self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizers": {k: o.state_dict() for k, (o, _) in self.named.items()},
            "schedulers": {k: s.state_dict() for k, (_, s) in self.named.items() if s is not None},
            "scaler": self.scaler.state_dict() if self.scaler else None,
        }

    def load_state_dict(self, state: dict[str, Any], path: Path) -> None:
        if set(state["optimizers"]) != set(self.named):
            raise LabError(f"checkpoint {path} has optimizers {sorted(state['optimizers'])}, this run "
                           f"{sorted(self.named)}; resume with the configuration it was written with")
        for k, (opt, sched) in self.named.items():
            checkpoint.load_state(opt, state["optimizers"][k], f"optimizer {k!r}", path)
            if sched is not None and k in state["schedulers"]:
                horizon = getattr(sched, "total_steps", None)
                checkpoint.load_state(sched, state["schedulers"][k], f"scheduler {k!r}", path)
                if horizon is not None and sched.total_steps != horizon:
                    raise LabError(f"the learning-rate schedule of checkpoint {path} spans {sched.total_steps} "
                                   f"steps, this run {horizon}; resume with the same trainer.max_epochs")
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def lrs(self) -> dict[str, float]:
        single = len(self.named) == 1
        return {("lr" if single else f"lr_{k}"): o.param_groups[0]["lr"] for k, (o, _) in self.named.items()}


def check_task(task_cls: type[Task], ctx: RunContext) -> None:
    """Refuse, before the task is built, a run that the task's capability flags rule out (one line each)."""
    def why(flag: bool | str) -> str:
        return f" ({flag})" if isinstance(flag, str) else ""

    name = task_cls.__name__
    if ctx.dist.enabled and task_cls.single_process:
        raise LabError(f"{name} runs in one process{why(task_cls.single_process)}; drop torchrun")
    if ctx.precision != "32" and task_cls.fp32_only:
        raise LabError(f"trainer.precision={ctx.precision}: {name} trains in float32 only"
                       f"{why(task_cls.fp32_only)}; set trainer.precision=32")


def run_precision(spec: Any, device: torch.device, task_cls: type[Task] | None = None) -> str:
    """The precision a run uses: `resolve_precision`, except that `auto` is 32 for a task that is `fp32_only`."""
    if str(spec) == "auto" and task_cls is not None and task_cls.fp32_only:
        print(f"[lab] trainer.precision=auto: 32 ({task_cls.__name__} trains in float32)", flush=True)
        return "32"
    return resolve_precision(spec, device)


def run_context(t: DictConfig, task_cls: type[Task], device: torch.device, dist: Any, logger: Any, run_dir: Path,
                seed: int, mode: str) -> RunContext:
    """What the task sees of the run: the trainer block `t` resolved for this device and task, then checked
    against the task's capability flags."""
    ctx = RunContext(device=device, dist=dist, logger=logger, run_dir=run_dir, seed=seed,
                     precision=run_precision(t.precision, device, task_cls), compile=bool(t.compile),
                     channels_last=bool(t.get("channels_last")), grad_clip=t.get("grad_clip"), mode=mode)
    check_task(task_cls, ctx)
    return ctx


@dataclass
class _Window:
    """The train/ metrics of the steps since the last log row: sums and counts, steps, samples, start time."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)  # a task may report a key only on some steps
    steps: int = 0
    samples: int = 0
    start: float = field(default_factory=time.perf_counter)

    def add(self, values: dict[str, Any], samples: int) -> None:
        for k, v in values.items():
            if isinstance(v, list):  # several samples (the episodes that ended this step): each counts
                v, n = torch.tensor(v, dtype=torch.float32).sum(), len(v)
            else:
                v, n = (v.detach().float() if isinstance(v, torch.Tensor) else torch.tensor(float(v))), 1
            self.sums[k] = self.sums[k] + v if k in self.sums else v
            self.counts[k] = self.counts.get(k, 0) + n
        self.steps += 1
        self.samples += samples

    def means(self) -> dict[str, float]:
        return {f"train/{k}": (v / self.counts[k]).item() for k, v in self.sums.items()}

    def state_dict(self) -> dict[str, Any]:
        """In each checkpoint: a resumed run finishes the window it stopped in, so its log rows are the same."""
        return {"sums": {k: v.detach().cpu() for k, v in self.sums.items()}, "counts": dict(self.counts),
                "steps": self.steps, "samples": self.samples}

    @classmethod
    def from_state(cls, state: dict[str, Any] | None, device: torch.device) -> _Window:
        if not state:
            return cls()
        return cls({k: v.to(device) for k, v in state["sums"].items()}, dict(state["counts"]), int(state["steps"]),
                   int(state["samples"]))


@dataclass
class _Run:
    """Where the loop is: the counters a checkpoint keeps, and the state of this process's loop."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    last_eval_step: int = -1
    elapsed_s: float = 0.0  # seconds of training before this process (a resumed run's earlier ones)
    rng: Any = None  # a resumed run's random state, set once its data has skipped what it already trained on
    resumed: dict[str, Any] | None = None  # the checkpoint this run resumed from
    stopped: bool = False  # a signal asked to stop
    window: _Window = field(default_factory=_Window)

    COUNTERS = ("step", "epoch", "batch_in_epoch", "last_eval_step", "elapsed_s")


class Trainer:
    def __init__(self, cfg: DictConfig, ctx: RunContext, config: dict[str, Any]):
        check_config(cfg)
        self.cfg, self.ctx, self.config = cfg, ctx, config
        self.device, self.dist, self.logger = ctx.device, ctx.dist, ctx.logger
        self.ckpt_dir = ctx.run_dir / "checkpoints"
        self.precision = ctx.precision
        # Read once: interpolated values (an agent's ${ceil_div:...}) are recomputed on every access.
        self.log_every, self.eval_every, self.checkpoint_every = cfg.log_every, cfg.eval_every, cfg.checkpoint_every
        self.max_steps, self.max_epochs = cfg.max_steps or math.inf, cfg.max_epochs or math.inf
        self._raw: dict[str, nn.Module] = {}  # child modules before DDP wrapping
        self.stop_signal: int | None = None  # the signal that asked this run to stop
        self.best: dict[str, Any] = {}
        self.target_reached = False  # the main metric reached trainer.stop_at
        self._clock = (time.perf_counter(), 0.0)  # (start of this process's loop, seconds before it)
        self.ema: weight_average.Ema | None = None  # trainer.ema's averaged networks, built by fit

    def elapsed(self) -> float:
        """Seconds of this run's training loop so far, over all its resumes."""
        start, before = self._clock
        return before + time.perf_counter() - start

    # ---- precision and module wrapping ----------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.precision)

    def _prepare(self, task: Task) -> None:
        """Compile each child module with parameters (a frozen target or feature net too); DDP-wrap those that train.

        Static shapes: each batch size gets its own graph (an agent acts on 1 observation and learns on 512;
        a graph generic in the batch size ran slower on CPU)."""
        for name, child in task.named_children():
            params = list(child.parameters())
            if params and self.cfg.compile:
                child.compile(dynamic=False)
            if self.dist.enabled and any(p.requires_grad for p in params):
                self._raw[name] = child
                ids = [self.device.index] if self.device.type == "cuda" else None
                setattr(task, name, DistributedDataParallel(child, device_ids=ids))

    @contextlib.contextmanager
    def unwrapped(self, task: Task) -> Iterator[Task]:
        """The task with its plain (not DDP-wrapped) children: for state dicts and evaluation."""
        wrapped = {name: getattr(task, name) for name in self._raw}
        for name, child in self._raw.items():
            setattr(task, name, child)
        try:
            yield task
        finally:
            for name, child in wrapped.items():
                setattr(task, name, child)

    # ---- checkpoints --------------------------------------------------------------------------
    def _counters(self, run: _Run) -> dict[str, Any]:
        return {"step": run.step, "epoch": run.epoch, "batch_in_epoch": run.batch_in_epoch,
                "last_eval_step": run.last_eval_step, "elapsed_s": self.elapsed()}

    def _state(self, task: Task, optim: Optimizers, run: _Run, snapshot: bool = False) -> dict[str, Any]:
        with self.unwrapped(task):
            task_state = task.snapshot_state() if snapshot else task.state_dict()
        return {**self._counters(run), "task": task_state, **optim.state_dict(), "rng": checkpoint.rng_state(),
                "best": self.best, "logger_run_id": self.logger.run_id, "config": self.config,
                "metrics_rows": self.logger.rows, "window": run.window.state_dict(),
                "ema": self.ema.state_dict() if self.ema and not snapshot else None}  # best.pt: in "task"

    def _save(self, name: str, state: dict[str, Any]) -> None:
        if self.dist.is_main:
            checkpoint.save(self.ckpt_dir / name, state)

    def _resume(self, task: Task, optim: Optimizers) -> _Run:
        """The loop's position and the task's, optimizers' and best metric's state from checkpoints/last.pt."""
        path = self.ckpt_dir / "last.pt"
        if not path.exists():
            raise LabError(f"resume=true but there is no checkpoint at {path}; pass the run's directory "
                           "as hydra.run.dir=..., or drop resume=true to start a new run")
        state = checkpoint.load(path, map_location=self.device)
        with self.unwrapped(task):
            checkpoint.load_state(task, state["task"], "task (model) state", path)
        optim.load_state_dict(state, path)
        if self.ema:
            self.ema.load_state_dict(state.get("ema"), path)
        self.best = dict(state.get("best") or {})
        return _Run(**{k: state[k] for k in _Run.COUNTERS if k in state}, rng=state["rng"], resumed=state)

    # ---- the loop -----------------------------------------------------------------------------
    def fit(self, task: Task, resume: bool = False) -> dict[str, Any]:
        """Train `task` to its budget, a signal or `trainer.stop_at`; returns the run's summary."""
        data = task.train_data()
        optim, horizon = self._setup(task, data)
        if self.cfg.get("ema") is not None:  # before compile and DDP: it copies the plain networks
            self.ema = weight_average.Ema(task, self.cfg.ema)
            print(f"[lab] trainer.ema={self.cfg.ema}: evaluations use the moving average of "
                  f"{', '.join(self.ema.nets)}", flush=True)
        run = self._resume(task, optim) if resume else _Run()
        self._prepare(task)
        self._start_logging(task, run)
        with self._progress_bar(run, horizon) as bar, self._signal_handlers():
            task.train()
            for batch in self._batches(task, data, optim, run):
                self._train_step(task, batch, optim, run, bar)
                if run.stopped or self._after_step(task, optim, run):
                    break
            if not run.stopped and run.last_eval_step != run.step:
                self._evaluate(task, optim, run)
            self._save("last.pt", self._state(task, optim, run))
        return self._finish(task, self._counters(run), "interrupted" if run.stopped else "completed")

    def _setup(self, task: Task, data: Iterable[Any]) -> tuple[Optimizers, int | None]:
        """The task on its device and memory format, and its optimizers over the schedule's horizon."""
        per_epoch = len(data) if hasattr(data, "__len__") else None
        if self.cfg.max_steps is None and per_epoch is None:
            raise LabError("this task's data has no epochs; set trainer.max_steps")
        self.per_epoch = per_epoch
        # Schedules span the epoch budget; max_steps only stops early (so a resumed run keeps its schedule).
        cfg = self.cfg
        horizon = cfg.max_epochs * per_epoch if cfg.max_epochs and per_epoch else cfg.max_steps
        task.to(self.device)
        if cfg.get("channels_last"):
            task.to(memory_format=torch.channels_last)
        return Optimizers(task.optimizers(horizon), self.device, self.precision, cfg.get("grad_clip")), horizon

    def _start_logging(self, task: Task, run: _Run) -> None:
        """metrics.jsonl and W&B; a resumed run keeps exactly the rows its checkpoint had logged."""
        state = run.resumed
        self.logger.start(resume_step=run.step if state else None, run_id=state and state.get("logger_run_id"),
                          step_metric=task.step_metric, main_metric=task.main_metric, main_mode=task.main_mode,
                          resume_rows=state.get("metrics_rows") if state else None)
        self.logger.step = run.step
        if state:
            print(f"[lab] resumed from {self.ckpt_dir / 'last.pt'} at step {run.step}", flush=True)
        self._clock = (time.perf_counter(), run.elapsed_s)
        run.window = _Window.from_state(state and state.get("window"), self.device)

    def _progress_bar(self, run: _Run, horizon: int | None) -> tqdm:
        return tqdm(total=None if horizon is None else min(horizon, self.max_steps), initial=run.step, unit="step",
                    disable=not (self.dist.is_main and self.cfg.progress), dynamic_ncols=True, mininterval=1.0)

    def _batches(self, task: Task, data: Iterable[Any], optim: Optimizers, run: _Run) -> Iterator[Any]:
        """The batches of each epoch until the budget; a resumed run first skips what it already trained on.
        At each epoch's end: an evaluation (`eval_each_epoch`), and the end of the run if it hit stop_at."""
        while run.step < self.max_steps and run.epoch < self.max_epochs:
            if hasattr(data, "set_epoch"):
                data.set_epoch(run.epoch)
            batches = iter(data)
            for _ in range(run.batch_in_epoch):
                next(batches, None)
            if run.rng is not None:  # after the skip, so the run continues with the saved random state
                checkpoint.set_rng_state(run.rng)
                run.rng = None
            yield from batches
            run.epoch += 1
            run.batch_in_epoch = 0
            if self.cfg.get("eval_each_epoch") and run.last_eval_step != run.step:
                with self._paused(run):
                    self._evaluate(task, optim, run)
            if self.target_reached:
                return

    def _train_step(self, task: Task, batch: Any, optim: Optimizers, run: _Run, bar: tqdm) -> None:
        batch = _to_device(batch, self.device)
        with self.autocast():
            out = task.training_step(batch, optim)
        optim.end_step()
        if self.ema:
            self.ema.update()
        run.step += 1
        run.batch_in_epoch += 1
        self.logger.step = run.step
        bar.update(1)
        samples = (task.samples_in(batch) or 0) * self.dist.world_size
        run.window.add({**(out or {}), **optim.grad_norm_metrics()}, samples)
        run.stopped = distributed.any_rank(self.stop_signal is not None, self.dist, self.device)
        if run.step % self.log_every == 0 or run.stopped or run.step >= self.max_steps:
            self._log_train(task, optim, run, bar)

    def _log_train(self, task: Task, optim: Optimizers, run: _Run, bar: tqdm) -> None:
        w = run.window
        dt = time.perf_counter() - w.start
        epoch = run.epoch + run.batch_in_epoch / self.per_epoch if self.per_epoch else run.epoch
        metrics = {**w.means(), **{f"train/{k}": v for k, v in optim.lrs().items()}, "train/epoch": epoch,
                   "perf/steps_per_sec": w.steps / dt, "perf/elapsed_s": self.elapsed(), **task.progress()}
        if w.samples:
            metrics["perf/samples_per_sec"] = w.samples / dt
        self.logger.log(metrics)
        shown = {f"train/{k}" for k in task.progress_keys} | {"perf/samples_per_sec", "perf/steps_per_sec"}
        bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in metrics.items() if k in shown})
        run.window = _Window()

    def _after_step(self, task: Task, optim: Optimizers, run: _Run) -> bool:
        """Evaluate and checkpoint on their cadences; whether the run ends here (budget or stop_at)."""
        with self._paused(run):
            if self.eval_every and run.step % self.eval_every == 0:
                self._evaluate(task, optim, run)
                if self.target_reached:
                    return True
            if self.checkpoint_every and run.step % self.checkpoint_every == 0:
                self._save("last.pt", self._state(task, optim, run))
        return run.step >= self.max_steps

    @contextlib.contextmanager
    def _paused(self, run: _Run) -> Iterator[None]:
        """Evaluation and saving do not count against the logged throughput."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            run.window.start += time.perf_counter() - t0

    def _evaluate(self, task: Task, optim: Optimizers, run: _Run) -> None:
        run.last_eval_step = self.logger.step
        if self.dist.is_main:
            t0 = time.perf_counter()
            # trainer.ema: the averaged weights are evaluated, and best.pt holds them
            with self.ema.weights() if self.ema else contextlib.nullcontext():
                with self.unwrapped(task), torch.no_grad(), self.autocast():
                    task.eval()
                    try:
                        metrics = _eval_keys(task.evaluate())
                    finally:
                        task.train()
                metrics["perf/eval_seconds"] = time.perf_counter() - t0
                metrics["perf/elapsed_s"] = self.elapsed()
                metrics.update(task.progress())
                self.logger.log(metrics)
                tqdm.write(f"[lab] step {self.logger.step}: {metrics_line(metrics)}")  # above the bar, in any log
                self._track_best(task, optim, run, metrics)
        self.target_reached = distributed.any_rank(self.target_reached, self.dist, self.device)
        distributed.barrier(self.dist)

    def _track_best(self, task: Task, optim: Optimizers, run: _Run, metrics: dict[str, Any]) -> None:
        """best.pt when the main metric improves; the end of the run when it reaches trainer.stop_at."""
        name, mode = task.main_metric, task.main_mode
        if not name or name not in metrics:
            return
        value = float(metrics[name])
        old = self.best.get("value")
        if old is None or (value > old if mode == "max" else value < old):
            self.best = {"metric": name, "value": value, "step": self.logger.step}
            self._save("best.pt", self._state(task, optim, run, snapshot=True))
        target = self.cfg.get("stop_at")
        if target is not None and (value >= target if mode == "max" else value <= target):
            self.target_reached = True
            print(f"[lab] {name}={value:.4g} reached trainer.stop_at={target}: stopping", flush=True)

    def _load_task(self, task: Task, path: Path) -> dict[str, Any]:
        """Put a checkpoint's task state into `task` on this run's device (mode=eval, mode=generate): the
        weights its evaluations measured (the averaged ones where it ran with trainer.ema)."""
        if not path.exists():  # a directory or an unreadable file: checkpoint.load says which
            raise LabError(f"checkpoint={path} does not exist; pass a run's checkpoints/best.pt or last.pt")
        task.to(self.device)
        if self.cfg.get("channels_last"):
            task.to(memory_format=torch.channels_last)
        state = checkpoint.load(path, map_location=self.device)
        checkpoint.load_state(task, weight_average.averaged_task_state(state), "task (model) state", path)
        return state

    def generate_checkpoint(self, task: Task, path: Path, n: int) -> dict[str, Any]:
        """`mode=generate`: load a checkpoint's task state and call `task.generate(n)` (new samples, as files)."""
        if not callable(getattr(task, "generate", None)):
            raise LabError(f"{type(task).__name__} has no generate(n) method: mode=generate is for tasks that "
                           "draw new samples (the generative ones)")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise LabError(f"n={n!r} must be a positive number of samples")
        out = self._from_checkpoint(task, path, lambda: task.generate(n))
        print("[lab] " + ", ".join(f"{k}={v}" for k, v in out.items()), flush=True)
        return self.logger.summary({"checkpoint": str(path), "status": "generated", **out})

    def predict_checkpoint(self, task: Task, path: Path, folder: Any) -> dict[str, Any]:
        """`mode=predict`: load a checkpoint's task state and call `task.predict(folder)` (its outputs, as files)."""
        if not callable(getattr(task, "predict", None)):
            raise LabError(f"{type(task).__name__} has no predict(folder) method: mode=predict is for tasks that "
                           "label new inputs (detection, segmentation, text)")
        if not folder:
            raise LabError("mode=predict needs input=PATH: a folder of images, or a text file for a text model")
        out = self._from_checkpoint(task, path, lambda: task.predict(Path(str(folder))))
        return self.logger.summary({"checkpoint": str(path), "status": "predicted", **out})

    def _from_checkpoint(self, task: Task, path: Path, call: Any) -> dict[str, Any]:
        """Load a checkpoint's task state, start the logger at its step and run `call()` in eval mode."""
        state = self._load_task(task, path)
        self.logger.start()
        self.logger.step = int(state.get("step", 0))
        with torch.no_grad(), self.autocast():
            task.eval()
            return call()

    def evaluate_checkpoint(self, task: Task, path: Path) -> dict[str, Any]:
        """`mode=eval`: load a checkpoint's task state and evaluate it once (an agent plays and records)."""
        state = self._load_task(task, path)
        self.logger.start()
        self.logger.step = int(state.get("step", 0))
        t0 = time.perf_counter()
        with torch.no_grad(), self.autocast():
            task.eval()
            metrics = _eval_keys(task.evaluate())
        metrics.update({"perf/eval_seconds": time.perf_counter() - t0, **task.progress()})
        self.logger.log(metrics)
        print(f"[lab] {metrics_line(metrics)}", flush=True)
        return self.logger.summary({"checkpoint": str(path), "status": "evaluated", "main_metric": task.main_metric})

    def _finish(self, task: Task, counters: dict[str, Any], status: str) -> dict[str, Any]:
        if self.target_reached:
            status = "target reached"
        extra: dict[str, Any] = {"step": counters["step"], "epoch": counters["epoch"], "status": status,
                                 "elapsed_s": round(counters["elapsed_s"], 3), "main_metric": task.main_metric,
                                 "main_mode": task.main_mode}
        if self.best:
            extra[f"best/{self.best['metric']}"] = self.best["value"]
            extra["best/step"] = self.best["step"]
        summary = self.logger.summary(extra)
        if self.dist.is_main:
            for name, aliases in (("last.pt", ["latest"]), ("best.pt", ["best"])):
                self.logger.log_checkpoint(self.ckpt_dir / name, aliases)
            from lab.plots import plot_curves

            try:
                fig = plot_curves(self.logger.metrics_path, x=task.step_metric)
                if fig is not None:
                    self.logger.log_image("curves", fig)
            except Exception as e:  # noqa: BLE001 - a plot must never cost the run's results
                print(f"[lab] could not plot curves: {e}", flush=True)
        return summary

    # ---- signals --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _signal_handlers(self) -> Iterator[None]:
        """SIGINT/SIGTERM ask the loop to save and stop; a second one stops at once (the previous handler)."""
        previous: dict[int, Any] = {}

        def handler(signum: int, _frame: Any) -> None:
            self.stop_signal = signum
            print(f"\n[lab] {signal.Signals(signum).name}: saving a checkpoint, then stopping "
                  "(send it again to stop at once)", flush=True)
            for s, h in previous.items():
                signal.signal(s, h)

        try:
            for s in (signal.SIGINT, signal.SIGTERM):
                previous[s] = signal.signal(s, handler)
        except ValueError:  # not the main thread: no handlers
            pass
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def _eval_keys(metrics: dict[str, Any]) -> dict[str, Any]:
    """Plain keys go under eval/; a key with its own prefix (perf/eval_images_per_sec) stays as is."""
    return {k if "/" in k else f"eval/{k}": v for k, v in metrics.items()}


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch
