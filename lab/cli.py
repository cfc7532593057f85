"""`python -m lab +experiment=NAME key=value ...`: compose the Hydra config, build the task, train."""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
import sys
import tempfile
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from lab import config as _config  # noqa: F401 - registers the ${ceil_div:...} resolver
from lab import distributed, io, rundir, seeds
from lab.devices import resolve_device
from lab.errors import LabError
from lab.logger import RunLogger
from lab.task import Task
from lab.trainer import Trainer, check_config, run_context

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def _register_plugins() -> None:
    """Make Hydra find the lab's sweeper (hydra_plugins/lab_sweeper) in any install mode: Hydra discovers
    plugins only in the `hydra_plugins` namespace, which an editable install does not extend."""
    import hydra_plugins

    folder = str(CONF_DIR.parent / "hydra_plugins")
    if Path(folder).is_dir() and folder not in list(hydra_plugins.__path__):
        hydra_plugins.__path__.append(folder)


def experiments() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


FAMILIES = {"agents": "Reinforcement learning (agents/)", "generative": "Generative models (generative/)",
            "vision": "Vision (vision/)", "text": "Text (text/)"}


def describe_experiments() -> dict[str, list[tuple[str, str]]]:
    """{family: [(experiment, its one-line description)]}: the family from the package of the yaml's `task:`,
    the description from the yaml's first comment line."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for name in experiments():
        path = CONF_DIR / "experiment" / f"{name}.yaml"
        comments = [ln[1:].strip() for ln in path.read_text().splitlines() if ln.startswith("#")]
        description = next((c for c in comments if c and not c.startswith("@package")), "")
        task = str(OmegaConf.load(path).get("task") or "")
        family = FAMILIES.get(task.split(".")[0], "Other")
        groups.setdefault(family, []).append((name, description))
    return groups


def _usage(problem: str) -> str:
    lines = [problem, "Experiments (run one with: python -m lab +experiment=NAME [key=value ...]):"]
    groups = describe_experiments()
    width = max(len(n) for g in groups.values() for n, _ in g)
    for family in [*FAMILIES.values(), "Other"]:
        if family in groups:
            lines.append(f"  {family}")
            lines += [f"    {n:<{width}}  {d}" for n, d in groups[family]]
    return "\n".join(lines)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def task_class(name: str) -> type[Task]:
    """The Task class an experiment's `task:` names (module.Class)."""
    try:
        task_cls = hydra.utils.get_class(name)
    except Exception:  # noqa: BLE001
        raise LabError(f"task={name!r} is not an importable class (module.Class)") from None
    if not issubclass(task_cls, Task):
        raise LabError(f"task={name!r} is not a lab.task.Task")
    return task_cls


MODES = ("train", "eval", "generate", "predict")


