"""Latency measurement: the statistic (median over rounds, its order-statistics interval, the reference
correction) and the measuring loop (warm-up until steady, interleaved rounds, rounds added until the interval is
tight) against scripted timings (no real clock in an assertion); the reference workload and its cached anchor;
the measuring protocol (threads, eval mode, interleaving, context), bad input, parameter/MAC counting, and real
smoke tests on tiny models. CUDA paths run only where there is a GPU."""

import json
import math
import random
import statistics
import time
from collections import Counter

import pytest
import torch
from torch import nn

import searchspace
from searchspace import MixerNASError
from searchspace.latency import (
    COUNTER_NAME,
    Anchor,
    InputSpec,
    LatencyResult,
    MeasurementError,
    Reference,
    calibrate_runs,
    count_params_macs,
    default_cache_dir,
    measure_latency,
    measure_many,
    median_interval,
    reference_for,
    relative_spread,
    robust_latency,
    run_rounds,
    summarize,
    warm_until_steady,
)
from searchspace.latency import reference as reference_module
from searchspace.latency.cache import CACHE_ENV
from searchspace.latency.measure import (
    REFERENCE_OPTION,
    _resolve_reference,
    clock_for,
    clock_name,
    cpu_timer,
    reference_drift,
    reference_key,
    thread_cpu_timer,
)
from searchspace.latency.stats import CONFIDENCE, MIN_RUNS_PER_ROUND

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TINY = InputSpec(batch=1, channels=3, height=8, width=8)
CPU = torch.device("cpu")


class ScriptedTimer:
    """A timer that runs nothing and answers from per-fn scripts: ``script(fn, call_index) -> ms``."""

    def __init__(self, script):
        self.script, self.calls = script, []

    def __call__(self, fn):
        index = sum(1 for f in self.calls if f is fn)
        self.calls.append(fn)
        return self.script(fn, index)


def fns(n):
    return [lambda: None for _ in range(n)]


# ------------------------------------------------------------------------------------------------ the statistic


def test_a_30x_spike_round_does_not_move_the_result():
    calm = [[2.0, 2.1, 2.0, 2.05, 2.0]] * 4
    spiked = calm[:2] + [[60.0, 61.0, 63.0, 60.5, 62.0]] + calm[2:]
    assert summarize(spiked).value_ms == summarize(calm).value_ms == 2.0
    assert summarize(spiked).spread == summarize(calm).spread == 0.0


def test_spike_runs_inside_a_round_are_absorbed_by_the_round_median():
    rounds = [[2.0, 2.0, 60.0, 2.1, 2.0], [2.1, 2.0, 2.0, 90.0, 2.0], [2.0, 2.0, 2.0, 2.0, 70.0]]
    result = summarize(rounds)
    assert result.value_ms == 2.0
    assert result.round_medians_ms == (2.0, 2.0, 2.0)
    assert result.runs == 15


def test_the_value_is_the_median_round_not_the_fastest():
    # A lucky fast round no longer sets the value: the median over rounds is what a repeat measurement reproduces.
    rounds = [[3.0, 3.0], [2.0, 2.0], [3.1, 3.1], [2.9, 2.9], [4.0, 4.0]]
    summary = summarize(rounds)
    assert summary.value_ms == 3.0
    assert robust_latency(summary.round_medians_ms) == 2.0  # the old statistic, still available, differs
    assert summary.raw_ms == summary.value_ms  # no reference: nothing corrected
    assert (summary.ci_low_ms, summary.ci_high_ms) == (2.0, 4.0)  # five rounds: the range


def test_robust_latency_is_the_lowest_round_median():
    assert robust_latency([3.0, 2.5, 80.0, 2.6]) == 2.5


def test_spread_is_typical_round_over_best_round():
    assert relative_spread([2.0, 2.2, 2.4]) == pytest.approx(0.1)
    assert relative_spread([5.0]) == 0.0
    assert relative_spread([2.0, 2.0, 60.0]) == 0.0  # one spiked round in three is ignored
    assert relative_spread([2.0, 60.0, 60.0]) == pytest.approx(29.0)  # a slow phase is not
    assert relative_spread([0.0, 0.0]) == 0.0
    assert math.isinf(relative_spread([0.0, 1.0, 1.0]))


@pytest.mark.parametrize("statistic", [robust_latency, relative_spread, median_interval,
                                       lambda values: summarize([values])])
@pytest.mark.parametrize("bad", [[], [1.0, float("nan")], [float("inf")], [-1.0]])
def test_statistic_rejects_meaningless_timings(statistic, bad):
    with pytest.raises(MeasurementError):
        statistic(bad)


def coverage(n, k):
    """Chance that the k-th smallest and k-th largest of n draws bracket the true median: 1 - 2 P(B(n, 1/2) < k)."""
    return 1 - 2 * sum(math.comb(n, j) for j in range(k)) / 2 ** n


def test_median_interval_of_ten_values_is_the_second_and_ninth_smallest():
    values = [5.0, 1.0, 4.0, 2.0, 3.0, 6.0, 7.0, 8.0, 9.0, 10.0]
    assert median_interval(values) == (2.0, 9.0)
    assert median_interval([3 * v for v in reversed(values)]) == (6.0, 27.0)  # order does not matter
    assert CONFIDENCE == 0.95
    assert median_interval(values, confidence=0.5) == (4.0, 7.0)  # a lower confidence, a narrower interval


@pytest.mark.parametrize("n", range(1, 6))
def test_median_interval_of_fewer_than_six_values_is_their_range(n):
    values = [float(20 - 3 * v) for v in range(n)]
    assert median_interval(values) == (min(values), max(values))


@pytest.mark.parametrize("n", range(6, 70))
def test_median_interval_is_the_narrowest_order_statistics_with_95_percent_coverage(n):
    values = [float(v) for v in range(n)]
    random.Random(n).shuffle(values)
    low, high = median_interval(values)
    k = int(low) + 1  # low is the k-th smallest of 0..n-1
    assert high == n - k  # ... and high the k-th largest
    assert coverage(n, k) >= 0.95
    assert k == n // 2 or coverage(n, k + 1) < 0.95  # one step narrower would fall below 95%


@pytest.mark.parametrize("seed", range(20))
def test_median_interval_always_contains_the_median(seed):
    rng = random.Random(seed)
    values = [round(rng.lognormvariate(0, 1), 1) for _ in range(rng.randint(1, 40))]  # ties included
    low, high = median_interval(values)
    assert low <= statistics.median(values) <= high
    assert min(values) <= low and high <= max(values)


