"""What the Optuna, Ray and NNI backends share: the study, the objective, progress and the best so far.

A backend decides only how candidates are proposed and where they run (:meth:`Backend.search`). Everything else
is here, once: opening the study (:class:`~searchspace.nas.study.SearchStudy`) and releasing dead workers' trials,
queueing the presets, the objective every trial runs (claim the trial, sample the candidate, evaluate it, record
the outcome), the progress bar over the study's total, the best feasible metric so far, waiting for other
workers, and the rows the results files are written from.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from .candidate import CandidateRunner, Outcome
from .config import SearchConfig
from .study import DUPLICATE_ATTR, OUTCOME_ATTR, SearchStudy, Skipped, Surplus, Tally, attrs

MAX_DUPLICATES = 50  # draws in a row that repeat earlier candidates before a worker gives up on the space


class SpaceExhausted(Exception):
    """The sampler keeps proposing candidates the study has already evaluated."""


class Backend:
    """Run the trials a study still needs; subclasses implement :meth:`search`."""

    label = "search"
    queue_presets = True  # presets that are points of the space are a new study's first trials

    def __init__(self, config: SearchConfig, space, runner: CandidateRunner, *, progress: bool,
                 echo: Callable[[str], None]):
        self.config, self.space, self.runner, self.echo = config, space, runner, echo
        self.progress = progress
        self.study = SearchStudy(config)
        self.metric = self.study.metric
        self.best: float | None = None
        self.bar = None
        self.duplicates = 0  # draws in a row that repeated an earlier candidate
        self.deadline = time.monotonic() + config.timeout_s if config.timeout_s else None

    # -------------------------------------------------------------------------------------------- the run

    def run(self) -> tuple[list[dict[str, Any]], bool]:
        """Run this worker's share of the study; returns (rows of every finished trial, interrupted?)."""
        from tqdm.auto import tqdm

        released = self.study.release_dead_workers()
        if released:
            self.echo(f"{released} trial(s) of stopped workers are queued to run again")
        tally = self.study.tally()
        if tally.counted:
            self.study.check_space(self.space)
            self.echo(f"resuming study {self.config.name!r}: {tally.counted} of {self.config.trials} trials "
                      f"finished" + (f", {tally.running} running on other workers" if tally.running else ""))
        if tally.startable and self.queue_presets:
            queued = self.study.enqueue_presets(self.space)
            if queued:
                self.echo(f"the first {len(queued)} trials are the presets that are points of the space: "
                          f"{', '.join(queued)}")
        self.best = self.study.best_feasible()
        self.bar = tqdm(total=self.config.trials, initial=tally.counted, disable=not self.progress or tally.settled,
                        unit="trial", dynamic_ncols=True, desc=self._description())
        started, before = time.perf_counter(), tally.counted
        interrupted = False
        try:
            while not interrupted:
                stalled = False
                if self.tally().startable and not self._timed_out():
                    known = len(self.study.trials())
                    interrupted = self.search()
                    stalled = len(self.study.trials()) == known
                if interrupted or self._timed_out():
                    break
                if stalled and self.tally().startable:  # the backend has nothing more to propose
                    break
                # no trial left to start here (another worker may have just taken the last one): wait for the other
                # workers' trials; a dead worker's is queued again, and run here
                if self.study.wait_for_others(self.echo, deadline=self.deadline):
                    break
        except KeyboardInterrupt:
            interrupted = True
        except SpaceExhausted:
            pass
        finally:
            self.bar.close()
        ran = self.study.tally().counted - before
        if ran and not interrupted:
            self.echo(f"{ran} trials in {time.perf_counter() - started:.0f} s{self._summary()}")
        return self.study.rows(), interrupted

    def search(self) -> bool:
        """Run trials until the study has none left to start (or the timeout); returns interrupted?"""
        raise NotImplementedError

    def _description(self) -> str:
        limit = f", {self.config.timeout_s:.0f} s max" if self.config.timeout_s else ""
        return f"{self.label} ({self.config.trials} trials{limit})"

    def _summary(self) -> str:
        return ""

    def _timed_out(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def tally(self) -> Tally:
        return self.study.tally()

    # -------------------------------------------------------------------------------------------- trials

    def objective(self, trial: optuna.trial.Trial) -> Any:
        """One trial: claim it, sample its candidate from the space, evaluate, record; Optuna's return value."""
        pareto = self.config.objective == "pareto"

        def report(epoch: int, accuracy: float) -> bool:
            if pareto:
                return False
            trial.report(accuracy, epoch)
            return trial.should_prune()

        arch = None
        try:
            arch = self.space.sample(trial)
            try:
                self.study.admit(trial)
            except Surplus:
                self.study.study.stop()
                raise
            self.duplicates = 0
            outcome = self.runner.run(arch, report=report)
        except Skipped:
            raise
        except Exception as exc:
            trial.set_user_attr(OUTCOME_ATTR, {"state": "failed", "error": f"{type(exc).__name__}: {exc}"[:500],
                                               "arch": arch.to_dict() if arch is not None else None})
            raise
        self.study.record(trial, outcome)
        self.observe(outcome)
        if outcome.state == "pruned":
            raise optuna.TrialPruned()
        if pareto:
            return outcome.objective, outcome.latency_for_constraint() or float("inf")
        return outcome.objective

    def observe(self, outcome: Outcome) -> None:
        """Keep the best feasible metric for the progress bar."""
        value = outcome.accuracy if self.metric == "accuracy" else outcome.score
        fits = outcome.measured_ms is not None and outcome.measured_ms <= self.config.budget_ms
        if outcome.state == "complete" and fits and value is not None and (self.best is None or value > self.best):
            self.best = value

    def after_trial(self, trial: FrozenTrial | None = None) -> Tally:
        """Show the study's progress after a trial of this worker; returns the study's tally."""
        tally = self.study.tally()
        if trial is not None and DUPLICATE_ATTR in trial.user_attrs:
            self.duplicates += 1
            if self.duplicates >= MAX_DUPLICATES:
                self.echo(f"{MAX_DUPLICATES} draws in a row repeated earlier candidates: the space seems "
                          f"exhausted; stopping with {tally.counted} trials")
                raise SpaceExhausted
        if self.bar is not None:
            self.bar.n = tally.counted
            if self.best is not None:
                self.bar.set_postfix_str(f"best {self.metric} {self.best:.3f}")
            elif trial is not None:
                self.bar.set_postfix_str(f"last: {attrs(trial).get('state', trial.state.name.lower())}")
            self.bar.refresh()
        return tally
