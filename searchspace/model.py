"""Build an ``nn.Module`` from an :class:`~searchspace.arch.Arch` or a preset name."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from timm.models._features import feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

from .arch import Arch, Stage
from .blocks import BLOCKS, DOWNSAMPLES, HEADS, STEMS
from .errors import MixerNASError
from .layers import make_norm
from .presets import resolve_arch

__all__ = ["MetaFormerNet", "MetaFormerStage", "build_model", "resolve_arch", "stage_resolutions"]


class MetaFormerStage(nn.Module):
    """Downsampling (identity for the first stage), then the stage's blocks."""

    def __init__(self, downsample: nn.Module, blocks: list[nn.Module]):
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class MetaFormerNet(nn.Module):
    """A MetaFormer backbone built from an ``Arch``: ``stem -> stages -> pool -> norm -> classifier``.

    It has timm's model interface, so timm's training, benchmark and feature-extraction tools work on it:
    ``forward_features`` (the last stage's map), ``forward_head(x, pre_logits)``, ``forward_intermediates``,
    ``prune_intermediate_layers``, ``get_classifier``, ``reset_classifier``, ``set_grad_checkpointing`` and
    ``feature_info``. The forward traces with ``torch.fx``, ``torch.export`` and ``torch.compile(fullgraph=True)``.

    >>> model = build_model("PoolFormerV2-S12", num_classes=10)
    >>> [f.shape[1] for f in model.forward_intermediates(torch.randn(1, 3, 64, 64), intermediates_only=True)]
    [64, 128, 320, 512]
    """

    def __init__(self, arch: Arch, num_classes: int = 1000, in_chans: int = 3, drop_path: float | None = None):
        super().__init__()
        _check_num_classes(num_classes)
        if not isinstance(in_chans, int) or in_chans < 1:
            raise MixerNASError(f"in_chans must be a positive integer, got {in_chans!r}")
        self.arch = arch
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = self.head_hidden_size = arch.stages[-1].width
        self.grad_checkpointing = False
        drop_path = arch.drop_path if drop_path is None else drop_path

        self.stem = STEMS.get(arch.stem)(in_chans, arch.stages[0].width, arch)
        total = sum(s.total_depth for s in arch.stages)
        rates = torch.linspace(0, drop_path, total).tolist() if total > 1 else [0.0] * total
        stages, k, prev = [], 0, arch.stages[0].width
        self.feature_info = []
        reductions = [_PROBE // h for h, _ in stage_resolutions(arch, _PROBE, _PROBE)]
        for i, stage in enumerate(arch.stages):
            down = nn.Identity() if i == 0 else DOWNSAMPLES.get(arch.downsample)(prev, stage.width, arch)
            blocks = []
            for run in stage.runs:
                factory = BLOCKS.get(run.block or arch.block)
                for j in range(run.depth):
                    blocks.append(factory(stage.width, run, arch, j, rates[k]))
                    k += 1
            stages.append(MetaFormerStage(down, blocks))
            prev = stage.width
            self.feature_info.append(dict(num_chs=stage.width, reduction=reductions[i], module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.head_norm = make_norm(arch.head_norm, self.num_features, arch.norm_eps)
        self.head = self._make_head(num_classes)
        self.apply(_init_weights)
        for m in self.modules():  # mixers with an initialisation of their own (e.g. ConViT's local init)
            if m is not self and hasattr(m, "init_weights"):
                m.init_weights()

    def _make_head(self, num_classes: int) -> nn.Module:
        if num_classes == 0:
            return nn.Identity()
        return HEADS.get(self.arch.head)(self.num_features, num_classes, self.arch.head_dropout)

    # ---------------------------------------------------------------------------------------- timm interface

    def get_classifier(self) -> nn.Module:
        """The classifier on the pooled, normalised features (``nn.Identity`` at ``num_classes=0``)."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new, freshly initialised classifier for ``num_classes`` (0: ``forward`` returns the pooled features).

        ``global_pool`` is timm's argument; MixerNAS models always average (``None`` or ``"avg"``).
        """
        _check_num_classes(num_classes)
        check_global_pool(global_pool)
        head = self._make_head(num_classes)
        head.apply(_init_weights)
        ref = next(self.parameters(), None)  # the new head lives where the model does
        if ref is not None:
            head = head.to(device=ref.device, dtype=ref.dtype)
        self.num_classes = num_classes
        self.head = head.train(self.training)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each stage in the backward pass instead of keeping its activations (less memory, slower)."""
        self.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's map, ``(B, num_features, H/32, W/32)`` for four stages, before the head norm."""
        x = self.stem(x)
        if self.grad_checkpointing:
            for stage in self.stages:
                x = checkpoint(stage, x, use_reentrant=False)
            return x
        return self.stages(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs for dense-prediction necks, with timm's signature and semantics.

        Args:
            x: input images ``(B, in_chans, H, W)``.
            indices: the stages to return: ``None`` for all, an int ``n`` for the last ``n``, or a sequence of
                indices (negative ones count from the end).
            norm: apply the head norm to the last stage's output. Only where the architecture normalises the map
                (``Arch.head_norm_first``); a norm of pooled features does not apply to a map and is left out.
            stop_early: run no stage after the last one returned.
            output_fmt: ``"NCHW"``, the only layout.
            intermediates_only: return the list alone.

        Returns:
            ``(features, intermediates)``: the output of the last stage run (``forward_features(x)`` unless
            ``stop_early`` stopped sooner) and the selected stage outputs, first stage first; or only the list.
        """
        if output_fmt != "NCHW":
            raise MixerNASError(f"output_fmt must be 'NCHW' (MixerNAS maps are channels-first), got {output_fmt!r}")
        take_indices, max_index = _take_indices(len(self.stages), indices)
        stages = self.stages[: max_index + 1] if stop_early else self.stages
        final = len(self.arch.stages) - 1  # the stage the head norm was built for (stages may have been pruned)
        intermediates = []
        x = self.stem(x)
        for i, stage in enumerate(stages):
            x = checkpoint(stage, x, use_reentrant=False) if self.grad_checkpointing else stage(x)
            if i in take_indices:
                normed = norm and i == final and self.arch.head_norm_first
                intermediates.append(self.head_norm(x) if normed else x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last of ``indices`` (and the head and norm where asked); returns the
        absolute indices, which :meth:`forward_intermediates` then takes (timm's feature getter calls this).

        Once the last stage is gone the head norm and classifier, sized for it, go too and ``num_features``
        becomes the width of the new last stage.
        """
        take_indices, max_index = _take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[: max_index + 1]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_norm or prune_end:
            self.head_norm = nn.Identity()
        if prune_head or prune_end:
            self.reset_classifier(0)
        return take_indices

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool and normalise ``forward_features``' map (in the architecture's order), then classify.

        ``pre_logits=True`` returns the ``(B, num_features)`` pooled, normalised features.
        """
        if self.arch.head_norm_first:
            x = self.head_norm(x).mean((2, 3))
        else:
            x = self.head_norm(x.mean((2, 3), keepdim=True)).flatten(1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ------------------------------------------------------------------------------------------------------ geometry

_PROBE = 4096  # the input side at which each stage's reduction (timm's feature_info) is read off its resolution


def stage_resolutions(arch: Arch, height: int, width: int) -> tuple[tuple[int, int], ...]:
    """``(H, W)`` of every stage's blocks for an input of ``height x width``, as the stem and downsampling layers
    compute it: each layer's own ``output_size`` where it has one, else its forward run on the meta device (a
    user's layer, say). The one place the model's geometry is read (feature_info, timm's pool size, the latency
    table's parts).

    >>> stage_resolutions(resolve_arch("PoolFormerV2-S12"), 65, 63)
    ((16, 16), (8, 8), (4, 4), (2, 2))
    """
    hw = _layer_size("stem", arch.stem, height, width)
    out = [hw]
    for _ in arch.stages[1:]:
        hw = _layer_size("downsampling", arch.downsample, *hw)
        out.append(hw)
    if min(min(r) for r in out) < 1:
        raise MixerNASError(f"input {height}x{width} is too small for this architecture: stage resolutions "
                            f"{out}; use a larger --input-size or fewer stages")
    return tuple(out)


def _layer_size(kind: str, name: str, height: int, width: int) -> tuple[int, int]:
    try:
        return _output_size((STEMS if kind == "stem" else DOWNSAMPLES).get(name), height, width)
    except (RuntimeError, NotImplementedError, TypeError, ValueError) as e:
        raise MixerNASError(f"the {kind} layer {name!r} could not run on the meta device to tell its output size "
                            f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); give it an "
                            f"output_size(height, width) method") from None


@functools.lru_cache(maxsize=4096)
def _output_size(factory: Any, height: int, width: int) -> tuple[int, int]:
    layer = _probe_layer(factory)
    if hasattr(layer, "output_size"):
        return tuple(layer.output_size(height, width))
    with torch.device("meta"), torch.inference_mode():
        out = layer(torch.empty(1, 8, height, width))
    return int(out.shape[-2]), int(out.shape[-1])


@functools.lru_cache(maxsize=64)
def _probe_layer(factory: Any) -> nn.Module:
    """A stem or downsampling layer from ``factory`` on the meta device (no memory, no compute), to ask its
    geometry. Keyed by the factory, not its name, so a layer registered again under a name is asked anew."""
    with torch.device("meta"), torch.inference_mode():  # the same tensors whether or not the caller is in it
        return factory(8, 8, shell_arch())


def shell_arch(**fields: Any) -> Arch:
    """A one-stage ``Arch`` that only carries the global fields a layer's factory reads (norms, eps, ...): what a
    stem, block, downsampling layer or head is built with when it is built alone."""
    return Arch(stages=(Stage(mixer="identity", depth=1, width=8),), **fields)


def _check_num_classes(num_classes: int) -> None:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
        raise MixerNASError(f"num_classes must be an integer >= 0, got {num_classes!r}")


def check_global_pool(global_pool: str | None) -> None:
    """MixerNAS models average: timm's ``global_pool`` may only be ``None`` or ``"avg"``."""
    if global_pool not in (None, "avg"):
        raise MixerNASError(f"global_pool={global_pool!r} is not supported: MixerNAS models average ('avg'); "
                            "for the unpooled map use forward_features")


def _take_indices(num_stages: int, indices: int | Sequence[int] | None) -> tuple[list[int], int]:
    """timm's ``feature_take_indices``, with a :class:`MixerNASError` instead of an assertion for bad indices."""
    try:
        return feature_take_indices(num_stages, indices)
    except (AssertionError, TypeError, ValueError) as exc:  # out of range, not ints, or none at all
        raise MixerNASError(f"indices {indices!r} do not select stages of a {num_stages}-stage model: {exc}") from None


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def build_model(arch: Arch | str | dict[str, Any], num_classes: int = 1000, in_chans: int = 3,
                drop_path: float | None = None) -> MetaFormerNet:
    """Build the backbone described by ``arch`` (an ``Arch``, preset name, arch JSON path or dict).

    >>> model = build_model("PoolFormerV2-S12", num_classes=10)
    >>> model(torch.randn(1, 3, 64, 64)).shape
    torch.Size([1, 10])
    """
    return MetaFormerNet(resolve_arch(arch), num_classes=num_classes, in_chans=in_chans, drop_path=drop_path)
