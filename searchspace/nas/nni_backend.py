"""The NNI backend (optional extra ``nni``): NNI's regularised evolution drives the same space and evaluator.

NNI 3.0 (an archived project) is used through its NAS strategy interface, without its experiment manager or web
server: the space's decisions become an ``nni.mutable`` space (one ``Categorical`` per parameter, labelled with
the space's dotted name), ``nni.nas.strategy.RegularizedEvolution`` (aging evolution, Real et al. 2019) proposes
candidates, and NNI's ``SequentialExecutionEngine`` evaluates them one at a time in this process. Each evaluation
runs the Optuna backend's objective on the search's study, so every trial is recorded exactly as the Optuna backend
records it (``trials.csv``, the winner choice and the report read the study unchanged) and a poor training is still
stopped early by the study's median pruner; NNI then receives the trial's accuracy (or proxy score; 0 for
candidates over the budget, which were not trained) as the individual's fitness. Failed trials give no fitness and
never join the population.

Resume: the study is the record. A re-run counts the finished trials, runs the missing ones, and starts the
evolution from the last ``population_size`` finished trials (their full NNI samples are stored with each trial,
so duplicates are never proposed again).

Limits: one objective (use ``--backend optuna`` or ``ray`` for ``--objective pareto``); one trial at a time
(``--workers`` is ignored); every decision of the space must be discrete (categorical, integer or stepped float).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optuna
from optuna.trial import TrialState

from ..errors import MixerNASError
from .backend import Backend
from .candidate import CandidateRunner
from .config import SearchConfig
from .study import FINISHED, OUTCOME_ATTR, QUEUED_ATTR

SAMPLE_ATTR = "nni_sample"  # the full NNI sample of a trial (the space may not use every decision)
PROBES = 512  # random walks through a define-by-run space to find its decisions


# -------------------------------------------------------------------------------------------- the decisions


class _Recorder:
    """A trial that picks at random and records every decision it is asked (name -> choices)."""

    def __init__(self, rng: random.Random, found: dict[str, list[Any]]):
        self.rng, self.found = rng, found

    def _pick(self, name: str, choices: Sequence[Any]) -> Any:
        choices = list(choices)
        known = self.found.setdefault(name, choices)
        if known != choices:
            raise MixerNASError(f"the NNI backend needs fixed choices per parameter, but {name!r} offers {known} in "
                                f"one branch and {choices} in another; give the parameters different names")
        return self.rng.choice(choices)

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        return self._pick(name, choices)

    def suggest_int(self, name: str, low: int, high: int, step: int = 1, log: bool = False) -> int:
        return self._pick(name, range(low, high + 1, step))

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None,
                      log: bool = False) -> float:
        if step is None:
            raise MixerNASError(f"the NNI backend needs discrete decisions, but {name!r} is a continuous float in "
                                f"[{low}, {high}]; give it a step, or use --backend optuna")
        n = int(math.floor((high - low) / step + 1e-9)) + 1
        return self._pick(name, [low + i * step for i in range(n)])


def space_decisions(space, probes: int = PROBES, seed: int = 0) -> dict[str, list[Any]]:
    """Every parameter the space can ask for, with its choices, found by random walks through ``space.define``.

    A decision reached only in a rare branch could be missed; the candidate that needs it then fails with a clear
    error (the walks reach every mixer argument of a ChoiceSpace with near certainty).
    """
    rng = random.Random(seed)
    found: dict[str, list[Any]] = {}
    for _ in range(probes):
        space.define(_Recorder(rng, found))
    return found


class _FromSample:
    """A trial answering from an NNI sample; records which decisions the space actually used."""

    def __init__(self, sample: Mapping[str, Any]):
        self.sample, self.used = sample, {}

    def _get(self, name: str) -> Any:
        if name not in self.sample:
            raise MixerNASError(f"the space asked for {name!r}, which the NNI backend did not find in it")
        self.used[name] = self.sample[name]
        return self.sample[name]

    def suggest_categorical(self, name, choices):
        return self._get(name)

    def suggest_int(self, name, low, high, step=1, log=False):
        return self._get(name)

    def suggest_float(self, name, low, high, *, step=None, log=False):
        return self._get(name)


def used_params(space, sample: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters of ``sample`` that the space uses (the others belong to branches not taken)."""
    probe = _FromSample(sample)
    space.define(probe)
    return probe.used


