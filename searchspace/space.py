"""Search spaces: ``sample(trial) -> Arch``.

Two ways to declare one:

* **Declarative** - :class:`ChoiceSpace`: per-stage choices of mixer, depth, width and MLP ratio (and, per mixer,
  choices of its arguments), plus global choices such as the activation.
* **Define-by-run** - any function ``fn(trial) -> Arch`` that calls ``trial.suggest_*`` (Optuna's API), so
  conditional spaces are plain ``if`` statements::

      @searchspace.register_space("two-mixers")
      def two_mixers(trial):
          mixer = trial.suggest_categorical("s3.mixer", ["pooling", "attention"])
          depth = trial.suggest_int("s3.depth", 2, 6, step=2)
          return searchspace.preset("PoolFormerV2-S12").replace_stage(2, mixer=mixer, depth=depth)

``sample`` takes an Optuna trial or a dict of fixed parameters (``{"s3.mixer": "attention", ...}``), which replays
a trial exactly. Parameter names are stable dotted paths: ``act``, ``norm``, ``head`` for choices of the whole
architecture, ``s1.mixer`` ... ``s4.mlp_ratio`` (stages numbered from 1 as in the papers), and
``s3.strip_attention.sr_ratio`` for a mixer's own arguments. ``params_of(arch)`` goes the other way: the
parameters that make ``arch``, or ``None`` when it is not a point of the space; the search queues the presets that
are points as its first trials. The ``presets`` space holds every preset, one parameter ``preset`` naming it.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .arch import Arch, FrozenArgs, Stage
from .errors import InvalidArchError, MixerNASError
from .presets import list_presets, preset
from .registry import Registry


class TrialLike(Protocol):
    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any: ...
    def suggest_int(self, name: str, low: int, high: int, step: int = 1, log: bool = False) -> int: ...
    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None,
                      log: bool = False) -> float: ...


# --------------------------------------------------------------------------------------------- fixed parameters


class FixedParams:
    """A trial that answers every ``suggest_*`` from a dict, checking each value against the choices."""

    def __init__(self, params: Mapping[str, Any]):
        self.params = dict(params)
        self.used: dict[str, Any] = {}

    def _get(self, name: str) -> Any:
        if name not in self.params:
            raise MixerNASError(f"parameter {name!r} is missing; the space asks for it")
        value = self.params[name]
        self.used[name] = value
        return value

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        value = self._get(name)
        if value not in list(choices):
            raise MixerNASError(f"parameter {name!r} = {value!r} is not one of {list(choices)}")
        return value

    def suggest_int(self, name: str, low: int, high: int, step: int = 1, log: bool = False) -> int:
        value = self._get(name)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high or (value - low) % step:
            raise MixerNASError(f"parameter {name!r} = {value!r} is not an integer in [{low}, {high}] step {step}")
        return value

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None,
                      log: bool = False) -> float:
        value = self._get(name)
        if not isinstance(value, (int, float)) or not low <= value <= high:
            raise MixerNASError(f"parameter {name!r} = {value!r} is not a number in [{low}, {high}]")
        return float(value)

    def check_all_used(self) -> None:
        unused = sorted(set(self.params) - set(self.used))
        if unused:
            raise MixerNASError(f"unknown parameter(s) {', '.join(unused)}; this space uses: "
                                f"{', '.join(sorted(self.used))}")


class _Enumerator:
    """Replays one branch of a define-by-run space, recording how many options each decision had."""

    def __init__(self, path: list[int]):
        self.path, self.depth, self.widths = path, 0, []

    def _pick(self, options: Sequence[Any]) -> Any:
        if self.depth >= len(self.path):
            self.path.append(0)
        self.widths.append(len(options))
        value = options[self.path[self.depth]]
        self.depth += 1
        return value

    def suggest_categorical(self, name, choices):
        return self._pick(list(choices))

    def suggest_int(self, name, low, high, step=1, log=False):
        return self._pick(list(range(low, high + 1, step)))

    def suggest_float(self, name, low, high, *, step=None, log=False):
        if step is None:
            raise _Uncountable
        n = int(math.floor((high - low) / step + 1e-9)) + 1
        return self._pick([low + i * step for i in range(n)])


class _Uncountable(Exception):
    pass


# --------------------------------------------------------------------------------------------------- the spaces


class SearchSpace:
    """Base class: a named source of architectures."""

    name: str = ""
    description: str = ""

    def define(self, trial: TrialLike) -> Arch:  # pragma: no cover - abstract
        raise NotImplementedError

    def sample(self, trial: TrialLike | Mapping[str, Any]) -> Arch:
        """The architecture for an Optuna trial, or for a dict of fixed parameters (checked strictly)."""
        if isinstance(trial, Mapping):
            fixed = FixedParams(trial)
            arch = self.define(fixed)
            fixed.check_all_used()
            return arch
        return self.define(trial)

    def size(self, limit: int = 1_000_000) -> int | None:
        """Number of architectures, by enumerating the decisions; ``None`` if over ``limit`` or continuous."""
        count, path = 0, []
        try:
            while True:
                probe = _Enumerator(path)
                self.define(probe)
                count += 1
                if count > limit:
                    return None
                del path[probe.depth:]
                while path and path[-1] + 1 >= probe.widths[len(path) - 1]:
                    path.pop()
                if not path:
                    return count
                path[-1] += 1
        except _Uncountable:
            return None

    def params_of(self, arch: Arch) -> dict[str, Any] | None:
        """The parameters that make ``arch`` in this space, or ``None`` if it is not a point of it."""
        return None


class FunctionSpace(SearchSpace):
    """A define-by-run space around ``fn(trial) -> Arch``."""

    def __init__(self, fn: Callable[[TrialLike], Arch], name: str = "", description: str = ""):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "space")
        self.description = description or (fn.__doc__ or "").strip().split("\n")[0]

    def define(self, trial: TrialLike) -> Arch:
        arch = self.fn(trial)
        if not isinstance(arch, Arch):
            raise MixerNASError(f"space {self.name!r} returned {type(arch).__name__}, expected an Arch")
        return arch


@dataclass(frozen=True)
class StageChoices:
    """The choices for one stage of a :class:`ChoiceSpace`."""

    mixers: tuple[str, ...]
    depths: tuple[int, ...]
    widths: tuple[int, ...]
    mlp_ratios: tuple[float, ...] = (4.0,)
    mixer_args: Mapping[str, Mapping[str, tuple]] = field(default_factory=dict)  # mixer -> arg -> choices
    res_scale: float | None = None  # fixed for the stage (MetaFormer-v2 uses 1.0 in the last two stages)

    def __post_init__(self) -> None:
        for name in ("mixers", "depths", "widths", "mlp_ratios"):
            value = tuple(getattr(self, name))
            if not value:
                raise MixerNASError(f"StageChoices.{name} must offer at least one choice")
            object.__setattr__(self, name, value)
        object.__setattr__(self, "mixer_args", FrozenArgs(self.mixer_args))

    def size(self) -> int:
        per_mixer = sum(math.prod(len(v) for v in self.mixer_args.get(m, {}).values()) for m in self.mixers)
        return per_mixer * len(self.depths) * len(self.widths) * len(self.mlp_ratios)


class ChoiceSpace(SearchSpace):
    """Per-stage categorical choices, and choices of whole-architecture fields; every combination is checked to
    build at construction.

    ``choices`` maps :class:`Arch` fields to their options (``{"act": ("starrelu", "gelu"), "norm": (...)}``); the
    trial parameter is the field's name. ``base`` fixes other fields (``{"stem": "patch4"}``)::

        ChoiceSpace(stages, choices={"act": ("starrelu", "gelu")}, base={"head": "mlp"})
    """

    def __init__(self, stages: Sequence[StageChoices], *, choices: Mapping[str, Sequence[Any]] | None = None,
                 base: Mapping[str, Any] | None = None, name: str = "", description: str = ""):
        self.stages = tuple(stages)
        self.choices = {key: tuple(values) for key, values in (choices or {}).items()}
        self.base = dict(base or {})  # fixed Arch fields (norm, head, stem, ...)
        self.name, self.description = name, description
        self._validate()

    def _validate(self) -> None:
        where = f"space {self.name or 'ChoiceSpace'}"
        if not self.stages:
            raise MixerNASError(f"{where}: a ChoiceSpace needs at least one stage")
        settable = {f.name for f in dataclasses.fields(Arch)} - {"stages", "name"}
        for key, values in self.choices.items():
            if key not in settable:
                raise MixerNASError(f"{where}: choices.{key} is not a field of Arch; choose among "
                                    f"{', '.join(sorted(settable))}")
            if not values:
                raise MixerNASError(f"{where}: choices.{key} must offer at least one option")
            if key in self.base:
                raise MixerNASError(f"{where}: {key!r} is both fixed in base and a choice; keep one")
        first = {key: values[0] for key, values in self.choices.items()}
        plain = [Stage(mixer="identity", depth=1, width=32) for _ in self.stages]
        for key, values in self.choices.items():
            for value in values[1:]:
                try:
                    Arch(stages=tuple(plain), **self.base, **{**first, key: value})
                except InvalidArchError as exc:
                    raise MixerNASError(f"{where}: choice {key} = {value!r} cannot build: {exc}") from None
        # Build one representative of every (stage, mixer, width, argument) combination, so a bad
        # combination is reported now, not as a failed trial in the middle of a search.
        for i, sc in enumerate(self.stages):
            for mixer in sc.mixers:
                arg_choices = sc.mixer_args.get(mixer, {})
                for args in _product(arg_choices):
                    for width in sc.widths:
                        arch_stages = list(plain)
                        arch_stages[i] = Stage(mixer=mixer, depth=sc.depths[0], width=width, mixer_args=args,
                                               mlp_ratio=sc.mlp_ratios[0], res_scale=sc.res_scale)
                        try:
                            Arch(stages=tuple(arch_stages), **self.base, **first)
                        except InvalidArchError as exc:
                            raise MixerNASError(f"{where}: stage s{i + 1} choice ({mixer}, width {width}, "
                                                f"{dict(args)}) cannot build: {exc}") from None

    def define(self, trial: TrialLike) -> Arch:
        chosen = {key: _choose(trial, key, values) for key, values in self.choices.items()}
        stages = []
        for i, sc in enumerate(self.stages):
            mixer = _choose(trial, stage_param(i, "mixer"), sc.mixers)
            args = {k: _choose(trial, stage_param(i, k, mixer), v) for k, v in sc.mixer_args.get(mixer, {}).items()}
            stages.append(Stage(
                mixer=mixer, mixer_args=args,
                depth=_choose(trial, stage_param(i, "depth"), sc.depths),
                width=_choose(trial, stage_param(i, "width"), sc.widths),
                mlp_ratio=_choose(trial, stage_param(i, "mlp_ratio"), sc.mlp_ratios),
                res_scale=sc.res_scale,
            ))
        return Arch(stages=tuple(stages), **self.base, **chosen)

    def size(self, limit: int | None = None) -> int:
        return math.prod(len(v) for v in self.choices.values()) * math.prod(sc.size() for sc in self.stages)

    def params_of(self, arch: Arch) -> dict[str, Any] | None:
        """The parameters whose :meth:`sample` equals ``arch`` (name aside), or ``None``::

            space = get_space("default")
            params = space.params_of(preset("PoolFormerV2-S12"))  # {"act": "starrelu", "norm": ...}
            assert space.sample(params) == preset("PoolFormerV2-S12")
        """
        if len(arch.stages) != len(self.stages):
            return None
        params: dict[str, Any] = {key: getattr(arch, key) for key in self.choices}
        for i, (sc, st) in enumerate(zip(self.stages, arch.stages)):
            params.update({stage_param(i, "mixer"): st.mixer, stage_param(i, "depth"): st.depth,
                           stage_param(i, "width"): st.width, stage_param(i, "mlp_ratio"): st.mlp_ratio})
            for k in sc.mixer_args.get(st.mixer, {}):
                if k not in st.mixer_args:
                    return None
                params[stage_param(i, k, st.mixer)] = st.mixer_args[k]
        params = {k: v for k, v in params.items() if _is_decision(self, k)}
        try:
            rebuilt = self.sample(params)
        except MixerNASError:
            return None
        return params if rebuilt == arch else None


class PresetSpace(SearchSpace):
    """Every registered preset, one categorical parameter ``preset`` naming it: the published models compared
    with each other on this device and data, as a search (``search.py --space presets``)."""

    description = "every preset (the published models), one trial each"

    def define(self, trial: TrialLike) -> Arch:
        return preset(trial.suggest_categorical(PRESET_PARAM, list_presets()))

    def params_of(self, arch: Arch) -> dict[str, Any] | None:
        names = [arch.name] if arch.name in list_presets() else list_presets()
        return next(({PRESET_PARAM: name} for name in names if preset(name) == arch), None)


ACT_PARAM = "act"  # the trial parameter of the activation, when the space offers more than one
PRESET_PARAM = "preset"  # the one parameter of the presets space


def stage_param(index: int, field: str, mixer: str | None = None) -> str:
    """The trial parameter of stage ``index`` (from 0): ``s3.width``, or ``s3.strip_attention.sr_ratio`` for one
    of a mixer's arguments. The one place the names are made: studies resume and compare by them.

    >>> stage_param(2, "width"), stage_param(2, "sr_ratio", "strip_attention")
    ('s3.width', 's3.strip_attention.sr_ratio')
    """
    return f"s{index + 1}.{mixer}.{field}" if mixer else f"s{index + 1}.{field}"


def _choose(trial: TrialLike, name: str, choices: Sequence[Any]) -> Any:
    # a single option is fixed, not a decision: it never appears in trial tables or fixed params
    return choices[0] if len(choices) == 1 else trial.suggest_categorical(name, list(choices))


def _is_decision(space: ChoiceSpace, key: str) -> bool:
    if key in space.choices:
        return len(space.choices[key]) > 1
    stage, _, rest = key.partition(".")
    sc = space.stages[int(stage[1:]) - 1]
    if rest.count("."):
        mixer, arg = rest.split(".")
        return len(sc.mixer_args[mixer][arg]) > 1
    return len({"mixer": sc.mixers, "depth": sc.depths, "width": sc.widths, "mlp_ratio": sc.mlp_ratios}[rest]) > 1


def _product(choices: Mapping[str, tuple]) -> list[dict[str, Any]]:
    combos: list[dict[str, Any]] = [{}]
    for key, values in choices.items():
        combos = [{**c, key: v} for c in combos for v in values]
    return combos


# ----------------------------------------------------------------------------------------------------- registry

SPACES: Registry[SearchSpace] = Registry("search space")


def register_space(name: str, space: SearchSpace | Callable[[TrialLike], Arch] | None = None, *,
                   overwrite: bool = False):
    """Register a space by name; usable as a decorator on a define-by-run function."""

    def add(obj):
        sp = obj if isinstance(obj, SearchSpace) else FunctionSpace(obj, name=name)
        sp.name = name
        SPACES.add(name, sp, overwrite=overwrite)
        return obj

    return add if space is None else add(space)


def get_space(spec: str | SearchSpace) -> SearchSpace:
    """A space by registered name, or ``"package.module:attribute"`` naming a space or a function."""
    if isinstance(spec, SearchSpace):
        return spec
    if isinstance(spec, str) and ":" in spec and spec not in SPACES:
        module_name, _, attr = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise MixerNASError(f"cannot import space module {module_name!r}: {exc}") from None
        if not hasattr(module, attr):
            raise MixerNASError(f"module {module_name!r} has no attribute {attr!r}")
        obj = getattr(module, attr)
        if isinstance(obj, SearchSpace):
            return obj
        if callable(obj):
            return FunctionSpace(obj, name=spec)
        raise MixerNASError(f"{spec!r} is neither a SearchSpace nor a function of a trial")
    return SPACES.get(spec)


def list_spaces() -> list[str]:
    return SPACES.names()


# ------------------------------------------------------------------------------------------------ built-in spaces

ALL_MIXERS = ("identity", "pooling", "sepconv", "modulation", "additive", "hadamard", "random",
              "strip_attention", "gpsa", "attention")

# The default space is a grid around the MetaFormer baselines, so that those presets are points of it and the
# search starts from them: S12 and S18 depths (2-2-6-2, 3-3-9-3) and widths (64-128-320-512), their norms (GroupNorm
# for PoolFormerV2, IdentityFormer and RandFormer; LayerNorm for ConvFormer and CAFormer) and heads (linear; an MLP
# for the S18 models); the higher-order Hadamard mixer with HorNet's interaction order, rising 2 to 5 by stage
# (fixed, not a decision); strip attention with or without reduced keys in the two attention stages.
register_space("default", ChoiceSpace(
    [
        StageChoices(ALL_MIXERS, depths=(1, 2, 3), widths=(32, 64), mlp_ratios=(2.0, 3.0, 4.0),
                     mixer_args={"hadamard": {"order": (2,)}}),
        StageChoices(ALL_MIXERS, depths=(1, 2, 3), widths=(64, 96, 128), mlp_ratios=(2.0, 3.0, 4.0),
                     mixer_args={"hadamard": {"order": (3,)}}),
        StageChoices(ALL_MIXERS, depths=(2, 4, 6, 9), widths=(128, 192, 256, 320), mlp_ratios=(2.0, 3.0, 4.0),
                     mixer_args={"hadamard": {"order": (4,)}, "strip_attention": {"sr_ratio": (1, 2)}},
                     res_scale=1.0),
        StageChoices(ALL_MIXERS, depths=(1, 2, 3), widths=(256, 384, 512), mlp_ratios=(2.0, 3.0, 4.0),
                     mixer_args={"hadamard": {"order": (5,)}, "strip_attention": {"sr_ratio": (1, 2)}},
                     res_scale=1.0),
    ],
    choices={"act": ("starrelu", "gelu"), "norm": ("layernorm_nobias", "groupnorm_nobias"),
             "head": ("linear", "mlp")},
    description="every built-in mixer in every stage; MetaFormer-v2 blocks; the MetaFormer baselines are points",
))

register_space("tiny", ChoiceSpace(
    [
        StageChoices(("identity", "pooling", "sepconv"), depths=(1,), widths=(32,), mlp_ratios=(2.0,)),
        StageChoices(("pooling", "sepconv", "modulation"), depths=(1,), widths=(32,), mlp_ratios=(2.0,)),
        StageChoices(("pooling", "additive", "attention"), depths=(1, 2), widths=(32, 64), mlp_ratios=(2.0,),
                     res_scale=1.0),
        StageChoices(("pooling", "attention"), depths=(1,), widths=(64,), mlp_ratios=(2.0,), res_scale=1.0),
    ],
    description="a small space for tests and quick demonstrations",
))

register_space("presets", PresetSpace())
