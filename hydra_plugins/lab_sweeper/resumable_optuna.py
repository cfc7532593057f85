"""Hydra's Optuna sweeper, made resumable: rerun an interrupted sweep's command and it finishes the budget.

`conf/hparams_search/*.yaml` select it through `hydra.sweeper._target_` (Hydra loads sweepers only
from the `hydra_plugins` namespace package, hence this folder) and keep the study in SQLite inside a
fixed sweep directory. On a rerun the study is loaded, trials left RUNNING by the interruption are
marked FAIL, only `n_trials` minus the finished trials run, and job numbers (the run directories
0, 1, 2, ...) continue after the existing ones instead of overwriting them.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper

log = logging.getLogger(__name__)


class ResumableOptunaSweeper(OptunaSweeper):
    def sweep(self, arguments: list[str]) -> None:
        import optuna

        impl = self.sweeper
        storage = str(impl.storage or "")
        if storage.startswith("sqlite:///"):  # SQLite cannot create the directory of its file
            Path(storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        if storage and impl.study_name:
            try:
                study = optuna.load_study(study_name=impl.study_name, storage=storage)
            except KeyError:  # no such study yet: a fresh sweep
                study = None
            if study is not None:
                for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
                    study._storage.set_trial_state(t._trial_id, optuna.trial.TrialState.FAIL)
                done = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                                     optuna.trial.TrialState.PRUNED)))
                impl.job_idx = len(study.trials)
                impl.n_trials = max(0, impl.n_trials - done)
                log.info(f"Resuming study {impl.study_name!r}: {done} trials finished, {impl.n_trials} to run")
        return super().sweep(arguments)
