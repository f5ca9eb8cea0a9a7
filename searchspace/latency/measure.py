"""Measure a model's latency on this machine, in a way that survives a noisy machine.

The protocol, and why:

* **Fixed threads, inference mode, eval mode, warm-up until steady.** The thread count is set for the
  measurement and restored afterwards. Warm-up runs (allocator, caches, oneDNN/cuDNN kernel selection) are never
  timed; they go on, block by block, until two blocks agree (:func:`warm_until_steady`), within a bound.
* **Short interleaved rounds.** Each round times ``runs_per_round`` forward passes (about ``target_round_ms``)
  and keeps their median. :func:`measure_many` visits every model in each round, starting one later each round,
  so a slow phase of the machine hits all of them alike.
* **A reference workload in the same rounds (CPU).** Two fixed models, a light and a weight-heavy one
  (:mod:`.reference`), are timed among each model's runs: one run of each after every chunk of runs about as long
  as the light one, the geometric mean of the two as the reference's value (:func:`run_paired_rounds`);
  the latency is the median of the per-round ratios model / reference (of their mean runs in the round, see
  :func:`summarize`), times the reference's *anchor* (its latency on this machine, measured once and cached).
  The machine's own drift, shared by both, divides out.
* **Busy rounds left out.** A round whose reference ran more than 25% slower than on the calm machine (the
  lower quartile of the rounds, :func:`~.stats.calm_rounds`) was a machine slowed on the memory side, where the
  ratio moves too; it is left out and counted (``busy_rounds``).
* **The statistic and its interval.** The value is the median over the calm rounds (of the corrected values);
  its interval is the distribution-free confidence interval of a median from order statistics
  (:func:`median_interval`, 95%). Rounds are added, at most ``max_extra_rounds``, until the interval's
  half-width is within ``tolerance`` of the value; ``converged`` says whether it got there.
* **Spread** = ``(median round - fastest round) / fastest round``, kept for display.
* **CUDA:** each run is timed with CUDA events and synchronised; options for cuDNN benchmark, channels_last,
  float16/bfloat16 (cast or autocast) and CUDA graphs (capture once, time ``graph.replay()``). No reference.
* **Runtimes:** what is timed is one inference of the model prepared by a runtime (:mod:`searchspace.runtimes`:
  eager PyTorch, torch.compile, ONNX Runtime, OpenVINO, TensorRT); the runtime, its version and provider are
  recorded in the context. The reference stays an eager PyTorch workload: it measures the machine.

>>> result = measure_latency("PoolFormerV2-S12", InputSpec(height=64, width=64), threads=1)  # doctest: +SKIP
>>> print(result)  # doctest: +SKIP
13.8 ms +-0.9% (95% interval 13.7-13.9 ms, 12 rounds of 2 runs, reference-corrected) on AMD EPYC [cpu], ...
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

from ..runtimes import Runtime, get_runtime
from . import reference as _reference
from .budget import format_ms
from .stats import (  # the pure statistics of the rounds
    CONFIDENCE,
    MIN_ROUNDS_FOR_INTERVAL,
    MeasurementError,
    Summary,
    _relative_half_width,
    calibrate_runs,
    calm_rounds,
    chunk_size,
    reference_value,
    summarize,
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
LAYOUTS = {
    "nchw": "(batch, channels, height, width): images and our mixers",
    "nhwc": "(batch, height, width, channels)",
    "tokens": "(batch, height*width, channels): transformer token sequences such as timm's metaformer.Attention",
}

# A timer runs ``fn`` once and returns how long it took in milliseconds. Injectable, so the measuring loop can be
# tested with scripted timings instead of a real clock.
Timer = Callable[[Callable[[], Any]], float]


@dataclass(frozen=True)
class InputSpec:
    """The input a model is measured on. ``layout`` declares how the tensor is arranged (see ``LAYOUTS``)."""

    batch: int = 1
    channels: int = 3
    height: int = 224
    width: int = 224
    dtype: str = "float32"  # compute precision: "float32", "float16" or "bfloat16"
    layout: str = "nchw"
    # an nchw tensor stored channels-last (NHWC in memory), as a layer inside a model may hand it to the next one;
    # kernels choose their path by it
    channels_last: bool = False

    def __post_init__(self) -> None:
        for name in ("batch", "channels", "height", "width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MeasurementError(f"input {name} must be a positive integer, got {value!r}")
        if self.dtype not in DTYPES:
            raise MeasurementError(f"unknown input dtype {self.dtype!r}; use one of {', '.join(DTYPES)}")
        if self.layout not in LAYOUTS:
            raise MeasurementError(f"unknown input layout {self.layout!r}; use one of {', '.join(LAYOUTS)}")
        if not isinstance(self.channels_last, bool) or (self.channels_last and self.layout != "nchw"):
            raise MeasurementError(f"channels_last must be True or False and applies to 'nchw' inputs, got "
                                   f"{self.channels_last!r} with {self.layout!r}")

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
        return x.contiguous(memory_format=torch.channels_last) if channels_last or self.channels_last else x


DEFAULT_INPUT = InputSpec()  # one 224x224 RGB image, float32


@dataclass(frozen=True)
class RunOptions:
    """How a model runs while it is timed, beyond the device, threads, input (its dtype included) and runtime: what
    a GPU deployment sets. ``for_device`` gives the defaults a user of that device expects; the search, the
    latency CLI, the table (part of its key) and compress all pass these through."""

    channels_last: bool = False  # channels-last memory format (NHWC in memory; faster convolutions on GPUs)
    cuda_graphs: bool = False  # capture the forward pass once and time graph.replay() (no launch overhead)
    cudnn_benchmark: bool = False  # let cuDNN try its kernels during warm-up and keep the fastest

    @classmethod
    def for_device(cls, device: torch.device | str, *, channels_last: bool | None = None, cuda_graphs: bool = False,
                   cudnn_benchmark: bool | None = None) -> RunOptions:
        """The options for ``device``; None = its default. On CUDA: channels-last and cuDNN benchmark on (how a GPU
        model is deployed), CUDA graphs only when asked. On the CPU: all off."""
        gpu = resolve_device(device).type == "cuda"
        options = cls(channels_last=gpu if channels_last is None else bool(channels_last),
                      cuda_graphs=bool(cuda_graphs), cudnn_benchmark=gpu if cudnn_benchmark is None else
                      bool(cudnn_benchmark))
        options.check(device)
        return options

    def check(self, device: torch.device | str) -> None:
        """Raise :class:`MeasurementError` (one line, the fix) for options this device cannot take."""
        if resolve_device(device).type != "cuda":
            wrong = [flag for flag, on in (("--cuda-graphs", self.cuda_graphs),
                                           ("--cudnn-benchmark", self.cudnn_benchmark)) if on]
            if wrong:
                raise MeasurementError(f"{' and '.join(wrong)} need a CUDA device; pass --device cuda or leave "
                                       f"them out")

    def tags(self) -> tuple[str, ...]:
        """The options that are on, by name (part of a lookup table's key)."""
        return tuple(name for name in ("channels_last", "cuda_graphs", "cudnn_benchmark") if getattr(self, name))

    def kwargs(self) -> dict[str, bool]:
        """The keyword arguments of :func:`measure_many`."""
        return {"channels_last": self.channels_last, "cuda_graphs": self.cuda_graphs,
                "cudnn_benchmark": self.cudnn_benchmark}


def default_dtype(device: torch.device | str) -> str:
    """The precision a model is deployed in on ``device``: float16 on CUDA, float32 on the CPU."""
    return "float16" if resolve_device(device).type == "cuda" else "float32"


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
    runtime: str = "eager"  # what ran the model: "onnxruntime 1.32.0 (CPUExecutionProvider)"

    def __str__(self) -> str:
        shape = "x".join(map(str, self.input_shape))
        opts = f", {', '.join(self.options)}" if self.options else ""
        threads = f"{self.threads} thread{'s' if self.threads != 1 else ''}"
        return (f"{self.device_name} [{self.device}], {threads}, {shape} {self.layout} {self.dtype}{opts}, "
                f"torch {self.torch_version}, {self.runtime}")


@dataclass(frozen=True)
class LatencyResult:
    """A measured latency with its interval and context. ``str(result)`` is one readable line."""

    value_ms: float  # median over rounds; on the CPU, of the per-round ratio to the reference times its anchor
    spread: float  # relative: (median round - fastest round) / fastest round
    round_medians_ms: tuple[float, ...]  # per-round values in the order measured (reference-corrected if used)
    runs: int  # timed runs in all rounds (warm-up excluded)
    runs_per_round: int
    remeasured: bool  # the interval was too wide after the first rounds and more were measured
    context: LatencyContext
    ci_low_ms: float = math.nan  # 95% confidence interval of the value
    ci_high_ms: float = math.nan
    converged: bool = True  # the interval reached the tolerance asked for (else: the best the rounds allowed)
    tolerance: float = 0.0  # the relative half-width asked for
    raw_ms: float = math.nan  # median of the plain round medians (what the clock said, uncorrected)
    anchor_ms: float | None = None  # the reference's anchor on this machine (None: no reference)
    drift: float | None = None  # reference's median in the calm rounds / its anchor (1.10 = machine 10% slow)
    busy_rounds: int = 0  # rounds left out because the reference showed a busy machine (stats.calm_rounds)

    @property
    def rounds(self) -> int:
        return len(self.round_medians_ms)

    @property
    def precision(self) -> float:
        """Relative half-width of the interval (0.01 = +-1%)."""
        return _relative_half_width(self.value_ms, self.ci_low_ms, self.ci_high_ms)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        data = asdict(self)
        data["context"]["input_shape"] = list(self.context.input_shape)
        data["context"]["options"] = list(self.context.options)
        data["round_medians_ms"] = list(self.round_medians_ms)
        data["precision"] = self.precision
        return data

    def describe(self) -> str:
        """The value with its interval and how it was obtained, without the context."""
        again = "" if self.converged else f", wider than the +-{self.tolerance:.1%} asked for"
        ref = f", reference-corrected (machine at {self.drift:.2f}x its anchor)" if self.drift is not None else ""
        if self.busy_rounds:
            ref += f"; {self.busy_rounds} busy round{'s' if self.busy_rounds != 1 else ''} left out"
        runs = f"{self.runs_per_round} run{'s' if self.runs_per_round != 1 else ''}"
        return (f"{format_ms(self.value_ms)} +-{self.precision:.1%} ({CONFIDENCE:.0%} interval "
                f"{format_ms(self.ci_low_ms)} to {format_ms(self.ci_high_ms)}{again}; {self.rounds} rounds of "
                f"{runs}{ref})")

    def __str__(self) -> str:
        return f"{self.describe()} on {self.context}"


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


CLOCKS = ("auto", "thread", "wall")


def clock_for(device: torch.device | str, threads: int | None, clock: str = "auto",
              runtime: str | Runtime | None = None) -> Timer | None:
    """The timer a measurement on ``device`` with ``threads`` threads on ``runtime`` uses; the one place that
    decides it.

    ``"auto"`` (what the search, the table and the CLI use): the measuring thread's CPU time
    (:func:`thread_cpu_timer`) with one CPU thread on a runtime that computes on the calling thread, where it is
    exact and leaves out the time other processes take; else the wall clock. ``"thread"`` or ``"wall"`` force
    one. On a GPU: None (CUDA events).

    >>> clock_for("cpu", 1) is thread_cpu_timer, clock_for("cpu", 2) is cpu_timer
    (True, True)
    """
    if clock not in CLOCKS:
        raise MeasurementError(f"unknown clock {clock!r}; use one of {', '.join(CLOCKS)}")
    if resolve_device(device).type != "cpu":
        return None
    rt = get_runtime(runtime)
    if clock == "thread" and not rt.thread_clock:
        raise _not_on_the_thread_clock(rt)
    return thread_cpu_timer if rt.thread_clock and (clock == "thread" or (clock == "auto" and threads == 1)) \
        else cpu_timer


def _not_on_the_thread_clock(rt: Runtime) -> MeasurementError:
    return MeasurementError(f"runtime {rt.name!r} computes on threads of its own, which the thread clock does not "
                            f"see; use the wall clock (clock_for picks it)")


# The thread clock must see most of the process's CPU time during an inference; below this share the work runs on
# other threads of the process.
THREAD_CLOCK_MIN_SHARE = 0.2


def check_thread_clock(fn: Callable[[], Any], runtime: str, runs: int = 3, windows: int = 3) -> None:
    """Raise :class:`MeasurementError` if ``fn`` computes elsewhere than on the calling thread, where the thread
    clock would time next to nothing.

    The calling thread's CPU time is compared with the whole process's, not with the wall time: on a busy machine
    (other workers, other jobs) the process waits for a core, which lowers both alike. The share is taken over
    ``windows`` separate spans of ``runs`` calls, and only a share low in every one of them raises: a part of a
    few microseconds can share its span with another thread of the process waking up once (a progress bar's
    monitor, a collector), which a runtime computing on its own threads does in every span.
    """
    shares = []
    for _ in range(windows):
        process = thread = 0
        for _ in range(runs):
            p0, t0 = time.process_time_ns(), time.thread_time_ns()
            fn()
            thread += time.thread_time_ns() - t0
            process += time.process_time_ns() - p0
        if process <= 0 or thread >= THREAD_CLOCK_MIN_SHARE * process:
            return
        shares.append(thread / process)
    raise MeasurementError(f"the thread clock saw {max(shares):.0%} of the CPU time of runtime {runtime!r} at most: "
                           f"it computes on threads of its own; measure with the wall clock (clock='wall')")


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


def warm_until_steady(fn: Callable[[], Any], timer: Timer, *, min_runs: int, block: int = 5,
                      tolerance: float = 0.03, max_ms: float = 2000.0, max_runs: int = 500) -> list[float]:
    """Untimed-for-the-result runs of ``fn`` until the machine and the model are warm; returns their timings.

    At least ``min_runs``; then blocks of ``block`` runs until a block's median is within ``tolerance`` of the
    previous block's (caches, allocator and kernel choices have settled), or ``max_ms`` / ``max_runs`` are spent.

    >>> times = iter([9.0, 7.0, 5.0, 3.0, 2.0] + [2.0] * 20)
    >>> len(warm_until_steady(lambda: None, lambda fn: next(times), min_runs=0, block=5))
    15
    """
    times = [timer(fn) for _ in range(min_runs)]
    previous = None
    while len(times) < max_runs and sum(times) < max_ms:
        recent = [timer(fn) for _ in range(max(1, block))]
        times.extend(recent)
        current = statistics.median(recent)
        if previous is not None and abs(current - previous) <= tolerance * max(previous, 1e-12):
            break
        previous = current
    return times


def run_rounds(fns: Sequence[Callable[[], Any]], runs_per_round: Sequence[int], *, rounds: int, tolerance: float,
               max_extra_rounds: int, timer: Timer = cpu_timer,
               done: Callable[[list[list[list[float]]]], bool] | None = None) -> list[list[list[float]]]:
    """Time ``fns`` in interleaved rounds; returns ``timings[fn][round][run]`` in milliseconds.

    Each round visits every fn, starting one later each round; when there are several, one untimed run settles the
    caches after switching. After ``rounds`` rounds, one more round of all fns is measured while ``done(timings)``
    is false, at most ``max_extra_rounds`` times. The default ``done``: every fn's interval (:func:`summarize`) is
    within ``tolerance`` of its value.
    """
    if done is None:
        def done(t: list[list[list[float]]]) -> bool:
            return all(summarize(rows).precision <= tolerance for rows in t)

    timings, _ = _rounds(fns, runs_per_round, None, rounds=rounds, max_extra_rounds=max_extra_rounds, timer=timer,
                         done=lambda t, _r: done(t))
    return timings


def run_paired_rounds(fns: Sequence[Callable[[], Any]], runs_per_round: Sequence[int],
                      reference: Callable[[], Any] | Sequence[Callable[[], Any]],
                      *, rounds: int, max_extra_rounds: int, timer: Timer = cpu_timer,
                      done: Callable[[list[list[list[float]]], list[list[list[float]]]], bool],
                      chunks: Sequence[int] | None = None) -> tuple[list[list[list[float]]], list[list[list[float]]]]:
    """As :func:`run_rounds`, with the runs of each fn in chunks of ``chunks[fn]`` runs (default 1), each chunk
    followed by one timed run of ``reference`` (or of each of several references, one after another: the value is
    the geometric mean of their times); returns ``(timings, reference_timings)``, both ``[fn][round][run]``: each
    fn's runs and the reference values taken among them.

    Pairing this closely keeps the two within milliseconds of each other, so the machine's drift is shared:
    measured under load at 32x32, the per-round ratio's scatter was half that of a reference timed once per round
    (8-10% against 13-19% standard deviation). A chunk as long as one reference run (:func:`chunk_size`) keeps the
    cost at about twice the fn's own time, for a 50 us block as for a 50 ms model.
    """
    return _rounds(fns, runs_per_round, reference, rounds=rounds, max_extra_rounds=max_extra_rounds, timer=timer,
                   done=done, chunks=chunks)


def _rounds(fns, runs_per_round, reference, *, rounds, max_extra_rounds, timer, done, chunks=None):
    chunks = list(chunks) if chunks is not None else [1] * len(fns)
    references = [reference] if callable(reference) else list(reference or ())
    timings: list[list[list[float]]] = [[] for _ in fns]
    paired: list[list[list[float]]] = [[] for _ in fns]
    settle = 1 if len(fns) > 1 or references else 0

    def one_round(index: int) -> None:
        for k in range(len(fns)):
            i = (index + k) % len(fns)
            for _ in range(settle):
                fns[i]()
            with _gc_paused():
                if not references:
                    timings[i].append([timer(fns[i]) for _ in range(runs_per_round[i])])
                    continue
                own, ref = [], []
                while len(own) < runs_per_round[i]:
                    for _ in range(min(chunks[i], runs_per_round[i] - len(own))):
                        own.append(timer(fns[i]))
                    ref.append(reference_value([timer(r) for r in references]))
                timings[i].append(own)
                paired[i].append(ref)

    for index in range(rounds):
        one_round(index)
    extra = 0
    while extra < max_extra_rounds and not done(timings, paired):
        one_round(rounds + extra)
        extra += 1
    return timings, paired


# ------------------------------------------------------------------------------------------------ device context


def resolve_device(device: torch.device | str = "auto") -> torch.device:
    """``torch.device`` for ``"auto"`` (the first CUDA GPU if one is visible, else the CPU), ``"cpu"``, ``"cuda"``
    or ``"cuda:N"``; anything else, or CUDA without a GPU, is an error (:class:`MeasurementError`, one line).

    >>> resolve_device("cpu"), str(resolve_device("cpu"))
    (device(type='cpu'), 'cpu')
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise MeasurementError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise MeasurementError(f"device {device!r} is not supported; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if not torch.cuda.is_available():
        raise MeasurementError(f"device {device!r} asked for, but torch {torch.__version__} sees no CUDA GPU here; "
                               f"use device 'cpu' (or 'auto')")
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
    rounds: int = 10,
    runs_per_round: int | None = None,
    tolerance: float = 0.02,
    max_extra_rounds: int = 40,
    target_round_ms: float = 20.0,
    cudnn_benchmark: bool = False,
    channels_last: bool = False,
    autocast: bool = False,
    cuda_graphs: bool = False,
    timer: Timer | None = None,
    reference: Any = "auto",
    runtime: str | Runtime | None = None,
) -> list[LatencyResult]:
    """Measure several models side by side, alternating rounds between them; results in the order given.

    Args:
        models: ``nn.Module``s, ``Arch``es, preset names or arch JSON paths (built with ``in_chans=channels``).
            A module of yours is put in eval mode for the measurement and restored; if it must move to another
            device or dtype, a copy is measured and yours is left untouched.
        input_spec: one spec for all models, or one per model (e.g. a token-layout input for a transformer layer).
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        threads: torch intra-op threads during the measurement (restored afterwards); None keeps the current count.
        warmup: untimed runs per model at least, before the first round; warm-up then goes on until it is steady
            (:func:`warm_until_steady`). Also sizes the rounds when ``runs_per_round`` is None.
        rounds: rounds per model before the interval is checked.
        runs_per_round: timed runs per round; None sizes each model's rounds to last about ``target_round_ms``
            (at least 3, at most 1000 runs). Short rounds keep a model and the reference close in time.
        tolerance: the relative half-width of the 95% interval to reach (0.02 = +-2%): while a model's interval
            is wider, one more round of all models is measured, at most ``max_extra_rounds`` times; results that
            did not get there say so (``converged=False``).
        cudnn_benchmark: CUDA only; let cuDNN pick the fastest kernels (during warm-up).
        channels_last: channels-last memory format for the model and its ``nchw`` input.
        autocast: for float16/bfloat16 specs, keep the model in float32 and run under ``torch.autocast``
            instead of casting the model and input.
        cuda_graphs: CUDA only; capture the forward pass in a CUDA graph and time its replay.
        timer: ``timer(fn) -> milliseconds``; defaults to the wall clock on CPU and CUDA events on a GPU.
        reference: ``"auto"`` (on the CPU: time the reference workload in the same rounds and correct by it, see
            :mod:`.reference`; its anchor is read from, or measured once into, the cache folder), ``False`` (plain
            round medians), or a :class:`~.reference.Reference` to use (the latency table passes its own).
        runtime: what runs the model: a name of :mod:`searchspace.runtimes` (None = ``"eager"``) or a
            :class:`~searchspace.runtimes.Runtime`. A runtime that is missing or cannot prepare a model raises
            :class:`~searchspace.runtimes.RuntimeUnavailableError` (a ``MixerNASError``) with the reason.

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
    rt = get_runtime(runtime)
    rt.check(dev)
    if cuda_graphs and rt.name != "eager":
        raise MeasurementError(f"cuda_graphs captures eager PyTorch; runtime {rt.name!r} runs its own way")
    if autocast and rt.name not in ("eager", "compile"):
        raise MeasurementError(f"autocast applies to PyTorch's runtimes (eager, compile), not {rt.name!r}; pass a "
                               f"float16 or bfloat16 input without autocast")
    if timer is thread_cpu_timer and not rt.thread_clock:
        raise _not_on_the_thread_clock(rt)
    if rt.exclusive and len(models) > 1:  # one at a time (see the runtime)
        return [measure_many([m], s, device=device, threads=threads, warmup=warmup, rounds=rounds,
                             runs_per_round=runs_per_round, tolerance=tolerance, max_extra_rounds=max_extra_rounds,
                             target_round_ms=target_round_ms, cudnn_benchmark=cudnn_benchmark,
                             channels_last=channels_last, autocast=autocast, cuda_graphs=cuda_graphs, timer=timer,
                             reference=reference, runtime=rt)[0] for m, s in zip(models, specs)]
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
        ref = _resolve_reference(reference, dev, specs[0], threads_used, timer)
        ref_modules = []
        if ref is not None:
            ref_spec = InputSpec(**ref.key["input"])
            # in the measurement's precision, as its anchor was measured
            ref_modules = [_on_device(m, dev, ref_spec.torch_dtype, False, owned=True) for m in ref.modules()]
            prepared.extend(ref_modules)
        for model in prepared:
            stack.enter_context(_eval_mode(model))
        if dev.type == "cuda":
            stack.enter_context(torch.cuda.device(dev))
            stack.enter_context(_cudnn_benchmark(cudnn_benchmark))
        stack.enter_context(torch.inference_mode())
        if autocast:
            # Cached casts would be baked into a captured graph; PyTorch's docs ask for no cache with CUDA graphs.
            stack.enter_context(torch.autocast(dev.type, dtype=specs[0].torch_dtype, cache_enabled=not cuda_graphs))

        fns, ready = [], []
        for model, spec in zip(prepared, specs):
            x = spec.example(dev, torch.float32 if autocast else None, channels_last)
            ready.append(rt.prepare(model, x, device=dev, threads=threads_used))
            fns.append(_cuda_graph(model, x) if cuda_graphs else ready[-1].run)
        ref_fns = []
        if ref is not None:  # the reference's own input, as when its anchor was measured
            ref_x = ref_spec.example(dev)
            ref_fns = [lambda model=model, x=ref_x: model(x) for model in ref_modules]
        ref_ms = None
        for j, ref_fn in enumerate(ref_fns):
            ref_warm = warm_until_steady(ref_fn, timer, min_runs=max(warmup, 1))
            if j == 0:  # chunks as long as one run of the light reference, as bench/reference_mix.py times them
                ref_ms = statistics.median(ref_warm[len(ref_warm) // 2:])
        per_round, chunks = [], []
        for fn in fns:
            warm = warm_until_steady(fn, timer, min_runs=max(warmup, 1))
            if timer is thread_cpu_timer:
                check_thread_clock(fn, rt.name)
            per_round.append(runs_per_round or calibrate_runs(warm, target_round_ms))
            if ref_ms is not None:
                chunks.append(chunk_size(statistics.median(warm[len(warm) // 2:]), ref_ms))
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

        def calm(t: list[list[list[float]]], r: list[list[list[float]]]) -> list[tuple[list, list | None]]:
            """Each model's rounds in which the machine was calm (all of them without a reference)."""
            if ref is None:
                return [(rows, None) for rows in t]
            keep = [calm_rounds(refs) for refs in r]
            return [([rows[k] for k in ks], [refs[k] for k in ks]) for rows, refs, ks in zip(t, r, keep)]

        def summaries_of(kept: list[tuple[list, list | None]]) -> list[Summary]:
            return [summarize(rows) if refs is None else summarize(rows, refs, ref.anchor.ms) for rows, refs in kept]

        def done(t: list[list[list[float]]], r: list[list[list[float]]]) -> bool:
            kept = calm(t, r)
            return (min(len(rows) for rows, _ in kept) >= MIN_ROUNDS_FOR_INTERVAL
                    and all(x.precision <= tolerance for x in summaries_of(kept)))

        timings, paired = _rounds(fns, per_round, ref_fns, rounds=rounds, max_extra_rounds=max_extra_rounds,
                                  timer=timer, done=done, chunks=chunks or None)
        kept = calm(timings, paired)
        summaries = summaries_of(kept)

    context = dict(device=str(dev), device_name=device_name(dev), threads=threads_used,
                   torch_version=torch.__version__.split("+")[0], runtime=str(ready[0].info))
    options = tuple(name for name, on in (("cudnn_benchmark", cudnn_benchmark), ("channels_last", channels_last),
                                          ("autocast", autocast), ("cuda_graphs", cuda_graphs),
                                          (STEADY_ALLOCATOR, steady), (REFERENCE_OPTION, ref is not None)) if on)
    drift = None
    if ref is not None:  # over the calm rounds: the machine's speed where the values come from
        drift = statistics.median(t for _, refs in kept for r in refs for t in r) / ref.anchor.ms
    results = []
    for spec, rounds_of_model, (calm_of_model, _), n, summary in zip(specs, timings, kept, per_round, summaries):
        ctx = LatencyContext(batch=spec.batch, input_shape=spec.shape, layout=spec.layout, dtype=spec.dtype,
                             options=options, **context)
        enough = len(calm_of_model) >= MIN_ROUNDS_FOR_INTERVAL
        results.append(LatencyResult(
            summary.value_ms, summary.spread, summary.round_medians_ms, summary.runs, n,
            remeasured=len(rounds_of_model) > rounds, context=ctx, ci_low_ms=summary.ci_low_ms,
            ci_high_ms=summary.ci_high_ms, converged=enough and summary.precision <= tolerance, tolerance=tolerance,
            raw_ms=summary.raw_ms, anchor_ms=ref.anchor.ms if ref is not None else None, drift=drift,
            busy_rounds=len(rounds_of_model) - len(calm_of_model)))
    return results


REFERENCE_OPTION = "reference-corrected"  # the context option that says the value is corrected by the reference


def clock_name(timer: Timer | None) -> str:
    """``"thread"``, ``"wall"`` or the timer's own name: the clock is part of what an anchor is valid for."""
    if timer is thread_cpu_timer:
        return "thread"
    if timer is None or timer is cpu_timer:
        return "wall"
    return getattr(timer, "__name__", type(timer).__name__)


def reference_key(device: torch.device, spec: InputSpec, threads: int, clock: str = "wall") -> dict[str, Any]:
    """What an anchor is valid for: this CPU model, thread count, clock, torch version and input."""
    return {"device": device.type, "device_name": device_name(device), "threads": threads, "clock": clock,
            "torch_version": torch.__version__.split("+")[0],
            "input": {"batch": spec.batch, "channels": spec.channels, "height": spec.height, "width": spec.width,
                      "dtype": spec.dtype}}


def reference_for(device: torch.device | str, spec: InputSpec, threads: int, *, timer: Timer | None = None,
                  cache_dir: str | None = None, anchor_rounds: int = 30,
                  anchor_tolerance: float = 0.01) -> _reference.Reference:
    """The reference workload for ``spec`` on this machine, with its anchor: read from the cache, or measured now
    (at least ``anchor_rounds`` short rounds, more until its interval is within ``anchor_tolerance``, at most a
    few seconds) and stored for every later measurement with the same key."""
    dev = resolve_device(device)
    if dev.type != "cpu":
        raise MeasurementError("the reference workload corrects CPU measurements only")
    if spec.layout != "nchw" or spec.channels_last:
        spec = InputSpec(spec.batch, spec.channels, spec.height, spec.width, spec.dtype)
    key = reference_key(dev, spec, threads, clock_name(timer))
    anchor = _reference.read_anchor(key, cache_dir)
    if anchor is None:
        results = measure_many(list(_reference.reference_models(spec.channels)), spec, device=dev, threads=threads,
                               rounds=anchor_rounds, max_extra_rounds=3 * anchor_rounds, target_round_ms=20.0,
                               tolerance=anchor_tolerance, timer=timer, reference=False)
        anchor = _reference.write_anchor(key, _reference.Anchor(
            *(reference_value([getattr(r, name) for r in results]) for name in ("value_ms", "ci_low_ms", "ci_high_ms")),
            min(r.rounds for r in results), time.time()), cache_dir)
    return _reference.Reference(key, anchor, spec.channels)


def reference_drift(reference: _reference.Reference, *, threads: int, timer: Timer | None = None,
                    rounds: int = 4) -> float:
    """How fast the machine runs now: the reference workload timed alone (a few short rounds) over its anchor
    (1.0 = as when the anchor was measured, 1.3 = 30% slower). A probe taken beside work that is not corrected by
    the reference (the latency table's parts), without running the reference among that work's rounds."""
    spec = InputSpec(**reference.key["input"])
    results = measure_many(list(reference.modules()), spec, device="cpu", threads=threads, warmup=3, rounds=rounds,
                           target_round_ms=10.0, tolerance=1.0, max_extra_rounds=0, timer=timer, reference=False)
    return reference_value([r.value_ms for r in results]) / reference.anchor.ms


def _resolve_reference(reference: Any, dev: torch.device, spec: InputSpec, threads: int,
                       timer: Timer) -> _reference.Reference | None:
    if isinstance(reference, _reference.Reference):
        if dev.type != "cpu":
            raise MeasurementError("a Reference corrects CPU measurements only; use it with device='cpu'")
        return reference
    if reference is False or reference is None or dev.type != "cpu":
        if reference is True and dev.type != "cpu":
            raise MeasurementError("reference=True corrects CPU measurements only; use it with device='cpu'")
        return None
    if reference not in (True, "auto"):
        raise MeasurementError(f"reference must be 'auto', True, False or a Reference, got {reference!r}")
    return reference_for(dev, spec, threads, timer=timer)


def measure_latency(
    model_or_arch: nn.Module | Any,
    input_spec: InputSpec = DEFAULT_INPUT,
    *,
    device: torch.device | str = "cpu",
    threads: int | None = None,
    warmup: int = 10,
    rounds: int = 10,
    runs_per_round: int | None = None,
    tolerance: float = 0.02,
    max_extra_rounds: int = 40,
    target_round_ms: float = 20.0,
    cudnn_benchmark: bool = False,
    channels_last: bool = False,
    autocast: bool = False,
    cuda_graphs: bool = False,
    timer: Timer | None = None,
    reference: Any = "auto",
    runtime: str | Runtime | None = None,
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
        autocast=autocast, cuda_graphs=cuda_graphs, timer=timer, reference=reference, runtime=runtime,
    )[0]
