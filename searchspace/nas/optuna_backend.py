"""The Optuna backend: TPE under the latency constraint, or NSGA-II for the accuracy/latency Pareto front.

Every trial's outcome is stored in its user attributes, so the study storage alone (SQLite in the results folder by
default, or any database URL for many machines on one study) is enough to resume and to rewrite every result file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import TrialState

from ..errors import MixerNASError
from .candidate import CandidateRunner, Outcome
from .config import SearchConfig

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def _constraints(trial: optuna.trial.FrozenTrial) -> list[float]:
    # <= 0 means feasible (Optuna's convention); failed trials without the attribute count as infeasible
    return [float(trial.user_attrs.get("constraint", 1.0))]


def tpe_startup_trials(trials: int) -> int:
    """Random trials before TPE models the space: a sixth of the requested trials, between 4 and 10.

    Optuna's default of 10 suits long studies; the default search here finishes 12-20 trials in its time budget,
    and with 10 random start-up trials it would hardly be guided at all. Screened-out candidates count as trials
    (they cost milliseconds and tell TPE where the budget ends), so the start-up trials are cheap.

    >>> tpe_startup_trials(40), tpe_startup_trials(16), tpe_startup_trials(200)
    (6, 4, 10)
    """
    return max(4, min(10, trials // 6))


def create_study(config: SearchConfig) -> optuna.Study:
    import warnings

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message=".*constraints_func.*", category=FutureWarning)
    name = config.sampler or ("nsga2" if config.objective == "pareto" else "tpe")
    if name == "random":
        sampler = optuna.samplers.RandomSampler(seed=config.seed)
    elif name == "nsga2":
        sampler = optuna.samplers.NSGAIISampler(seed=config.seed, constraints_func=_constraints, population_size=16)
    else:
        sampler = optuna.samplers.TPESampler(seed=config.seed, constraints_func=_constraints,
                                             n_startup_trials=tpe_startup_trials(config.trials),
                                             multivariate=True, group=True)
    if config.objective == "pareto":
        directions = ["maximize", "minimize"]
        pruner = optuna.pruners.NopPruner()  # Optuna cannot prune multi-objective trials
    else:
        directions = ["maximize"]
        pruner = optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)
    try:
        storage = optuna.storages.RDBStorage(config.storage_url, engine_kwargs=_engine_kwargs(config.storage_url))
        return optuna.create_study(storage=storage, study_name=config.name, sampler=sampler, pruner=pruner,
                                   directions=directions, load_if_exists=True)
    except ValueError as exc:  # e.g. the stored study has other directions
        raise MixerNASError(f"cannot use study {config.name!r} in {config.storage_url}: {exc}") from None
    except ImportError as exc:
        raise MixerNASError(f"the storage {config.storage_url!r} needs a database driver: {exc}") from None
    except Exception as exc:  # sqlalchemy errors: unreachable server, bad URL
        if type(exc).__module__.startswith("sqlalchemy"):
            raise MixerNASError(f"cannot open storage {config.storage_url!r}: {str(exc).splitlines()[0]}") from None
        raise


def _engine_kwargs(url: str) -> dict[str, Any]:
    # several local processes may share one SQLite file; wait for the lock instead of failing at once
    return {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}


def fail_stale_trials(study: optuna.Study) -> int:
    """Trials left RUNNING by a killed process are marked FAILED so a resumed search can replace them."""
    stale = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        study._storage.set_trial_user_attr(t._trial_id, "error", "interrupted: the process stopped mid-trial")
        study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
        stale += 1
    return stale


def record(trial: optuna.trial.Trial, outcome: Outcome, budget_ms: float) -> None:
    for key, value in outcome.to_attrs().items():
        trial.set_user_attr(key, value)
    latency = outcome.latency_for_constraint()  # measured if measured, else predicted (screened out)
    trial.set_user_attr("constraint", (latency - budget_ms) if latency is not None else 1.0)


def make_objective(config: SearchConfig, space, runner: CandidateRunner,
                   on_outcome: Callable[[Outcome], None]) -> Callable[[optuna.trial.Trial], Any]:
    pareto = config.objective == "pareto"

    def objective(trial: optuna.trial.Trial):
        arch = space.sample(trial)
        trial.set_user_attr("arch", arch.to_dict())

        def report(epoch: int, accuracy: float) -> bool:
            if pareto:
                return False
            trial.report(accuracy, epoch)
            return trial.should_prune()

        try:
            outcome = runner.run(arch, report=report)
        except Exception as exc:
            trial.set_user_attr("state", "failed")
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:500])
            raise
        record(trial, outcome, config.budget_ms)
        on_outcome(outcome)
        if outcome.state == "pruned":
            raise optuna.TrialPruned()
        if pareto:
            return outcome.objective, outcome.latency_for_constraint() or float("inf")
        return outcome.objective

    return objective


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One flat row per finished trial, from the storage alone."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state not in FINISHED:
            continue
        ua = t.user_attrs
        state = ua.get("state") or ("failed" if t.state == TrialState.FAIL else t.state.name.lower())
        if t.state == TrialState.FAIL:
            state = "failed"
        row = {
            "trial": t.number,
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
            "error": ua.get("error"),
            **{f"param.{k}": v for k, v in sorted(t.params.items())},
            "arch": json.dumps(ua["arch"], separators=(",", ":")) if "arch" in ua else None,
        }
        rows.append(row)
    return rows


def _duration(t: optuna.trial.FrozenTrial) -> float | None:
    return t.duration.total_seconds() if t.duration is not None else None


def open_study(config: SearchConfig, echo: Callable[[str], None]) -> tuple[optuna.Study, int, int]:
    """The study, with trials cut off by an earlier stop marked failed; (study, finished, still to run).

    Every backend resumes this way: the study storage is the record of what finished.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = create_study(config)
    stale = fail_stale_trials(study)
    if stale:
        echo(f"resuming: {stale} trial(s) cut off by an earlier stop are recorded as failed")
    done = len(study.get_trials(deepcopy=False, states=FINISHED))
    remaining = max(config.trials - done, 0)
    if done:
        echo(f"resuming study {config.name!r}: {done} trials already finished, {remaining} to run")
    return study, done, remaining