def run(cfg: DictConfig) -> float | None:
    """Train the configured task; returns its main metric (the objective for sweepers)."""
    if not cfg.get("task"):
        raise LabError(_usage("No experiment chosen."))
    mode = str(cfg.get("mode", "train"))
    if mode not in MODES:
        raise LabError(f"mode={mode!r} is not a mode; use mode=train, mode=eval checkpoint=PATH, "
                       "mode=generate checkpoint=PATH n=N or mode=predict checkpoint=PATH input=PATH")
    if mode != "train" and not cfg.get("checkpoint"):
        raise LabError(f"mode={mode} needs checkpoint=PATH (a run's checkpoints/best.pt or last.pt)")
    t = cfg.trainer
    check_config(t)
    task_cls = task_class(cfg.task)
    info = distributed.from_env()
    device = resolve_device(t.device, info.local_rank)
    distributed.init(info, device)
    logger = task = None
    sweep_job = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        run_dir = Path(distributed.broadcast(HydraConfig.get().runtime.output_dir, info))
        if info.is_main:  # a single run's directory is already taken (claim_run_dir); a sweep job's is taken here
            rundir.claim(run_dir, resume=bool(cfg.resume), overwrite=bool(cfg.get("overwrite")))
        seed_everything(int(cfg.seed), bool(t.deterministic))
        if t.get("num_threads"):
            torch.set_num_threads(int(t.num_threads))
        _sweep_labels(cfg)
        config = OmegaConf.to_container(cfg, resolve=True)
        if info.is_main:  # Hydra's .hydra/config.yaml keeps interpolations; this is what the run used
            io.write_text(run_dir / "config.yaml", OmegaConf.to_yaml(config))
        logger = RunLogger(cfg.logger, run_dir, config, enabled=info.is_main)
        ctx = run_context(t, task_cls, device, info, logger, run_dir, int(cfg.seed), mode)
        if cfg.get("seeds"):  # several seeds, each its own run in a subdirectory: the result is their aggregate
            if mode != "train" or info.enabled or not task_cls.main_metric:
                raise LabError("seeds=[...] trains several seeds, one process each, and aggregates their main "
                               "metric: use it with mode=train, without torchrun, for a task with a main_metric")
            return seeds.run(cfg, run_dir, list(HydraConfig.get().overrides.task), str(task_cls.main_metric),
                             task_cls.main_mode)
        task = task_cls(cfg, ctx)
        trainer = Trainer(t, ctx, config)
        if mode == "eval":
            summary = trainer.evaluate_checkpoint(task, Path(str(cfg.checkpoint)))
        elif mode == "generate":
            summary = trainer.generate_checkpoint(task, Path(str(cfg.checkpoint)), cfg.get("n", 64))
        elif mode == "predict":
            summary = trainer.predict_checkpoint(task, Path(str(cfg.checkpoint)), cfg.get("input"))
        else:
            summary = trainer.fit(task, resume=bool(cfg.resume))
    finally:
        if task is not None:
            task.close()
        if logger is not None:
            logger.finish()
        if sweep_job and info.is_main:
            rundir.release(run_dir)
        distributed.shutdown()
    if trainer.stop_signal is not None:
        print(f"[lab] stopped at step {summary['step']}; continue with resume=true hydra.run.dir={run_dir}",
              file=sys.stderr, flush=True)
        sys.exit(128 + trainer.stop_signal)
    return summary.get(task.main_metric) if task.main_metric else None


def _sweep_labels(cfg: DictConfig) -> None:
    """Runs of one sweep share a W&B group and carry a "sweep" tag, so its dashboard needs no filtering."""
    if cfg.logger.get("backend") != "wandb":
        return
    tags = list(cfg.logger.get("tags") or [])
    with open_dict(cfg):
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            cfg.logger.group = f"{cfg.experiment}-{Path(HydraConfig.get().sweep.dir).name}"
            tags.append("sweep")
        if os.environ.get("WANDB_SWEEP_ID"):  # a `wandb agent` started this run
            tags.append("wandb-sweep")
        cfg.logger.tags = list(dict.fromkeys(tags))


FAILED_RUNS: list[str] = []  # multirun jobs that stopped with a LabError (the sweep goes on)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> float | None:
    try:
        return run(cfg)
    except (LabError, OmegaConfBaseException, OSError) as e:  # OmegaConf: a missing key or a failed interpolation
        if isinstance(e, OSError) and e.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS):
            raise
        if isinstance(e, LabError):
            msg = str(e)
        elif isinstance(e, OSError):  # a media file or a log the file system refused
            msg = (f"could not write {e.filename or 'a file of the run'} ({e.strerror}); free disk space, then "
                   "resume=true continues from the last checkpoint")
        else:
            msg = f"config: {' '.join(str(e).split())}"
        print(f"error: {msg}", file=sys.stderr, flush=True)
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            # One bad run must not end a sweep: its objective is None (Optuna records a failed trial).
            FAILED_RUNS.append(f"{HydraConfig.get().runtime.output_dir}: {msg}")
            return None
        sys.exit(2)


RUNLESS_FLAGS = ("--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i", "--shell-completion", "-sc")


