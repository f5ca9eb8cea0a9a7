"""A per-device lookup table of block latencies that predicts an architecture's latency without building it.

What is measured: every *part* a backbone is assembled from, built alone and timed on its own input:

* :class:`StemPart` - the stem on the image (kind, input channels, width, norm, image size);
* :class:`BlockPart` - one block (variant, mixer and its arguments for that block, width, MLP ratio, norm,
  activation, MLP bias, layer/residual scale on or off, the resolution of its stage);
* :class:`DownsamplePart` - the downsampling layer in front of a stage (kind, widths in and out, its input size);
* :class:`HeadPart` - pooling, head norm and classifier (kind, norm, width, classes, final feature-map size).

Parts are frozen dataclasses (hashable keys, never strings). Stage resolutions follow the real layers' arithmetic,
odd sizes included (:func:`stage_resolutions`). Parts are measured in batches, interleaved (:func:`measure_many`).
With one thread on the CPU the clock is the measuring thread's CPU time, which leaves out the time other
processes hold the core (:class:`PartProtocol`).

The prediction: ``predicted = scale * sum(parts)``, plus a fixed cost per part or per model where that predicts
better. The sum misses what only a whole model has (caches a part timed alone finds warm, code a part run in a loop
keeps hot), so :meth:`LatencyTable.calibrate` fits the calibration by least squares on the *relative* error of a
few whole models measured for real, choosing its form by leave-one-out error (:func:`fit_calibration`); until then
the calibration is the identity and the prediction is the plain sum.

Where: one JSON file per (device fingerprint, threads, torch version, batch, channels, input size, dtype) in
``$MIXERNAS_CACHE_DIR``, else ``$XDG_CACHE_HOME/mixernas``, else ``~/.cache/mixernas`` (folder ``latency/``).
Files are written atomically under an exclusive lock (``fcntl.flock`` on a ``.lock`` file beside them), and every
write merges what is on disk, so two processes filling the same table never lose each other's entries.

>>> table = LatencyTable.open("cpu", InputSpec(height=64, width=64), threads=1)  # doctest: +SKIP
>>> table.build_for_space(searchspace.get_space("default"))  # measures what is missing, with a progress bar
>>> table.predict(searchspace.preset("PoolFormerV2-S12")).total_ms  # doctest: +SKIP
13.6
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from .._io import atomic_write_text
from ..arch import Arch, Blocks, FrozenArgs, Stage
from ..blocks import BLOCKS, DOWNSAMPLES, HEADS, STEMS
from ..errors import MixerNASError
from ..layers import make_norm
from ..space import ChoiceSpace, SearchSpace
from .measure import (  # thread_cpu_timer is also imported from here by the benches
    DEFAULT_INPUT,
    InputSpec,
    MeasurementError,
    cpu_timer,
    device_name,
    measure_many,
    resolve_device,
    thread_cpu_timer,
)

TABLE_FORMAT = 4  # bump when the file layout or the meaning of an entry changes; older files are then ignored
CACHE_ENV = "MIXERNAS_CACHE_DIR"

# ------------------------------------------------------------------------------------------------------- parts


@dataclass(frozen=True)
class StemPart:
    """The stem on the ``height x width`` image."""

    kind: ClassVar[str] = "stem"
    stem: str  # searchspace.blocks.STEMS name
    in_chans: int
    dim: int  # output channels (the first stage's width)
    norm: str
    eps: float
    height: int  # input size
    width: int

    def build(self) -> nn.Module:
        return STEMS.get(self.stem)(self.in_chans, self.dim, _shell_arch(embed_norm=self.norm, norm_eps=self.eps))

    def input_spec(self, batch: int, dtype: str) -> InputSpec:
        return InputSpec(batch, self.in_chans, self.height, self.width, dtype)


@dataclass(frozen=True)
class BlockPart:
    """One block of a stage, as built by ``BLOCKS[block](dim, run, arch, index)``."""

    kind: ClassVar[str] = "block"
    block: str  # block variant (searchspace.blocks.BLOCKS)
    mixer: str
    mixer_args: FrozenArgs  # the mixer's arguments for this block (``Blocks.block_args(index)``)
    dim: int
    mlp_ratio: float
    norm: str
    act: str
    mlp_bias: bool
    layer_scale: bool  # on or off: the init value does not change the cost
    res_scale: bool
    eps: float
    height: int  # resolution of the stage
    width: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "mixer_args", FrozenArgs(self.mixer_args))
        object.__setattr__(self, "mlp_ratio", float(self.mlp_ratio))

    def build(self) -> nn.Module:
        run = Blocks(mixer=self.mixer, depth=1, mlp_ratio=self.mlp_ratio, mixer_args=self.mixer_args,
                     block=self.block, norm=self.norm, act=self.act, mlp_bias=self.mlp_bias,
                     layer_scale=1.0 if self.layer_scale else None, res_scale=1.0 if self.res_scale else None)
        return BLOCKS.get(self.block)(self.dim, run, _shell_arch(norm_eps=self.eps), 0, 0.0)

    def input_spec(self, batch: int, dtype: str) -> InputSpec:
        return InputSpec(batch, self.dim, self.height, self.width, dtype)


@dataclass(frozen=True)
class DownsamplePart:
    """The downsampling layer in front of a stage, on its ``height x width`` input."""

    kind: ClassVar[str] = "downsample"
    downsample: str  # searchspace.blocks.DOWNSAMPLES name
    in_dim: int
    out_dim: int
    norm: str
    eps: float
    height: int  # input size (the previous stage's resolution)
    width: int

    def build(self) -> nn.Module:
        arch = _shell_arch(embed_norm=self.norm, norm_eps=self.eps)
        return DOWNSAMPLES.get(self.downsample)(self.in_dim, self.out_dim, arch)

    def input_spec(self, batch: int, dtype: str) -> InputSpec:
        return InputSpec(batch, self.in_dim, self.height, self.width, dtype)


@dataclass(frozen=True)
class HeadPart:
    """Global pooling, the head norm and the classifier on the last stage's ``height x width`` map."""

    kind: ClassVar[str] = "head"
    head: str  # searchspace.blocks.HEADS name
    norm: str
    norm_first: bool  # normalise the map before pooling (Arch.head_norm_first)
    eps: float
    dim: int
    num_classes: int
    height: int
    width: int

    def build(self) -> nn.Module:
        return _Head(self)

    def input_spec(self, batch: int, dtype: str) -> InputSpec:
        return InputSpec(batch, self.dim, self.height, self.width, dtype)


