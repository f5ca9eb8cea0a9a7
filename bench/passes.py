"""What the benches that time the same models in several passes share: rounds sized as ``measure_many`` sizes them,
and how far the passes agree."""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Callable, Sequence
from typing import Any

from searchspace.latency.measure import warm_until_steady
from searchspace.latency.predictor import kendall_tau
from searchspace.latency.stats import calibrate_runs, chunk_size


def paired_rounds_setup(fns: Sequence[Callable[[], Any]], references: Sequence[Callable[[], Any]],
                        timer) -> tuple[list[int], list[int]]:
    """Warm the references and ``fns``; returns each fn's runs per round (about 20 ms) and its chunk of runs between
    two reference runs (about as long as one run of the first, light, reference, as ``measure_many`` makes them)."""
    for ref in references[1:]:
        warm_until_steady(ref, timer, min_runs=5)
    ref_ms = statistics.median(warm_until_steady(references[0], timer, min_runs=5)[-5:])
    runs, chunks = [], []
    for fn in fns:
        warm = warm_until_steady(fn, timer, min_runs=5)
        runs.append(calibrate_runs(warm, 20.0))
        chunks.append(chunk_size(statistics.median(warm[len(warm) // 2:]), ref_ms))
    return runs, chunks


def agreement(passes: Sequence[Sequence[float]]) -> tuple[float, float]:
    """How far the passes (one value per model each) land apart: the mean over pairs of passes of the mean
    relative difference, and of Kendall's tau."""
    pairs = list(itertools.combinations(passes, 2))
    apart = statistics.fmean(statistics.fmean(abs(a - b) / ((a + b) / 2) for a, b in zip(x, y)) for x, y in pairs)
    return apart, statistics.fmean(kendall_tau(x, y) for x, y in pairs)
