"""The Optuna backend: TPE under the latency constraint, or NSGA-II for the accuracy/latency Pareto front.

Trials run one at a time in this process; more processes (on this machine or others) with the same ``--storage``
and study name share the study's ``--trials`` between them (see :mod:`searchspace.nas.study`).
"""

from __future__ import annotations

import time
from typing import Any

import optuna

from .backend import Backend
from .config import SearchConfig
from .study import FINISHED, SearchStudy, record, tpe_startup_trials, trial_rows

__all__ = ["FINISHED", "OptunaBackend", "create_study", "record", "run_study", "tpe_startup_trials", "trial_rows"]


class OptunaBackend(Backend):
    label = "search"

    def search(self) -> bool:
        def after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            if not self.after_trial(trial).startable:
                study.stop()

        while self.tally().startable and not self._timed_out():
            left = None if self.deadline is None else max(self.deadline - time.monotonic(), 0.0)
            self.study.study.optimize(self.objective, n_trials=None, timeout=left, catch=(Exception,),
                                      callbacks=[after_trial], gc_after_trial=True)
        return False


def create_study(config: SearchConfig) -> optuna.Study:
    """The search's Optuna study (created, or loaded to resume)."""
    return SearchStudy(config, heartbeat=False).study


def run_study(config: SearchConfig, space, runner, *, progress: bool, echo) -> tuple[list[dict[str, Any]], bool]:
    return OptunaBackend(config, space, runner, progress=progress, echo=echo).run()