def compose_run(argv: list[str]) -> tuple[str | None, DictConfig | None]:
    """Compose the config as the run will (a sweep by its first value), before anything runs: (the problem with
    an override of a key the config does not have, in one line; the config with its `hydra` node). Either is
    None where the check does not apply (a syntax or a sweep Hydra reports itself, an app already running)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import ConfigCompositionException

    if GlobalHydra.instance().is_initialized():  # called from inside a Hydra app: it composes for itself
        return None, None
    try:
        parsed = OverridesParser.create().parse_overrides([a for a in argv if not a.startswith("-")])
        lines = []
        for o in parsed:
            first = next(iter(o.sweep_string_iterator())) if o.is_sweep_override() else None
            lines.append(o.input_line if first is None else f"{o.get_key_element()}={first}")
    except Exception:  # noqa: BLE001 - a syntax Hydra reports itself, or a sweep with no first value (interval)
        return None, None
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            return None, compose("config", overrides=lines, return_hydra_config=True)
    except ConfigCompositionException as e:
        text = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        m = re.fullmatch(r"Could not override '(.+)'\.", text[0]) if text else None
        detail = f"{e} {e.__cause__}"
        struct = re.search(r"Key '(.+)' is not in struct", detail)
        full = re.search(r"full_key: (\S+)", detail)
        if m and struct and full and full.group(1) != m.group(1):
            return (f"{m.group(1)}: its new value adds the key {full.group(1)}, which the config's {m.group(1)} "
                    f"does not have; to replace {m.group(1)} as a whole, delete it first: '~{m.group(1)}' "
                    f"'+{m.group(1)}={{...}}', or set its keys one by one ({full.group(1)} with a +)"), None
        if m:
            return (f"{m.group(1)} is not a key of this config, so the override cannot take effect; check its "
                    f"spelling (python -m lab +experiment=NAME --cfg job prints the config), or add a new key "
                    f"with +{m.group(1)}=..."), None
        return " ".join(text)[:400], None
    except Exception:  # noqa: BLE001 - anything else (a missing value, a plugin): the run reports it in its own words
        return None, None


def claim_run_dir(argv: list[str], cfg: DictConfig | None) -> list[str]:
    """A single training, eval or generate run takes its directory (lab/rundir.py) before Hydra writes into it,
    and runs there by an explicit hydra.run.dir (a timestamped default resolved once). Sweeps' jobs take theirs
    in `run`."""
    multirun = any(a in ("-m", "--multirun") for a in argv) or "MULTIRUN" in str(cfg.hydra.get("mode") if cfg else "")
    if cfg is None or multirun or not cfg.get("task") or any(a.split("=")[0] in RUNLESS_FLAGS for a in argv):
        return argv
    try:
        run_dir = Path(str(cfg.hydra.run.dir)).resolve()
    except Exception:  # noqa: BLE001 - a run.dir only Hydra's own resolvers know: `run` claims it
        return argv
    rundir.claim(run_dir, resume=bool(cfg.get("resume")), overwrite=bool(cfg.get("overwrite")))
    return [*(a for a in argv if not a.startswith("hydra.run.dir=")), f"hydra.run.dir={run_dir}"]


def main(argv: list[str] | None = None) -> None:
    """Entry point of `python -m lab` and the `lab` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not (CONF_DIR / "config.yaml").is_file():  # a non-editable install copies the packages, not conf/
        print(f"error: the lab's configs are not at {CONF_DIR}. Run it from a clone: `make run`, or "
              "`pip install -e .` in the clone (an editable install keeps conf/ next to the code).", file=sys.stderr)
        sys.exit(2)
    if argv[:1] == ["report"]:  # python -m lab report RUN_OR_SWEEP_DIR...
        from lab import report

        sys.exit(report.main(argv[1:]))
    if argv[:1] == ["scenes"]:  # python -m lab scenes OUT ...: digit scenes in VOC and COCO format
        from vision import scenes

        sys.exit(scenes.main(argv[1:]))
    for arg in argv:
        m = re.fullmatch(r"\+{0,2}experiment=(.*)", arg)
        if m:
            unknown = [n for n in m.group(1).split(",") if n not in experiments()]
            if unknown:
                print(f"error: {_usage(f'Unknown experiment: {unknown[0]!r}.')}", file=sys.stderr)
                sys.exit(2)
    _register_plugins()
    problem, cfg = compose_run(argv)
    info = distributed.from_env()
    if not problem and info.is_main:
        try:
            argv = claim_run_dir(argv, cfg)
        except LabError as e:
            problem = str(e)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    scratch = None
    if info.enabled and not info.is_main:
        # Only rank 0 writes the run directory; the other ranks learn its path from rank 0.
        scratch = tempfile.mkdtemp(prefix=f"lab-rank{info.rank}-")
        argv = [a for a in argv if not a.startswith(("hydra.run.dir=", "hydra.output_subdir="))]
        argv += [f"hydra.run.dir={scratch}", "hydra.output_subdir=null"]
    sys.argv = [sys.argv[0], *argv]
    try:
        hydra_main()
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    if FAILED_RUNS:
        print(f"error: {len(FAILED_RUNS)} run(s) of the sweep failed:\n  " + "\n  ".join(FAILED_RUNS), file=sys.stderr)
        sys.exit(2)
