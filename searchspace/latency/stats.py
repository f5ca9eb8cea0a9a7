"""The statistics of a latency measurement: pure functions of timings, no clock and no model.

A measurement (:mod:`.measure`) times a model in short rounds; here is what becomes of those timings: one value per
round (the median of its runs, or with the reference workload the ratio of the round's mean run to the mean
reference run, :func:`summarize`), which rounds a busy machine spoilt (:func:`calm_rounds`), the median over
rounds and its distribution-free 95% interval (:func:`median_interval`), how many runs make a round
(:func:`calibrate_runs`) and how many of a model's runs go between two reference runs (:func:`chunk_size`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import MixerNASError

MIN_RUNS_PER_ROUND = 3  # a median of fewer runs is itself noisy; rounds are short, their number gives precision
MAX_RUNS_PER_ROUND = 1000  # tiny workloads (an identity mixer) would otherwise ask for millions


class MeasurementError(MixerNASError, ValueError):
    """A measurement that cannot be made as asked (device, input spec, options)."""


@dataclass(frozen=True)
class Summary:
    """The statistic of a set of rounds (see :func:`summarize`), in milliseconds."""

    value_ms: float  # median over rounds (of the reference-corrected round ratios when there is a reference)
    spread: float  # (median - lowest) / lowest of the same per-round values
    round_medians_ms: tuple[float, ...]  # the per-round values, in the order measured
    runs: int  # timed runs over all rounds
    ci_low_ms: float = math.nan  # the value's confidence interval (order statistics, CONFIDENCE)
    ci_high_ms: float = math.nan
    raw_ms: float = math.nan  # median of the plain round medians, before any correction

    @property
    def precision(self) -> float:
        """Relative half-width of the interval: 0.01 means the value is known to +-1%."""
        return _relative_half_width(self.value_ms, self.ci_low_ms, self.ci_high_ms)


def _finite_timings(values: Sequence[float], what: str) -> list[float]:
    values = [float(v) for v in values]
    if not values:
        raise MeasurementError(f"no {what} to summarise")
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise MeasurementError(f"{what} must be finite and >= 0, got {values}")
    return values


def robust_latency(round_medians: Sequence[float]) -> float:
    """The lowest round median: the statistic before the reference correction, kept for comparisons. It is not
    what results report: it picks the luckiest round, and moved 13-20% between measurements of the same models
    under load where the median moved 10-12% (the corrected median: 1-3%).

    >>> robust_latency([2.05, 61.0, 2.0, 2.1])
    2.0
    """
    return min(_finite_timings(round_medians, "round medians"))


def relative_spread(round_medians: Sequence[float]) -> float:
    """``(median - lowest) / lowest`` of the round medians: how much slower a typical round was than the best one.

    >>> round(relative_spread([2.0, 2.1, 60.0]), 3)
    0.05
    """
    values = _finite_timings(round_medians, "round medians")
    best, typical = min(values), statistics.median(values)
    if typical == best:
        return 0.0
    return (typical - best) / best if best > 0 else math.inf


CONFIDENCE = 0.95
MIN_ROUNDS_FOR_INTERVAL = 6  # fewer rounds than this have no 95% order-statistics interval: never "converged"


def _relative_half_width(value: float, low: float, high: float) -> float:
    half = max(value - low, high - value)
    if value > 0:
        return half / value
    return 0.0 if half == 0 else math.inf  # a clock too coarse to see the work: 0 +- 0


def median_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Distribution-free confidence interval of the median of ``values``, from their order statistics.

    The ``k``-th smallest and ``k``-th largest values bound the median with probability
    ``1 - 2 P(Binomial(n, 1/2) < k)``; ``k`` is the largest that keeps that at least ``confidence``. Below six
    values no such ``k`` exists at 95% and the interval is the range.

    >>> median_interval([5.0, 1.0, 4.0, 2.0, 3.0, 6.0, 7.0, 8.0, 9.0, 10.0])
    (2.0, 9.0)
    """
    ordered = sorted(_finite_timings(values, "values"))
    n = len(ordered)
    tail, k = 0.0, 0  # tail = P(Binomial(n, 1/2) <= k - 1)
    while k < n // 2:
        nxt = tail + math.comb(n, k) / 2.0 ** n
        if 2 * nxt > 1 - confidence:
            break
        tail, k = nxt, k + 1
    k = max(k, 1)
    return ordered[k - 1], ordered[n - k]