Part = StemPart | BlockPart | DownsamplePart | HeadPart
PART_TYPES: dict[str, type] = {cls.kind: cls for cls in (StemPart, BlockPart, DownsamplePart, HeadPart)}


class _Head(nn.Module):
    """The model's own ``forward_head`` on a stand-alone norm and classifier, so the two cannot drift apart."""

    def __init__(self, part: HeadPart):
        super().__init__()
        from ..model import MetaFormerNet

        self.arch = _shell_arch(head_norm_first=part.norm_first)
        self.head_norm = make_norm(part.norm, part.dim, part.eps)
        self.head = HEADS.get(part.head)(part.dim, part.num_classes, 0.0) if part.num_classes else nn.Identity()
        self._forward = MetaFormerNet.forward_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(self, x)


def _shell_arch(**fields: Any) -> Arch:
    """A one-stage ``Arch`` that only carries the global fields a part's factory reads (norms, eps, ...)."""
    return Arch(stages=(Stage(mixer="identity", depth=1, width=8),), **fields)


def part_to_dict(part: Part) -> dict[str, Any]:
    """JSON-ready fields of a part, with its kind under ``"part"``."""
    return {"part": part.kind, **{f.name: _thaw(getattr(part, f.name)) for f in fields(part)}}


def part_from_dict(data: Mapping[str, Any]) -> Part:
    data = dict(data)
    cls = PART_TYPES[data.pop("part")]
    return cls(**{f.name: data[f.name] for f in fields(cls)})


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_thaw(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------------- resolutions


def conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output size of a convolution: ``floor((size + 2*padding - kernel) / stride) + 1``."""
    return (size + 2 * padding - kernel) // stride + 1


def _ceil_div(size: int, stride: int) -> int:
    return -(-size // stride)  # kernel == stride conv after padding to a multiple of the stride


# Per kind, the output size along one axis. Kept beside blocks.py's registrations; the tests check every kind
# against the real modules at odd sizes. A kind registered later (by a user) is probed on the meta device instead.
STEM_SIZE: dict[str, Callable[[int], int]] = {
    "conv7_s4": lambda n: conv_out(n, 7, 4, 2),
    "conv7_s4_p3": lambda n: conv_out(n, 7, 4, 3),
    "patch4": lambda n: _ceil_div(n, 4),
    "conv3x2": lambda n: conv_out(conv_out(n, 3, 2, 1), 3, 2, 1),
}
DOWNSAMPLE_SIZE: dict[str, Callable[[int], int]] = {
    "norm_conv3": lambda n: conv_out(n, 3, 2, 1),
    "conv3_norm": lambda n: conv_out(n, 3, 2, 1),
    "norm_conv2": lambda n: _ceil_div(n, 2),
}


@functools.lru_cache(maxsize=1024)
def _probe_size(kind: str, name: str, height: int, width: int) -> tuple[int, int]:
    """Output size of an unlisted stem or downsampling kind, by running it on the meta device (no compute)."""
    arch = _shell_arch()
    with torch.device("meta"):
        module = (STEMS if kind == "stem" else DOWNSAMPLES).get(name)(8, 8, arch)
        out = module(torch.empty(1, 8, height, width))
    return int(out.shape[-2]), int(out.shape[-1])


def _apply_size(kind: str, name: str, rules: Mapping[str, Callable[[int], int]], hw: tuple[int, int]):
    rule = rules.get(name)
    if rule is None:
        return _probe_size(kind, name, *hw)
    return rule(hw[0]), rule(hw[1])


def stage_resolutions(arch: Arch, height: int, width: int) -> tuple[tuple[int, int], ...]:
    """``(H, W)`` of every stage's blocks for an input of ``height x width``, as the real layers compute it.

    >>> stage_resolutions(searchspace.preset("PoolFormerV2-S12"), 65, 63)  # doctest: +SKIP
    ((16, 16), (8, 8), (4, 4), (2, 2))
    """
    hw = _apply_size("stem", arch.stem, STEM_SIZE, (height, width))
    out = [hw]
    for _ in arch.stages[1:]:
        hw = _apply_size("downsample", arch.downsample, DOWNSAMPLE_SIZE, hw)
        out.append(hw)
    if min(min(r) for r in out) < 1:
        raise MeasurementError(f"input {height}x{width} is too small for this architecture: stage resolutions "
                               f"{out}")
    return tuple(out)


@dataclass(frozen=True)
class PartUse:
    """One part of an architecture, in forward order. ``stage`` is None for the stem and the head."""

    label: str  # "stem", "s1.b0", "s2.down", "s2.b1", ..., "head" (for display)
    stage: int | None
    part: Part


@functools.lru_cache(maxsize=4096)
def arch_parts(arch: Arch, height: int, width: int, in_chans: int = 3, num_classes: int = 1000) -> tuple[PartUse, ...]:
    """The parts of ``arch`` for an input of ``in_chans x height x width``, in forward order (pure, cached)."""
    res = stage_resolutions(arch, height, width)
    uses = [PartUse("stem", None, StemPart(arch.stem, in_chans, arch.stages[0].width, arch.embed_norm,
                                            arch.norm_eps, height, width))]
    prev = arch.stages[0].width
    for i, (stage, (h, w)) in enumerate(zip(arch.stages, res)):
        if i > 0:
            ph, pw = res[i - 1]
            uses.append(PartUse(f"s{i + 1}.down", i, DownsamplePart(arch.downsample, prev, stage.width,
                                                                    arch.embed_norm, arch.norm_eps, ph, pw)))
        k = 0
        for run in stage.runs:
            for j in range(run.depth):
                part = BlockPart(
                    block=run.block or arch.block, mixer=run.mixer, mixer_args=FrozenArgs(run.block_args(j)),
                    dim=stage.width, mlp_ratio=run.mlp_ratio, norm=run.norm or arch.norm, act=run.act or arch.act,
                    mlp_bias=arch.mlp_bias if run.mlp_bias is None else run.mlp_bias,
                    layer_scale=run.layer_scale is not None, res_scale=run.res_scale is not None,
                    eps=arch.norm_eps, height=h, width=w)
                uses.append(PartUse(f"s{i + 1}.b{k}", i, part))
                k += 1
        prev = stage.width
    h, w = res[-1]
    uses.append(PartUse("head", None, HeadPart(arch.head, arch.head_norm, arch.head_norm_first, arch.norm_eps,
                                               prev, num_classes, h, w)))
    return tuple(uses)


# ---------------------------------------------------------------------------------------------- keys and results


@dataclass(frozen=True)
class TableKey:
    """What a table's numbers are valid for; each distinct key is its own file."""

    device: str  # "cpu" or "cuda" (the index does not matter, the model does)
    device_name: str  # CPU model from /proc/cpuinfo or the CUDA device name
    threads: int  # torch intra-op threads during measurement
    torch_version: str
    batch: int
    channels: int
    height: int
    width: int
    dtype: str

    def filename(self) -> str:
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]
        return f"latency-{self.device}-{self.height}x{self.width}-b{self.batch}-{self.dtype}-{digest}.json"

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec(self.batch, self.channels, self.height, self.width, self.dtype)