# ------------------------------------------------------------------------------------------------ the run


def _import_nni():
    try:
        with warnings.catch_warnings():  # nni.nas warns that it does not know torch's newest modules
            warnings.simplefilter("ignore")
            import nni  # noqa: F401
            from nni.mutable import Categorical, MutableDict
            from nni.nas.execution import SequentialExecutionEngine
            from nni.nas.space import ExecutableModelSpace, ModelStatus
            from nni.nas.strategy import RegularizedEvolution
    except ImportError as exc:
        raise MixerNASError(f"--backend nni needs NNI: pip install 'mixernas[nni]' (nni>=3.0) ({exc})") from None
    except Exception as exc:  # an NNI that cannot load on this Python/torch
        raise MixerNASError(f"NNI cannot load here ({type(exc).__name__}: {str(exc).splitlines()[0]}); use "
                            f"--backend optuna or ray") from None
    return Categorical, MutableDict, SequentialExecutionEngine, ExecutableModelSpace, ModelStatus, RegularizedEvolution


class NniBackend(Backend):
    """NNI's regularised evolution proposes each candidate; the shared objective evaluates it on the study."""

    label = "nni evolution"
    queue_presets = False  # the evolution starts from its own random population

    def search(self) -> bool:
        config, study = self.config, self.study.study
        Categorical, MutableDict, Engine, ExecutableModelSpace, ModelStatus, RegularizedEvolution = _import_nni()
        import nni

        if config.workers > 1:
            self.echo("NNI evaluates one candidate at a time here (its sequential engine); --workers is ignored")
        if config.sampler:
            self.echo(f"NNI's regularised evolution chooses the candidates; --sampler {config.sampler} is ignored")
        decisions = space_decisions(self.space, seed=config.seed)
        if not decisions:
            raise MixerNASError(f"space {self.space.name!r} has no decisions to search")
        mutables = MutableDict({name: Categorical(choices, label=name) for name, choices in decisions.items()})
        tally = self.tally()
        remaining = tally.free + tally.waiting

        def evaluate(sample: dict[str, Any]) -> None:
            """One NNI individual: an Optuna trial of the study with exactly these parameters."""
            try:
                params = used_params(self.space, sample)
            except Exception as exc:
                params, error = {}, f"{type(exc).__name__}: {exc}"
            else:
                error = None
            attrs = {SAMPLE_ATTR: json.dumps(sample), QUEUED_ATTR: "nni"}
            if error is None:
                study.enqueue_trial(params, user_attrs=attrs, skip_if_exists=False)
                study.optimize(self.objective, n_trials=1, catch=(Exception,), gc_after_trial=True)
            else:  # the space cannot make this sample: a failed trial, as the objective records one
                failed = {"state": "failed", "error": error[:500]}
                study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL,
                                                          user_attrs={**attrs, OUTCOME_ATTR: failed}))
            last = study.get_trials(deepcopy=False)[-1]
            self.after_trial(last)
            fitness = _fitness(last)
            if fitness is not None:
                nni.report_final_result(fitness)

        class ArchSpace(ExecutableModelSpace):
            """The space's decisions as NNI mutables; executing a frozen sample evaluates that candidate."""

            def __init__(self) -> None:
                super().__init__()
                self.evaluator, self.sample = None, None

            def freeze(self, sample):
                self.validate(sample)
                frozen = ArchSpace()
                frozen.sample, frozen.status = dict(sample), ModelStatus.Frozen
                return frozen

            def check_contains(self, sample):
                return mutables.check_contains(sample)

            def leaf_mutables(self, is_leaf):
                yield from mutables.leaf_mutables(is_leaf)

            def execute(self) -> None:
                evaluate(self.sample)

        population = self.population = max(4, min(16, config.trials // 3))
        strategy = RegularizedEvolution(population_size=population, sample_size=max(2, population // 4),
                                        mutation_prob=max(0.05, 1 / len(decisions)), seed=config.seed, dedup=True)
        left = None if self.deadline is None else max(self.deadline - time.monotonic(), 0.0)
        engine = Engine(max_model_count=remaining, max_duration=left, continue_on_failure=True)
        strategy.initialize(ArchSpace(), engine)
        _resume_population(strategy, study, decisions, population, config.seed + tally.counted)

        nni_log = logging.getLogger("nni")
        level = nni_log.level
        nni_log.setLevel(logging.ERROR)  # NNI logs every individual at INFO; the progress bar says enough
        try:
            strategy.run()
        finally:
            nni_log.setLevel(level)
        return False

    def _summary(self) -> str:
        return f" (NNI regularised evolution, population {getattr(self, 'population', '?')})"


def run_study(config: SearchConfig, space, runner: CandidateRunner, *, progress: bool,
              echo: Callable[[str], None]) -> tuple[list[dict[str, Any]], bool]:
    """Run the missing trials with NNI's regularised evolution; returns (rows of all finished trials, interrupted?)."""
    if config.objective == "pareto":
        raise MixerNASError("--backend nni searches one objective (regularised evolution); use --backend optuna or "
                            "ray for --objective pareto")
    _import_nni()
    return NniBackend(config, space, runner, progress=progress, echo=echo).run()


def _fitness(trial: optuna.trial.FrozenTrial) -> float | None:
    """What NNI's evolution maximises: the objective; a pruned trial's last accuracy; nothing for a failure."""
    if trial.state == TrialState.COMPLETE and trial.value is not None and math.isfinite(trial.value):
        return float(trial.value)
    if trial.state == TrialState.PRUNED and trial.intermediate_values:
        return float(trial.intermediate_values[max(trial.intermediate_values)])
    return None


def _resume_population(strategy, study: optuna.Study, decisions: dict[str, list[Any]], population: int,
                       seed: int) -> None:
    """Start the evolution from the study's finished trials: the newest become the population, all are known."""
    from nni.nas.strategy.evolution import Individual
    from numpy.random import RandomState

    tried: list[dict[str, Any]] = []
    individuals: list[Individual] = []
    for t in study.get_trials(deepcopy=False, states=FINISHED):
        sample = _sample_of(t, decisions)
        if sample is None:
            continue
        tried.append(sample)
        fitness = _fitness(t)
        if fitness is not None:
            individuals.append(Individual(sample, fitness))
    if not tried:
        return
    state = {"population": individuals[-population:], "individual_counter": len(tried),
             "random_state": RandomState(seed).get_state(), "num_running_models": 0}
    if "dedup_history" in strategy.state_dict():  # the strategy never proposes a sample twice
        from nni.nas.strategy.utils import DeduplicationHelper

        helper = DeduplicationHelper()
        for sample in tried:
            helper.dedup(sample)
        state.update(helper.state_dict())
    strategy.load_state_dict(state)


def _sample_of(trial: optuna.trial.FrozenTrial, decisions: dict[str, list[Any]]) -> dict[str, Any] | None:
    """A finished trial's full NNI sample: stored by this backend, or rebuilt from another backend's parameters."""
    if SAMPLE_ATTR in trial.user_attrs:
        sample = json.loads(trial.user_attrs[SAMPLE_ATTR])
        return sample if set(sample) == set(decisions) else None
    if not trial.params or any(k not in decisions or v not in decisions[k] for k, v in trial.params.items()):
        return None
    return {name: trial.params.get(name, choices[0]) for name, choices in decisions.items()}
