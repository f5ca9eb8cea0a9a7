"""The study: the one record of a search, shared by every backend and by every worker on it.

A search's Optuna study (SQLite in the results folder, or any database ``--storage`` names) holds every trial: its
parameters, its outcome in user attributes, and whether it broke the latency budget as Optuna's constraint
(``system_attrs["constraints"]``, which samplers and optuna-dashboard read). The results files are rebuilt from it
alone, so any number of processes on any number of machines can work on one study:

* **``--trials`` is the study's total.** A trial *counts* once it is complete, pruned, or failed by its candidate
  (a bad architecture, a runtime that cannot compile it). Workers start trials while the counted, running and
  queued trials leave room; two workers that start the last free trial at the same moment are told apart by trial
  number, and the later one is recorded as ``surplus`` (failed, never evaluated, not counted). A trial that draws
  the parameters of a counted or running trial is recorded as a duplicate the same way, so no candidate is
  evaluated twice, and the worker's next trial draws at random (TPE, sure of its best region, would propose the
  same candidate again). A worker with no trial left to start waits for the others' running trials, so every worker's
  results cover every trial.
* **Only a dead worker loses its trial.** Every running trial beats Optuna's heartbeat (``HEARTBEAT_S``); a trial
  whose heartbeat stops for ``GRACE_S`` is failed by the next worker that looks and queued again with the same
  parameters (Optuna's :class:`~optuna.storages.RetryHeartbeatStaleTrialCallback`, ``MAX_RETRY`` times). A
  worker on the same machine whose process is gone is noticed at once, by its process id. Nothing else ever fails
  another worker's trial. A trial stopped by Ctrl-C is failed and not counted: the next run draws a new one.
* **The sampler's state follows the study.** Each trial's random draws are seeded by the search's seed and the
  trial's number, so a resumed search, or a second worker, never repeats the draws of the trials before it.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.samplers import BaseSampler
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from ..errors import MixerNASError
from ..presets import list_presets, preset
from .candidate import Outcome
from .config import SearchConfig
from .storage import display_url, open_storage

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
HEARTBEAT_S = 10  # a running trial's heartbeat, seconds
GRACE_S = 60  # a trial whose heartbeat stops this long belongs to a dead worker
MAX_RETRY = 2  # a dead worker's trial is queued again at most this many times
OUTCOME_ATTR = "outcome"  # everything a trial's evaluation found (one write: each attribute is a transaction)
WORKER_ATTR = "worker"  # who runs the trial (host/boot:pid) and what it drew: {"id", "params", "distributions"}
QUEUED_ATTR = "queued"  # set on trials queued as reserved work (presets, NNI's samples)
PRESET_ATTR = "preset"  # the name of the preset a queued trial evaluates
SURPLUS_ATTR = "surplus"  # a trial started when the study's trials were all taken: never evaluated
DUPLICATE_ATTR = "duplicate_of"  # a trial that drew another's parameters: never evaluated
CONSTRAINTS_KEY = "constraints"  # Optuna's system attribute for constraint values (<= 0 is feasible)


# ------------------------------------------------------------------------------------------------- workers


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()[:8]
    except OSError:
        return "-"


def worker_id() -> str:
    """``host/boot:pid``: which process runs a trial, and whether it can be checked from here."""
    return f"{socket.gethostname()}/{_boot_id()}:{os.getpid()}"


def worker_of(trial: FrozenTrial) -> str | None:
    """The ``host/boot:pid`` of the worker that runs (or ran) a trial."""
    worker = trial.user_attrs.get(WORKER_ATTR)
    return worker.get("id") if isinstance(worker, dict) else worker


class RetryDeadWorkersTrial(RetryHeartbeatStaleTrialCallback):
    """Optuna's retry of a dead worker's trial, with the parameters the worker had drawn.

    Optuna keeps a running trial's parameters in the worker's memory until the trial ends, so the stored trial of
    a dead worker has none; :meth:`SearchStudy.claim` stored them with the worker's name.
    """

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        trial = copy.deepcopy(trial)
        drawn = trial.user_attrs.get(WORKER_ATTR)
        if not trial.params and isinstance(drawn, dict) and drawn.get("params"):
            trial.distributions = {k: optuna.distributions.json_to_distribution(d)
                                   for k, d in drawn["distributions"].items()}
            trial.params = drawn["params"]
        # the copy names no worker (until one claims it, no worker, dead or alive, runs it) and carries no error
        trial.user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in (WORKER_ATTR, "error")}
        super().__call__(study, trial)


def _local_pid(worker: str | None) -> int | None:
    """The process id of a worker on this machine (same host and boot), else None."""
    if not worker or ":" not in worker:
        return None
    where, pid = worker.rsplit(":", 1)
    if where != worker_id().rsplit(":", 1)[0] or not pid.isdigit():
        return None
    return int(pid)


def pid_alive(pid: Any) -> bool:
    """Whether process ``pid`` (on this machine) is running; zombies count as dead."""
    if not isinstance(pid, int):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


# ------------------------------------------------------------------------------------------------- sampling


def _constraints(trial: FrozenTrial) -> list[float]:
    # <= 0 means feasible (Optuna's convention); failed trials without the attribute count as infeasible
    return [float(attrs(trial).get("constraint", 1.0))]


def tpe_startup_trials(trials: int) -> int:
    """Random trials before TPE models the space: a sixth of the requested trials, between 4 and 10.

    Optuna's default of 10 suits long studies; the default search here finishes 12-20 trials in its time budget,
    and with 10 random start-up trials it would hardly be guided at all. Screened-out candidates count as trials
    (they cost milliseconds and tell TPE where the budget ends), so the start-up trials are cheap.

    >>> tpe_startup_trials(40), tpe_startup_trials(16), tpe_startup_trials(200)
    (6, 4, 10)
    """
    return max(4, min(10, trials // 6))


def sampler_factory(config: SearchConfig) -> Callable[[int], BaseSampler]:
    """The search's sampler, as a function of its seed."""
    name = config.sampler or ("nsga2" if config.objective == "pareto" else "tpe")
    if name == "random":
        return lambda seed: optuna.samplers.RandomSampler(seed=seed)
    if name == "nsga2":
        return lambda seed: optuna.samplers.NSGAIISampler(seed=seed, constraints_func=_constraints,
                                                          population_size=16)
    startup = tpe_startup_trials(config.trials)
    return lambda seed: optuna.samplers.TPESampler(seed=seed, constraints_func=_constraints,
                                                   n_startup_trials=startup, multivariate=True, group=True)


