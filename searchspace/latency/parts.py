"""The parts a backbone is assembled from, as the latency table measures them, and where each sits in a model.

* :class:`StemPart` - the stem on the image (kind, input channels, width, norm, image size);
* :class:`BlockPart` - one block (variant, mixer and its arguments for that block, width, MLP ratio, norm,
  activation, MLP bias, layer/residual scale on or off, the resolution of its stage);
* :class:`DownsamplePart` - the downsampling layer in front of a stage (kind, widths in and out, its input size);
* :class:`HeadPart` - pooling, head norm and classifier (kind, norm, width, classes, final feature-map size).

All but the stem also carry the memory format their input has inside the model (:func:`follow_layouts`).

Parts are frozen dataclasses (hashable keys, never strings), and each builds its module with the same factories
the model uses (``searchspace.blocks``). The geometry is the model's own: stage resolutions come from
``model.stage_resolutions``, which asks each stem and downsampling layer (odd sizes included), the block options
from ``blocks.resolved_options`` and the trial parameter names from ``space.stage_param``, so nothing here
restates the model.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import nn

from ..arch import Arch, Blocks, FrozenArgs
from ..blocks import BLOCKS, DOWNSAMPLES, HEADS, STEMS, resolved_options
from ..errors import MixerNASError
from ..layers import make_norm
from ..model import MetaFormerNet, shell_arch, stage_resolutions
from ..space import ChoiceSpace, SearchSpace, stage_param
from .measure import DTYPES, InputSpec


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
        return STEMS.get(self.stem)(self.in_chans, self.dim, shell_arch(embed_norm=self.norm, norm_eps=self.eps))

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
    channels_last: bool = False  # the memory format its input has in the model (see follow_layouts)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mixer_args", FrozenArgs(self.mixer_args))
        object.__setattr__(self, "mlp_ratio", float(self.mlp_ratio))

    def build(self) -> nn.Module:
        run = Blocks(mixer=self.mixer, depth=1, mlp_ratio=self.mlp_ratio, mixer_args=self.mixer_args,
                     block=self.block, norm=self.norm, act=self.act, mlp_bias=self.mlp_bias,
                     layer_scale=1.0 if self.layer_scale else None, res_scale=1.0 if self.res_scale else None)
        return BLOCKS.get(self.block)(self.dim, run, shell_arch(norm_eps=self.eps), 0, 0.0)

    def input_spec(self, batch: int, dtype: str) -> InputSpec:
        return InputSpec(batch, self.dim, self.height, self.width, dtype, channels_last=self.channels_last)


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
    channels_last: bool = False

    def build(self) -> nn.Module:
        arch = shell_arch(embed_norm=self.norm, norm_eps=self.eps)
        return DOWNSAMPLES.get(self.downsample)(self.in_dim, self.out_dim, arch)

    def input_spec(self, batch: int, dtype: str) -> InputSpec:
        return InputSpec(batch, self.in_dim, self.height, self.width, dtype, channels_last=self.channels_last)


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
    channels_last: bool = False

    def build(self) -> nn.Module:
        return _Head(self)

    def input_spec(self, batch: int, dtype: str) -> InputSpec:
        return InputSpec(batch, self.dim, self.height, self.width, dtype, channels_last=self.channels_last)


Part = StemPart | BlockPart | DownsamplePart | HeadPart
PART_TYPES: dict[str, type] = {cls.kind: cls for cls in (StemPart, BlockPart, DownsamplePart, HeadPart)}


class _Head(nn.Module):
    """The model's own ``forward_head`` on a stand-alone norm and classifier, so the two cannot drift apart."""

    def __init__(self, part: HeadPart):
        super().__init__()
        self.arch = shell_arch(head_norm_first=part.norm_first)
        self.head_norm = make_norm(part.norm, part.dim, part.eps)
        self.head = HEADS.get(part.head)(part.dim, part.num_classes, 0.0) if part.num_classes else nn.Identity()
        self._forward = MetaFormerNet.forward_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(self, x)


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


# ------------------------------------------------------------------------------------------------ memory format


def follow_layouts(uses: tuple[PartUse, ...], device: str | torch.device = "cpu", batch: int = 1,
                   dtype: str = "float32") -> tuple[PartUse, ...]:
    """``uses`` with each part after the stem taking its input in the memory format the part before it leaves.

    Inside a model a layer hands the next one whatever strides its kernels produced: a LayerNorm over channels
    permutes and leaves a channels-last tensor, a convolution on a channels-last input stays channels-last, and
    with one input channel the stem's convolution already answers channels-last. The kernels that follow choose
    their path by it (GroupNorm has a channels-last kernel of its own; README.md gives what it changed), so a part
    is timed on the layout it meets in the model. The layout is the kernels' choice on the device, which neither
    the part's description nor meta tensors tell, so each part is run once, eagerly, to see what it hands on
    (:func:`output_channels_last`, cached per part).
    """
    out = [uses[0]]
    for use in uses[1:]:
        channels_last = output_channels_last(out[-1].part, str(device), batch, dtype)
        out.append(PartUse(use.label, use.stage, dataclasses.replace(use.part, channels_last=channels_last)))
    return tuple(out)


@functools.lru_cache(maxsize=8192)
def output_channels_last(part: Part, device: str = "cpu", batch: int = 1, dtype: str = "float32") -> bool:
    """Whether ``part``, run eagerly on ``device`` on its own input, returns a channels-last 4-d tensor.

    The part is built and run once with the random number generators forked, so asking leaves a search's seeded
    draws as they were."""
    dev = torch.device(device)
    try:
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), torch.inference_mode():
            module = part.build().eval().to(device=dev, dtype=DTYPES[dtype])
            y = module(part.input_spec(batch, dtype).example(dev))
    except Exception:  # a part that cannot run here: its measurement says why, with the context
        return False
    return (isinstance(y, torch.Tensor) and y.dim() == 4 and not y.is_contiguous()
            and y.is_contiguous(memory_format=torch.channels_last))


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


def space_parts(space: SearchSpace, height: int, width: int, in_chans: int = 3, num_classes: int = 1000,
                follow: Callable[[tuple[PartUse, ...]], tuple[PartUse, ...]] | None = None) -> dict[Part, None]:
    """Every part a :class:`ChoiceSpace` can produce at this input size, without enumerating architectures.

    For each stage: every mixer (and mixer-argument combination) x width x MLP ratio x every combination of the
    space's whole-architecture choices (activation, norm, head), at the
    stage's resolution, with the downsampling from every width of the previous stage; the stem for every first
    width and the head for every last width. Each combination goes through the space's own ``define`` and
    :func:`arch_parts` (and ``follow``, the table's :func:`follow_layouts` where it applies), so the parts are
    those of the sampled architectures; a part whose input layout depends on an earlier stage's choice is listed
    with the layout the first choices give it (the table measures any other when a model needs it).
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
                                uses = arch_parts(arch, height, width, in_chans, num_classes)
                                for use in follow(uses) if follow else uses:
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
