"""Latency measurement: the robust statistic and the re-measure loop against scripted timings (no real clock),
the measuring protocol (threads, eval mode, interleaving, context), bad input, parameter/MAC counting, and a real
smoke test on a tiny model. CUDA paths run only where there is a GPU."""

import json
import math

import pytest
import torch
from torch import nn

import searchspace
from searchspace import MixerNASError
from searchspace.latency import (
    COUNTER_NAME,
    InputSpec,
    LatencyResult,
    MeasurementError,
    calibrate_runs,
    count_params_macs,
    measure_latency,
    measure_many,
    relative_spread,
    robust_latency,
    run_rounds,
    summarize,
)

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TINY = InputSpec(batch=1, channels=3, height=8, width=8)


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


def test_robust_latency_is_the_lowest_round_median():
    assert robust_latency([3.0, 2.5, 80.0, 2.6]) == 2.5


def test_spread_is_typical_round_over_best_round():
    assert relative_spread([2.0, 2.2, 2.4]) == pytest.approx(0.1)
    assert relative_spread([5.0]) == 0.0
    assert relative_spread([2.0, 2.0, 60.0]) == 0.0  # one spiked round in three is ignored
    assert relative_spread([2.0, 60.0, 60.0]) == pytest.approx(29.0)  # a slow phase is not
    assert relative_spread([0.0, 0.0]) == 0.0
    assert math.isinf(relative_spread([0.0, 1.0, 1.0]))


@pytest.mark.parametrize("bad", [[], [1.0, float("nan")], [float("inf")], [-1.0]])
def test_statistic_rejects_meaningless_timings(bad):
    with pytest.raises(MeasurementError):
        robust_latency(bad)


def test_calibrate_runs_sizes_rounds_and_clamps():
    assert calibrate_runs([50.0, 2.0, 2.0, 2.0], target_round_ms=100.0) == 50  # early slow warm-up runs ignored
    assert calibrate_runs([500.0, 500.0], target_round_ms=100.0) == 5
    assert calibrate_runs([1e-4, 1e-4], target_round_ms=100.0) == 1000
    assert calibrate_runs([0.0], target_round_ms=100.0) == 1000


# ------------------------------------------------------------------------------------- the loop, scripted clock


def test_rounds_that_agree_are_not_remeasured():
    timer = ScriptedTimer(lambda fn, i: 2.0 + 0.01 * (i % 3))
    timings = run_rounds(fns(1), [4], rounds=5, tolerance=0.05, max_extra_rounds=5, timer=timer)
    assert len(timings[0]) == 5 and all(len(r) == 4 for r in timings[0])


def test_a_slow_phase_triggers_extra_rounds_until_rounds_agree():
    # The first 3 of 5 rounds are slow (the machine is busy), then it calms down: the median round only agrees
    # with the best once slow rounds are fewer than half, i.e. after 2 extra rounds.
    runs = 4
    timer = ScriptedTimer(lambda fn, i: 20.0 if i < 3 * runs else 2.0)
    timings = run_rounds(fns(1), [runs], rounds=5, tolerance=0.05, max_extra_rounds=10, timer=timer)
    assert len(timings[0]) == 7
    summary = summarize(timings[0])
    assert summary.value_ms == 2.0 and summary.spread == 0.0


def test_remeasuring_is_bounded():
    timer = ScriptedTimer(lambda fn, i: 2.0 if (i // 3) % 3 == 0 else 5.0)  # mostly slow rounds, forever
    timings = run_rounds(fns(1), [3], rounds=4, tolerance=0.05, max_extra_rounds=3, timer=timer)
    assert len(timings[0]) == 4 + 3


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
        self.seen.append((torch.get_num_threads(), torch.is_inference_mode_enabled(), self.training, x.shape))
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
    result = measure_latency(model, TINY, threads=threads, warmup=2, rounds=3, runs_per_round=4,
                             timer=run_and_answer({"m": 1.5}))
    assert isinstance(result, LatencyResult)
    assert result.value_ms == 1.5 and result.spread == 0.0
    assert result.round_medians_ms == (1.5, 1.5, 1.5)
    assert result.runs == 12 and result.runs_per_round == 4 and not result.remeasured
    assert {seen[:3] for seen in model.seen} == {(threads, True, False)}  # fixed threads, inference, eval
    assert torch.get_num_threads() == before  # restored
    assert model.training and model.conv.training  # restored
    ctx = result.context
    assert (ctx.device, ctx.threads, ctx.batch, ctx.input_shape, ctx.dtype) == ("cpu", threads, 1, (1, 3, 8, 8),
                                                                                "float32")
    assert ctx.device_name and ctx.torch_version == torch.__version__.split("+")[0]
    assert "\n" not in str(result) and "1.50 ms" in str(result)
    assert json.loads(json.dumps(result.to_dict()))["context"]["input_shape"] == [1, 3, 8, 8]


def test_measure_many_interleaves_and_keeps_order_and_per_model_inputs():
    a, b = Tagged("a"), Tagged("b")
    b.conv = nn.Identity()
    specs = [TINY, InputSpec(channels=5, height=2, width=3, layout="tokens")]
    ra, rb = measure_many([a, b], specs, warmup=1, rounds=4, runs_per_round=2,
                          timer=run_and_answer({"a": 1.0, "b": 4.0}))
    assert (ra.value_ms, rb.value_ms) == (1.0, 4.0)
    assert rb.context.input_shape == (1, 6, 5) and rb.context.layout == "tokens"
    assert {s[3] for s in b.seen} == {torch.Size([1, 6, 5])}


def test_runs_per_round_calibrated_from_warmup():
    result = measure_latency(Tagged("m"), TINY, warmup=4, rounds=2, target_round_ms=10.0,
                             timer=run_and_answer({"m": 0.5}))
    assert result.runs_per_round == 20


def test_presets_and_arches_are_built_for_the_input_channels():
    timer = ScriptedTimer(lambda fn, i: 3.0)  # never runs the model: only the build is exercised
    result = measure_latency("IdentityFormer-S12", InputSpec(channels=1, height=32, width=32), warmup=0, rounds=1,
                             runs_per_round=1, timer=timer)
    assert result.value_ms == 3.0 and result.context.input_shape == (1, 1, 32, 32)


def test_real_measurement_smoke():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    result = measure_latency(model, InputSpec(height=16, width=16), threads=1, warmup=2, rounds=3, runs_per_round=5,
                             max_extra_rounds=1)
    assert 0 < result.value_ms < 1000
    assert len(result.round_medians_ms) in (3, 4) and result.value_ms == min(result.round_medians_ms)
    assert result.spread >= 0 and result.context.threads == 1


def test_user_model_is_not_moved_to_another_dtype():
    model = nn.Conv2d(3, 4, 1)
    result = measure_latency(model, InputSpec(height=4, width=4, dtype="bfloat16"), warmup=1, rounds=1,
                             runs_per_round=2)
    assert model.weight.dtype == torch.float32
    assert result.context.dtype == "bfloat16"


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
            for _ in range(10):
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                big(x)
                faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    finally:
        torch.set_num_threads(threads)
        measure_module.steady_allocator.cache_clear()
    # Churn faults on every pass (~24,000 4-KiB pages: three fresh 32 MiB buffers). A steady heap faults only while
    # it grows to its peak, over the first passes: 24,576 + 24,576 + 8,192 pages at one thread, and how many passes
    # that takes depends on the thread count and on what the process allocated before. After that, none.
    assert max(faults[5:]) < 1000, f"page faults per pass: {faults}"


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