def run_study(config: SearchConfig, space, runner: CandidateRunner, *, progress: bool,
              echo: Callable[[str], None]) -> tuple[list[dict[str, Any]], bool]:
    """Run the missing trials of the study; returns (rows of all finished trials, interrupted?)."""
    import time

    from tqdm.auto import tqdm

    study, done, remaining = open_study(config, echo)
    if remaining:
        _enqueue_presets_in_space(study, space, done, remaining)
    metric = "accuracy" if config.evaluator == "train" else "score"
    best = [_best_feasible(study, metric, config.budget_ms)]
    bar = tqdm(total=remaining, disable=not progress, unit="trial", dynamic_ncols=True,
               desc=f"search ({config.trials} trials" + (f", {config.timeout_s:.0f} s max)" if config.timeout_s
                                                         else ")"))

    def on_outcome(outcome: Outcome) -> None:
        value = outcome.accuracy if metric == "accuracy" else outcome.score
        fits = outcome.measured_ms is not None and outcome.measured_ms <= config.budget_ms
        if outcome.state == "complete" and fits and value is not None and (best[0] is None or value > best[0]):
            best[0] = value

    def after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        bar.update(1)
        state = trial.user_attrs.get("state", trial.state.name.lower())
        bar.set_postfix_str(f"best {metric} {best[0]:.3f}" if best[0] is not None else f"last: {state}")

    interrupted = False
    started = time.perf_counter()
    try:
        study.optimize(make_objective(config, space, runner, on_outcome), n_trials=remaining,
                       timeout=config.timeout_s, catch=(Exception,), callbacks=[after_trial],
                       gc_after_trial=True)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
    ran = len(study.get_trials(deepcopy=False, states=FINISHED)) - done
    if remaining and not interrupted:
        echo(f"{ran} trials in {time.perf_counter() - started:.0f} s")
    return trial_rows(study), interrupted


def _best_feasible(study: optuna.Study, metric: str, budget_ms: float) -> float | None:
    values = [t.user_attrs.get(metric) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
              if t.user_attrs.get("state") == "complete" and (t.user_attrs.get("measured_ms") or 1e18) <= budget_ms]
    values = [v for v in values if v is not None]
    return max(values) if values else None


def _enqueue_presets_in_space(study: optuna.Study, space, done: int, remaining: int) -> None:
    """Presets that are points of the space start the study: the search begins from the hand-designed models."""
    if done:
        return
    from ..presets import list_presets, preset

    queued = 0
    for name in list_presets():
        params = space.params_of(preset(name))
        if params and queued < remaining:
            study.enqueue_trial(params, user_attrs={"preset": name}, skip_if_exists=True)
            queued += 1
