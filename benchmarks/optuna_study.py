"""Keep an Optuna sweep's study as a record: every trial's parameters, objective and state, with each trial's
per-seed final results (its `seeds.json`, for multi-seed searches), the best trial, and the command.

    python benchmarks/optuna_study.py multirun/dqn_cartpole/seeds_optuna [--name dqn_cartpole_seeds_study]

Reads `<sweep dir>/optuna.db` (the storage of conf/hparams_search/*.yaml) and `<sweep dir>/<trial>/seeds.json`;
writes benchmarks/results/<name>.json (default: `<study name>_study`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import record  # noqa: E402


def export(sweep: Path) -> dict[str, Any]:
    """The study in `sweep` (its only one) as plain data; trials in the order they ran."""
    import optuna

    from lab.io import read_json

    db = sweep / "optuna.db"
    if not db.exists():
        raise SystemExit(f"error: {db} does not exist; pass the sweep directory of an Optuna search "
                         "(hydra.sweep.dir, e.g. multirun/dqn_cartpole/seeds_optuna)")
    storage = f"sqlite:///{db}"
    names = optuna.get_all_study_summaries(storage)
    if len(names) != 1:
        raise SystemExit(f"error: {db} holds {len(names)} studies; this exporter reads a sweep with one")
    study = optuna.load_study(study_name=names[0].study_name, storage=storage)
    trials = []
    for t in study.trials:
        path = sweep / str(t.number) / "seeds.json"
        seeds = read_json(path) if path.exists() else {}
        minutes = None
        if t.datetime_start and t.datetime_complete:
            minutes = round((t.datetime_complete - t.datetime_start).total_seconds() / 60, 2)
        trials.append({"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
                       "minutes": minutes, "seeds_final": seeds.get("final"), "seeds_iqm": seeds.get("iqm"),
                       "seeds_min": seeds.get("min"), "aggregate": seeds.get("aggregate")})
    done = [t for t in trials if t["state"] == "COMPLETE"]
    best = max(done, key=lambda t: t["value"]) if done else None
    fixed = study.trials[0].user_attrs if study.trials else {}  # the sweep's own overrides (Hydra's sweeper)
    command = " ".join(["python -m lab -m", *(f"{k}={v}" for k, v in fixed.items())])
    return {"study_name": study.study_name, "direction": study.direction.name, "sweep_dir": str(sweep),
            "search_command": command, "trials_complete": len(done), "trials": trials, "best": best,
            "fixed_overrides": fixed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep", type=Path, help="the sweep directory (it holds optuna.db)")
    ap.add_argument("--name", default=None, help="the record's name (default: <study name>_study)")
    args = ap.parse_args()
    figures = export(args.sweep)
    print(json.dumps(figures["best"]))
    record.write(args.name or f"{figures['study_name']}_study", figures)


if __name__ == "__main__":
    main()
