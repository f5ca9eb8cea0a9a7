"""One candidate's evaluation, shared by every backend: screen by the latency table, measure, then evaluate.

The order matters for honesty and for time: a candidate whose *predicted* latency is clearly over the budget is
recorded as infeasible without being built; one that could fit is measured for real; only a candidate whose
*measured* latency fits is trained (or scored by a proxy).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..arch import Arch
from ..evaluators import TrialPruned
from ..latency import InputSpec, clock_for, count_params_macs, measure_latency
from ..latency.measure import RunOptions
from ..model import build_model

# A candidate predicted this much over the budget is screened out unmeasured. The table's error is a few percent;
# the margin keeps borderline candidates, which are then judged on measured latency.
SCREEN_MARGIN = 1.15

STATES = ("screened", "infeasible", "complete", "pruned", "failed")


@dataclass
class Outcome:
    """What happened to one candidate; stored with its trial and written to trials.csv."""

    arch: Arch
    state: str = "failed"  # screened | infeasible | complete | pruned | failed
    predicted_ms: float | None = None
    measured_ms: float | None = None
    measured_spread: float | None = None
    accuracy: float | None = None  # validation top-1 in [0, 1] (train evaluator)
    score: float | None = None  # proxy score (zero-cost evaluator); the objective value either way
    params: int | None = None
    macs: int | None = None
    epochs: int | None = None
    error: str | None = None
    seconds: float = 0.0
    curve: list[float] = field(default_factory=list)  # per-epoch validation accuracy

    @property
    def objective(self) -> float:
        """The value maximised: accuracy, or the proxy score; 0 for candidates that were not evaluated."""
        value = self.accuracy if self.score is None else self.score
        return 0.0 if value is None or not math.isfinite(value) else float(value)

    def latency_for_constraint(self) -> float | None:
        return self.measured_ms if self.measured_ms is not None else self.predicted_ms

    def to_attrs(self) -> dict[str, Any]:
        """JSON-ready fields (the arch as a dict) for a trial's user attributes."""
        data = asdict(self)
        data["arch"] = self.arch.to_dict()
        return data


class CandidateRunner:
    """Evaluates candidates under a latency budget on one device; see the module docstring."""

    def __init__(self, *, budget_ms: float, predictor, evaluator, data, input_spec: InputSpec, device: str,
                 threads: int | None, measure_rounds: int = 10, runtime: str = "eager",
                 options: RunOptions | None = None):
        self.budget_ms = budget_ms
        self.predictor = predictor  # .predict(arch).total_ms (and .observe(arch, ms)), or None to measure everything
        self.evaluator = evaluator
        self.data = data
        self.input_spec = input_spec
        self.device = device
        self.threads = threads
        self.measure_rounds = measure_rounds
        self.runtime = runtime  # what runs the candidates when their latency is measured (searchspace.runtimes)
        self.options = options or RunOptions()  # channels-last, CUDA graphs, cuDNN benchmark

    def predict(self, arch: Arch) -> float | None:
        return None if self.predictor is None else float(self.predictor.predict(arch).total_ms)

    @property
    def timer(self):
        """With one CPU thread, time the measuring thread's CPU time: time other processes take is left out."""
        return clock_for(self.device, self.threads, runtime=self.runtime)

    def measure(self, model: torch.nn.Module):
        """A robust measurement of a candidate (reference-corrected on the CPU, to +-2% where the machine allows);
        finalists are measured again side by side."""
        return measure_latency(model, self.input_spec, device=self.device, threads=self.threads,
                               rounds=self.measure_rounds, warmup=5, timer=self.timer, runtime=self.runtime,
                               **self.options.kwargs())

    def observe(self, arch: Arch, measured_ms: float) -> None:
        """Give a whole-model measurement to the latency table, which refits its prediction on it."""
        if self.predictor is not None and hasattr(self.predictor, "observe"):
            self.predictor.observe(arch, measured_ms)

    def run(self, arch: Arch, report: Callable[[int, float], bool] | None = None) -> Outcome:
        """Screen, measure and evaluate ``arch``. ``report(epoch, accuracy) -> prune?`` is passed to training.

        Exceptions from building, measuring or training propagate (the backend records the trial as failed);
        a pruned training returns an outcome in state ``pruned``.
        """
        start = time.perf_counter()
        out = Outcome(arch=arch)
        try:
            out.predicted_ms = self.predict(arch)
            if out.predicted_ms is not None and out.predicted_ms > self.budget_ms * SCREEN_MARGIN:
                out.state = "screened"
                return out
            model = arch_model(arch, self.data)
            counts = count_params_macs(model, self.input_spec)
            out.params, out.macs = counts.params, counts.macs
            result = self.measure(model)
            del model
            out.measured_ms, out.measured_spread = result.value_ms, result.spread
            self.observe(arch, result.value_ms)
            if result.value_ms > self.budget_ms:
                out.state = "infeasible"
                return out
            try:
                ev = self.evaluator.evaluate(arch, self.data, report=report)
            except TrialPruned as stop:  # the pruner stopped a poor training; keep what it measured
                ev = stop.result
            out.accuracy = ev.accuracy
            out.score = ev.score if ev.accuracy is None else None  # proxies have a score, training an accuracy
            out.curve = list(ev.accuracies)
            out.epochs = ev.epochs or None
            out.state = "pruned" if ev.pruned else "complete"
            return out
        finally:
            out.seconds = time.perf_counter() - start


def arch_model(arch: Arch, data) -> torch.nn.Module:
    return build_model(arch, num_classes=data.num_classes, in_chans=data.in_chans)
