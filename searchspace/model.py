"""Build an ``nn.Module`` from an :class:`~searchspace.arch.Arch` or a preset name."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .arch import Arch
from .blocks import BLOCKS, DOWNSAMPLES, HEADS, STEMS
from .errors import MixerNASError
from .layers import make_norm


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

    Follows timm's model conventions (``forward_features``, ``forward_head``, ``reset_classifier``,
    ``feature_info``), so timm's training, benchmark and feature-extraction tools work on it.
    """

    def __init__(self, arch: Arch, num_classes: int = 1000, in_chans: int = 3, drop_path: float | None = None):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 0:
            raise MixerNASError(f"num_classes must be an integer >= 0, got {num_classes!r}")
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
            self.feature_info.append(dict(num_chs=stage.width, reduction=2 ** (i + 2), module=f"stages.{i}"))
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
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head = self._make_head(num_classes)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            from torch.utils.checkpoint import checkpoint

            for stage in self.stages:
                x = checkpoint(stage, x, use_reentrant=False)
            return x
        return self.stages(x)

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output of every stage, highest resolution first (for dense-prediction necks)."""
        out = []
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.arch.head_norm_first:
            x = self.head_norm(x).mean((2, 3))
        else:
            x = self.head_norm(x.mean((2, 3), keepdim=True)).flatten(1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def resolve_arch(arch_or_name: Arch | str | dict[str, Any]) -> Arch:
    """An ``Arch`` from an ``Arch``, a preset name, a path to an arch JSON file, or a dict."""
    from pathlib import Path

    from .presets import PRESETS, preset

    if isinstance(arch_or_name, Arch):
        return arch_or_name
    if isinstance(arch_or_name, dict):
        return Arch.from_dict(arch_or_name)
    if isinstance(arch_or_name, (str, Path)):
        text = str(arch_or_name)
        if text in PRESETS or not (text.endswith(".json") or Path(text).exists()):
            return preset(text)
        return Arch.load(text)
    raise MixerNASError(f"expected an Arch, a preset name or an arch JSON path, got {type(arch_or_name).__name__}")


def build_model(arch: Arch | str | dict[str, Any], num_classes: int = 1000, in_chans: int = 3,
                drop_path: float | None = None) -> MetaFormerNet:
    """Build the backbone described by ``arch`` (an ``Arch``, preset name, arch JSON path or dict).

    >>> model = build_model("PoolFormerV2-S12", num_classes=10)
    >>> model(torch.randn(1, 3, 64, 64)).shape
    torch.Size([1, 10])
    """
    return MetaFormerNet(resolve_arch(arch), num_classes=num_classes, in_chans=in_chans, drop_path=drop_path)
