"""Measure a model's latency on this machine, in a way that survives a noisy machine.

The protocol, and why:

* **Fixed threads, inference mode, eval mode, warm-up.** The thread count is set for the measurement and restored
  afterwards; warm-up runs (allocator, caches, oneDNN/cuDNN kernel selection) are never timed.
* **Rounds of runs; the statistic is the lowest round median.** Each round times ``runs_per_round`` forward passes
  and keeps their median (robust to a few slow runs). On a shared CPU, noise (other processes, frequency changes,
  interrupts) only ever *adds* time: a whole round can be 38x slow, none can be faster than the model allows. So the
  fastest round median is the best estimate of what the model costs, and it does not move when a round is hit.
* **Spread** = ``(median of round medians - lowest round median) / lowest round median``: how much slower a typical
  round was than the best one. It ignores a single spiked round, but grows when the machine is slow for a while.
* **Bounded re-measurement.** When the spread exceeds ``tolerance`` the rounds disagree: extra rounds are measured
  (at most ``max_extra_rounds``) until the typical round agrees with the best one again.
* **Interleaving.** :func:`measure_many` visits every model in each round (starting with a different model each
  round), so a slow phase of the machine hits all of them alike and their ratios are fair.
* **CUDA:** each run is timed with CUDA events and synchronised; options for cuDNN benchmark, channels_last,
  float16/bfloat16 (cast or autocast) and CUDA graphs (capture once, time ``graph.replay()``).

>>> result = measure_latency("PoolFormerV2-S12", InputSpec(height=64, width=64), threads=1)  # doctest: +SKIP
>>> print(result)  # doctest: +SKIP
13.8 ms (spread 2.5% over 5 rounds of 15 runs) on Intel(R) Xeon(R) Processor [cpu], 1 thread, 1x3x64x64 nchw ...
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import functools
import gc
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..errors import MixerNASError
from .budget import format_ms

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
LAYOUTS = {
    "nchw": "(batch, channels, height, width): images and our mixers",
    "nhwc": "(batch, height, width, channels)",
    "tokens": "(batch, height*width, channels): transformer token sequences such as timm's metaformer.Attention",
}

# A timer runs ``fn`` once and returns how long it took in milliseconds. Injectable, so the measuring loop can be
# tested with scripted timings instead of a real clock.
Timer = Callable[[Callable[[], Any]], float]

MIN_RUNS_PER_ROUND = 5  # a median of fewer runs is itself noisy
MAX_RUNS_PER_ROUND = 1000  # tiny workloads (an identity mixer) would otherwise ask for millions


class MeasurementError(MixerNASError, ValueError):
    """A measurement that cannot be made as asked (device, input spec, options)."""


@dataclass(frozen=True)
class InputSpec:
    """The input a model is measured on. ``layout`` declares how the tensor is arranged (see ``LAYOUTS``)."""

    batch: int = 1
    channels: int = 3
    height: int = 224
    width: int = 224
    dtype: str = "float32"  # compute precision: "float32", "float16" or "bfloat16"
    layout: str = "nchw"

    def __post_init__(self) -> None:
        for name in ("batch", "channels", "height", "width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MeasurementError(f"input {name} must be a positive integer, got {value!r}")
        if self.dtype not in DTYPES:
            raise MeasurementError(f"unknown input dtype {self.dtype!r}; use one of {', '.join(DTYPES)}")
        if self.layout not in LAYOUTS:
            raise MeasurementError(f"unknown input layout {self.layout!r}; use one of {', '.join(LAYOUTS)}")

    @property
    def shape(self) -> tuple[int, ...]:
        b, c, h, w = self.batch, self.channels, self.height, self.width
        return {"nchw": (b, c, h, w), "nhwc": (b, h, w, c), "tokens": (b, h * w, c)}[self.layout]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def example(self, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                channels_last: bool = False) -> torch.Tensor:
        """A random input of this spec (``dtype`` overrides the spec's, e.g. float32 under autocast)."""
        x = torch.randn(self.shape, device=device, dtype=dtype or self.torch_dtype)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x


DEFAULT_INPUT = InputSpec()  # one 224x224 RGB image, float32


@dataclass(frozen=True)
class LatencyContext:
    """Where and how a latency was measured; a number without this is not comparable to another."""

    device: str  # "cpu" or "cuda:N"
    device_name: str  # CPU model (from /proc/cpuinfo) or CUDA device name
    threads: int  # torch intra-op threads during the measurement
    batch: int
    input_shape: tuple[int, ...]
    layout: str
    dtype: str
    torch_version: str
    options: tuple[str, ...] = ()  # e.g. ("channels_last", "cuda_graphs", "autocast")

    def __str__(self) -> str:
        shape = "x".join(map(str, self.input_shape))
        opts = f", {', '.join(self.options)}" if self.options else ""
        threads = f"{self.threads} thread{'s' if self.threads != 1 else ''}"
        return (f"{self.device_name} [{self.device}], {threads}, {shape} {self.layout} {self.dtype}{opts}, "
                f"torch {self.torch_version}")


@dataclass(frozen=True)
class Summary:
    """The robust statistic of a set of rounds (see :func:`summarize`)."""

    value_ms: float  # lowest round median
    spread: float  # (median of round medians - lowest) / lowest
    round_medians_ms: tuple[float, ...]
    runs: int  # timed runs over all rounds


@dataclass(frozen=True)
class LatencyResult:
    """A measured latency with its spread and context. ``str(result)`` is one readable line."""

    value_ms: float  # lowest round median: noise only adds time, so the fastest typical round is the model's cost
    spread: float  # relative: (median of round medians - lowest) / lowest; 0.02 means typical rounds were 2% slower
    round_medians_ms: tuple[float, ...]  # in the order measured
    runs: int  # timed runs in all rounds (warm-up and calibration excluded)
    runs_per_round: int
    remeasured: bool  # rounds disagreed beyond the tolerance and extra rounds were measured
    context: LatencyContext

    @property
    def rounds(self) -> int:
        return len(self.round_medians_ms)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        data = asdict(self)
        data["context"]["input_shape"] = list(self.context.input_shape)
        data["context"]["options"] = list(self.context.options)
        data["round_medians_ms"] = list(self.round_medians_ms)
        return data

    def __str__(self) -> str:
        again = ", re-measured" if self.remeasured else ""
        return (f"{format_ms(self.value_ms)} (spread {self.spread:.1%} over {self.rounds} rounds of "
                f"{self.runs_per_round} runs{again}) on {self.context}")


# ------------------------------------------------------------------------------------------ the statistic (pure)


def _finite_timings(values: Sequence[float], what: str) -> list[float]:
    values = [float(v) for v in values]
    if not values:
        raise MeasurementError(f"no {what} to summarise")
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise MeasurementError(f"{what} must be finite and >= 0, got {values}")
    return values


def robust_latency(round_medians: Sequence[float]) -> float:
    """The lowest round median: noise on a shared CPU only adds time, so slow rounds are ignored, not averaged in.

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


def summarize(timings_per_round: Sequence[Sequence[float]]) -> Summary:
    """Median of each round, then the lowest of those medians and their spread.

    >>> s = summarize([[2.0, 2.1, 2.0], [60.0, 61.0, 59.0], [2.1, 2.0, 2.2]])
    >>> s.value_ms, round(s.spread, 3), s.runs
    (2.0, 0.05, 9)
    """
    medians = tuple(statistics.median(_finite_timings(r, "timings")) for r in timings_per_round)
    return Summary(robust_latency(medians), relative_spread(medians), medians, sum(len(r) for r in timings_per_round))


# ------------------------------------------------------------------------------ the measuring loop (clock injected)


def cpu_timer(fn: Callable[[], Any]) -> float:
    """Wall-clock time of ``fn()`` in milliseconds (CPU work is synchronous)."""
    start = time.perf_counter_ns()
    fn()
    return (time.perf_counter_ns() - start) / 1e6


def cuda_timer(fn: Callable[[], Any]) -> float:
    """GPU time of ``fn()`` in milliseconds, from CUDA events recorded around it on the current stream."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def thread_cpu_timer(fn: Callable[[], Any]) -> float:
    """CPU time of the calling thread during ``fn()`` in milliseconds: time other processes take is left out.

    Equals the latency for work that runs in the calling thread only (torch with one intra-op thread).
    """
    start = time.thread_time_ns()
    fn()
    return (time.thread_time_ns() - start) / 1e6


def calibrate_runs(warmup_ms: Sequence[float], target_round_ms: float) -> int:
    """Runs per round so that a round lasts about ``target_round_ms``, from the later half of the warm-up timings.

    >>> calibrate_runs([9.0, 2.0, 2.0, 2.0], target_round_ms=100.0)
    50
    """
    later = list(warmup_ms)[len(warmup_ms) // 2:]
    typical = statistics.median(_finite_timings(later, "warm-up timings"))
    runs = math.ceil(target_round_ms / typical) if typical > 0 else MAX_RUNS_PER_ROUND
    return max(MIN_RUNS_PER_ROUND, min(MAX_RUNS_PER_ROUND, runs))


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Keep Python's garbage collector out of timed runs (as ``timeit`` does)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def run_rounds(fns: Sequence[Callable[[], Any]], runs_per_round: Sequence[int], *, rounds: int, tolerance: float,
               max_extra_rounds: int, timer: Timer = cpu_timer) -> list[list[list[float]]]:
    """Time ``fns`` in interleaved rounds; returns ``timings[fn][round][run]`` in milliseconds.

    Each round visits every fn, starting one later each round; when there are several, one untimed run settles the
    caches after switching. While any fn's rounds disagree (:func:`relative_spread` above ``tolerance``), one extra
    round of all fns is measured, at most ``max_extra_rounds`` times.
    """
    timings: list[list[list[float]]] = [[] for _ in fns]
    settle = 1 if len(fns) > 1 else 0

    def one_round(index: int) -> None:
        for k in range(len(fns)):
            i = (index + k) % len(fns)
            for _ in range(settle):
                fns[i]()
            with _gc_paused():
                timings[i].append([timer(fns[i]) for _ in range(runs_per_round[i])])

    for index in range(rounds):
        one_round(index)
    extra = 0
    while extra < max_extra_rounds and any(summarize(t).spread > tolerance for t in timings):
        one_round(rounds + extra)
        extra += 1
    return timings


# ------------------------------------------------------------------------------------------------ device context


def resolve_device(device: torch.device | str) -> torch.device:
    """``torch.device`` for ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; anything else, or CUDA without a GPU, is an error."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise MeasurementError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise MeasurementError(f"device {device!r} is not supported; use 'cpu', 'cuda' or 'cuda:N'")
    if not torch.cuda.is_available():
        raise MeasurementError(f"device {device!r} asked for, but torch {torch.__version__} sees no CUDA GPU here; "
                               f"use device 'cpu'")
    index, count = dev.index or 0, torch.cuda.device_count()
    if index >= count:
        raise MeasurementError(f"device {device!r} does not exist; this machine has {count} CUDA device(s)")
    return torch.device("cuda", index)


def device_name(device: torch.device | str = "cpu") -> str:
    """The processor's or GPU's model name, e.g. ``"Intel(R) Xeon(R) Processor"`` or ``"NVIDIA A100-SXM4-40GB"``."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


ALLOCATOR_ENV = "MIXERNAS_ALLOCATOR"  # "system": leave the C allocator as it is
STEADY_ALLOCATOR = "steady-allocator"  # the context option that says the allocator was set


@functools.lru_cache(maxsize=1)
def steady_allocator() -> bool:
    """Keep freed CPU memory in the process for reuse, as caching allocators do; True if it is (now) so.

    With glibc's defaults every buffer above the mmap threshold (dynamic, at most 32 MiB) is mapped fresh and
    unmapped on free, so each forward pass pays page faults for its large activations, and how many depends on
    what ran in the process before. Measured here at 224x224, one thread: a GPSA block at 56x56 took 84 ms with
    29,000 page faults per run and 45 ms with none; PoolFormerV2-S12 paid 2,850 faults per run (41-44 ms against
    37-38 ms). Blocks timed one by one for the lookup table met a different allocator state than the same blocks
    inside a whole model, and predictions of models with attention at high resolution came out up to 38% low.

    So before measuring on the CPU, the process's allocator is told once (``mallopt``) to serve large buffers
    from its heap and not to give freed memory back: the steady state of jemalloc or tcmalloc, which PyTorch's
    CPU performance guide recommends for inference. Latencies then describe the model, not the allocator's
    history, and carry ``steady-allocator`` in their context. The process keeps its peak memory until it exits.
    Only glibc on Linux; elsewhere, or with ``MIXERNAS_ALLOCATOR=system``, nothing is changed (returns False).
    """
    if os.environ.get(ALLOCATOR_ENV, "").strip().lower() == "system":
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - glibc only: other C libraries read mallopt's codes differently
        mallopt = libc.mallopt
    except (AttributeError, OSError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, (1 << 31) - 1))