class TrialSeededSampler(BaseSampler):
    """A sampler whose random draws for trial ``n`` depend only on the seed and ``n``.

    A seeded Optuna sampler starts its random stream again in every process, so a resumed search, or a second
    worker on the study, would draw the same candidates as the first. Here each trial gets a fresh inner sampler
    seeded with ``(seed, trial number)``; everything else it knows comes from the study, as before.
    """

    def __init__(self, factory: Callable[[int], BaseSampler], seed: int):
        self._factory, self._seed = factory, seed
        self._inner = factory(seed)
        self.explore_next = False  # the next trial draws at random (after a draw that repeated a candidate)

    @property
    def inner(self) -> BaseSampler:
        return self._inner

    def before_trial(self, study, trial: FrozenTrial) -> None:
        seed = (self._seed * 1_000_003 + trial.number) % 2**32
        if self.explore_next:  # a model-based sampler that proposed a candidate already evaluated tends to again
            self._inner, self.explore_next = optuna.samplers.RandomSampler(seed=seed), False
        else:
            self._inner = self._factory(seed)
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None) -> None:
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()


# ------------------------------------------------------------------------------------------------- the study


def counts(trial: FrozenTrial) -> bool:
    """Whether a trial uses up one of the study's ``--trials``: it finished, or its candidate failed."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and attrs(trial).get("state") == "failed"


def reserved(trial: FrozenTrial) -> bool:
    """A trial taken from the queue: a preset, an NNI sample, or a dead worker's trial run again."""
    return QUEUED_ATTR in trial.user_attrs or RetryHeartbeatStaleTrialCallback.retried_trial_number(trial) is not None