def test_reference_rounds_take_out_a_machine_that_slows_down():
    steady_model, steady_ref = [[3.0, 3.1, 2.9]] * 10, [[1.0, 1.0, 1.1]] * 10
    factor = [2.0 if r in (1, 4, 5, 6, 8, 9) else 1.0 for r in range(10)]  # at half speed in 6 rounds of 10
    model = [[t * f for t in row] for row, f in zip(steady_model, factor)]
    ref = [[t * f for t in row] for row, f in zip(steady_ref, factor)]
    steady = summarize(steady_model, steady_ref, anchor_ms=1.25)
    slowed = summarize(model, ref, anchor_ms=1.25)
    per_round = 3.0 / (3.1 / 3) * 1.25  # mean model run / mean reference run x anchor, every round
    assert slowed.value_ms == pytest.approx(per_round) and steady.value_ms == pytest.approx(per_round)
    assert slowed.round_medians_ms == pytest.approx((per_round,) * 10)
    assert steady.round_medians_ms == pytest.approx((per_round,) * 10)
    assert slowed.ci_low_ms == pytest.approx(per_round) and slowed.ci_high_ms == pytest.approx(per_round)
    assert slowed.runs == 30
    assert steady.raw_ms == 3.0 and slowed.raw_ms == 6.0  # what the clock said, uncorrected
    assert summarize(model).value_ms == 6.0  # without the reference, the slow phase would be the answer


def test_a_corrected_round_uses_the_mean_of_its_runs_and_a_spoilt_round_is_left_out_by_the_median():
    model = [[2.0, 2.0, 5.0]] + [[2.0, 2.0, 2.0]] * 6  # one stray slow run in the first round
    ref = [[1.0, 1.0, 1.0]] * 7
    s = summarize(model, ref, anchor_ms=1.0)
    assert s.round_medians_ms[0] == pytest.approx(3.0)  # every run of the round counts: (2 + 2 + 5) / 3
    assert s.round_medians_ms[1:] == pytest.approx((2.0,) * 6)
    assert s.value_ms == 2.0 and s.raw_ms == 2.0  # the median over rounds does not see the spoilt round
    # the reference's runs are averaged likewise: a round whose reference ran 10% slow reads 10% fast
    assert summarize([[2.0, 2.0]], [[1.0, 1.2]], anchor_ms=1.0).value_ms == pytest.approx(2.0 / 1.1)


def test_calm_rounds_are_those_whose_reference_ran_within_a_quarter_of_the_calm_level():
    from searchspace.latency.stats import BUSY_MARGIN, calm_level, calm_rounds

    assert BUSY_MARGIN == 0.25
    refs = [[2.0, 2.2], [4.0, 4.1], [2.5], [2.0], [2.7, 2.7], [2.1]]  # round means 2.1, 4.05, 2.5, 2.0, 2.7, 2.1
    assert calm_level([2.1, 4.05, 2.5, 2.0, 2.7, 2.1]) == 2.1  # the lower quartile
    assert calm_rounds(refs) == [0, 2, 3, 5]  # 2.5 <= 1.25 x 2.1 < 2.7
    assert calm_rounds(refs, margin=1.5) == [0, 1, 2, 3, 4, 5]
    assert calm_rounds([[3.0]] * 4) == [0, 1, 2, 3]  # a steady machine keeps every round
    # one round in which the reference ran a third faster (a burst of the host) leaves the others in
    burst = [[1.0]] * 9 + [[0.65]]
    assert calm_rounds(burst) == list(range(10))
    with pytest.raises(MeasurementError, match="reference timings"):
        calm_level([])
    with pytest.raises(MeasurementError, match="reference timings"):
        calm_rounds([[1.0], [math.nan]])


def test_reference_correction_needs_a_positive_reference_round_for_every_round_and_an_anchor():
    rounds = [[2.0], [2.0]]
    for ref, anchor in (([[1.0]], 1.0), ([[1.0], [1.0]], None), ([[1.0], [0.0]], 1.0)):
        with pytest.raises(MeasurementError, match="reference"):
            summarize(rounds, ref, anchor_ms=anchor)


def test_one_place_decides_the_clock_thread_cpu_time_only_where_it_is_exact():
    assert clock_for("cpu", 1) is thread_cpu_timer  # the search's, the table's and the CLI's default
    assert clock_for(CPU, 2) is cpu_timer and clock_for("cpu", None) is cpu_timer
    assert clock_for("cpu", 1, "wall") is cpu_timer and clock_for("cpu", 4, "thread") is thread_cpu_timer
    assert clock_name(clock_for("cpu", 1)) == "thread" and clock_name(clock_for("cpu", 2)) == "wall"
    with pytest.raises(MeasurementError, match="unknown clock 'sundial'"):
        clock_for("cpu", 1, "sundial")


def test_calibrate_runs_sizes_rounds_and_clamps():
    assert calibrate_runs([50.0, 2.0, 2.0, 2.0], target_round_ms=100.0) == 50  # early slow warm-up runs ignored
    assert calibrate_runs([500.0, 500.0], target_round_ms=100.0) == MIN_RUNS_PER_ROUND == 3  # a median needs runs
    assert calibrate_runs([1e-4, 1e-4], target_round_ms=100.0) == 1000
    assert calibrate_runs([0.0], target_round_ms=100.0) == 1000


# --------------------------------------------------------------------------------------- warm-up, scripted clock


def test_warm_up_stops_once_two_blocks_agree():
    timer = ScriptedTimer(lambda fn, i: max(2.0, 9.0 - 2 * i))  # a cold model: 9, 7, 5, 3, then 2 ms
    warm = warm_until_steady(lambda: None, timer, min_runs=0, block=5)
    # block medians 5 (cold), 2, 2: the third block agrees with the second
    assert len(warm) == len(timer.calls) == 15
    assert warm[:5] == [9.0, 7.0, 5.0, 3.0, 2.0] and set(warm[5:]) == {2.0}


def test_warm_up_runs_at_least_min_runs_then_blocks():
    timer = ScriptedTimer(lambda fn, i: 2.0)
    assert len(warm_until_steady(lambda: None, timer, min_runs=12, block=5)) == 12 + 5 + 5
    timer = ScriptedTimer(lambda fn, i: 2.0)
    assert len(warm_until_steady(lambda: None, timer, min_runs=0, block=3)) == 3 + 3


def test_warm_up_blocks_agree_within_the_tolerance():
    within = ScriptedTimer(lambda fn, i: 2.0 if i < 5 else 2.05)  # 2.5% apart
    assert len(warm_until_steady(lambda: None, within, min_runs=0, block=5, tolerance=0.03)) == 10
    beyond = ScriptedTimer(lambda fn, i: 2.0 if i < 5 else 2.1)  # 5% apart: one more block
    assert len(warm_until_steady(lambda: None, beyond, min_runs=0, block=5, tolerance=0.03)) == 15