@contextlib.contextmanager
def num_threads(threads: int | None) -> Iterator[int]:
    """Run with ``threads`` torch intra-op threads (None keeps the count); restored afterwards."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def _cudnn_benchmark(enabled: bool) -> Iterator[None]:
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the measurement; each submodule's own training flag comes back afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


# --------------------------------------------------------------------------------------------------- measuring


def as_model(model_or_arch: nn.Module | Any, input_spec: InputSpec) -> nn.Module:
    """The module itself, or the backbone built from an ``Arch``, preset name, arch JSON path or dict."""
    if isinstance(model_or_arch, nn.Module):
        return model_or_arch
    from ..model import build_model

    return build_model(model_or_arch, in_chans=input_spec.channels)


def _check_options(*, warmup: int, rounds: int, runs_per_round: int | None, tolerance: float,
                   max_extra_rounds: int, threads: int | None, target_round_ms: float) -> None:
    def count(name: str, value: Any, low: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise MeasurementError(f"{name} must be an integer >= {low}, got {value!r}")

    count("warmup", warmup, 0)
    count("rounds", rounds, 1)
    count("max_extra_rounds", max_extra_rounds, 0)
    if runs_per_round is not None:
        count("runs_per_round", runs_per_round, 1)
    if threads is not None:
        count("threads", threads, 1)
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance >= 0):
        raise MeasurementError(f"tolerance must be a finite number >= 0 (0.05 = 5%), got {tolerance!r}")
    if not (isinstance(target_round_ms, (int, float)) and math.isfinite(target_round_ms) and target_round_ms > 0):
        raise MeasurementError(f"target_round_ms must be a positive number, got {target_round_ms!r}")


def _on_device(model: nn.Module, device: torch.device, dtype: torch.dtype, channels_last: bool,
               owned: bool) -> nn.Module:
    """The model on ``device`` in ``dtype``; a user's module is copied first rather than changed under them."""
    tensors = [*model.parameters(), *model.buffers()]
    moves = any(t.device != device or (t.is_floating_point() and t.dtype != dtype) for t in tensors)
    if not owned and (moves or channels_last):
        model = copy.deepcopy(model)
    model = model.to(device=device, dtype=dtype)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def _cuda_graph(model: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    """Capture one forward pass in a CUDA graph (after warm-up on a side stream, as PyTorch's docs prescribe)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            model(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model(x)
    return graph.replay


def measure_many(
    models: Sequence[nn.Module | Any],
    input_spec: InputSpec | Sequence[InputSpec] = DEFAULT_INPUT,
    *,
    device: torch.device | str = "cpu",
    threads: int | None = None,
    warmup: int = 10,
    rounds: int = 5,
    runs_per_round: int | None = None,
    tolerance: float = 0.05,
    max_extra_rounds: int = 5,
    target_round_ms: float = 200.0,
    cudnn_benchmark: bool = False,
    channels_last: bool = False,
    autocast: bool = False,
    cuda_graphs: bool = False,
    timer: Timer | None = None,
) -> list[LatencyResult]:
    """Measure several models side by side, alternating rounds between them; results in the order given.

    Args:
        models: ``nn.Module``s, ``Arch``es, preset names or arch JSON paths (built with ``in_chans=channels``).
            A module of yours is put in eval mode for the measurement and restored; if it must move to another
            device or dtype, a copy is measured and yours is left untouched.
        input_spec: one spec for all models, or one per model (e.g. a token-layout input for a transformer layer).
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        threads: torch intra-op threads during the measurement (restored afterwards); None keeps the current count.
        warmup: untimed runs per model before the first round (also used to size rounds when
            ``runs_per_round`` is None; at least one such run is made then).
        rounds: rounds per model before the agreement check.
        runs_per_round: timed runs per round; None sizes each model's rounds to last about ``target_round_ms``
            (at least 5, at most 1000 runs).
        tolerance: rounds agree when the median round median is within this fraction of the lowest (0.05 = 5%);
            otherwise up to ``max_extra_rounds`` more rounds of all models are measured.
        cudnn_benchmark: CUDA only; let cuDNN pick the fastest kernels (during warm-up).
        channels_last: channels-last memory format for the model and its ``nchw`` input.
        autocast: for float16/bfloat16 specs, keep the model in float32 and run under ``torch.autocast``
            instead of casting the model and input.
        cuda_graphs: CUDA only; capture the forward pass in a CUDA graph and time its replay.
        timer: ``timer(fn) -> milliseconds``; defaults to the wall clock on CPU and CUDA events on a GPU.

    >>> spec = InputSpec(height=64, width=64)
    >>> a, b = measure_many(["IdentityFormer-S12", "PoolFormerV2-S12"], spec)  # doctest: +SKIP
    >>> b.value_ms / a.value_ms  # PoolFormerV2-S12 / IdentityFormer-S12  # doctest: +SKIP
    1.05
    """
    models = list(models)
    specs = [input_spec] * len(models) if isinstance(input_spec, InputSpec) else list(input_spec)
    if not models:
        raise MeasurementError("no models to measure")
    if len(specs) != len(models) or not all(isinstance(s, InputSpec) for s in specs):
        raise MeasurementError(f"input_spec must be an InputSpec or one per model ({len(models)}), got {input_spec!r}")
    _check_options(warmup=warmup, rounds=rounds, runs_per_round=runs_per_round, tolerance=tolerance,
                   max_extra_rounds=max_extra_rounds, threads=threads, target_round_ms=target_round_ms)
    dev = resolve_device(device)
    if dev.type != "cuda" and (cudnn_benchmark or cuda_graphs):
        raise MeasurementError("cudnn_benchmark and cuda_graphs need a CUDA device; pass device='cuda'")
    for spec in specs:
        if channels_last and spec.layout != "nchw":
            raise MeasurementError(f"channels_last applies to 'nchw' inputs, not {spec.layout!r}")
        if autocast and (spec.dtype == "float32" or spec.dtype != specs[0].dtype):
            raise MeasurementError("autocast needs one float16 or bfloat16 dtype in the input spec(s)")
    if timer is None:
        timer = cuda_timer if dev.type == "cuda" else cpu_timer
    steady = dev.type == "cpu" and steady_allocator()

    built = [as_model(m, s) for m, s in zip(models, specs)]
    prepared = [
        _on_device(m, dev, torch.float32 if autocast else s.torch_dtype, channels_last, owned=m is not orig)
        for m, s, orig in zip(built, specs, models)
    ]
    with contextlib.ExitStack() as stack:
        threads_used = stack.enter_context(num_threads(threads))
        for model in prepared:
            stack.enter_context(_eval_mode(model))
        if dev.type == "cuda":
            stack.enter_context(torch.cuda.device(dev))
            stack.enter_context(_cudnn_benchmark(cudnn_benchmark))
        stack.enter_context(torch.inference_mode())
        if autocast:
            # Cached casts would be baked into a captured graph; PyTorch's docs ask for no cache with CUDA graphs.
            stack.enter_context(torch.autocast(dev.type, dtype=specs[0].torch_dtype, cache_enabled=not cuda_graphs))

        fns = []
        for model, spec in zip(prepared, specs):
            x = spec.example(dev, torch.float32 if autocast else None, channels_last)
            fns.append(_cuda_graph(model, x) if cuda_graphs else (lambda model=model, x=x: model(x)))
        per_round = []
        for fn in fns:
            warm = [timer(fn) for _ in range(max(warmup, 0 if runs_per_round else 1))]
            per_round.append(runs_per_round or calibrate_runs(warm, target_round_ms))
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        timings = run_rounds(fns, per_round, rounds=rounds, tolerance=tolerance, max_extra_rounds=max_extra_rounds,
                             timer=timer)

    context = dict(device=str(dev), device_name=device_name(dev), threads=threads_used,
                   torch_version=torch.__version__.split("+")[0])
    options = tuple(name for name, on in (("cudnn_benchmark", cudnn_benchmark), ("channels_last", channels_last),
                                          ("autocast", autocast), ("cuda_graphs", cuda_graphs),
                                          (STEADY_ALLOCATOR, steady)) if on)
    results = []
    for spec, rounds_of_model, n in zip(specs, timings, per_round):
        summary = summarize(rounds_of_model)
        ctx = LatencyContext(batch=spec.batch, input_shape=spec.shape, layout=spec.layout, dtype=spec.dtype,
                             options=options, **context)
        results.append(LatencyResult(summary.value_ms, summary.spread, summary.round_medians_ms, summary.runs, n,
                                     remeasured=len(rounds_of_model) > rounds, context=ctx))
    return results


def measure_latency(
    model_or_arch: nn.Module | Any,
    input_spec: InputSpec = DEFAULT_INPUT,
    *,
    device: torch.device | str = "cpu",
    threads: int | None = None,
    warmup: int = 10,
    rounds: int = 5,
    runs_per_round: int | None = None,
    tolerance: float = 0.05,
    max_extra_rounds: int = 5,
    target_round_ms: float = 200.0,
    cudnn_benchmark: bool = False,
    channels_last: bool = False,
    autocast: bool = False,
    cuda_graphs: bool = False,
    timer: Timer | None = None,
) -> LatencyResult:
    """Measure one model, ``Arch``, preset name or arch JSON path; arguments as in :func:`measure_many`.

    >>> result = measure_latency("PoolFormerV2-S12", InputSpec(height=64, width=64), threads=1)  # doctest: +SKIP
    >>> result.value_ms, result.spread, result.context.device_name  # doctest: +SKIP
    (13.79, 0.025, 'Intel(R) Xeon(R) Processor')
    """
    return measure_many(
        [model_or_arch], input_spec, device=device, threads=threads, warmup=warmup, rounds=rounds,
        runs_per_round=runs_per_round, tolerance=tolerance, max_extra_rounds=max_extra_rounds,
        target_round_ms=target_round_ms, cudnn_benchmark=cudnn_benchmark, channels_last=channels_last,
        autocast=autocast, cuda_graphs=cuda_graphs, timer=timer,
    )[0]
