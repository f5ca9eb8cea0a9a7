"""A per-device lookup table of part latencies that predicts an architecture's latency without building it.

What is measured: every part a backbone is assembled from (:mod:`.parts`: stem, blocks, downsampling layers,
head), built alone and timed on its own input, in batches of interleaved rounds. With one thread on the CPU the
clock is the measuring thread's CPU time, which leaves out other processes, and a part's time is taken as it is;
on the wall clock it is corrected by the reference workload timed in the same rounds (:class:`PartProtocol`).
Every batch after the first also re-times a few parts already in the table (yardsticks) and is scaled by how
much slower or faster they ran than when they were stored, so parts measured minutes apart share one level.
Whole models are always corrected by the reference on the CPU (:mod:`.reference`), so the calibration relates
the parts to whole models in this machine's anchored unit whatever the machine was doing.

The prediction is not the plain sum: :mod:`.predictor` fits, on whole models measured for real, the form of
the sum, the part count and the weights that predicts best held out. A table calibrates itself the first time
it is opened for a search (:meth:`LatencyTable.ensure_calibrated`: a few whole models, seconds, with a
progress bar) and every whole-model measurement a search makes refines it (:meth:`LatencyTable.observe`).

Where: one JSON file per key (:mod:`.storage`: device fingerprint, threads, torch version, batch, channels,
input size, dtype) in the cache folder (:mod:`.cache`), written atomically under a lock and merged on every
write, so two processes filling the same table never lose each other's entries.

>>> table = LatencyTable.open("cpu", InputSpec(height=64, width=64), threads=1)  # doctest: +SKIP
>>> table.ensure_calibrated("default")  # a few whole models, once per device and input
>>> table.predict(searchspace.preset("PoolFormerV2-S12")).total_ms  # doctest: +SKIP
13.6
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import random
import statistics
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..arch import Arch
from ..model import build_model
from ..space import SearchSpace, get_space
from . import reference as _reference
from .cache import latency_dir, locked
from .measure import (
    DEFAULT_INPUT,
    InputSpec,
    MeasurementError,
    RunOptions,
    clock_for,
    clock_name,
    measure_many,
    reference_drift,
    reference_for,
    reference_key,
    resolve_device,
    thread_cpu_timer,
)
from .parts import (
    BlockPart,
    DownsamplePart,
    HeadPart,
    Part,
    PartUse,
    StemPart,
    arch_parts,
    follow_layouts,
    part_to_dict,
    space_parts,
)
from .predictor import (
    IDENTITY,
    SMALL_MAP,
    Accuracy,
    Calibration,
    Features,
    accuracy,
    fit_calibration,
    holdout_predictions,
)
from .stats import BUSY_MARGIN, calm_level
from .storage import Observation, TableData, TableKey, read_table, table_key, write_table

# measure(modules, input_specs) -> milliseconds per module. Injectable so tests count calls instead of timing.
MeasureParts = Callable[[Sequence[nn.Module], Sequence[InputSpec]], Sequence[float]]
# measure_models(archs) -> milliseconds per whole model, likewise injectable.
MeasureModels = Callable[[Sequence[Arch]], Sequence[float]]
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# Whole models measured when a table is first opened for a search: 16, so that the four-coefficient forms may
# compete (predictor.min_models); README.md gives what that gained over 10 on this kind of machine.
CALIBRATION_MODELS = 16


@functools.cache
def part_params(part: Part) -> int:
    """Parameters of ``part`` (its module built on the meta device: no memory, no compute)."""
    with torch.device("meta"):
        return sum(p.numel() for p in part.build().parameters())


@dataclass(frozen=True)
class Prediction:
    """A predicted latency and what it is made of."""

    total_ms: float  # calibration applied to the features; a lower bound while ``missing`` is not empty
    sum_ms: float  # plain sum of the parts' table entries
    parts: tuple[tuple[PartUse, float], ...]  # every part in forward order with its table latency (ms)
    calibration: Calibration
    features: Features
    missing: tuple[Part, ...] = ()  # parts not in the table (only when measuring them was turned off)

    @property
    def complete(self) -> bool:
        return not self.missing

    @property
    def breakdown(self) -> dict[str, float]:
        """Milliseconds per group, before calibration: ``stem``, ``s1`` ... (downsampling included), ``head``."""
        out: dict[str, float] = {}
        for use, ms in self.parts:
            group = use.label if use.stage is None else f"s{use.stage + 1}"
            out[group] = out.get(group, 0.0) + ms
        return out

    def __str__(self) -> str:
        parts = ", ".join(f"{k} {v:.3g}" for k, v in self.breakdown.items())
        bound = f" (lower bound: {len(self.missing)} parts missing)" if self.missing else ""
        return f"{self.total_ms:.3f} ms{bound} = {self.calibration} of [{parts}] ms"


@dataclass(frozen=True)
class PartProtocol:
    """How table entries are measured: short interleaved rounds (there are hundreds of parts), in the memory
    state a part meets inside a model, on a clock that ignores other processes where that is exact."""

    warmup: int = 3  # untimed runs per part at least (warm-up goes on until steady; also sizes the rounds)
    rounds: int = 6  # rounds per part before the interval is checked (statistic: median over rounds)
    target_round_ms: float = 10.0  # each part's round lasts about this long (at least 3 runs)
    tolerance: float = 0.03  # the 95% interval of each part within +-3%, else ...
    max_extra_rounds: int = 10  # ... up to this many more rounds of the whole batch
    batch: int = 12  # parts measured side by side (interleaved) at a time
    # Parts already in the table re-timed in the same rounds as each new batch (spread over the stored times). The
    # machine's level moves by several percent over minutes even on the thread clock (frequency, the host), and
    # the whole table must share one level, or parts measured at the first open and parts measured later by the
    # search are off from each other by that much; the new batch is multiplied by the median of stored / now
    # over these parts. 0 turns this off.
    yardsticks: int = 6
    # Flush the caches (write a buffer of 4x the L2 size) before each timed run. Timed alone, a part runs from a
    # warm L2 and the plain sum is 15-25% below the whole model; flushing closes that gap on average but widens
    # the spread (small models, whose working set fits in L2, then come out 10% too slow), and the calibration
    # removes the average gap anyway. Measured here (64x64, 1 thread): sum error -17..-34% warm, +11..-17% flushed.
    flush_caches: bool = False
    # Where parts are taken as measured (see ``reference``), the reference is timed alone right after each batch
    # and only tells the machine's state: a batch after which it ran more than ``busy_margin`` slower than on the
    # calm machine (stats.calm_level of the batches so far, or its anchor) was measured while the machine was busy
    # on the memory side, and is measured again, at most ``busy_retries`` times; the calmest attempt is kept. On
    # the thread clock a busy machine only ever makes a part slower, and the slowdown differs from part to part,
    # so no factor could take it out.
    busy_margin: float = BUSY_MARGIN
    busy_retries: int = 3
    # "thread": CPU time of the measuring thread (time.thread_time), which leaves out the time other processes
    # hold the core; exact for one thread, so used only when threads == 1 on the CPU. "wall": the wall clock.
    # "auto": "thread" where it is exact, else "wall".
    clock: str = "auto"
    # The reference workload timed in the same rounds (:mod:`.reference`), CPU only. "auto": whole models are
    # corrected by it, parts only on the wall clock; True: parts always; False: nothing is corrected.
    # On the thread clock a part's raw time is the steadier one:
    # a part keeps its data in the core's caches while the reference streams megabytes of weights, so when the
    # machine slows on the memory side (another process, a neighbour on the host) the reference slows, the part
    # does not, and the correction would move the part (README.md gives the measurement). Whole models stream
    # their weights like the reference, and the correction takes out most of the machine's drift from them.
    # Parts that are not corrected are not timed among the reference's runs either (the probe comes after).
    reference: bool | str = "auto"

    def corrects_parts(self, device: torch.device, threads: int, runtime: str | None = None) -> bool:
        """Whether part timings are divided by the reference (see ``reference``)."""
        if self.reference not in (True, False, "auto"):
            raise MeasurementError(f"PartProtocol.reference must be True, False or 'auto', got {self.reference!r}")
        if device.type != "cpu" or self.reference is False:
            return False
        return self.reference is True or clock_for(device, threads, self.clock, runtime) is not thread_cpu_timer

    def timer(self, device: torch.device, threads: int, runtime: str | None = None
              ) -> Callable[[Callable[[], Any]], float] | None:
        """The timer for :func:`measure_many`; None = its default (wall clock on CPU, CUDA events on a GPU)."""
        clock = clock_for(device, threads, self.clock, runtime)
        if clock is None or not self.flush_caches:
            return clock
        flush = _cache_flusher()
        return lambda fn: (flush(), clock(fn))[1]


def l2_cache_bytes() -> int:
    """Size of the largest per-core cache below the last level (L2 on today's CPUs); 2 MiB if unknown."""
    sizes = []
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level = int((index / "level").read_text())
            text = (index / "size").read_text().strip().upper()
        except (OSError, ValueError):
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        with contextlib.suppress(ValueError):
            sizes.append((level, int(text.rstrip("KMG")) * scale))
    below_last = [size for level, size in sizes if level < max(lv for lv, _ in sizes)] if sizes else []
    return max(below_last, default=2 << 20)


@functools.lru_cache(maxsize=1)
def _cache_flusher() -> Callable[[], None]:
    buffer = torch.empty(min(64 << 20, max(8 << 20, 4 * l2_cache_bytes())) // 4, dtype=torch.float32)
    return buffer.zero_


class LatencyTable:
    """Part latencies for one device and input spec, cached on disk; predicts an ``Arch``'s latency.

    Open with :meth:`open`; fill with :meth:`build_for_space` or :meth:`ensure`; :meth:`ensure_calibrated` on a
    few whole models; :meth:`predict` any architecture (parts not yet in the table are measured on demand);
    :meth:`observe` every whole model measured for real.
    """

    def __init__(self, key: TableKey, path: Path, *, device: str = "cpu", measure: MeasureParts | None = None,
                 measure_models: MeasureModels | None = None, protocol: PartProtocol = PartProtocol(),
                 num_classes: int = 1000, cache_dir: str | Path | None = None, options: RunOptions | None = None):
        self.key, self.path, self.device = key, Path(path), device
        self.protocol = protocol
        self.num_classes = num_classes
        self.cache_dir = cache_dir
        self._measure = measure or self._measure_parts
        self._measure_models = measure_models or self._measure_whole
        self._data = TableData()
        self._new: dict[Part, float] = {}  # measured here since the last save
        self._new_observations: list[Observation] = []
        self._reference: _reference.Reference | None = None
        self._drifts: list[float] = []  # the reference's drift after each batch of parts (kept attempts)
        self.level_scales: list[float] = []  # the factor each batch measured here was scaled by (yardsticks)
        self.run_options = options or RunOptions()  # how parts and models run while timed (part of the key)

    # ----------------------------------------------------------------------------------------------- opening

    @classmethod
    def open(cls, device: str = "cpu", input_spec: InputSpec = DEFAULT_INPUT, *, threads: int | None = None,
             cache_dir: str | Path | None = None, rebuild: bool = False, measure: MeasureParts | None = None,
             measure_models: MeasureModels | None = None, protocol: PartProtocol = PartProtocol(),
             num_classes: int = 1000, runtime: str | None = None, options: RunOptions | None = None
             ) -> LatencyTable:
        """The table for ``device`` and ``input_spec``, read from the cache (``rebuild=True`` empties it first).

        Args:
            device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
            input_spec: batch, channels, image size and dtype of the model input (``nchw``).
            threads: torch threads while measuring; part of the key. None = torch's current count.
            cache_dir: folder of the tables; None = :func:`~.cache.default_cache_dir` (``$MIXERNAS_CACHE_DIR``).
            rebuild: forget every stored entry, observation and calibration of this key, and the reference's
                anchor (all are measured again on demand).
            measure: ``measure(modules, input_specs) -> ms per module``; None = :class:`PartProtocol` timing.
            measure_models: ``measure_models(archs) -> ms per whole model``; None = :func:`measure_many`.
            num_classes: classifier size used for the head part.
            runtime: what runs the parts and models (:mod:`searchspace.runtimes`; None = eager). Each runtime
                has its own table and calibration: fused runtimes do not add up like eager PyTorch.
            options: channels-last, CUDA graphs, cuDNN benchmark (:class:`~.measure.RunOptions`; the dtype is the
                input spec's); part of the key.
        """
        options = options or RunOptions()
        options.check(device)
        key = table_key(device, input_spec, threads, runtime, options)
        table = cls(key, latency_dir(cache_dir) / key.filename(), device=device, measure=measure,
                    measure_models=measure_models, protocol=protocol, num_classes=num_classes, cache_dir=cache_dir,
                    options=options)
        if rebuild:
            with locked(table.path):
                write_table(table.path, key, TableData(), protocol)
            if resolve_device(device).type == "cpu":
                clock = clock_name(protocol.timer(torch.device("cpu"), key.threads, key.runtime))
                _reference.forget_anchor(reference_key(resolve_device(device), key.input_spec, key.threads, clock),
                                         cache_dir)
        table.refresh()
        return table

    def refresh(self) -> None:
        """Take in what other processes have written since (own unsaved work is kept)."""
        data = read_table(self.path, self.key)
        data.entries.update(self._new)
        if self._new_observations:
            data.observations.extend(self._new_observations)
            data.calibration = self._data.calibration
        self._data = data

    def save(self) -> None:
        """Merge this table's new entries and observations into the file, under the lock (others' are kept)."""
        if not self._new and not self._new_observations:
            return
        with locked(self.path):
            data = read_table(self.path, self.key)
            data.entries.update(self._new)
            if self._new_observations:
                data.observations.extend(self._new_observations)
                data.calibration = self._fit(data.observations, data.entries) or data.calibration
            ref = self._reference
            write_table(self.path, self.key, data, self.protocol,
                        {"anchor_ms": ref.anchor.ms, "key": ref.key} if ref is not None else None)
        self._data = data
        self._new, self._new_observations = {}, []

    # ------------------------------------------------------------------------------------------------ reading

    def __len__(self) -> int:
        return len(self._data.entries)

    def __contains__(self, part: object) -> bool:
        return part in self._data.entries

    def get(self, part: Part) -> float | None:
        """The stored latency of ``part`` in milliseconds, or None."""
        return self._data.entries.get(part)

    @property
    def entries(self) -> dict[Part, float]:
        return dict(self._data.entries)

    @property
    def calibration(self) -> Calibration:
        return self._data.calibration

    @property
    def observations(self) -> list[Observation]:
        """Whole models measured for real on this key (the calibration's data), oldest first."""
        return list(self._data.observations)

    def parts(self, arch: Arch) -> tuple[PartUse, ...]:
        """The parts of ``arch`` for this table's input (forward order), each on the memory format it meets in
        the model where the runtime runs the model as PyTorch built it (:func:`~.parts.follow_layouts`)."""
        return self._follow(arch_parts(arch, self.key.height, self.key.width, self.key.channels, self.num_classes))

    def _follow(self, uses: tuple[PartUse, ...]) -> tuple[PartUse, ...]:
        # eager PyTorch hands each layer the strides the previous one produced; a compiled or exported model plans
        # its own layouts, and channels_last turns the whole model and its input channels-last anyway
        if self.key.runtime != "eager" or self.run_options.channels_last:
            return uses
        return follow_layouts(uses, resolve_device(self.device), self.key.batch, self.key.dtype)

    def features(self, arch: Arch, entries: Mapping[Part, float] | None = None) -> Features:
        """What the predictor sees of ``arch``: the sum of its parts' entries, their number and weights (MB), and
        the shares of parts on small maps and of blocks leading a run (see :class:`~.predictor.Features`)."""
        entries = self._data.entries if entries is None else entries
        uses = self.parts(arch)
        small = [u for u in uses if u.part.height * u.part.width <= SMALL_MAP]
        mb = DTYPE_BYTES.get(self.key.dtype, 4) / 1e6
        lead = [u for prev, u in zip(uses, uses[1:]) if isinstance(u.part, BlockPart) and u.part != prev.part]
        return Features(math.fsum(entries.get(u.part, 0.0) for u in uses), len(uses),
                        sum(part_params(u.part) for u in uses) * mb,
                        math.fsum(entries.get(u.part, 0.0) for u in small),
                        sum(part_params(u.part) for u in small) * mb,
                        math.fsum(entries.get(u.part, 0.0) for u in lead))

    def predict(self, arch: Arch, *, measure_missing: bool = True, calibrated: bool = True) -> Prediction:
        """Predicted latency of ``arch`` (no model is built when its parts are in the table).

        ``total_ms`` is the calibration applied to :meth:`features`. Parts not in the table are measured now
        (and stored) unless ``measure_missing=False``; then they are listed in ``missing`` and the total is a
        lower bound. ``calibrated=False`` returns the plain sum as the total.
        """
        uses = self.parts(arch)
        missing = tuple(dict.fromkeys(u.part for u in uses if u.part not in self._data.entries))
        if missing and measure_missing:
            self._measure_and_store(missing, progress=False)
            missing = ()
        parts = tuple((u, self._data.entries.get(u.part, 0.0)) for u in uses)
        features = self.features(arch)
        calibration = self._data.calibration if calibrated else IDENTITY
        total = calibration.apply(features) if calibration.models else features.sum_ms
        return Prediction(total, features.sum_ms, parts, calibration, features, missing)

    # ---------------------------------------------------------------------------------------------- filling

    def missing(self, archs_or_space: SearchSpace | Iterable[Arch]) -> list[Part]:
        """Parts that ``archs_or_space`` can use and that the table does not hold yet."""
        if isinstance(archs_or_space, SearchSpace):
            wanted = space_parts(archs_or_space, self.key.height, self.key.width, self.key.channels,
                                 self.num_classes, follow=self._follow)
        else:
            wanted = dict.fromkeys(u.part for a in archs_or_space for u in self.parts(a))
        return [p for p in wanted if p not in self._data.entries]

    def ensure(self, archs_or_space: SearchSpace | Iterable[Arch], *, progress: bool = True) -> int:
        """Measure every part of these architectures (or of this space) that is not in the table yet.

        Returns the number of parts measured. Progress (with ETA) goes to stderr; the file is updated after
        each batch, so an interrupted build keeps what it measured.
        """
        self.refresh()
        if progress and isinstance(archs_or_space, SearchSpace):
            print(f"latency table: listing the parts of space {archs_or_space.name!r} at {self.key.height}x"
                  f"{self.key.width}", file=sys.stderr)
        todo = self.missing(archs_or_space)
        if todo:
            self._measure_and_store(todo, progress=progress)
        return len(todo)

    def build_for_space(self, space: SearchSpace | str, *, progress: bool = True) -> int:
        """Measure every part a :class:`ChoiceSpace` can produce (per-stage choices x stage resolutions)."""
        return self.ensure(get_space(space), progress=progress)

    def _measure_and_store(self, parts: Sequence[Part], progress: bool) -> None:
        from tqdm.auto import tqdm

        # similar parts side by side, so the interleaved rounds of a batch take similar time
        order = sorted(parts, key=_cost_order)
        size = max(1, self.protocol.batch)
        with tqdm(total=len(order), desc=f"latency table {self.key.height}x{self.key.width}", unit="part",
                  disable=not progress, file=sys.stderr, dynamic_ncols=True) as bar:
            for start in range(0, len(order), size):
                batch = order[start:start + size]
                sticks = self._yardsticks(batch)
                timed = batch + sticks
                modules = [p.build() for p in timed]
                specs = [p.input_spec(self.key.batch, self.key.dtype) for p in timed]
                times = list(self._measure(modules, specs))
                if len(times) != len(timed):
                    raise MeasurementError(f"the measure function returned {len(times)} times for {len(timed)} "
                                           f"parts")
                scale = level_scale([self._data.entries[p] for p in sticks], times[len(batch):])
                self.level_scales.append(scale)
                for part, ms in zip(batch, times):
                    self._data.entries[part] = self._new[part] = float(ms) * scale
                self.save()
                bar.update(len(batch))

    def _yardsticks(self, batch: Sequence[Part]) -> list[Part]:
        """Stored parts to re-time beside ``batch``: ``protocol.yardsticks`` of them, evenly spread over the
        stored times (none while the table holds fewer)."""
        k = max(0, self.protocol.yardsticks)
        skip = set(batch)
        stored = sorted((ms, _cost_order(p), p) for p, ms in self._data.entries.items() if p not in skip)
        if k == 0 or len(stored) < k:
            return []
        return [stored[int((i + 0.5) * len(stored) / k)][2] for i in range(k)]

    def reference(self) -> _reference.Reference | None:
        """The reference workload this table's whole-model CPU measurements are corrected by (None on a GPU or when
        the protocol turns it off), and its parts' where the protocol says so; its anchor is measured on first use
        (a few seconds) and cached."""
        on_cpu = resolve_device(self.device).type == "cpu"
        if self._reference is None and self.protocol.reference is not False and on_cpu:
            self._reference = reference_for(self.device, self.key.input_spec, self.key.threads,
                                            timer=self.protocol.timer(torch.device("cpu"), self.key.threads,
                                                                      self.key.runtime),
                                            cache_dir=None if self.cache_dir is None else str(self.cache_dir))
        return self._reference

    def _measure_parts(self, modules: Sequence[nn.Module], specs: Sequence[InputSpec]) -> list[float]:
        p, dev = self.protocol, resolve_device(self.device)
        timer = p.timer(dev, self.key.threads, self.key.runtime)
        reference = self.reference()
        corrected = reference is not None and p.corrects_parts(dev, self.key.threads, self.key.runtime)

        def attempt() -> list[Any]:
            return measure_many(modules, specs, device=self.device, threads=self.key.threads, runtime=self.key.runtime,
                                **self.run_options.kwargs(), warmup=p.warmup,
                                rounds=p.rounds, target_round_ms=p.target_round_ms, tolerance=p.tolerance,
                                max_extra_rounds=p.max_extra_rounds, timer=timer,
                                reference=reference if corrected else False)

        results = attempt()
        if reference is None or corrected:
            return [r.value_ms for r in results]
        # The parts' own times are kept; the reference, timed alone right after the batch, tells whether the
        # machine was busy meanwhile. Timed among the parts' rounds it would empty their caches between runs, as
        # nothing does inside a model: the parts' sums then ranked whole models worse (README.md).
        drift = reference_drift(reference, threads=self.key.threads, timer=timer)
        calm = min(1.0, calm_level(self._drifts)) if self._drifts else 1.0
        for _ in range(max(0, p.busy_retries)):
            if drift <= (1 + p.busy_margin) * calm:
                break
            again = attempt()
            again_drift = reference_drift(reference, threads=self.key.threads, timer=timer)
            if again_drift < drift:
                results, drift = again, again_drift
        self._drifts.append(drift)
        return [r.value_ms for r in results]

    def model(self, arch: Arch) -> nn.Module:
        """``arch`` built as the table predicts it: this table's classes and input channels (a whole model measured
        to calibrate or check the table must be this one, not ``measure_many``'s 1000-class build of an Arch)."""
        return build_model(arch, num_classes=self.num_classes, in_chans=self.key.channels)

    def _measure_whole(self, archs: Sequence[Arch]) -> list[float]:
        """Whole models, interleaved, with the protocol the search measures candidates with."""
        timer = self.protocol.timer(resolve_device(self.device), self.key.threads, self.key.runtime)
        results = measure_many([self.model(a) for a in archs], self.key.input_spec, device=self.device,
                               threads=self.key.threads, runtime=self.key.runtime, **self.run_options.kwargs(),
                               timer=timer, reference=self.reference() or False)
        return [r.value_ms for r in results]

    # ------------------------------------------------------------------------------------------- calibration

    def _fit(self, observations: Sequence[Observation], entries: Mapping[Part, float]) -> Calibration | None:
        usable = [o for o in observations if all(u.part in entries for u in self.parts(o.arch))]
        if not usable:
            return None
        return fit_calibration([self.features(o.arch, entries) for o in usable], [o.ms for o in usable])

    def observe(self, arch: Arch, measured_ms: float, *, save: bool = True) -> Calibration:
        """Take a whole model measured for real on this key into the calibration, and refit it.

        The search calls this for every candidate it measures, so the table predicts better with every trial.
        Parts of ``arch`` that are missing are measured first.
        """
        self._add_observation(arch, measured_ms)
        if save:
            self.save()  # refits on everything in the file, other processes' observations included
        else:
            self._data.calibration = self._fit(self._data.observations, self._data.entries) or IDENTITY
        return self._data.calibration

    def _add_observation(self, arch: Arch, measured_ms: float) -> None:
        if not (isinstance(measured_ms, (int, float)) and math.isfinite(measured_ms) and measured_ms > 0):
            raise MeasurementError(f"a measured latency must be a positive number of ms, got {measured_ms!r}")
        self.predict(arch)  # measures the parts it lacks
        self._new_observations.append(Observation(arch, float(measured_ms)))
        self._data.observations.append(self._new_observations[-1])

    def calibrate(self, archs: Sequence[Arch], measured_ms: Sequence[float] | None = None, *,
                  progress: bool = True) -> Calibration:
        """Observe whole models (measured now, interleaved, when ``measured_ms`` is None) and refit; their parts
        are measured first if missing."""
        archs = list(archs)
        if not archs:
            raise MeasurementError("calibration needs at least one architecture")
        self.ensure(archs, progress=progress)
        if measured_ms is None:
            measured_ms = list(self._measure_models(archs))
        if len(measured_ms) != len(archs):
            raise MeasurementError(f"calibration got {len(measured_ms)} latencies for {len(archs)} models")
        for arch, ms in zip(archs, measured_ms):
            self._add_observation(arch, ms)
        self.save()  # one refit for all of them
        return self.calibration

    def ensure_calibrated(self, space: SearchSpace | str = "default", *, models: int = CALIBRATION_MODELS,
                          seed: int = 0, progress: bool = True) -> Calibration:
        """Calibrate on ``models`` whole architectures drawn from ``space`` unless the table already has that many
        observations (a first open on a new device and input: seconds, with a progress bar)."""
        self.refresh()
        if len(self._data.observations) >= models:
            return self.calibration
        have = {o.arch for o in self._data.observations}
        archs = sample_archs(get_space(space), models - len(self._data.observations), seed=seed, exclude=have)
        if archs:
            self.ensure(archs, progress=progress)
            if progress:
                print(f"latency table: measuring {len(archs)} whole models to calibrate it on this machine",
                      file=sys.stderr)
            self.calibrate(archs, progress=progress)
        return self.calibration

    def holdout(self) -> Accuracy | None:
        """Held-out accuracy of the current form on the observations (leave-one-out), or None with fewer than 3."""
        usable = [o for o in self._data.observations if all(u.part in self._data.entries for u in self.parts(o.arch))]
        if len(usable) < 3 or not self.calibration.models:
            return None
        feats = [self.features(o.arch) for o in usable]
        return accuracy(holdout_predictions(feats, [o.ms for o in usable], self.calibration.forms),
                        [o.ms for o in usable])

    def check(self, archs: Sequence[Arch], measured_ms: Sequence[float] | None = None) -> Accuracy:
        """Accuracy of the current predictions on architectures *not* used by the calibration (measured now
        unless ``measured_ms`` is given). They are observed afterwards, so they refine the table too."""
        archs = list(archs)
        self.ensure(archs, progress=False)
        predicted = [self.predict(a).total_ms for a in archs]
        if measured_ms is None:
            measured_ms = list(self._measure_models(archs))
        result = accuracy(predicted, list(measured_ms))
        for arch, ms in zip(archs, measured_ms):
            self._add_observation(arch, ms)
        self.save()  # one refit for all of them
        return result

    def reset_calibration(self) -> None:
        """Back to the plain sum of parts: forget every observation (stored)."""
        with locked(self.path):
            data = read_table(self.path, self.key)
            data.entries.update(self._new)
            data.observations, data.calibration = [], IDENTITY
            write_table(self.path, self.key, data, self.protocol)
        self._data, self._new, self._new_observations = data, {}, []

    def __repr__(self) -> str:
        return f"LatencyTable({len(self)} entries, {self.calibration}, file={str(self.path)!r})"


def level_scale(stored_ms: Sequence[float], now_ms: Sequence[float]) -> float:
    """The factor that brings times measured now to the level of the stored ones: the median of stored / now over
    the same parts (1.0 without any)."""
    ratios = [s / n for s, n in zip(stored_ms, now_ms) if s > 0 and n > 0 and math.isfinite(s / n)]
    return statistics.median(ratios) if ratios else 1.0


def _cost_order(part: Part) -> tuple:
    # group kinds, then by resolution and width, so a batch holds parts of similar cost
    return (part.kind, -part.height * part.width, getattr(part, "dim", 0), json.dumps(part_to_dict(part),
                                                                                        sort_keys=True))


class _RandomTrial:
    """Answers every ``suggest_*`` with a seeded uniform choice (what Optuna's RandomSampler does)."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        return self.rng.choice(list(choices))

    def suggest_int(self, name: str, low: int, high: int, step: int = 1, log: bool = False) -> int:
        return self.rng.randrange(low, high + 1, step)

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None,
                      log: bool = False) -> float:
        return self.rng.uniform(low, high)


def sample_archs(space: SearchSpace, n: int, *, seed: int = 0, exclude: Iterable[Arch] = ()) -> list[Arch]:
    """``n`` distinct architectures of ``space`` drawn uniformly with ``seed`` (fewer if the space runs out)."""
    rng, out, seen = random.Random(seed), [], set(exclude)
    for _ in range(50 * max(n, 1)):
        if len(out) >= n:
            break
        arch = space.define(_RandomTrial(rng))
        if arch not in seen:
            seen.add(arch)
            out.append(arch)
    return out


__all__ = [
    "BlockPart",
    "Calibration",
    "DownsamplePart",
    "HeadPart",
    "LatencyTable",
    "Part",
    "PartProtocol",
    "PartUse",
    "Prediction",
    "StemPart",
    "TableKey",
    "arch_parts",
    "fit_calibration",
    "sample_archs",
    "space_parts",
    "table_key",
]
