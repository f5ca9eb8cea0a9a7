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


# --- kept until the Ray backend moves onto Backend (same behaviour as before for its callers) -------------------


def open_study(config: SearchConfig, echo) -> tuple[optuna.Study, int, int]:
    study = SearchStudy(config)
    study.release_dead_workers()
    tally = study.tally()
    if tally.counted:
        echo(f"resuming study {config.name!r}: {tally.counted} of {config.trials} trials finished")
    return study.study, tally.counted, tally.free + tally.waiting


def _best_feasible(study: optuna.Study, metric: str, budget_ms: float) -> float | None:
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    values = [t.user_attrs.get(metric) for t in complete
              if t.user_attrs.get("state") == "complete" and (t.user_attrs.get("measured_ms") or 1e18) <= budget_ms]
    values = [v for v in values if v is not None]
    return max(values) if values else None


def _enqueue_presets_in_space(study: optuna.Study, space, done: int, remaining: int) -> None:
    from ..presets import list_presets, preset

    if done:
        return
    queued = 0
    for name in list_presets():
        params = space.params_of(preset(name))
        if params and queued < remaining:
            study.enqueue_trial(params, user_attrs={"preset": name}, skip_if_exists=True)
            queued += 1