@dataclass(frozen=True)
class Tally:
    """Where the study stands against its total."""

    total: int
    counted: int
    running: int
    waiting: int

    @property
    def free(self) -> int:
        """Trials nobody has started or queued yet."""
        return max(self.total - self.counted - self.running - self.waiting, 0)

    @property
    def startable(self) -> bool:
        return self.free > 0 or self.waiting > 0

    @property
    def settled(self) -> bool:
        return not self.running and not self.startable


class Skipped(Exception):
    """The trial is recorded (failed, not counted) without evaluating its candidate."""


class Surplus(Skipped):
    """The trial started after the study's trials were all taken."""


class Duplicate(Skipped):
    """The trial drew the parameters of a trial already counted or running."""


class SearchStudy:
    """The study of one search, opened with heartbeats, the trial-seeded sampler and the search's directions."""

    def __init__(self, config: SearchConfig, *, heartbeat: bool = True):
        import warnings

        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message=".*constraints_func.*", category=FutureWarning)
        optuna.logging.set_verbosity(optuna.logging.ERROR)  # trial failures are recorded and reported by us
        self.config = config
        self.storage = open_storage(config.storage_url, **(dict(
            heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
            failed_trial_callback=RetryDeadWorkersTrial(max_retry=MAX_RETRY)) if heartbeat else {}))
        if config.objective == "pareto":
            directions = ["maximize", "minimize"]
            pruner = optuna.pruners.NopPruner()  # Optuna cannot prune multi-objective trials
        else:
            directions = ["maximize"]
            pruner = optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)
        self.sampler = sampler = TrialSeededSampler(sampler_factory(config), config.seed)
        study = dict(storage=self.storage, study_name=config.name, sampler=sampler, pruner=pruner,
                     directions=directions)
        try:
            try:
                self.study = optuna.create_study(**study)
                self.created = True  # the storage lets one worker create a study: that one queues the presets
            except optuna.exceptions.DuplicatedStudyError:
                self.study = optuna.create_study(**study, load_if_exists=True)
                self.created = False
        except ValueError as exc:  # e.g. the stored study has other directions
            raise MixerNASError(f"cannot use study {config.name!r} in {display_url(config.storage_url)}: "
                                f"{exc}") from None
        self.study_id = self.storage.get_study_id_from_name(config.name)
        self.metric = "accuracy" if config.evaluator == "train" else "score"

    # -------------------------------------------------------------------------------------------- state

    def trials(self, states: Sequence[TrialState] | None = None) -> list[FrozenTrial]:
        return self.study.get_trials(deepcopy=False, states=tuple(states) if states else None)

    def tally(self) -> Tally:
        trials = self.trials()
        return Tally(total=self.config.trials, counted=sum(counts(t) for t in trials),
                     running=sum(t.state == TrialState.RUNNING for t in trials),
                     waiting=sum(t.state == TrialState.WAITING for t in trials))

    def _trial_id(self, number: int) -> int:
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)

    def release_dead_workers(self) -> int:
        """Fail and queue again the trials of dead workers; how many were released.

        On this machine a worker whose process is gone is noticed at once; elsewhere its heartbeat must have
        stopped for ``GRACE_S`` (Optuna's :func:`~optuna.storages.fail_stale_trials`).
        """
        released = 0
        retry = RetryDeadWorkersTrial(max_retry=MAX_RETRY)
        for t in self.trials((TrialState.RUNNING,)):
            pid = _local_pid(worker_of(t))
            if pid is None or pid == os.getpid() or pid_alive(pid):
                continue
            trial_id = self._trial_id(t.number)
            try:
                self.storage.set_trial_user_attr(trial_id, "error", "its worker stopped mid-trial (process gone)")
                if not self.storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                    continue
            except optuna.exceptions.UpdateFinishedTrialError:  # another worker got there first
                continue
            retry(self.study, t)
            released += 1
        before = len(self.trials((TrialState.FAIL,)))
        optuna.storages.fail_stale_trials(self.study)
        return released + len(self.trials((TrialState.FAIL,))) - before

    # -------------------------------------------------------------------------------------------- trials

    def admit(self, trial: optuna.trial.Trial) -> None:
        """:meth:`claim` and :meth:`check_new` on one read of the study (each read is a query to its database)."""
        trials = self.trials()
        self.claim(trial, trials)
        self.check_new(trial, trials)

    def claim(self, trial: optuna.trial.Trial, trials: Sequence[FrozenTrial] | None = None) -> None:
        """Mark a trial whose candidate is drawn as this worker's; raise :class:`Surplus` if the study's trials are
        all taken. The draw is stored with it: Optuna writes a trial's parameters only when it finishes, and a dead
        worker's trial is queued again with them."""
        trial.set_user_attr(WORKER_ATTR, {
            "id": worker_id(), "params": trial.params,
            "distributions": {k: optuna.distributions.distribution_to_json(d) for k, d in trial.distributions.items()}})
        mine = None
        taken = 0
        for t in self.trials() if trials is None else trials:
            if t.number == trial.number:
                mine = t
            elif counts(t) or t.state == TrialState.WAITING or (t.state == TrialState.RUNNING
                                                                 and t.number < trial.number):
                taken += 1
        if mine is not None and reserved(mine):
            return
        if taken >= self.config.trials:
            trial.set_user_attr(SURPLUS_ATTR, True)
            trial.set_user_attr("error", "not evaluated: the study's trials were all taken by other workers")
            raise Surplus

    def check_new(self, trial: optuna.trial.Trial, trials: Sequence[FrozenTrial] | None = None) -> None:
        """Raise :class:`Duplicate` if another worker's trial, or an earlier one, already has these parameters."""
        params = trial.params
        for t in self.trials() if trials is None else trials:
            if t.number != trial.number and t.params == params and (
                    counts(t) or (t.state == TrialState.RUNNING and t.number < trial.number)):
                trial.set_user_attr(DUPLICATE_ATTR, t.number)
                trial.set_user_attr("error", f"not evaluated: the same parameters as trial {t.number}")
                self.sampler.explore_next = True
                raise Duplicate

    def record(self, trial: optuna.trial.Trial, outcome: Outcome) -> None:
        """A trial's outcome in its user attributes, and the latency budget as its constraint."""
        record(trial, outcome, self.config.budget_ms, study_id=self.study_id)

    def check_space(self, space) -> None:
        """Refuse to resume a study whose finished trials are not points of ``space``: the space of that name was
        changed since the study began (another version of MixerNAS, or an edited user space), and its trials and
        the new ones would not be comparable (Optuna itself fails every new trial whose choices differ)."""
        # one finished trial is enough: every trial of a study was drawn from the same space
        t = next(iter(self.trials((TrialState.COMPLETE, TrialState.PRUNED))), None)
        if t is None:
            return
        try:
            space.sample(t.params)
        except MixerNASError as exc:
            raise MixerNASError(
                f"study {self.config.name!r} was made with another version of space {self.config.space!r} "
                f"(trial {t.number}: {exc}); pass --out NEW_FOLDER (or another --study-name) to start a new "
                f"search") from None

    def enqueue_presets(self, space) -> list[str]:
        """Queue the presets the search is compared with (``config.baselines``; None = all) that are points of
        ``space`` as the first trials of the study, at most ``config.trials``; returns their names.

        Only the worker that created the study queues them, so workers that start together never queue a preset
        twice, and a resumed study is never queued again.
        """
        if not self.created:
            return []
        queued = []
        for name in list_presets() if self.config.baselines is None else self.config.baselines:
            params = space.params_of(preset(name))
            if params is not None and len(queued) < self.config.trials:
                self.study.enqueue_trial(params, user_attrs={PRESET_ATTR: name, QUEUED_ATTR: "preset"},
                                         skip_if_exists=True)  # two presets of one architecture: one trial
                queued.append(name)
        return queued

    def rows(self) -> list[dict[str, Any]]:
        return trial_rows(self.study)

    def best_feasible(self) -> float | None:
        """The best metric among complete trials whose measured latency fits."""
        outcomes = [attrs(t) for t in self.trials((TrialState.COMPLETE,))]
        values = [o.get(self.metric) for o in outcomes
                  if o.get("state") == "complete" and (o.get("measured_ms") or 1e18) <= self.config.budget_ms]
        values = [v for v in values if v is not None]
        return max(values) if values else None

    def wait_for_others(self, echo: Callable[[str], None], *, poll_s: float = 2.0,
                        deadline: float | None = None) -> bool:
        """Wait while other workers run trials; True once nothing is running and nothing is left to start
        (False if ``deadline``, a ``time.monotonic()`` value, came first, or work was queued for this worker)."""
        told = False
        while True:
            self.release_dead_workers()
            tally = self.tally()
            if tally.startable:
                return False
            if not tally.running:
                return True
            if deadline is not None and time.monotonic() > deadline:
                return False
            if not told:
                echo(f"waiting for {tally.running} trial(s) running on other workers of study "
                     f"{self.config.name!r}")
                told = True
            time.sleep(poll_s)


