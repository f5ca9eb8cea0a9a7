"""The parts a backbone is assembled from, as the latency table measures them, and where each sits in a model.

* :class:`StemPart` - the stem on the image (kind, input channels, width, norm, image size);
* :class:`BlockPart` - one block (variant, mixer and its arguments for that block, width, MLP ratio, norm,
  activation, MLP bias, layer/residual scale on or off, the resolution of its stage);
* :class:`DownsamplePart` - the downsampling layer in front of a stage (kind, widths in and out, its input size);
* :class:`HeadPart` - pooling, head norm and classifier (kind, norm, width, classes, final feature-map size).

Parts are frozen dataclasses (hashable keys, never strings), and each builds its module with the same factories
the model uses (``searchspace.blocks``). The geometry is the layers' own: stage resolutions come from each stem's
and downsampling layer's ``output_size`` (odd sizes included), the block options from ``blocks.resolved_options``
and the trial parameter names from ``space.stage_param``, so nothing here restates the model.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import nn

from ..arch import Arch, Blocks, FrozenArgs, Stage
from ..blocks import BLOCKS, DOWNSAMPLES, HEADS, STEMS, resolved_options
from ..errors import MixerNASError
from ..layers import make_norm
from ..model import MetaFormerNet
from ..space import ChoiceSpace, SearchSpace, stage_param
from .measure import InputSpec, MeasurementError


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


@functools.lru_cache(maxsize=64)
def _layer(factory: Any) -> nn.Module:
    """A stem or downsampling layer from ``factory`` on the meta device (no memory, no compute), to ask its
    geometry. Keyed by the factory, not its name, so a layer registered again under a name is asked anew."""
    with torch.device("meta"):
        return factory(8, 8, _shell_arch())


def layer_output_size(kind: str, name: str, height: int, width: int) -> tuple[int, int]:
    """``(H, W)`` out of the stem or downsampling layer ``name`` for a ``height x width`` input: the layer's own
    ``output_size`` where it has one, else its forward run on the meta device (a user's layer, say)."""
    return _output_size((STEMS if kind == "stem" else DOWNSAMPLES).get(name), height, width)


@functools.lru_cache(maxsize=4096)
def _output_size(factory: Any, height: int, width: int) -> tuple[int, int]:
    layer = _layer(factory)
    if hasattr(layer, "output_size"):
        return tuple(layer.output_size(height, width))
    with torch.device("meta"):
        out = layer(torch.empty(1, 8, height, width))
    return int(out.shape[-2]), int(out.shape[-1])


def stage_resolutions(arch: Arch, height: int, width: int) -> tuple[tuple[int, int], ...]:
    """``(H, W)`` of every stage's blocks for an input of ``height x width``, as the real layers compute it.

    >>> stage_resolutions(searchspace.preset("PoolFormerV2-S12"), 65, 63)  # doctest: +SKIP
    ((16, 16), (8, 8), (4, 4), (2, 2))
    """
    hw = layer_output_size("stem", arch.stem, height, width)
    out = [hw]
    for _ in arch.stages[1:]:
        hw = layer_output_size("downsample", arch.downsample, *hw)
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
                    dim=stage.width, mlp_ratio=run.mlp_ratio, **resolved_options(run, arch),
                    layer_scale=run.layer_scale is not None, res_scale=run.res_scale is not None,
                    eps=arch.norm_eps, height=h, width=w)
                uses.append(PartUse(f"s{i + 1}.b{k}", i, part))
                k += 1
        prev = stage.width
    h, w = res[-1]
    uses.append(PartUse("head", None, HeadPart(arch.head, arch.head_norm, arch.head_norm_first, arch.norm_eps,
                                               prev, num_classes, h, w)))
    return tuple(uses)



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

    For each stage: every mixer (and mixer-argument combination) x width x MLP ratio x every combination of the
    space's whole-architecture choices (activation, norm, head), at the
    stage's resolution, with the downsampling from every width of the previous stage; the stem for every first
    width and the head for every last width. Each combination goes through the space's own ``define`` and
    :func:`arch_parts`, so the parts are exactly those of the sampled architectures.
    """
    if not isinstance(space, ChoiceSpace):
        raise MixerNASError(f"space {space.name!r} is define-by-run, so its parts cannot be listed; pass the "
                            f"architectures to measure to LatencyTable.ensure(archs) instead")
    out: dict[Part, None] = {}
    globals_ = [dict(zip(space.choices, combo)) for combo in itertools.product(*space.choices.values())]
    for i, sc in enumerate(space.stages):
        prev_widths = space.stages[i - 1].widths if i > 0 else (None,)
        for chosen in globals_:
            for mixer in sc.mixers:
                for args in _combinations(sc.mixer_args.get(mixer, {})):
                    for dim in sc.widths:
                        for ratio in sc.mlp_ratios:
                            for prev in prev_widths:
                                fixed = {stage_param(i, "mixer"): mixer, stage_param(i, "width"): dim,
                                         stage_param(i, "mlp_ratio"): ratio, stage_param(i, "depth"): max(sc.depths)}
                                fixed.update({stage_param(i, k, mixer): v for k, v in args.items()})
                                fixed.update(chosen)
                                if prev is not None:
                                    fixed[stage_param(i - 1, "width")] = prev
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