def summarize(timings_per_round: Sequence[Sequence[float]],
              reference_rounds: Sequence[Sequence[float]] | None = None, anchor_ms: float | None = None) -> Summary:
    """One value per round; then the median over rounds, its interval and spread.

    Without a reference a round's value is the median of its runs. With ``reference_rounds`` (the reference's
    timings in the same rounds) and its ``anchor_ms``, it is the *mean* of the round's runs divided by the mean
    of the reference runs among them, times the anchor. The runs of a round are paired within milliseconds, and
    the means use every run where a median of three keeps one: cut into blocks of rounds, the estimates scatter
    a third less than with the ratio of round medians (README.md gives the measurement). A round that a stray
    slow run spoils is one round, and the median over rounds leaves it out.

    >>> s = summarize([[2.0, 2.1, 2.0], [60.0, 61.0, 59.0], [2.1, 2.0, 2.2]])
    >>> s.value_ms, s.runs
    (2.1, 9)
    >>> summarize([[2.0], [4.0]], reference_rounds=[[1.0], [2.0]], anchor_ms=1.0).value_ms  # the machine halved
    2.0
    """
    timings = [_finite_timings(r, "timings") for r in timings_per_round]
    medians = [statistics.median(r) for r in timings]
    raw = statistics.median(medians)
    values = medians
    if reference_rounds is not None:
        ref = [statistics.fmean(_finite_timings(r, "reference timings")) for r in reference_rounds]
        if len(ref) != len(medians) or anchor_ms is None or any(v <= 0 for v in ref):
            raise MeasurementError("a reference correction needs positive reference timings for every round and "
                                   "an anchor")
        values = [statistics.fmean(t) / r * anchor_ms for t, r in zip(timings, ref)]
    low, high = median_interval(values)
    return Summary(statistics.median(values), relative_spread(values), tuple(values),
                   sum(len(r) for r in timings_per_round), low, high, raw)


def calibrate_runs(warmup_ms: Sequence[float], target_round_ms: float) -> int:
    """Runs per round so that a round lasts about ``target_round_ms``, from the later half of the warm-up timings.

    >>> calibrate_runs([9.0, 2.0, 2.0, 2.0], target_round_ms=100.0)
    50
    """
    later = list(warmup_ms)[len(warmup_ms) // 2:]
    typical = statistics.median(_finite_timings(later, "warm-up timings"))
    runs = math.ceil(target_round_ms / typical) if typical > 0 else MAX_RUNS_PER_ROUND
    return max(MIN_RUNS_PER_ROUND, min(MAX_RUNS_PER_ROUND, runs))


def chunk_size(fn_ms: float, reference_ms: float) -> int:
    """Runs of a fn taking ``fn_ms`` between two reference runs: about as long as one reference run.

    >>> chunk_size(0.05, 3.0), chunk_size(13.0, 3.0)
    (60, 1)
    """
    return max(1, min(MAX_RUNS_PER_ROUND, round(reference_ms / fn_ms))) if fn_ms > 0 else MAX_RUNS_PER_ROUND


def reference_value(times: Sequence[float]) -> float:
    """The reference workload's value from its models' times (one each): their geometric mean, 0 where a clock too
    coarse saw no time in one of them (:mod:`.reference` says why two models).

    >>> reference_value([1.0, 4.0]), reference_value([2.5]), reference_value([0.0, 3.0])
    (2.0, 2.5, 0.0)
    """
    return 0.0 if min(times) <= 0 else math.prod(times) ** (1 / len(times))


BUSY_MARGIN = 0.25  # a round whose reference ran this much slower than on the calm machine was a busy machine


def calm_level(values: Sequence[float]) -> float:
    """The calm machine's level among reference timings (one per round or per probe): their lower quartile.

    Not the lowest: now and then the reference runs a third faster than in any other round (a burst of the host),
    and measured against such a round every other one looked busy and was left out, down to a single round per
    model. README.md gives what that cost the repeatability.

    >>> calm_level([1.0, 1.05, 1.2, 2.05])
    1.05
    >>> calm_level([3.0])
    3.0
    """
    if not values:
        raise MeasurementError("no reference timings to tell the calm machine's level from")
    return sorted(values)[len(values) // 4]


def calm_rounds(reference_rounds: Sequence[Sequence[float]], margin: float = BUSY_MARGIN,
                level: Callable[[Sequence[float]], float] = calm_level) -> list[int]:
    """Indices of the rounds in which the machine was calm: the mean reference run of the round is within
    ``margin`` of the calm level (``level`` of the rounds' means, :func:`calm_level` unless a bench compares rules).

    The reference divides out a machine that slows as a whole, not one that slows on the memory side only (another
    process, a neighbour on the host): then the reference, which streams megabytes of weights, slows more than a
    model that keeps more of its data in cache, and their ratio moves. Such rounds are left out; the reference
    running 25% slower than on the calm machine marks them.

    >>> calm_rounds([[1.0, 1.1], [2.0, 2.1], [1.2], [1.0], [1.1]])
    [0, 2, 3, 4]
    >>> calm_rounds([[0.6], [1.0], [1.1], [1.05], [0.95]])  # one burst does not make the rest busy
    [0, 1, 2, 3, 4]
    """
    means = [statistics.fmean(_finite_timings(r, "reference timings")) for r in reference_rounds]
    calm = level(means)
    return [i for i, m in enumerate(means) if m <= (1 + margin) * calm]