@dataclass(frozen=True)
class Calibration:
    """``predicted = scale * sum_of_parts + offset_ms + per_part_ms * parts``, fitted on ``models`` whole models
    (identity when 0); ``parts`` is how many parts (stem, blocks, downsampling layers, head) the model has."""

    scale: float = 1.0
    offset_ms: float = 0.0  # a fixed cost per forward pass
    per_part_ms: float = 0.0  # a fixed cost per part that a part timed alone does not pay
    models: int = 0  # whole models the fit used
    fit_mape: float | None = None  # mean absolute percentage error on those models after the fit
    holdout_mape: float | None = None  # the same, each model predicted by a fit on the others (leave-one-out)

    @property
    def form(self) -> str:
        return "per_part" if self.per_part_ms else "offset" if self.offset_ms else "scale"

    def apply(self, sum_ms: float, parts: int = 0) -> float:
        return self.scale * sum_ms + self.offset_ms + self.per_part_ms * parts

    def __str__(self) -> str:
        if not self.models:
            return "uncalibrated (plain sum of parts)"
        extra = {"scale": "", "offset": f" {self.offset_ms:+.3f} ms",
                 "per_part": f" {self.per_part_ms * 1000:+.1f} us per part"}[self.form]
        held = f", {self.holdout_mape:.1%} held out" if self.holdout_mape is not None else ""
        return (f"calibrated on {self.models} models: {self.scale:.4f} x sum{extra} "
                f"(fit error {self.fit_mape:.1%}{held})")


IDENTITY = Calibration()
FORMS = ("scale", "offset", "per_part")
MIN_MODELS_FOR_TWO = 4  # leave-one-out then fits two numbers on at least three models


def _least_squares(s: Sequence[float], n: Sequence[float], m: Sequence[float], form: str) -> tuple[float, float]:
    """``(scale, second)`` minimising the squared relative error of ``scale * s + second * x``, where ``x`` is 1
    (form ``offset``), the part count ``n`` (``per_part``) or absent (``scale``: ``second`` is 0)."""
    x = [1.0] * len(s) if form == "offset" else list(n)
    # linear least squares in (a, b) with rows (s/m, x/m) and target 1
    rows = [(si / mi, xi / mi) for si, xi, mi in zip(s, x, m)]
    saa = sum(u * u for u, _ in rows)
    sab = sum(u * v for u, v in rows)
    sbb = sum(v * v for _, v in rows)
    ta = sum(u for u, _ in rows)
    tb = sum(v for _, v in rows)
    det = saa * sbb - sab * sab
    if form != "scale" and len(s) >= 2 and det > 1e-12 * saa * sbb:
        return (ta * sbb - tb * sab) / det, (saa * tb - sab * ta) / det
    return ta / saa, 0.0


def _calibration(a: float, b: float, form: str, **fit: Any) -> Calibration:
    """The calibration of ``form`` with scale ``a`` and second coefficient ``b`` (see :func:`_least_squares`)."""
    return Calibration(scale=a, offset_ms=b if form == "offset" else 0.0, per_part_ms=b if form == "per_part" else 0.0,
                       **fit)


def _holdout_mape(s: list[float], n: list[float], m: list[float], form: str) -> float:
    """Mean relative error of each model predicted by the fit on all the others (leave-one-out)."""
    errors = []
    for i in range(len(s)):
        fit = _calibration(*_least_squares(s[:i] + s[i + 1:], n[:i] + n[i + 1:], m[:i] + m[i + 1:], form), form)
        errors.append(abs(fit.apply(s[i], n[i]) - m[i]) / m[i])
    return sum(errors) / len(errors)


def fit_calibration(sums_ms: Sequence[float], measured_ms: Sequence[float], parts: Sequence[int] | None = None, *,
                    form: str = "auto") -> Calibration:
    """Least squares of the calibrated prediction against the measured latencies, in relative error.

    Each model's residual is divided by its measured latency, so a 2 ms model counts as much as a 200 ms one
    (the targets are percentages). Parts timed one by one miss what a whole model pays: a gap proportional to the
    work (caches a part alone finds warm; at large inputs the sum comes out a few percent *above* the model), and
    a fixed cost per part that only shows on small, overhead-bound models (code and data a part run in a loop
    keeps hot). The forms: ``scale`` (``scale * sum``), ``offset`` (``+ a fixed cost per forward pass``) and
    ``per_part`` (``+ a cost per part``; needs ``parts``, each model's part count). ``form="auto"`` fits each and
    keeps the one with the lowest leave-one-out error on these models; fewer than four models fit the scale
    alone. Seen with ``bench/latency_table.py`` on an idle 2-core machine, 6 models fitted and 24 predicted
    (300 draws), at 64 pixels: scale 3.7% mean error and 93% within +-10%, offset 2.0% and 99%, per part 1.7% and
    100%; at 224 pixels: scale 2.3% and 100%, offset 2.6% and 99%, per part 2.6% and 99%.

    >>> c = fit_calibration([10.0, 20.0, 40.0], [11.0, 22.0, 44.0])
    >>> round(c.scale, 6), c.offset_ms
    (1.1, 0.0)
    >>> c = fit_calibration([10.0, 20.0, 40.0], [11.0, 21.0, 41.0], form="offset")
    >>> round(c.scale, 6), round(c.offset_ms, 6)
    (1.0, 1.0)
    """
    s = [float(v) for v in sums_ms]
    m = [float(v) for v in measured_ms]
    if len(s) != len(m) or not s or any(v <= 0 or not math.isfinite(v) for v in s + m):
        raise MeasurementError("calibration needs matching, positive, finite sums and measured latencies")
    if form not in ("auto", *FORMS):
        raise MeasurementError(f"calibration form must be 'auto' or one of {', '.join(FORMS)}; got {form!r}")
    if parts is not None and len(parts) != len(s):
        raise MeasurementError(f"calibration got {len(parts)} part counts for {len(s)} models")
    if form == "per_part" and parts is None:
        raise MeasurementError("the per_part calibration needs each model's part count (parts=...)")
    n = [float(v) for v in parts] if parts is not None else [0.0] * len(s)
    holdout = None
    if len(s) >= MIN_MODELS_FOR_TWO:
        forms = [form] if form != "auto" else [f for f in FORMS if f != "per_part" or parts is not None]
        # ties go to the simpler form: FORMS is ordered by complexity
        holdout, _, form = min((_holdout_mape(s, n, m, f), i, f) for i, f in enumerate(forms))
    elif form == "auto":
        form = "scale"
    a, b = _least_squares(s, n, m, form)
    fit = _calibration(a, b, form)
    mape = sum(abs(fit.apply(si, ni) - mi) / mi for si, ni, mi in zip(s, n, m)) / len(s)
    return _calibration(a, b, form, models=len(s), fit_mape=mape, holdout_mape=holdout)


@dataclass(frozen=True)
class Prediction:
    """A predicted latency and what it is made of."""

    total_ms: float  # calibration applied to sum_ms; a lower bound while ``missing`` is not empty
    sum_ms: float  # plain sum of the parts' table entries
    parts: tuple[tuple[PartUse, float], ...]  # every part in forward order with its table latency (ms)
    calibration: Calibration
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


# ------------------------------------------------------------------------------------------------------- storage


def default_cache_dir() -> Path:
    """``$MIXERNAS_CACHE_DIR``, else ``$XDG_CACHE_HOME/mixernas``, else ``~/.cache/mixernas``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "mixernas"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path.lock`` between processes (released when the file is closed, even on a crash)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _read_file(path: Path, key: TableKey) -> tuple[dict[Part, float], Calibration]:
    """Entries and calibration stored in ``path``; a missing, foreign or damaged file reads as empty."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}, IDENTITY
    except OSError as exc:
        raise MixerNASError(f"cannot read latency table {str(path)!r}: {exc.strerror}") from None
    try:
        data = json.loads(text)
        if data.get("format") != TABLE_FORMAT or data.get("key") != asdict(key):
            return {}, IDENTITY
        entries = {part_from_dict(e["part"]): float(e["ms"]) for e in data["entries"]}
        calibration = Calibration(**data["calibration"]) if data.get("calibration") else IDENTITY
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        warnings.warn(f"latency table {path} is damaged ({exc!r}); it will be measured again", stacklevel=3)
        return {}, IDENTITY
    return entries, calibration


def _write_file(path: Path, key: TableKey, entries: Mapping[Part, float], calibration: Calibration,
                protocol: Any = None) -> None:
    rows = [{"part": part_to_dict(p), "ms": ms} for p, ms in entries.items()]
    rows.sort(key=lambda r: json.dumps(r["part"], sort_keys=True))
    data = {"format": TABLE_FORMAT, "key": asdict(key),
            "calibration": asdict(calibration) if calibration.models else None,
            "protocol": asdict(protocol) if protocol is not None else None,  # for the record: not part of the key
            "entries": rows}
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------------- the table

# measure(modules, input_specs) -> milliseconds per module. Injectable so tests count calls instead of timing.
MeasureParts = Callable[[Sequence[nn.Module], Sequence[InputSpec]], Sequence[float]]


@dataclass(frozen=True)
class PartProtocol:
    """How table entries are measured: short interleaved rounds (there are hundreds of parts), in the memory
    state a part meets inside a model, on a clock that ignores other processes where that is exact."""

    warmup: int = 3  # untimed runs per part (also sizes the rounds)
    rounds: int = 3  # rounds per part before the agreement check (statistic: lowest round median)
    target_round_ms: float = 25.0  # each part's round lasts about this long (at least 5 runs)
    tolerance: float = 0.05  # rounds agree within 5%, else ...
    max_extra_rounds: int = 3  # ... up to this many more rounds of the whole batch
    batch: int = 12  # parts measured side by side (interleaved) at a time
    # Flush the caches (write a buffer of 4x the L2 size) before each timed run. Timed alone, a part runs from a
    # warm L2 and the plain sum is 15-25% below the whole model; flushing closes that gap on average but widens
    # the spread (small models, whose working set fits in L2, then come out 10% too slow), and the calibration
    # removes the average gap anyway. Measured here (64x64, 1 thread): sum error -17..-34% warm, +11..-17% flushed.
    flush_caches: bool = False
    # "thread": CPU time of the measuring thread (time.thread_time), which leaves out the time other processes
    # hold the core; exact for one thread, so used only when threads == 1 on the CPU. "wall": the wall clock.
    # "auto": "thread" where it is exact, else "wall".
    clock: str = "auto"

    def timer(self, device: torch.device, threads: int) -> Callable[[Callable[[], Any]], float] | None:
        """The timer for :func:`measure_many`; None = its default (wall clock on CPU, CUDA events on a GPU)."""
        if self.clock not in ("auto", "thread", "wall"):
            raise MeasurementError(f"PartProtocol.clock must be 'auto', 'thread' or 'wall', got {self.clock!r}")
        if device.type != "cpu":
            return None
        thread_clock = self.clock == "thread" or (self.clock == "auto" and threads == 1)
        clock = thread_cpu_timer if thread_clock else cpu_timer
        if not self.flush_caches:
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
    """Block-level latencies for one device and input spec, cached on disk; predicts an ``Arch``'s latency.

    Open with :meth:`open`; fill with :meth:`build_for_space` or :meth:`ensure`; :meth:`calibrate` on a few
    whole models; :meth:`predict` any architecture (parts not yet in the table are measured on demand).
    """

    def __init__(self, key: TableKey, path: Path, *, device: str = "cpu", measure: MeasureParts | None = None,
                 protocol: PartProtocol = PartProtocol(), num_classes: int = 1000):
        self.key, self.path, self.device = key, Path(path), device
        self.protocol = protocol
        self.num_classes = num_classes
        self._measure = measure or self._measure_parts
        self._entries: dict[Part, float] = {}
        self._new: dict[Part, float] = {}  # measured here since the last save
        self._calibration = IDENTITY
        self._new_calibration = False

    # ----------------------------------------------------------------------------------------------- opening

    @classmethod
    def open(cls, device: str = "cpu", input_spec: InputSpec = DEFAULT_INPUT, *, threads: int | None = None,
             cache_dir: str | Path | None = None, rebuild: bool = False, measure: MeasureParts | None = None,
             protocol: PartProtocol = PartProtocol(), num_classes: int = 1000) -> LatencyTable:
        """The table for ``device`` and ``input_spec``, read from the cache (``rebuild=True`` empties it first).

        Args:
            device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
            input_spec: batch, channels, image size and dtype of the model input (``nchw``).
            threads: torch threads while measuring; part of the key. None = torch's current count.
            cache_dir: folder of the tables; None = :func:`default_cache_dir` (``$MIXERNAS_CACHE_DIR`` wins).
            rebuild: forget every stored entry and calibration of this key (they are measured again on demand).
            measure: ``measure(modules, input_specs) -> ms per module``; None = :class:`PartProtocol` timing.
            num_classes: classifier size used for the head part.
        """
        key = table_key(device, input_spec, threads)
        path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        table = cls(key, path / "latency" / key.filename(), device=device, measure=measure, protocol=protocol,
                    num_classes=num_classes)
        if rebuild:
            with _locked(table.path):
                _write_file(table.path, key, {}, IDENTITY, protocol)
        table.refresh()
        return table

    def refresh(self) -> None:
        """Take in what other processes have written since (own unsaved entries are kept)."""
        entries, calibration = _read_file(self.path, self.key)
        entries.update(self._new)
        self._entries = entries
        if not self._new_calibration:
            self._calibration = calibration

    def save(self) -> None:
        """Merge this table's new entries into the file, under the lock (others' entries are kept)."""
        if not self._new and not self._new_calibration:
            return
        with _locked(self.path):
            entries, calibration = _read_file(self.path, self.key)
            entries.update(self._new)
            if self._new_calibration:
                calibration = self._calibration
            _write_file(self.path, self.key, entries, calibration, self.protocol)
        self._entries, self._calibration = entries, calibration
        self._new, self._new_calibration = {}, False

    # ------------------------------------------------------------------------------------------------ reading

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, part: object) -> bool:
        return part in self._entries

    def get(self, part: Part) -> float | None:
        """The stored latency of ``part`` in milliseconds, or None."""
        return self._entries.get(part)

    @property
    def entries(self) -> dict[Part, float]:
        return dict(self._entries)

    @property
    def calibration(self) -> Calibration:
        return self._calibration

    def parts(self, arch: Arch) -> tuple[PartUse, ...]:
        """The parts of ``arch`` for this table's input (forward order)."""
        return arch_parts(arch, self.key.height, self.key.width, self.key.channels, self.num_classes)

    def predict(self, arch: Arch, *, measure_missing: bool = True, calibrated: bool = True) -> Prediction:
        """Predicted latency of ``arch`` (no model is built when its parts are in the table).

        ``total_ms = calibration.apply(sum of the parts' entries, number of parts)``. Parts not in the table are
        measured now (and stored) unless ``measure_missing=False``; then they are listed in ``missing`` and the
        total is a lower bound. ``calibrated=False`` returns the plain sum as the total.
        """
        uses = self.parts(arch)
        missing = tuple(dict.fromkeys(u.part for u in uses if u.part not in self._entries))
        if missing and measure_missing:
            self._measure_and_store(missing, progress=False)
            missing = ()
        parts = tuple((u, self._entries.get(u.part, 0.0)) for u in uses)
        total = math.fsum(ms for _, ms in parts)
        calibration = self._calibration if calibrated else IDENTITY
        return Prediction(calibration.apply(total, len(uses)), total, parts, calibration, missing)

    # ---------------------------------------------------------------------------------------------- filling

    def missing(self, archs_or_space: SearchSpace | Iterable[Arch]) -> list[Part]:
        """Parts that ``archs_or_space`` can use and that the table does not hold yet."""
        if isinstance(archs_or_space, SearchSpace):
            wanted = space_parts(archs_or_space, self.key.height, self.key.width, self.key.channels,
                                 self.num_classes)
        else:
            wanted = dict.fromkeys(u.part for a in archs_or_space for u in self.parts(a))
        return [p for p in wanted if p not in self._entries]

    def ensure(self, archs_or_space: SearchSpace | Iterable[Arch], *, progress: bool = True) -> int:
        """Measure every part of these architectures (or of this space) that is not in the table yet.

        Returns the number of parts measured. Progress (with ETA) goes to stderr; the file is updated after
        each batch, so an interrupted build keeps what it measured.
        """
        self.refresh()
        todo = self.missing(archs_or_space)
        if todo:
            self._measure_and_store(todo, progress=progress)
        return len(todo)

    def build_for_space(self, space: SearchSpace | str, *, progress: bool = True) -> int:
        """Measure every part a :class:`ChoiceSpace` can produce (per-stage choices x stage resolutions)."""
        from ..space import get_space

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
                modules = [p.build() for p in batch]
                specs = [p.input_spec(self.key.batch, self.key.dtype) for p in batch]
                times = list(self._measure(modules, specs))
                if len(times) != len(batch):
                    raise MeasurementError(f"the measure function returned {len(times)} times for {len(batch)} "
                                           f"parts")
                for part, ms in zip(batch, times):
                    self._entries[part] = self._new[part] = float(ms)
                self.save()
                bar.update(len(batch))

    def _measure_parts(self, modules: Sequence[nn.Module], specs: Sequence[InputSpec]) -> list[float]:
        p = self.protocol
        timer = p.timer(resolve_device(self.device), self.key.threads)
        results = measure_many(modules, specs, device=self.device, threads=self.key.threads, warmup=p.warmup,
                               rounds=p.rounds, target_round_ms=p.target_round_ms, tolerance=p.tolerance,
                               max_extra_rounds=p.max_extra_rounds, timer=timer)
        return [r.value_ms for r in results]

    # ------------------------------------------------------------------------------------------- calibration

    def calibrate(self, archs: Sequence[Arch], measured_ms: Sequence[float] | None = None, *,
                  progress: bool = True, form: str = "auto", **measure_options: Any) -> Calibration:
        """Fit and store the calibration (:func:`fit_calibration`) from whole models (a handful, different from
        each other).

        ``measured_ms`` gives their measured latencies; None measures them now, interleaved, with the robust
        protocol of :func:`measure_many` (``measure_options`` are passed on). Their parts are measured first
        if missing.
        """
        archs = list(archs)
        if not archs:
            raise MeasurementError("calibration needs at least one architecture")
        self.ensure(archs, progress=progress)
        sums = [self.predict(a, calibrated=False).sum_ms for a in archs]
        if measured_ms is None:
            results = measure_many(archs, self.key.input_spec, device=self.device, threads=self.key.threads,
                                   **measure_options)
            measured_ms = [r.value_ms for r in results]
        counts = [len(self.parts(a)) for a in archs]
        self._calibration = fit_calibration(sums, measured_ms, counts, form=form)
        self._new_calibration = True
        self.save()
        return self._calibration

    def reset_calibration(self) -> None:
        """Back to the plain sum of parts (stored)."""
        self._calibration, self._new_calibration = IDENTITY, True
        self.save()

    def __repr__(self) -> str:
        return f"LatencyTable({len(self)} entries, {self._calibration}, file={str(self.path)!r})"


def table_key(device: str, input_spec: InputSpec, threads: int | None) -> TableKey:
    """The key of the table for these settings (device fingerprint, threads, torch version, input)."""
    if not isinstance(input_spec, InputSpec) or input_spec.layout != "nchw":
        raise MeasurementError(f"a latency table needs an 'nchw' InputSpec, got {input_spec!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise MeasurementError(f"threads must be a positive integer or None, got {threads!r}")
    dev = resolve_device(device)
    return TableKey(device=dev.type, device_name=device_name(dev),
                    threads=threads if threads is not None else torch.get_num_threads(),
                    torch_version=torch.__version__.split("+")[0], batch=input_spec.batch,
                    channels=input_spec.channels, height=input_spec.height, width=input_spec.width,
                    dtype=input_spec.dtype)


def _cost_order(part: Part) -> tuple:
    # group kinds, then by resolution and width, so a batch holds parts of similar cost
    return (part.kind, -part.height * part.width, getattr(part, "dim", 0), json.dumps(part_to_dict(part),
                                                                                        sort_keys=True))


# ------------------------------------------------------------------------------------------- parts of a space


class _Pick:
    """A trial that answers ``suggest_*`` from ``overrides`` or with the first choice."""

    def __init__(self, overrides: Mapping[str, Any]):
        self.overrides = overrides

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        return self.overrides.get(name, list(choices)[0])

    def suggest_int(self, name: str, low: int, high: int, step: int = 1, log: bool = False) -> int:
        return self.overrides.get(name, low)

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None,
                      log: bool = False) -> float:
        return self.overrides.get(name, low)


def space_parts(space: SearchSpace, height: int, width: int, in_chans: int = 3,
                num_classes: int = 1000) -> dict[Part, None]:
    """Every part a :class:`ChoiceSpace` can produce at this input size, without enumerating architectures.

    For each stage: every mixer (and mixer-argument combination) x width x MLP ratio x activation, at the
    stage's resolution, with the downsampling from every width of the previous stage; the stem for every first
    width and the head for every last width. Each combination goes through the space's own ``define`` and
    :func:`arch_parts`, so the parts are exactly those of the sampled architectures.
    """
    if not isinstance(space, ChoiceSpace):
        raise MixerNASError(f"space {space.name!r} is define-by-run, so its parts cannot be listed; pass the "
                            f"architectures to measure to LatencyTable.ensure(archs) instead")
    out: dict[Part, None] = {}
    acts = space.acts if len(space.acts) > 1 else (None,)
    for i, sc in enumerate(space.stages):
        p = f"s{i + 1}"
        prev_widths = space.stages[i - 1].widths if i > 0 else (None,)
        for act in acts:
            for mixer in sc.mixers:
                for args in _combinations(sc.mixer_args.get(mixer, {})):
                    for dim in sc.widths:
                        for ratio in sc.mlp_ratios:
                            for prev in prev_widths:
                                fixed = {f"{p}.mixer": mixer, f"{p}.width": dim, f"{p}.mlp_ratio": ratio,
                                         f"{p}.depth": max(sc.depths)}
                                fixed.update({f"{p}.{mixer}.{k}": v for k, v in args.items()})
                                if act is not None:
                                    fixed["act"] = act
                                if prev is not None:
                                    fixed[f"s{i}.width"] = prev
                                arch = space.define(_Pick(fixed))
                                for use in arch_parts(arch, height, width, in_chans, num_classes):
                                    keep = use.stage == i or (i == 0 and use.label == "stem") or (
                                        i == len(space.stages) - 1 and use.label == "head")
                                    if keep:
                                        out[use.part] = None
    return out


def _combinations(choices: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    combos: list[dict[str, Any]] = [{}]
    for key, values in choices.items():
        combos = [{**c, key: v} for c in combos for v in values]
    return combos


__all__ = [
    "CACHE_ENV",
    "Calibration",
    "BlockPart",
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
    "conv_out",
    "default_cache_dir",
    "fit_calibration",
    "space_parts",
    "stage_resolutions",
    "table_key",
]