def attrs(trial: FrozenTrial | optuna.trial.Trial) -> dict[str, Any]:
    """A trial's user attributes with its outcome's fields at the top level (``state``, ``accuracy``, ...)."""
    ua = trial.user_attrs
    return {**ua, **ua[OUTCOME_ATTR]} if OUTCOME_ATTR in ua else ua


def record(trial: optuna.trial.Trial, outcome: Outcome, budget_ms: float, *, study_id: int | None = None) -> None:
    """A trial's outcome as one user attribute; its latency against the budget as Optuna's constraint."""
    latency = outcome.latency_for_constraint()  # measured if measured, else predicted (screened out)
    constraint = (latency - budget_ms) if latency is not None else 1.0
    trial.set_user_attr(OUTCOME_ATTR, {**outcome.to_attrs(), "constraint": constraint})
    storage = trial.storage
    if study_id is None:
        study_id = storage.get_study_id_from_name(trial.study.study_name)
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
    storage.set_trial_system_attr(trial_id, CONSTRAINTS_KEY, [constraint])


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One flat row per finished trial, from the storage alone (surplus and duplicate draws, never evaluated, are
    left out)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state not in FINISHED or t.user_attrs.get(SURPLUS_ATTR) or DUPLICATE_ATTR in t.user_attrs:
            continue
        ua = attrs(t)
        state = "failed" if t.state == TrialState.FAIL else (ua.get("state") or t.state.name.lower())
        retried = RetryHeartbeatStaleTrialCallback.retried_trial_number(t)
        row = {
            "trial": t.number,
            "preset": ua.get(PRESET_ATTR) if counts(t) else None,  # the preset's name when the trial evaluated one
            "state": state,
            "accuracy": ua.get("accuracy"),
            "score": ua.get("score"),
            "predicted_ms": ua.get("predicted_ms"),
            "measured_ms": ua.get("measured_ms"),
            "measured_spread": ua.get("measured_spread"),
            "params": ua.get("params"),
            "macs": ua.get("macs"),
            "epochs": ua.get("epochs"),
            "seconds": ua.get("seconds") if ua.get("seconds") is not None else _duration(t),
            "error": ua.get("error") or (None if t.state != TrialState.FAIL or counts(t)
                                         else "interrupted: stopped mid-trial"),
            "worker": worker_of(t),
            "retry_of": retried,
            **{f"param.{k}": v for k, v in sorted(t.params.items())},
            "arch": json.dumps(ua["arch"], separators=(",", ":")) if "arch" in ua else None,
        }
        rows.append(row)
    return rows


def _duration(t: FrozenTrial) -> float | None:
    return t.duration.total_seconds() if t.duration is not None else None
