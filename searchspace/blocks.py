"""The parts a MetaFormer is assembled from: stems, blocks, downsampling layers and heads, each by name.

Block variants (``Arch.block`` or per run ``Blocks.block``):

* ``metaformer`` - ``x = rs(x) + ls(mixer(norm(x)))`` then ``x = rs(x) + ls(mlp(norm(x)))`` (MetaFormer).
* ``fused`` - one residual branch ``x + ls(mixer(norm(x)))``; the mixer carries its own channel MLP
  (EfficientMod's modulation blocks).
* ``casvit`` - CAS-ViT: ``x + local(x)``, ``x + mixer(norm(x))``, ``x + mlp(norm(x))`` with a
  local-integration convolution branch first.

Every block exposes its two halves, ``mixer_half(x)`` (the token-mixing residual steps) and ``mlp_half(x)`` (the
channel-MLP step; the identity where there is none), and its forward is ``mlp_half(mixer_half(x))``: token pruning
selects tokens between the two without re-typing the block.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ConvMlp, DropPath, Scale, SquaredReLU, make_norm
from .mixers import create_mixer
from .mixers.additive import LocalIntegration
from .registry import Registry

if TYPE_CHECKING:
    from .arch import Arch, Blocks

BLOCKS: Registry[Callable[..., nn.Module]] = Registry("block variant")
STEMS: Registry[Callable[..., nn.Module]] = Registry("stem")
DOWNSAMPLES: Registry[Callable[..., nn.Module]] = Registry("downsampling")
HEADS: Registry[Callable[..., nn.Module]] = Registry("head")


def _scale(dim: int, init: float | None) -> nn.Module:
    return nn.Identity() if init is None else Scale(dim, init)


def resolved_options(run: Blocks, arch: Arch) -> dict[str, Any]:
    """A run's norm, activation and MLP bias: its own where it sets them, else the architecture's."""
    return {
        "norm": run.norm or arch.norm,
        "act": run.act or arch.act,
        "mlp_bias": arch.mlp_bias if run.mlp_bias is None else run.mlp_bias,
    }


# ------------------------------------------------------------------------------------------------------- blocks


class MetaFormerBlock(nn.Module):
    """``x = rs1(x) + ls1(mixer(norm1(x)))``; ``x = rs2(x) + ls2(mlp(norm2(x)))`` (MLP omitted at ratio 0)."""

    def __init__(self, dim: int, run: Blocks, arch: Arch, index: int = 0, drop_path: float = 0.0):
        super().__init__()
        cfg = resolved_options(run, arch)
        self.norm1 = make_norm(cfg["norm"], dim, arch.norm_eps)
        self.mixer = create_mixer(run.mixer, dim, **run.block_args(index))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.layer_scale1 = _scale(dim, run.layer_scale)
        self.res_scale1 = _scale(dim, run.res_scale)
        self.has_mlp = run.mlp_ratio > 0
        if self.has_mlp:
            self.norm2 = make_norm(cfg["norm"], dim, arch.norm_eps)
            self.mlp = ConvMlp(dim, int(run.mlp_ratio * dim), cfg["act"], cfg["mlp_bias"])
            self.layer_scale2 = _scale(dim, run.layer_scale)
            self.res_scale2 = _scale(dim, run.res_scale)

    def mixer_half(self, x: torch.Tensor) -> torch.Tensor:
        """``rs1(x) + ls1(mixer(norm1(x)))``: the token-mixing step."""
        return self.res_scale1(x) + self.layer_scale1(self.drop_path(self.mixer(self.norm1(x))))

    def mlp_half(self, x: torch.Tensor) -> torch.Tensor:
        """``rs2(x) + ls2(mlp(norm2(x)))``, or ``x`` without an MLP."""
        if not self.has_mlp:
            return x
        return self.res_scale2(x) + self.layer_scale2(self.drop_path(self.mlp(self.norm2(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp_half(self.mixer_half(x))


class FusedBlock(nn.Module):
    """``x = rs(x) + ls(mixer(norm(x)))``: a single branch whose mixer also mixes channels (EfficientMod)."""

    def __init__(self, dim: int, run: Blocks, arch: Arch, index: int = 0, drop_path: float = 0.0):
        super().__init__()
        cfg = resolved_options(run, arch)
        self.norm = make_norm(cfg["norm"], dim, arch.norm_eps)
        self.mixer = create_mixer(run.mixer, dim, **run.block_args(index))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.layer_scale = _scale(dim, run.layer_scale)
        self.res_scale = _scale(dim, run.res_scale)

    def mixer_half(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_scale(x) + self.layer_scale(self.drop_path(self.mixer(self.norm(x))))

    def mlp_half(self, x: torch.Tensor) -> torch.Tensor:
        return x  # the mixer mixes channels too: there is no separate MLP step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp_half(self.mixer_half(x))


class CASViTBlock(nn.Module):
    """CAS-ViT's block: a local-integration conv branch, then the mixer and the MLP, each residual."""

    def __init__(self, dim: int, run: Blocks, arch: Arch, index: int = 0, drop_path: float = 0.0):
        super().__init__()
        cfg = resolved_options(run, arch)
        self.local = LocalIntegration(dim, act=cfg["act"], norm=cfg["norm"])
        self.norm1 = make_norm(cfg["norm"], dim, arch.norm_eps)
        self.mixer = create_mixer(run.mixer, dim, **run.block_args(index))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.layer_scale1 = _scale(dim, run.layer_scale)
        self.has_mlp = run.mlp_ratio > 0
        if self.has_mlp:
            self.norm2 = make_norm(cfg["norm"], dim, arch.norm_eps)
            self.mlp = ConvMlp(dim, int(run.mlp_ratio * dim), cfg["act"], cfg["mlp_bias"])
            self.layer_scale2 = _scale(dim, run.layer_scale)

    def mixer_half(self, x: torch.Tensor) -> torch.Tensor:
        """The local-integration step, then the mixer's."""
        x = x + self.local(x)
        return x + self.layer_scale1(self.drop_path(self.mixer(self.norm1(x))))

    def mlp_half(self, x: torch.Tensor) -> torch.Tensor:
        if not self.has_mlp:
            return x
        return x + self.layer_scale2(self.drop_path(self.mlp(self.norm2(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp_half(self.mixer_half(x))


BLOCKS.add("metaformer", MetaFormerBlock)
BLOCKS.add("fused", FusedBlock)
BLOCKS.add("casvit", CASViTBlock)


# -------------------------------------------------------------------------------------------- stems, downsampling


class ConvNorm(nn.Module):
    """A strided convolution with a norm before or after it."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, padding: int, norm: str, eps: float,
                 norm_first: bool, pad_to_stride: bool = False):
        super().__init__()
        self.norm_first = norm_first
        self.pad_to_stride = pad_to_stride  # kernel == stride convs drop odd rows; pad instead
        self.norm = make_norm(norm, cin if norm_first else cout, eps)
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_first:
            x = self.norm(x)
        if self.pad_to_stride:
            s = self.conv.stride[0]
            x = F.pad(x, (0, (-x.shape[-1]) % s, 0, (-x.shape[-2]) % s))
        x = self.conv(x)
        return x if self.norm_first else self.norm(x)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """``(H, W)`` this layer gives for an input of ``height x width`` (what ``forward`` computes)."""
        return _conv_size(self.conv, height, width, self.pad_to_stride)


class ConvStem(nn.Module):
    """Two 3x3 stride-2 convolutions (width/2 then width), each with norm and ReLU (CAS-ViT)."""

    def __init__(self, cin: int, cout: int, norm: str, eps: float):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout // 2, 3, 2, 1)
        self.norm1 = make_norm(norm, cout // 2, eps)
        self.conv2 = nn.Conv2d(cout // 2, cout, 3, 2, 1)
        self.norm2 = make_norm(norm, cout, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(x)))

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        return _conv_size(self.conv2, *_conv_size(self.conv1, height, width))


def _conv_size(conv: nn.Conv2d, height: int, width: int, pad_to_stride: bool = False) -> tuple[int, int]:
    """Output size of ``conv``: ``floor((n + 2 * padding - kernel) / stride) + 1`` per axis, after padding the input
    to a multiple of the stride when ``pad_to_stride``."""
    out = []
    for n, k, s, p in zip((height, width), conv.kernel_size, conv.stride, conv.padding):
        n = n + (-n) % s if pad_to_stride else n
        out.append((n + 2 * p - k) // s + 1)
    return out[0], out[1]


# factory(in_chans, width, arch) -> module reducing the resolution by 4. A stem or downsampling layer may say what
# size it outputs (``output_size(height, width)``); ``model.stage_resolutions`` asks it, and runs it on the meta
# device when it does not.
STEMS.add("conv7_s4", lambda cin, cout, arch: ConvNorm(cin, cout, 7, 4, 2, arch.embed_norm, arch.norm_eps, False))
STEMS.add("conv7_s4_p3", lambda cin, cout, arch: ConvNorm(cin, cout, 7, 4, 3, arch.embed_norm, arch.norm_eps, False))
STEMS.add("patch4", lambda cin, cout, arch: ConvNorm(cin, cout, 4, 4, 0, arch.embed_norm, arch.norm_eps, False,
                                                     pad_to_stride=True))
STEMS.add("conv3x2", lambda cin, cout, arch: ConvStem(cin, cout, arch.embed_norm, arch.norm_eps))

# factory(in_width, out_width, arch) -> module halving the resolution
DOWNSAMPLES.add("norm_conv3", lambda cin, cout, arch: ConvNorm(cin, cout, 3, 2, 1, arch.embed_norm, arch.norm_eps,
                                                               True))
DOWNSAMPLES.add("conv3_norm", lambda cin, cout, arch: ConvNorm(cin, cout, 3, 2, 1, arch.embed_norm, arch.norm_eps,
                                                               False))
DOWNSAMPLES.add("norm_conv2", lambda cin, cout, arch: ConvNorm(cin, cout, 2, 2, 0, arch.embed_norm, arch.norm_eps,
                                                               True, pad_to_stride=True))


# --------------------------------------------------------------------------------------------------------- heads


class MlpHead(nn.Module):
    """MetaFormer's MLP classifier: linear (ratio 4), SquaredReLU, LayerNorm, dropout, linear."""

    classifier_names = ("fc2",)  # the layers that give the logits (timm's pretrained_cfg "classifier")

    def __init__(self, dim: int, num_classes: int, dropout: float = 0.0, ratio: float = 4.0):
        super().__init__()
        hidden = int(ratio * dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = SquaredReLU()
        self.norm = nn.LayerNorm(hidden, eps=1e-6)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.norm(self.act(self.fc1(x)))))


class LinearHead(nn.Sequential):
    """Dropout, then a linear classifier."""

    classifier_names = ("fc",)

    def __init__(self, dim: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(dim, num_classes)


class DistilledLinearHead(nn.Module):
    """Two linear classifiers, a class head and a distillation head (DeiT), whose logits are averaged.

    CAS-ViT is published with this head (its parameter counts include both); :meth:`forward_both` gives the two
    logits apart for a distillation loss.
    """

    classifier_names = ("fc", "fc_dist")

    def __init__(self, dim: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(dim, num_classes)
        self.fc_dist = nn.Linear(dim, num_classes)

    def forward_both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.drop(x)
        return self.fc(x), self.fc_dist(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls, dist = self.forward_both(x)
        return (cls + dist) / 2


# factory(features, num_classes, dropout) -> classifier on pooled, normalised features; a head class may name the
# layers that give the logits in ``classifier_names`` (timm's pretrained_cfg reads them)
HEADS.add("linear", LinearHead)
HEADS.add("linear_distill", DistilledLinearHead)
HEADS.add("mlp", MlpHead)