def test_warm_up_that_never_settles_is_bounded_by_max_runs():
    timer = ScriptedTimer(lambda fn, i: 1.1 ** (i // 5))  # every block 10% slower than the last, forever
    assert len(warm_until_steady(lambda: None, timer, min_runs=0, block=5, max_runs=40, max_ms=1e9)) == 40
    timer = ScriptedTimer(lambda fn, i: 1.1 ** (i // 5))
    warm = warm_until_steady(lambda: None, timer, min_runs=0, block=5, max_runs=42, max_ms=1e9)
    assert 42 <= len(warm) < 42 + 5  # the block under way is finished


def test_warm_up_that_never_settles_is_bounded_by_max_ms():
    timer = ScriptedTimer(lambda fn, i: 10.0 if (i // 5) % 2 == 0 else 20.0)  # blocks alternate 10 and 20 ms
    warm = warm_until_steady(lambda: None, timer, min_runs=0, block=5, max_ms=200.0, max_runs=10_000)
    assert len(warm) == 15 and sum(warm) == 200.0  # 50 + 100 + 50 ms: the bound is reached, no block after it


# -------------------------------------------------------------------------------------- the loop, scripted clock


def test_rounds_that_agree_are_not_remeasured():
    timer = ScriptedTimer(lambda fn, i: 2.0 + 0.01 * (i % 3))
    timings = run_rounds(fns(1), [4], rounds=5, tolerance=0.05, max_extra_rounds=5, timer=timer)
    assert len(timings[0]) == 5 and all(len(r) == 4 for r in timings[0])


def test_a_slow_phase_triggers_extra_rounds_until_the_interval_leaves_it_out():
    # The first 3 of 5 rounds are slow (the machine is busy), then it calms down. Rounds are added until the
    # median's 95% interval (k-th smallest to k-th largest round) no longer reaches a slow round: k = 4 > 3 slow
    # rounds at 15 rounds; at 14 rounds k is 3 and the interval still ends on a slow round.
    runs = 4
    timer = ScriptedTimer(lambda fn, i: 20.0 if i < 3 * runs else 2.0)
    timings = run_rounds(fns(1), [runs], rounds=5, tolerance=0.05, max_extra_rounds=20, timer=timer)
    assert len(timings[0]) == 15
    assert median_interval([20.0] * 3 + [2.0] * 11) == (2.0, 20.0)
    summary = summarize(timings[0])
    assert summary.value_ms == 2.0 and (summary.ci_low_ms, summary.ci_high_ms) == (2.0, 2.0)
    assert summary.precision == 0.0


def test_remeasuring_is_bounded():
    timer = ScriptedTimer(lambda fn, i: 2.0 if (i // 3) % 3 == 0 else 5.0)  # mostly slow rounds, forever
    timings = run_rounds(fns(1), [3], rounds=4, tolerance=0.05, max_extra_rounds=3, timer=timer)
    assert len(timings[0]) == 4 + 3


def test_rounds_are_added_while_done_says_no():
    asked = []

    def done(timings):
        asked.append([len(t) for t in timings])
        return len(timings[0]) >= 7

    timer = ScriptedTimer(lambda fn, i: 1.0)
    timings = run_rounds(fns(2), [2, 3], rounds=4, tolerance=0.0, max_extra_rounds=10, timer=timer, done=done)
    assert [len(t) for t in timings] == [7, 7]
    assert asked == [[4, 4], [5, 5], [6, 6], [7, 7]]  # after the first rounds, then after every added round
    assert [len(r) for r in timings[0]] == [2] * 7 and [len(r) for r in timings[1]] == [3] * 7


def test_done_decides_alone_and_max_extra_rounds_bounds_it():
    varied = ScriptedTimer(lambda fn, i: float(1 + i % 7))  # far from any tolerance
    timings = run_rounds(fns(1), [3], rounds=2, tolerance=0.0, max_extra_rounds=10, timer=varied,
                         done=lambda t: True)
    assert len(timings[0]) == 2  # done at once: no extra round, whatever the tolerance
    timings = run_rounds(fns(1), [3], rounds=2, tolerance=1e9, max_extra_rounds=6, timer=ScriptedTimer(
        lambda fn, i: 1.0), done=lambda t: False)
    assert len(timings[0]) == 2 + 6  # never done: stops at max_extra_rounds, whatever the tolerance


def test_rounds_interleave_models_and_rotate_the_first():
    order = []
    models = [lambda k=k: order.append(k) for k in range(3)]

    def timer(fn):
        fn()
        return 1.0

    run_rounds(models, [2, 2, 2], rounds=3, tolerance=0.05, max_extra_rounds=0, timer=timer)
    # each visit = one untimed settling run + 2 timed runs
    visits = [order[i] for i in range(0, len(order), 3)]
    assert visits == [0, 1, 2, 1, 2, 0, 2, 0, 1]
    assert len(order) == 3 * 3 * 3


def test_one_disagreeing_model_remeasures_all_side_by_side():
    a, b = fns(2)
    timer = ScriptedTimer(lambda fn, i: 2.0 if fn is a or (i // 2) % 3 == 0 else 9.0)  # b: mostly slow rounds
    timings = run_rounds([a, b], [2, 2], rounds=3, tolerance=0.05, max_extra_rounds=2, timer=timer)
    assert len(timings[0]) == len(timings[1]) == 5


def test_fewer_rounds_than_a_95_percent_interval_needs_are_not_called_converged():
    # Below six rounds the order-statistics interval is the range of the rounds, which brackets the median with
    # probability 1 - 2/2^n: 0% for one round (a zero-width 'interval'), 93.75% for five. Labelled a 95% interval
    # and accepted by the stopping rule, it lets --rounds 1 stop after one round claiming +-0.0%. Rounds should
    # be added (max_extra_rounds allows 10 here) until a 95% interval exists, or the result say it has none.
    timer = ScriptedTimer(lambda fn, i: 2.0)
    result = measure_latency(nn.Identity(), TINY, warmup=0, rounds=1, runs_per_round=3, max_extra_rounds=10,
                             timer=timer, reference=False)
    assert result.rounds >= 6 or not result.converged, result


# ------------------------------------------------------------------------------------------------ the protocol


class Tagged(nn.Module):
    """A tiny model that reports which instance ran last and the threads and grad mode it ran under."""

    last = None

    def __init__(self, name):
        super().__init__()
        self.name = name
        self.conv = nn.Conv2d(3, 4, 3)
        self.seen = []

    def forward(self, x):
        Tagged.last = self.name
        self.seen.append((torch.get_num_threads(), torch.is_inference_mode_enabled(), self.training, x.shape,
                          x.dtype))
        return self.conv(x)


def run_and_answer(answers):
    """A timer that really calls fn (so the model records itself) and answers by model from ``answers``."""

    def timer(fn):
        fn()
        return answers[Tagged.last]

    return timer


def test_measure_latency_reports_the_statistic_and_its_context():
    model = Tagged("m")
    model.train()
    before = torch.get_num_threads()
    threads = 1 if before != 1 else 2
    result = measure_latency(model, TINY, threads=threads, warmup=2, rounds=6, runs_per_round=4,
                             timer=run_and_answer({"m": 1.5}), reference=False)
    assert isinstance(result, LatencyResult)
    assert result.value_ms == 1.5 and result.spread == 0.0
    assert result.round_medians_ms == (1.5,) * 6
    assert result.runs == 24 and result.runs_per_round == 4 and not result.remeasured
    assert (result.ci_low_ms, result.ci_high_ms, result.precision) == (1.5, 1.5, 0.0)
    assert result.converged and result.tolerance == 0.02  # the default: +-2%
    assert result.raw_ms == 1.5 and result.anchor_ms is None and result.drift is None  # reference=False
    assert {seen[:3] for seen in model.seen} == {(threads, True, False)}  # fixed threads, inference, eval
    assert torch.get_num_threads() == before  # restored
    assert model.training and model.conv.training  # restored
    ctx = result.context
    assert (ctx.device, ctx.threads, ctx.batch, ctx.input_shape, ctx.dtype) == ("cpu", threads, 1, (1, 3, 8, 8),
                                                                                "float32")
    assert ctx.device_name and ctx.torch_version == torch.__version__.split("+")[0]
    assert REFERENCE_OPTION not in ctx.options
    assert "\n" not in str(result) and "1.50 ms" in str(result)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["context"]["input_shape"] == [1, 3, 8, 8]
    assert (data["ci_low_ms"], data["ci_high_ms"], data["precision"], data["converged"]) == (1.5, 1.5, 0.0, True)
    assert data["anchor_ms"] is None and data["drift"] is None


def test_measure_many_interleaves_and_keeps_order_and_per_model_inputs():
    a, b = Tagged("a"), Tagged("b")
    b.conv = nn.Identity()
    specs = [TINY, InputSpec(channels=5, height=2, width=3, layout="tokens")]
    ra, rb = measure_many([a, b], specs, warmup=1, rounds=4, runs_per_round=2,
                          timer=run_and_answer({"a": 1.0, "b": 4.0}), reference=False)
    assert (ra.value_ms, rb.value_ms) == (1.0, 4.0)
    assert rb.context.input_shape == (1, 6, 5) and rb.context.layout == "tokens"
    assert {s[3] for s in b.seen} == {torch.Size([1, 6, 5])}


def test_runs_per_round_calibrated_from_warmup():
    result = measure_latency(Tagged("m"), TINY, warmup=4, rounds=2, target_round_ms=10.0,
                             timer=run_and_answer({"m": 0.5}), reference=False)
    assert result.runs_per_round == 20


def test_warm_up_goes_on_until_steady_so_cold_runs_stay_out_of_the_rounds():
    timer = ScriptedTimer(lambda fn, i: max(1.0, 10.0 - i))  # a cold model: 10, 9, ..., 2, then 1 ms
    result = measure_latency(nn.Identity(), TINY, warmup=2, rounds=6, runs_per_round=3, timer=timer,
                             reference=False)
    assert result.value_ms == 1.0 and result.round_medians_ms == (1.0,) * 6
    # warm-up: the 2 runs asked for, then blocks of 5 (medians 6, 1, 1) until two agree; then 6 rounds of 3
    assert len(timer.calls) == 2 + 3 * 5 + 6 * 3


def test_timings_that_never_settle_are_reported_as_not_converged_with_a_wide_interval():
    timer = ScriptedTimer(lambda fn, i: 1.0 if (i // 3) % 2 == 0 else 3.0)  # rounds alternate 1 and 3 ms
    result = measure_latency(nn.Identity(), TINY, warmup=0, rounds=6, runs_per_round=3, max_extra_rounds=4,
                             tolerance=0.05, timer=timer, reference=False)
    assert result.rounds == 6 + 4 and result.remeasured and not result.converged
    assert (result.ci_low_ms, result.ci_high_ms) == (1.0, 3.0)
    assert result.precision > result.tolerance == 0.05
    assert "wider than the +-5.0% asked for" in str(result)


def test_steady_timings_converge_in_the_first_rounds():
    timer = ScriptedTimer(lambda fn, i: 2.0 + 0.01 * (i % 2))
    result = measure_latency(nn.Identity(), TINY, warmup=0, rounds=6, runs_per_round=3, max_extra_rounds=4,
                             tolerance=0.05, timer=timer, reference=False)
    assert result.rounds == 6 and not result.remeasured and result.converged
    assert result.ci_low_ms <= result.value_ms <= result.ci_high_ms and result.precision <= 0.05
    assert "wider than" not in str(result)


def test_a_slow_start_converges_after_extra_rounds():
    # slow for the warm-up (10 or 11 runs: at most 1, then two agreeing blocks of 5) and the first 3 rounds
    timer = ScriptedTimer(lambda fn, i: 20.0 if i < 19 else 2.0)
    result = measure_latency(nn.Identity(), TINY, warmup=0, rounds=5, runs_per_round=3, max_extra_rounds=20,
                             tolerance=0.05, timer=timer, reference=False)
    assert result.rounds == 15 and result.remeasured and result.converged
    assert result.value_ms == result.ci_low_ms == result.ci_high_ms == 2.0


def test_str_states_the_value_its_interval_and_how_it_was_measured():
    cycle = [2.0, 2.1, 1.9, 2.2, 1.8, 2.05, 1.95, 2.3, 1.7, 2.0]  # 10 rounds of 1 run see each value once
    timer = ScriptedTimer(lambda fn, i: cycle[i % 10])
    result = measure_latency(nn.Identity(), TINY, warmup=0, rounds=10, runs_per_round=1, max_extra_rounds=0,
                             timer=timer, reference=False)
    assert sorted(result.round_medians_ms) == sorted(cycle)
    text = str(result)
    assert text.startswith("2.00 ms +-10.0% (95% interval 1.80 ms to 2.20 ms")  # the 2nd and 9th smallest
    assert "wider than the +-2.0% asked for" in text and "10 rounds" in text
    assert text.endswith(f" on {result.context}") and "\n" not in text
    assert result.describe() in text and "reference-corrected" not in text


def test_presets_and_arches_are_built_for_the_input_channels():
    spec = InputSpec(channels=1, height=32, width=32)
    timer = ScriptedTimer(lambda fn, i: 3.0)  # never runs the model: only the build is exercised
    result = measure_latency("IdentityFormer-S12", spec, warmup=0, rounds=1, runs_per_round=1, timer=timer,
                             reference=False)
    assert result.value_ms == 3.0 and result.context.input_shape == (1, 1, 32, 32)
    # with the reference in the rounds (each visit begins with an untimed run), it is built for 1 channel too
    ref = Reference(reference_key(CPU, spec, 1), Anchor(4.0, 3.9, 4.1, 40, 0.0), 1)
    timer = ScriptedTimer(lambda fn, i: 3.0)
    result = measure_latency("IdentityFormer-S12", spec, threads=1, warmup=0, rounds=1, runs_per_round=1,
                             timer=timer, reference=ref)
    assert result.value_ms == 3.0 / 3.0 * 4.0 and result.anchor_ms == 4.0


def test_real_measurement_smoke():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    result = measure_latency(model, InputSpec(height=16, width=16), threads=1, warmup=2, rounds=3, runs_per_round=5,
                             max_extra_rounds=1)
    assert 0 < result.value_ms < 1000
    assert len(result.round_medians_ms) in (3, 4) and result.value_ms == statistics.median(result.round_medians_ms)
    assert result.ci_low_ms <= result.value_ms <= result.ci_high_ms
    assert result.spread >= 0 and result.context.threads == 1
    # on the CPU, by default, corrected by the reference timed in the same rounds
    assert REFERENCE_OPTION in result.context.options and result.anchor_ms > 0 and result.drift > 0
    assert result.raw_ms > 0 and (result.precision <= result.tolerance or not result.converged)
    plain = measure_latency(model, InputSpec(height=16, width=16), threads=1, warmup=2, rounds=3, runs_per_round=5,
                            max_extra_rounds=1, reference=False)
    assert plain.value_ms == plain.raw_ms == statistics.median(plain.round_medians_ms)
    assert REFERENCE_OPTION not in plain.context.options and plain.anchor_ms is None


def test_user_model_is_not_moved_to_another_dtype():
    model = nn.Conv2d(3, 4, 1)
    # reference=False: the reference in a reduced precision is test_the_reference_runs_in_the_precision_...
    result = measure_latency(model, InputSpec(height=4, width=4, dtype="bfloat16"), warmup=1, rounds=1,
                             runs_per_round=2, reference=False)
    assert model.weight.dtype == torch.float32
    assert result.context.dtype == "bfloat16"


# ------------------------------------------------------------------------------------ the reference workload


@pytest.fixture
def tagged_reference(monkeypatch):
    """The reference workload is a pair of Tagged('ref') and Tagged('heavy') models here, so a timer can tell them
    from the models; returns the instances built."""
    built = []

    def models(in_chans):
        built.extend((Tagged("ref"), Tagged("heavy")))
        return tuple(built[-2:])

    monkeypatch.setattr(reference_module, "reference_models", models)
    return built


def tagged_ref(spec=TINY, threads=1, anchor_ms=2.5):
    """A Reference with a given anchor: nothing is measured or read for it."""
    return Reference(reference_key(CPU, spec, threads), Anchor(anchor_ms, anchor_ms, anchor_ms, 40, 0.0),
                     spec.channels)


def test_the_session_never_touches_the_user_cache(session_cache_dir):
    assert default_cache_dir() == session_cache_dir


def test_paired_rounds_time_the_reference_after_every_chunk_of_each_models_runs():
    from searchspace.latency.measure import run_paired_rounds

    order = []
    a, b, ref = (lambda: order.append("a")), (lambda: order.append("b")), (lambda: order.append("ref"))

    def timer(fn):
        fn()
        return {"a": 1.0, "b": 2.0, "ref": 0.5}[order[-1]]

    timings, paired = run_paired_rounds([a, b], [3, 2], ref, rounds=2, max_extra_rounds=0, timer=timer,
                                        done=lambda t, r: True, chunks=[2, 1])
    # each visit: one untimed settling run, then chunks of the model's runs, each followed by one reference run
    visit_a, visit_b = ["a", "a", "a", "ref", "a", "ref"], ["b", "b", "ref", "b", "ref"]
    assert order == visit_a + visit_b + visit_b + visit_a  # the first model rotates each round
    assert timings == [[[1.0] * 3] * 2, [[2.0] * 2] * 2]
    assert paired == [[[0.5] * 2] * 2, [[0.5] * 2] * 2]  # per model and round: the reference runs among its runs


def test_two_reference_workloads_are_timed_after_every_chunk_and_paired_by_their_geometric_mean():
    from searchspace.latency.measure import run_paired_rounds

    order = []
    a, light, heavy = (lambda: order.append("a")), (lambda: order.append("light")), (lambda: order.append("heavy"))

    def timer(fn):
        fn()
        return {"a": 1.0, "light": 1.0, "heavy": 4.0}[order[-1]]

    timings, paired = run_paired_rounds([a], [2], [light, heavy], rounds=2, max_extra_rounds=0, timer=timer,
                                        done=lambda t, r: True, chunks=[1])
    # each visit: one untimed settling run, then each run of the model followed by one run of each reference
    assert order == ["a", "a", "light", "heavy", "a", "light", "heavy"] * 2
    assert timings == [[[1.0, 1.0]] * 2] and paired == [[[2.0, 2.0]] * 2]  # sqrt(1 x 4) per chunk


def test_the_anchor_is_the_geometric_mean_of_both_workloads_latencies(tmp_path, tagged_reference):
    timer = Machine({"ref": 1.0, "heavy": 9.0})
    ref = reference_for("cpu", TINY, 1, timer=timer, cache_dir=str(tmp_path), anchor_rounds=6)
    assert (ref.anchor.ms, ref.anchor.ci_low_ms, ref.anchor.ci_high_ms, ref.anchor.rounds) == (3.0, 3.0, 3.0, 6)
    assert timer.counts["ref"] > 0 and timer.counts["heavy"] > 0
    stored = json.loads(reference_module.anchor_path(ref.key, tmp_path).read_text())
    assert [a["name"] for a in stored["archs"]] == ["reference", "heavy-reference"]
    # a light-only anchor of the format before is measured again, not used to correct the pair
    stored["format"] = 1
    reference_module.anchor_path(ref.key, tmp_path).write_text(json.dumps(stored))
    assert reference_module.read_anchor(ref.key, tmp_path) is None


class Machine:
    """A scripted machine: runs fn, sees which Tagged model ran, answers its time (``ms[name]``) at the machine's
    current speed: twice as slow once the model 'm' has run ``slow_after`` times (None: never)."""

    def __init__(self, ms, slow_after=None):
        self.ms, self.slow_after, self.counts = ms, slow_after, Counter()

    def __call__(self, fn):
        Tagged.last = None
        fn()
        name = Tagged.last
        self.counts[name] += 1
        slow = self.slow_after is not None and self.counts["m"] > self.slow_after
        return self.ms[name] * (2.0 if slow else 1.0)


def test_the_reference_is_timed_with_the_models_and_divides_out(tagged_reference):
    a, b = Tagged("a"), Tagged("b")
    timer = Machine({"a": 1.0, "b": 2.0, "ref": 0.25, "heavy": 1.0})  # the reference's value: sqrt(0.25 x 1.0)
    ra, rb = measure_many([a, b], TINY, threads=1, warmup=0, rounds=3, runs_per_round=2, timer=timer,
                          reference=tagged_ref(anchor_ms=2.5))
    ref, heavy = tagged_reference
    assert timer.counts["ref"] >= 3 * 2  # timed in every round of each model (after its own warm-up)
    assert timer.counts["heavy"] == timer.counts["ref"]  # each reference run times both workloads
    for workload in (ref, heavy):  # run like the models: threads, inference, eval
        assert {s[:3] for s in workload.seen} == {(1, True, False)}
    assert (ra.value_ms, rb.value_ms) == (1.0 / 0.5 * 2.5, 2.0 / 0.5 * 2.5)
    assert (ra.raw_ms, rb.raw_ms) == (1.0, 2.0)
    assert ra.anchor_ms == rb.anchor_ms == 2.5 and ra.drift == rb.drift == pytest.approx(0.5 / 2.5)
    assert REFERENCE_OPTION in ra.context.options and REFERENCE_OPTION in rb.context.options
    assert ra.converged and (ra.ci_low_ms, ra.ci_high_ms) == (5.0, 5.0)


def test_the_reference_probe_times_the_reference_alone_against_its_anchor(tagged_reference):
    timer = Machine({"ref": 2.0, "heavy": 4.5})  # the reference now takes sqrt(2.0 x 4.5) = 3 ms; its anchor 2.5
    assert reference_drift(tagged_ref(anchor_ms=2.5), threads=1, timer=timer) == pytest.approx(1.2)
    ref, heavy = tagged_reference
    assert set(timer.counts) == {"ref", "heavy"}
    assert {s[:3] for s in ref.seen} == {s[:3] for s in heavy.seen} == {(1, True, False)}


def test_a_machine_that_slows_half_way_gives_the_ratio_times_the_anchor(tagged_reference):
    rounds, runs, anchor_ms = 10, 3, 2.5
    # the model's warm-up is at most 11 runs; it then runs 3 per round: slow from about round 5 of 10 on
    half_way = 11 + rounds // 2 * runs

    def measure(timer, reference):
        return measure_latency(Tagged("m"), TINY, threads=1, warmup=0, rounds=rounds, runs_per_round=runs,
                               max_extra_rounds=0, timer=timer, reference=reference)

    ms = {"m": 3.0, "ref": 1.0, "heavy": 1.0}
    slowed = measure(Machine(ms, slow_after=half_way), tagged_ref(anchor_ms=anchor_ms))
    steady = measure(Machine(ms), tagged_ref(anchor_ms=anchor_ms))
    assert slowed.value_ms == steady.value_ms == 3.0 * anchor_ms
    assert slowed.ci_low_ms == slowed.ci_high_ms == 3.0 * anchor_ms and steady.converged
    # the slow rounds are left out as busy: 5 calm rounds are too few for a 95% interval, and it says so
    assert slowed.busy_rounds == rounds - slowed.rounds == 5 and steady.busy_rounds == 0
    assert not slowed.converged and "5 busy rounds left out" in str(slowed)
    assert steady.raw_ms == slowed.raw_ms == 3.0  # what the clock said in the calm rounds
    assert steady.drift == pytest.approx(1.0 / anchor_ms) == slowed.drift  # the machine's speed in calm rounds
    assert "reference-corrected (machine at 0.40x its anchor)" in str(steady)
    plain = measure(Machine(ms, slow_after=half_way), False)  # the same machine without the reference
    assert plain.value_ms > 3.0 and (plain.ci_low_ms, plain.ci_high_ms) == (3.0, 6.0) and not plain.converged


def test_the_anchor_is_measured_once_then_read_from_the_cache(tmp_path):
    timer = ScriptedTimer(lambda fn, i: 2.0)
    ref = reference_for("cpu", TINY, 1, timer=timer, cache_dir=str(tmp_path), anchor_rounds=6)
    measured = len(timer.calls)
    assert measured > 0
    assert (ref.anchor.ms, ref.anchor.ci_low_ms, ref.anchor.ci_high_ms, ref.anchor.rounds) == (2.0, 2.0, 2.0, 6)
    assert ref.key == reference_key(CPU, TINY, 1, clock_name(timer)) and ref.in_chans == 3
    assert ref.key["clock"] == "ScriptedTimer"  # an anchor is valid for the clock that measured it
    [path] = (tmp_path / "latency").glob("reference-*.json")
    assert path == reference_module.anchor_path(ref.key, tmp_path)
    assert json.loads(path.read_text())["anchor"]["ms"] == 2.0
    again = reference_for("cpu", TINY, 1, timer=timer, cache_dir=str(tmp_path), anchor_rounds=6)
    assert len(timer.calls) == measured  # read, not measured again
    assert again.anchor == ref.anchor
    other = reference_for("cpu", TINY, 2, timer=timer, cache_dir=str(tmp_path), anchor_rounds=6)
    assert len(timer.calls) > measured and other.key["threads"] == 2  # another key: its own anchor
    assert len(list((tmp_path / "latency").glob("reference-*.json"))) == 2


def test_a_stored_anchor_is_used_without_measuring(tmp_path):
    anchor = Anchor(7.0, 6.9, 7.1, 40, 0.0)
    timer = ScriptedTimer(lambda fn, i: 2.0)
    reference_module.write_anchor(reference_key(CPU, TINY, 1, clock_name(timer)), anchor, tmp_path)
    assert reference_for("cpu", TINY, 1, timer=timer, cache_dir=str(tmp_path)).anchor == anchor
    tokens = InputSpec(channels=3, height=8, width=8, layout="tokens")  # the reference always runs on images
    assert reference_for("cpu", tokens, 1, timer=timer, cache_dir=str(tmp_path)).anchor == anchor
    assert not timer.calls


def test_a_damaged_anchor_file_is_measured_again(tmp_path):
    timer = ScriptedTimer(lambda fn, i: 2.0)
    path = reference_module.anchor_path(reference_key(CPU, TINY, 1, clock_name(timer)), tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert reference_for("cpu", TINY, 1, timer=timer, cache_dir=str(tmp_path), anchor_rounds=3).anchor.ms == 2.0
    assert timer.calls and json.loads(path.read_text())["anchor"]["ms"] == 2.0


def test_the_anchor_lives_in_the_cache_folder_of_the_environment(tmp_path, monkeypatch, session_cache_dir):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env"))
    reference_for("cpu", TINY, 1, timer=ScriptedTimer(lambda fn, i: 2.0), anchor_rounds=3)
    assert len(list((tmp_path / "env" / "latency").glob("reference-*.json"))) == 1


def reference_runs(**kwargs):
    """How many times the reference runs in one scripted measurement of Tagged('m'), and the result."""
    timer = Machine({"m": 6.0, "ref": 2.0, "heavy": 2.0})
    result = measure_latency(Tagged("m"), TINY, threads=1, warmup=0, rounds=6, runs_per_round=3, timer=timer,
                             **kwargs)
    return timer.counts["ref"], result


def test_auto_measures_the_anchor_on_first_use_and_reads_it_afterwards(tmp_path, monkeypatch, tagged_reference):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    in_rounds, _ = reference_runs(reference=tagged_ref(anchor_ms=2.0))  # an anchor given: nothing else to run
    first_runs, first = reference_runs()  # reference="auto", the default
    assert first_runs > in_rounds  # ... the anchor's measurement first
    assert first.anchor_ms == 2.0 and first.value_ms == 6.0 and first.drift == 1.0
    assert REFERENCE_OPTION in first.context.options
    assert len(list((tmp_path / "latency").glob("reference-*.json"))) == 1
    second_runs, second = reference_runs(reference="auto")
    assert second_runs == in_rounds  # the anchor was read, not measured again
    assert second.anchor_ms == 2.0 and second.value_ms == 6.0


def test_auto_reads_the_anchor_from_the_cache_and_corrects_by_it(tmp_path, monkeypatch, tagged_reference):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    in_rounds, _ = reference_runs(reference=tagged_ref(anchor_ms=2.5))
    reference_module.write_anchor(reference_key(CPU, TINY, 1, "Machine"), Anchor(2.5, 2.4, 2.6, 40, 0.0))
    runs, result = reference_runs(reference="auto")  # the machine 20% slower than when it was anchored
    assert runs == in_rounds  # no anchor measurement
    assert result.anchor_ms == 2.5 and result.value_ms == 6.0 / 2.0 * 2.5 and result.raw_ms == 6.0
    assert result.drift == pytest.approx(0.8)


def test_the_reference_runs_in_the_precision_of_the_measurement(tagged_reference):
    # The anchor of a bfloat16 input is measured with the reference cast to bfloat16 (reference_for measures it
    # like any model); in the rounds it must run the same way, or a float32 module meets a bfloat16 input.
    spec = InputSpec(channels=3, height=8, width=8, dtype="bfloat16")
    timer = Machine({"ref": 1.0, "heavy": 1.0, None: 1.0})
    result = measure_latency(nn.Conv2d(3, 4, 3), spec, threads=1, warmup=0, rounds=2, runs_per_round=2,
                             timer=timer, reference=tagged_ref(spec))
    for workload in tagged_reference:
        assert {s[4] for s in workload.seen} == {torch.bfloat16} and workload.conv.weight.dtype == torch.bfloat16
    assert result.context.dtype == "bfloat16"


def test_reference_is_for_the_cpu_and_takes_named_values_only():
    with pytest.raises(MeasurementError, match="reference=True corrects CPU measurements only"):
        _resolve_reference(True, torch.device("cuda"), TINY, 1, cpu_timer)
    assert _resolve_reference("auto", torch.device("cuda"), TINY, 1, cpu_timer) is None  # a GPU: no reference
    assert _resolve_reference(False, CPU, TINY, 1, cpu_timer) is None
    ref = tagged_ref()
    assert _resolve_reference(ref, CPU, TINY, 1, cpu_timer) is ref
    with pytest.raises(MeasurementError):
        reference_for(torch.device("cuda"), TINY, 1)  # the reference corrects CPU measurements only
    for bad in ("yes", "always", 2):
        timer = ScriptedTimer(lambda fn, i: 1.0)
        with pytest.raises(MeasurementError, match="reference must be 'auto', True, False or a Reference") as info:
            measure_latency(nn.Identity(), TINY, timer=timer, reference=bad)
        assert "\n" not in str(info.value) and not timer.calls  # refused before anything is timed


def test_a_clock_too_coarse_to_see_the_work_is_not_a_crash():
    # A tiny workload on a coarse clock can read 0 ms on every run (calibrate_runs expects it). The result is
    # then 0 ms, or a clear MeasurementError; not a ZeroDivisionError from the interval's relative half-width.
    try:
        result = measure_latency(nn.Identity(), TINY, warmup=0, rounds=2, runs_per_round=1, max_extra_rounds=1,
                                 timer=lambda fn: 0.0, reference=False)
    except MeasurementError:
        return
    assert result.value_ms == result.ci_high_ms == 0.0


# ------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(device="banana"), "unknown device 'banana'"),
        (dict(device="mps"), "not supported"),
        (dict(threads=0), "threads must be an integer >= 1"),
        (dict(rounds=0), "rounds must be an integer >= 1"),
        (dict(warmup=-1), "warmup must be an integer >= 0"),
        (dict(runs_per_round=0), "runs_per_round must be an integer >= 1"),
        (dict(tolerance=-0.1), "tolerance must be"),
        (dict(tolerance=float("nan")), "tolerance must be"),
        (dict(max_extra_rounds=-1), "max_extra_rounds must be an integer >= 0"),
        (dict(max_extra_rounds=1.5), "max_extra_rounds must be an integer >= 0"),
        (dict(target_round_ms=0), "target_round_ms must be a positive number"),
        (dict(reference="sometimes"), "reference must be 'auto', True, False or a Reference"),
        (dict(cudnn_benchmark=True), "need a CUDA device"),
        (dict(cuda_graphs=True), "need a CUDA device"),
        (dict(autocast=True), "autocast needs"),
        (dict(input_spec=[TINY, TINY]), "one per model"),
        (dict(channels_last=True, input_spec=InputSpec(layout="tokens")), "channels_last applies"),
    ],
)
def test_bad_options_are_one_line_errors(kwargs, message):
    with pytest.raises(MixerNASError) as info:
        measure_latency(nn.Identity(), **{"input_spec": TINY, **kwargs})
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(batch=0), "batch must be a positive integer"),
        (dict(batch=-2), "batch must be a positive integer"),
        (dict(height=1.5), "height must be a positive integer"),
        (dict(width=True), "width must be a positive integer"),
        (dict(dtype="float64"), "unknown input dtype 'float64'"),
        (dict(layout="nhcw"), "unknown input layout 'nhcw'"),
    ],
)
def test_bad_input_specs(kwargs, message):
    with pytest.raises(MeasurementError, match=message):
        InputSpec(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(MixerNASError, match="sees no CUDA GPU here; use device 'cpu'"):
        measure_latency(nn.Identity(), TINY, device="cuda")


def test_unknown_preset_is_a_user_error():
    with pytest.raises(MixerNASError, match="unknown preset"):
        measure_latency("PoolFormer-XXL", TINY)


# ------------------------------------------------------------------------------------------------------ counting


def test_conv_and_linear_macs_are_exact():
    conv = nn.Conv2d(3, 8, 3, bias=False)
    assert count_params_macs(conv, InputSpec(height=10, width=10)) == (216, 216 * 8 * 8)
    lin = nn.Linear(5, 7)
    assert count_params_macs(lin, InputSpec(channels=5, height=2, width=3, layout="tokens")) == (42, 6 * 5 * 7)


def test_attention_macs_include_the_attention_itself():
    dim, h, w = 64, 5, 3
    mixer = searchspace.create_mixer("attention", dim)
    counts = count_params_macs(mixer, InputSpec(channels=dim, height=h, width=w))
    n, heads = h * w, mixer.num_heads
    projections = n * dim * 3 * dim + n * dim * dim
    attention = 2 * heads * n * n * (dim // heads)  # Q @ K^T and attn @ V
    assert counts.macs == projections + attention
    assert counts.params == sum(p.numel() for p in mixer.parameters())
    assert counts.counter == COUNTER_NAME == "torch FlopCounterMode"


def test_counting_restores_training_mode_and_builds_presets():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Dropout())
    model.train()
    count_params_macs(model, TINY)
    assert model.training
    params, macs = count_params_macs("IdentityFormer-S12", InputSpec(height=32, width=32))
    assert params > 1_000_000 and macs > 0


def test_elementwise_mixers_count_zero_macs():
    assert count_params_macs(searchspace.create_mixer("pooling", 16), InputSpec(channels=16, height=7, width=7)) == (
        0, 0)


# ----------------------------------------------------------------------------------------------------------- GPU


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, padding=1))

    def forward(self, x):
        return self.body(x).mean((2, 3))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize(
    "dtype, options",
    [
        ("float32", {}),
        ("float32", dict(cudnn_benchmark=True, channels_last=True)),
        ("float16", {}),
        ("bfloat16", dict(autocast=True)),
        ("float32", dict(cuda_graphs=True)),
        ("float16", dict(cuda_graphs=True, channels_last=True)),
    ],
)
def test_cuda_measurement(dtype, options):
    model = SmallNet()
    result = measure_latency(model, InputSpec(height=32, width=32, dtype=dtype), device="cuda", warmup=3, rounds=2,
                             runs_per_round=5, **options)
    assert result.value_ms > 0
    assert result.context.device.startswith("cuda") and result.context.device_name
    assert set(result.context.options) == {k for k, v in options.items() if v}
    assert next(model.parameters()).device.type == "cpu"  # the user's model was copied, not moved
    assert torch.backends.cudnn.benchmark is False


@pytest.mark.gpu
@gpu
def test_cuda_measure_many_interleaved():
    results = measure_many([SmallNet(), nn.Identity()], InputSpec(height=32, width=32), device="cuda", warmup=2,
                           rounds=2, runs_per_round=3)
    assert [r.context.device for r in results] == ["cuda:0", "cuda:0"]


@pytest.mark.gpu
@gpu
def test_cuda_has_no_reference_workload():
    with pytest.raises(MeasurementError, match="reference=True corrects CPU measurements only"):
        measure_latency(SmallNet(), InputSpec(height=32, width=32), device="cuda", warmup=1, rounds=1,
                        runs_per_round=1, reference=True)
    result = measure_latency(SmallNet(), InputSpec(height=32, width=32), device="cuda", warmup=1, rounds=1,
                             runs_per_round=1)  # reference="auto": plain round medians on a GPU
    assert REFERENCE_OPTION not in result.context.options and result.anchor_ms is None and result.drift is None


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_getaffinity"), reason="Linux only")
def test_cpu_measurements_run_without_page_fault_churn(monkeypatch):
    # Large activations must not be mapped fresh on every forward pass (glibc's default above 32 MiB): then a
    # block timed alone and the same block inside a model would meet different allocator states.
    import resource

    from searchspace.latency import measure as measure_module

    # What is tested is the allocator of this process as measurements set it, not a value left in the cache by an
    # earlier test or the environment's opt-out.
    monkeypatch.delenv(measure_module.ALLOCATOR_ENV, raising=False)
    measure_module.steady_allocator.cache_clear()
    threads = torch.get_num_threads()
    try:
        result = measure_latency(nn.Identity(), InputSpec(1, 1, 8, 8), threads=1, warmup=1, rounds=1,
                                 runs_per_round=1)
        if not measure_module.steady_allocator():
            pytest.skip("not glibc: the allocator is left as it is")
        assert measure_module.STEADY_ALLOCATOR in result.context.options
        big = nn.Sequential(nn.Conv2d(8, 8, 1), nn.GELU(), nn.Conv2d(8, 8, 1))  # 8 x 1024 x 1024 floats: 32 MiB
        x = torch.randn(1, 8, 1024, 1024)
        torch.set_num_threads(1)  # as measurements run, whatever an earlier test left
        faults = []
        with torch.inference_mode():
            for _ in range(20):
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                big(x)
                faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    finally:
        torch.set_num_threads(threads)
        measure_module.steady_allocator.cache_clear()
    # Churn faults on every pass (~24,000 4-KiB pages: three fresh 32 MiB buffers). A steady heap faults only while
    # it grows to its peak, over the first passes: 24,576 + 24,576 + 8,192 pages at one thread, and how many passes
    # that takes depends on the thread count and on what the process allocated before. After that, none, though the
    # counter is the whole process's: another thread (a Ray client, a test run before) may fault a pass now and then.
    quiet = [f < 1000 for f in faults[5:]]
    assert sum(quiet) >= 12, f"page faults per pass: {faults}"


def test_steady_allocator_can_be_turned_off(monkeypatch):
    from searchspace.latency import measure as measure_module

    measure_module.steady_allocator.cache_clear()
    monkeypatch.setenv(measure_module.ALLOCATOR_ENV, "system")
    try:
        assert measure_module.steady_allocator() is False
        result = measure_latency(nn.Identity(), InputSpec(1, 1, 8, 8), threads=1, warmup=1, rounds=1,
                                 runs_per_round=1)
        assert measure_module.STEADY_ALLOCATOR not in result.context.options
    finally:
        measure_module.steady_allocator.cache_clear()


def test_the_thread_clock_check_tells_other_threads_from_a_busy_machine():
    import threading

    from searchspace.latency.measure import MeasurementError, check_thread_clock

    def spin(seconds: float) -> None:
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass

    def elsewhere() -> None:  # the work runs on a thread of its own, as some runtimes do
        worker = threading.Thread(target=spin, args=(0.02,))
        worker.start()
        worker.join()

    def here_but_waiting() -> None:  # computes here, then waits as a process does for a busy core
        spin(0.005)
        time.sleep(0.05)

    with pytest.raises(MeasurementError, match="threads of its own"):
        check_thread_clock(elsewhere, "demo")
    check_thread_clock(here_but_waiting, "demo")  # 10% of the wall time, all of the process's CPU time


def test_the_thread_clock_check_is_not_fooled_by_another_thread_waking_once():
    import threading

    from searchspace.latency.measure import MeasurementError, check_thread_clock

    def spin(seconds: float) -> None:
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass

    calls = []

    def tiny_part_beside_a_waking_thread() -> None:  # microseconds here; once, another thread computes meanwhile
        calls.append(1)
        if len(calls) == 1:
            other = threading.Thread(target=spin, args=(0.02,))
            other.start()
            other.join()
        spin(0.0001)

    check_thread_clock(tiny_part_beside_a_waking_thread, "eager")  # the first span looks elsewhere, the next do not
    assert len(calls) == 6  # it looked again, and stopped at the first span that ran on its own thread

    def always_elsewhere() -> None:
        other = threading.Thread(target=spin, args=(0.005,))
        other.start()
        other.join()

    with pytest.raises(MeasurementError, match="threads of its own"):
        check_thread_clock(always_elsewhere, "demo")
