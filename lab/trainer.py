"""The common trainer: device, precision, compile, DDP, the training loop, evaluation,
checkpoint and resume, signals, progress and logging. Tasks know models and losses only.

    step = 0
    for each epoch, for each batch:
        metrics = task.training_step(batch, optim)   # under autocast; optim.step does the rest
        every log_every steps: log train/ and perf/ metrics
        every eval_every steps (and at epoch ends, and at the end): log eval/, save best.pt
        every checkpoint_every steps (and on SIGINT/SIGTERM, and at the end): save last.pt
"""

from __future__ import annotations

import contextlib
import math
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from lab import checkpoint, distributed
from lab.errors import LabError
from lab.task import RunContext, Task

PRECISIONS: dict[str, torch.dtype | None] = {"32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 runs at hardware speed here: a CUDA GPU with bf16, or a CPU with oneDNN bf16 kernels
    (AVX512/AVX512-BF16/AMX). On an AVX2-only CPU bf16 is emulated and several times slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def resolve_precision(spec: Any, device: torch.device) -> str:
    """`auto` is bf16 where the device runs it natively, else 32; an explicit bf16 on a CPU that only
    emulates it runs as asked, with a one-line warning."""
    spec = str(spec)
    if spec == "auto":
        spec = "bf16" if native_bf16(device) else "32"
        print(f"[lab] trainer.precision=auto: {spec} on {device}", flush=True)
    elif spec == "bf16" and device.type == "cpu" and not native_bf16(device):
        print(f"[lab] warning: trainer.precision=bf16 on a CPU without bf16 kernels "
              f"({torch.backends.cpu.get_cpu_capability()}): emulated, several times slower than float32; "
              "trainer.precision=auto picks the fast one", flush=True)
    return spec


def check_config(cfg: DictConfig) -> None:
    """Refuse bad trainer settings before anything runs."""
    if str(cfg.precision) not in (*PRECISIONS, "auto"):
        raise LabError(f"trainer.precision={cfg.precision!r} is not supported; use one of auto, 32, bf16, fp16")
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", str(cfg.device)):
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
    if cfg.max_steps is None and cfg.max_epochs is None:
        raise LabError("set a budget: trainer.max_steps=N or trainer.max_epochs=N")


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """`auto` picks CUDA (this process's local rank), then MPS, then CPU; explicit choices are checked."""
    spec = str(spec)
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise LabError(f"trainer.device={spec} but no CUDA device is visible; use trainer.device=auto or cpu")
        index = int(spec.split(":")[1]) if ":" in spec else local_rank
        if index >= torch.cuda.device_count():
            raise LabError(f"trainer.device={spec}: only {torch.cuda.device_count()} CUDA device(s) here")
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    if spec == "mps" and not mps:
        raise LabError("trainer.device=mps but MPS is not available; use trainer.device=auto or cpu")
    return torch.device(spec)


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


class Trainer:
    def __init__(self, cfg: DictConfig, ctx: RunContext, config: dict[str, Any]):
        check_config(cfg)
        self.cfg, self.ctx, self.config = cfg, ctx, config
        self.device, self.dist, self.logger = ctx.device, ctx.dist, ctx.logger
        self.ckpt_dir = ctx.run_dir / "checkpoints"
        self.precision = resolve_precision(cfg.precision, self.device)
        self._raw: dict[str, nn.Module] = {}  # child modules before DDP wrapping
        self.stop_signal: int | None = None  # the signal that asked this run to stop
        self.best: dict[str, Any] = {}
        self.target_reached = False  # the main metric reached trainer.stop_at
        self._clock = (time.perf_counter(), 0.0)  # (start of this process's loop, seconds before it)

    def elapsed(self) -> float:
        """Seconds of this run's training loop so far, over all its resumes."""
        start, before = self._clock
        return before + time.perf_counter() - start

    # ---- precision and module wrapping ----------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = PRECISIONS[self.precision]
        return torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()

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
    def _state(self, task: Task, optim: Optimizers, counters: dict[str, Any]) -> dict[str, Any]:
        with self.unwrapped(task):
            task_state = task.state_dict()
        return {**counters, "task": task_state, **optim.state_dict(), "rng": checkpoint.rng_state(),
                "best": self.best, "logger_run_id": self.logger.run_id, "config": self.config}

    def _save(self, name: str, state: dict[str, Any]) -> None:
        if self.dist.is_main:
            checkpoint.save(self.ckpt_dir / name, state)

    def _restore(self, task: Task, optim: Optimizers, path: Path) -> dict[str, Any]:
        state = checkpoint.load(path, map_location=self.device)
        with self.unwrapped(task):
            checkpoint.load_state(task, state["task"], "task (model) state", path)
        optim.load_state_dict(state, path)
        self.best = dict(state.get("best") or {})
        return state

    # ---- the loop -----------------------------------------------------------------------------
    def fit(self, task: Task, resume: bool = False) -> dict[str, Any]:
        cfg, log = self.cfg, self.logger
        data = task.train_data()
        per_epoch = len(data) if hasattr(data, "__len__") else None
        if cfg.max_steps is None and per_epoch is None:
            raise LabError("this task's data has no epochs; set trainer.max_steps")
        # Schedules span the epoch budget; max_steps only stops early (so a resumed run keeps its schedule).
        horizon = cfg.max_epochs * per_epoch if cfg.max_epochs and per_epoch else cfg.max_steps
        task.to(self.device)
        if cfg.get("channels_last"):
            task.to(memory_format=torch.channels_last)
        optim = Optimizers(task.optimizers(horizon), self.device, self.precision, cfg.get("grad_clip"))

        counters = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "last_eval_step": -1, "elapsed_s": 0.0}
        state = None
        if resume:
            path = self.ckpt_dir / "last.pt"
            if not path.exists():
                raise LabError(f"resume=true but there is no checkpoint at {path}; pass the run's directory "
                               "as hydra.run.dir=..., or drop resume=true to start a new run")
            state = self._restore(task, optim, path)
            counters.update({k: state[k] for k in counters if k in state})
        self._prepare(task)
        log.start(resume_step=counters["step"] if state else None, run_id=state and state.get("logger_run_id"),
                  step_metric=task.step_metric, main_metric=task.main_metric, main_mode=task.main_mode)
        log.step = counters["step"]
        if state:
            print(f"[lab] resumed from {self.ckpt_dir / 'last.pt'} at step {counters['step']}", flush=True)

        step, epoch = counters["step"], counters["epoch"]
        # Read once: interpolated values (an agent's ${ceil_div:...}) are recomputed on every access.
        log_every, eval_every, checkpoint_every = cfg.log_every, cfg.eval_every, cfg.checkpoint_every
        max_steps = cfg.max_steps or math.inf
        max_epochs = cfg.max_epochs or math.inf
        window: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}  # a task may report some values only on some steps (episode returns)
        n_window, samples_window, t_window = 0, 0, time.perf_counter()
        self._clock = (time.perf_counter(), counters["elapsed_s"])
        bar = tqdm(total=None if horizon is None else min(horizon, max_steps), initial=step, unit="step",
                   disable=not (self.dist.is_main and cfg.progress), dynamic_ncols=True, mininterval=1.0)
        previous = self._install_signal_handlers()
        stopped = False
        rng_restored = state is None
        batch_in_epoch = counters["batch_in_epoch"]

        def snapshot() -> dict[str, Any]:
            return {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "last_eval_step":
                    counters["last_eval_step"], "elapsed_s": self.elapsed()}

        try:
            task.train()
            while step < max_steps and epoch < max_epochs:
                if hasattr(data, "set_epoch"):
                    data.set_epoch(epoch)
                batches = iter(data)
                for _ in range(batch_in_epoch):  # a resumed run skips what it already trained on
                    next(batches, None)
                if not rng_restored:  # after the skip, so the run continues with the saved random state
                    checkpoint.set_rng_state(state["rng"])
                    rng_restored = True
                for batch in batches:
                    batch = _to_device(batch, self.device)
                    with self.autocast():
                        out = task.training_step(batch, optim)
                    optim.end_step()
                    step += 1
                    batch_in_epoch += 1
                    log.step = step
                    bar.update(1)
                    for k, v in {**(out or {}), **{f"grad_norm_{k}" if len(optim.named) > 1 else "grad_norm": v
                                                   for k, v in optim.grad_norms.items()}}.items():
                        if isinstance(v, list):  # several samples (the episodes that ended this step): each counts
                            v, n = torch.tensor(v, dtype=torch.float32).sum(), len(v)
                        else:
                            v, n = (v.detach().float() if isinstance(v, torch.Tensor) else torch.tensor(float(v))), 1
                        window[k] = window[k] + v if k in window else v
                        counts[k] = counts.get(k, 0) + n
                    n_window += 1
                    samples_window += (task.samples_in(batch) or 0) * self.dist.world_size

                    stopped = distributed.any_rank(self.stop_signal is not None, self.dist, self.device)
                    if step % log_every == 0 or stopped or step >= max_steps:
                        dt = time.perf_counter() - t_window
                        metrics = {f"train/{k}": (v / counts[k]).item() for k, v in window.items()}
                        metrics.update({f"train/{k}": v for k, v in optim.lrs().items()})
                        metrics.update({"train/epoch": epoch + batch_in_epoch / per_epoch if per_epoch else epoch,
                                        "perf/steps_per_sec": n_window / dt, "perf/elapsed_s": self.elapsed(),
                                        **task.progress()})
                        if samples_window:
                            metrics["perf/samples_per_sec"] = samples_window / dt
                        log.log(metrics)
                        bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in metrics.items()
                                         if k in ("train/loss", "train/episode_return", "perf/samples_per_sec",
                                                  "perf/steps_per_sec")})
                        window, counts, n_window, samples_window = {}, {}, 0, 0
                        t_window = time.perf_counter()
                    if stopped:
                        break
                    t_pause = time.perf_counter()  # evaluation and saving do not count against throughput
                    if eval_every and step % eval_every == 0:
                        self._evaluate(task, optim, counters, snapshot)
                        if self.target_reached:
                            break
                    if checkpoint_every and step % checkpoint_every == 0:
                        self._save("last.pt", self._state(task, optim, snapshot()))
                    t_window += time.perf_counter() - t_pause
                    if step >= max_steps:
                        break
                else:  # the epoch ran out
                    epoch += 1
                    batch_in_epoch = 0
                    if cfg.get("eval_each_epoch") and counters["last_eval_step"] != step:
                        t_pause = time.perf_counter()
                        self._evaluate(task, optim, counters, snapshot)
                        t_window += time.perf_counter() - t_pause
                    if self.target_reached:
                        break
                    continue
                break  # max_steps or a signal
            if not stopped and counters["last_eval_step"] != step:
                self._evaluate(task, optim, counters, snapshot)
            self._save("last.pt", self._state(task, optim, snapshot()))
        finally:
            bar.close()
            self._restore_signal_handlers(previous)
        return self._finish(task, snapshot(), "interrupted" if stopped else "completed")

    def _evaluate(self, task: Task, optim: Optimizers, counters: dict[str, Any], snapshot) -> None:
        counters["last_eval_step"] = self.logger.step
        if self.dist.is_main:
            t0 = time.perf_counter()
            with self.unwrapped(task), torch.no_grad(), self.autocast():
                task.eval()
                try:
                    # plain keys go under eval/; a key with its own prefix (perf/eval_images_per_sec) stays as is
                    metrics = {k if "/" in k else f"eval/{k}": v for k, v in task.evaluate().items()}
                finally:
                    task.train()
            metrics["perf/eval_seconds"] = time.perf_counter() - t0
            metrics["perf/elapsed_s"] = self.elapsed()
            metrics.update(task.progress())
            self.logger.log(metrics)
            tqdm.write(f"[lab] step {self.logger.step}: {metrics_line(metrics)}")  # above the bar, in any log
            name, mode = task.main_metric, task.main_mode
            if name and name in metrics:
                value = float(metrics[name])
                old = self.best.get("value")
                if old is None or (value > old if mode == "max" else value < old):
                    self.best = {"metric": name, "value": value, "step": self.logger.step}
                    task.snapshot_only = True
                    try:
                        self._save("best.pt", self._state(task, optim, snapshot()))
                    finally:
                        task.snapshot_only = False
                target = self.cfg.get("stop_at")
                if target is not None and (value >= target if mode == "max" else value <= target):
                    self.target_reached = True
                    print(f"[lab] {name}={value:.4g} reached trainer.stop_at={target}: stopping", flush=True)
        self.target_reached = distributed.any_rank(self.target_reached, self.dist, self.device)
        distributed.barrier(self.dist)

    def _load_task(self, task: Task, path: Path) -> dict[str, Any]:
        """Put a checkpoint's task state into `task` on this run's device (mode=eval, mode=generate)."""
        if not path.exists():  # a directory or an unreadable file: checkpoint.load says which
            raise LabError(f"checkpoint={path} does not exist; pass a run's checkpoints/best.pt or last.pt")
        task.to(self.device)
        if self.cfg.get("channels_last"):
            task.to(memory_format=torch.channels_last)
        state = checkpoint.load(path, map_location=self.device)
        checkpoint.load_state(task, state["task"], "task (model) state", path)
        return state

    def generate_checkpoint(self, task: Task, path: Path, n: int) -> dict[str, Any]:
        """`mode=generate`: load a checkpoint's task state and call `task.generate(n)` (new samples, as files)."""
        if not callable(getattr(task, "generate", None)):
            raise LabError(f"{type(task).__name__} has no generate(n); mode=generate is for generative tasks "
                           "(dcgan_*, autoencoder_*, vae_*)")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise LabError(f"n={n!r} must be a positive number of samples")
        state = self._load_task(task, path)
        self.logger.start()
        self.logger.step = int(state.get("step", 0))
        with torch.no_grad(), self.autocast():
            task.eval()
            out = task.generate(n)
        print("[lab] " + ", ".join(f"{k}={v}" for k, v in out.items()), flush=True)
        return self.logger.summary({"checkpoint": str(path), "status": "generated", **out})

    def evaluate_checkpoint(self, task: Task, path: Path) -> dict[str, Any]:
        """`mode=eval`: load a checkpoint's task state and evaluate it once (an agent plays and records)."""
        state = self._load_task(task, path)
        self.logger.start()
        self.logger.step = int(state.get("step", 0))
        t0 = time.perf_counter()
        with torch.no_grad(), self.autocast():
            task.eval()
            metrics = {k if "/" in k else f"eval/{k}": v for k, v in task.evaluate().items()}
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
    def _install_signal_handlers(self) -> dict[int, Any]:
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
        return previous

    def _restore_signal_handlers(self, previous: dict[int, Any]) -> None:
        for s, h in previous.items():
            signal.signal(s, h)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch
