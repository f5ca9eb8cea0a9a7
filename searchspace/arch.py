"""``Arch``: a plain, frozen, JSON-serialisable description of a MetaFormer backbone.

The same ``Arch`` always builds the same module (:func:`searchspace.build_model`). An architecture is a stem,
a list of stages (downsampling between them) and a head. A stage is a run of ``depth`` blocks sharing one token
mixer, optionally followed by ``extra`` runs of other blocks (EfficientMod's trailing attention blocks)::

    from searchspace import Arch, Stage

    arch = Arch(stages=(
        Stage(mixer="pooling", depth=2, width=64),
        Stage(mixer="pooling", depth=2, width=128),
        Stage(mixer="attention", depth=6, width=320, res_scale=1.0),
        Stage(mixer="attention", depth=2, width=512, res_scale=1.0),
    ))
    assert Arch.from_json(arch.to_json()) == arch

Every field is checked at construction; an invalid value raises :class:`InvalidArchError` naming the field,
e.g. ``stages[2].depth``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from . import blocks, layers, mixers
from ._io import atomic_write_text
from .errors import InvalidArchError, MixerNASError, UnknownNameError

Json = Any


class FrozenArgs(Mapping[str, Any]):
    """An immutable, hashable mapping of keyword arguments (lists become tuples)."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, Any] | None = None):
        items = dict(items or {})
        for key in items:
            if not isinstance(key, str):
                raise TypeError(f"argument names must be strings, got {key!r}")
        self._items = tuple(sorted((k, _freeze(v)) for k, v in items.items()))

    def __getitem__(self, key: str) -> Any:
        for k, v in self._items:
            if k == key:
                return v
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self) == dict(other)

    def __repr__(self) -> str:
        return repr(dict(self))


def _freeze(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, Mapping):
        return FrozenArgs(value)
    return value


def _thaw(value: Any) -> Json:
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    return value


@dataclass(frozen=True, kw_only=True)
class Blocks:
    """A run of ``depth`` blocks sharing one design.

    ``None`` in ``block``, ``norm``, ``act`` and ``mlp_bias`` means "as the architecture says".
    """

    mixer: str  # registered token mixer name (see searchspace.list_mixers())
    depth: int  # number of blocks, >= 1
    mlp_ratio: float = 4.0  # hidden width of the channel MLP / width; 0 = no MLP
    mixer_args: Mapping[str, Any] = field(default_factory=FrozenArgs)  # keyword arguments of the mixer
    cycle: Mapping[str, Any] = field(default_factory=FrozenArgs)  # mixer arguments varied block by block, cycled
    block: str | None = None  # block variant: metaformer | fused | casvit (searchspace.blocks)
    norm: str | None = None  # block norm name (searchspace.layers.NORMS)
    act: str | None = None  # MLP activation name (searchspace.layers.ACTIVATIONS)
    mlp_bias: bool | None = None
    layer_scale: float | None = None  # init value of a learnable per-channel scale on each branch; None = off
    res_scale: float | None = None  # init value of a learnable per-channel scale on the shortcut; None = off

    def __post_init__(self) -> None:
        object.__setattr__(self, "mixer_args", FrozenArgs(self.mixer_args))
        object.__setattr__(self, "cycle", FrozenArgs(self.cycle))

    def block_args(self, index: int) -> dict[str, Any]:
        """The mixer's keyword arguments for the ``index``-th block of this run (``cycle`` applied)."""
        args = dict(self.mixer_args)
        for key, values in self.cycle.items():
            args[key] = values[index % len(values)]
        return args

    def _validate(self, where: str) -> None:
        if not isinstance(self.depth, int) or isinstance(self.depth, bool) or self.depth < 1:
            raise InvalidArchError(f"{where}.depth", f"must be a positive integer, got {self.depth!r}")
        if not isinstance(self.mlp_ratio, (int, float)) or not math.isfinite(self.mlp_ratio) or self.mlp_ratio < 0:
            raise InvalidArchError(f"{where}.mlp_ratio", f"must be a number >= 0, got {self.mlp_ratio!r}")
        for name, registry in (("block", blocks.BLOCKS), ("norm", layers.NORMS), ("act", layers.ACTIVATIONS)):
            value = getattr(self, name)
            if value is not None:
                _check_name(registry, value, f"{where}.{name}")
        for name in ("layer_scale", "res_scale"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or not math.isfinite(value)):
                raise InvalidArchError(f"{where}.{name}", f"must be a number or null, got {value!r}")
        if self.mlp_bias is not None and not isinstance(self.mlp_bias, bool):
            raise InvalidArchError(f"{where}.mlp_bias", f"must be true, false or null, got {self.mlp_bias!r}")
        spec = _check_name(mixers.MIXERS, self.mixer, f"{where}.mixer")
        accepts_any = spec._takes_kwargs()
        for key in list(self.mixer_args) + list(self.cycle):
            if key not in spec.defaults and not accepts_any:
                known = ", ".join(sorted(spec.defaults)) or "none"
                raise InvalidArchError(f"{where}.mixer_args.{key}", f"mixer {self.mixer!r} takes: {known}")
        for key, values in self.cycle.items():
            if not isinstance(values, tuple) or not values:
                raise InvalidArchError(f"{where}.cycle.{key}", "must be a non-empty list of values")


@dataclass(frozen=True, kw_only=True)
class Stage(Blocks):
    """One stage: ``width`` channels, a run of blocks, then optional ``extra`` runs at the same width."""

    width: int  # channels of the stage, > 0
    extra: tuple[Blocks, ...] = ()  # further runs of blocks after the main ones (e.g. attention blocks)

    def __post_init__(self) -> None:
        super().__post_init__()
        extra = tuple(b if isinstance(b, Blocks) else Blocks(**b) for b in self.extra)
        object.__setattr__(self, "extra", extra)

    @property
    def runs(self) -> tuple[Blocks, ...]:
        """The main run followed by the extra runs."""
        return (self,) + self.extra

    @property
    def total_depth(self) -> int:
        return sum(run.depth for run in self.runs)

    def _validate(self, where: str) -> None:
        if not isinstance(self.width, int) or isinstance(self.width, bool) or self.width < 1:
            raise InvalidArchError(f"{where}.width", f"must be a positive integer, got {self.width!r}")
        super()._validate(where)
        for i, run in enumerate(self.extra):
            run._validate(f"{where}.extra[{i}]")
        for i, run in enumerate(self.runs):
            name = where if i == 0 else f"{where}.extra[{i - 1}]"
            _check_mixer_width(run, self.width, name)


@dataclass(frozen=True, kw_only=True)
class Arch:
    """A MetaFormer backbone: stem, stages with downsampling between them, head.

    The defaults are MetaFormer-v2 (ConvFormer/CAFormer) conventions: bias-free LayerNorm, StarReLU MLP without
    bias, a 7x7 stride-4 stem and 3x3 stride-2 downsampling, each preceded or followed by ``embed_norm``.
    """

    stages: tuple[Stage, ...]
    stem: str = "conv7_s4"  # searchspace.blocks.STEMS
    downsample: str = "norm_conv3"  # searchspace.blocks.DOWNSAMPLES
    embed_norm: str = "layernorm_nobias"  # norm of the stem and the downsampling layers
    norm: str = "layernorm_nobias"  # default block norm
    norm_eps: float = 1e-6  # eps of layer and group norms (batchnorm uses at least 1e-5)
    act: str = "starrelu"  # default MLP activation
    mlp_bias: bool = False  # default bias of the MLP convolutions
    block: str = "metaformer"  # default block variant
    head: str = "linear"  # linear | mlp (MetaFormer MLP head) | linear_distill (class + distillation heads)
    head_norm: str = "layernorm"  # norm of the pooled features
    head_norm_first: bool = False  # normalise the feature map before pooling (EfficientMod, CAS-ViT)
    head_dropout: float = 0.0  # dropout before the classifier
    drop_path: float = 0.0  # stochastic depth, rising linearly to this rate at the last block
    name: str = field(default="", compare=False)  # a label such as a preset name; not part of the identity

    def __post_init__(self) -> None:
        stages = self.stages
        if isinstance(stages, (list, tuple)):
            stages = tuple(s if isinstance(s, Stage) else _stage_from_dict(s, f"stages[{i}]")
                           for i, s in enumerate(stages))
        object.__setattr__(self, "stages", stages)
        self._validate()

    def _validate(self) -> None:
        if not isinstance(self.stages, tuple) or not 1 <= len(self.stages) <= 8:
            raise InvalidArchError("stages", f"must be a list of 1 to 8 stages, got {self.stages!r}")
        for i, stage in enumerate(self.stages):
            if not isinstance(stage, Stage):
                raise InvalidArchError(f"stages[{i}]", f"must be a Stage, got {type(stage).__name__}")
            stage._validate(f"stages[{i}]")
        _check_name(blocks.STEMS, self.stem, "stem")
        _check_name(blocks.DOWNSAMPLES, self.downsample, "downsample")
        _check_name(blocks.BLOCKS, self.block, "block")
        _check_name(blocks.HEADS, self.head, "head")
        for name in ("embed_norm", "norm", "head_norm"):
            _check_name(layers.NORMS, getattr(self, name), name)
        _check_name(layers.ACTIVATIONS, self.act, "act")
        if not isinstance(self.norm_eps, (int, float)) or not 0 < self.norm_eps < 1:
            raise InvalidArchError("norm_eps", f"must be a number in (0, 1), got {self.norm_eps!r}")
        for name in ("drop_path", "head_dropout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise InvalidArchError(name, f"must be a number in [0, 1), got {value!r}")
        for name in ("mlp_bias", "head_norm_first"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidArchError(name, f"must be true or false, got {getattr(self, name)!r}")

    # ------------------------------------------------------------------------------------------- conveniences

    @property
    def depths(self) -> tuple[int, ...]:
        return tuple(s.total_depth for s in self.stages)

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(s.width for s in self.stages)

    @property
    def mixers(self) -> tuple[str, ...]:
        return tuple(s.mixer for s in self.stages)

    def replace(self, **changes: Any) -> Arch:
        """A copy with some top-level fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def replace_stage(self, index: int, **changes: Any) -> Arch:
        """A copy with fields of stage ``index`` changed: ``arch.replace_stage(2, mixer="attention")``."""
        stages = list(self.stages)
        stages[index] = dataclasses.replace(stages[index], **changes)
        return dataclasses.replace(self, stages=tuple(stages), name="")

    def replace_mixer(self, index: int, mixer: str, **mixer_args: Any) -> Arch:
        """A copy whose stage ``index`` uses ``mixer`` (its arguments reset to ``mixer_args``)."""
        return self.replace_stage(index, mixer=mixer, mixer_args=mixer_args, cycle={})

    def summary(self) -> str:
        """One line: ``pooling x2 @64 | pooling x2 @128 | attention x6 @320 | attention x2 @512``."""
        parts = []
        for s in self.stages:
            runs = " + ".join(f"{r.mixer} x{r.depth}" for r in s.runs)
            parts.append(f"{runs} @{s.width}")
        return " | ".join(parts)

    # ------------------------------------------------------------------------------------------------ JSON

    def to_dict(self) -> dict[str, Json]:
        """A JSON-ready dict; :meth:`from_dict` gives back an equal ``Arch``."""
        return _to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Json]) -> Arch:
        """Rebuild from :meth:`to_dict` output; unknown keys are an error naming the key."""
        if not isinstance(data, Mapping):
            raise InvalidArchError("arch", f"must be a JSON object, got {type(data).__name__}")
        kwargs = _known_keys(cls, data, "arch")
        if "stages" not in kwargs:
            raise InvalidArchError("stages", "missing")
        if not isinstance(kwargs["stages"], (list, tuple)):
            raise InvalidArchError("stages", "must be a list of stages")
        kwargs["stages"] = tuple(_stage_from_dict(s, f"stages[{i}]") for i, s in enumerate(kwargs["stages"]))
        return cls(**kwargs)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> Arch:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise MixerNASError(f"architecture JSON is malformed: {exc}") from None
        if isinstance(data, Mapping) and "arch" in data and "stages" not in data:
            data = data["arch"]  # a results file (best.json) that holds an architecture
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Arch:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise MixerNASError(f"cannot read architecture file {str(path)!r}: {exc.strerror}") from None
        return cls.from_json(text)


# ------------------------------------------------------------------------------------------------------ helpers


def _check_name(registry, value: Any, where: str):
    if not isinstance(value, str):
        raise InvalidArchError(where, f"must be a name, got {value!r}")
    try:
        return registry.get(value)
    except UnknownNameError as exc:
        raise InvalidArchError(where, str(exc)) from None


def _check_mixer_width(run: Blocks, width: int, where: str) -> None:
    """Mixers may declare ``check(dim, **args) -> str | None`` to reject widths they cannot use."""
    check = getattr(mixers.get_mixer(run.mixer).factory, "check", None)
    if check is None:
        return
    for i in range(max(len(v) for v in run.cycle.values()) if run.cycle else 1):
        problem = check(width, **run.block_args(i))
        if problem:
            raise InvalidArchError(f"{where}.width", f"{width} does not suit mixer {run.mixer!r}: {problem}")


def _to_dict(obj: Any) -> Json:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, tuple) and obj and dataclasses.is_dataclass(obj[0]):
        return [_to_dict(o) for o in obj]
    return _thaw(obj)


def _known_keys(cls: type, data: Mapping[str, Json], where: str) -> dict[str, Json]:
    import difflib

    names = [f.name for f in fields(cls)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(names)}"
            raise InvalidArchError(f"{where}.{key}", f"unknown key; {hint}")
    return dict(data)


def _stage_from_dict(data: Any, where: str) -> Stage:
    if isinstance(data, Stage):
        return data
    if not isinstance(data, Mapping):
        raise InvalidArchError(where, f"must be an object, got {type(data).__name__}")
    kwargs = _known_keys(Stage, data, where)
    for key in ("mixer", "depth", "width"):
        if key not in kwargs:
            raise InvalidArchError(f"{where}.{key}", "missing")
    extra = kwargs.get("extra", ())
    if not isinstance(extra, (list, tuple)):
        raise InvalidArchError(f"{where}.extra", "must be a list of block runs")
    runs = []
    for i, run in enumerate(extra):
        if isinstance(run, Blocks):
            runs.append(run)
            continue
        if not isinstance(run, Mapping):
            raise InvalidArchError(f"{where}.extra[{i}]", "must be an object")
        runs.append(Blocks(**_known_keys(Blocks, run, f"{where}.extra[{i}]")))
    kwargs["extra"] = tuple(runs)
    for key in ("mixer_args", "cycle"):
        if key in kwargs and not isinstance(kwargs[key], Mapping):
            raise InvalidArchError(f"{where}.{key}", "must be an object")
    return Stage(**kwargs)
