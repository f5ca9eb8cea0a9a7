"""Layers shared by the mixers and the MetaFormer builder.

Everything works on channels-first tensors ``(B, C, H, W)`` and reads the channel count from the input, never
from a number stored at construction, so structured channel pruning can shrink any of them.
Norms and activations are looked up by name (``make_norm("layernorm_nobias", 64)``), which is how an
:class:`~searchspace.arch.Arch` refers to them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import MixerNASError
from .registry import Registry

# --------------------------------------------------------------------------------------------------- activations


class StarReLU(nn.Module):
    """``s * relu(x)**2 + b`` with learnable scalars ``s`` and ``b`` (MetaFormer Baselines)."""

    def __init__(self, scale: float = 1.0, bias: float = 0.0):
        super().__init__()
        self.scale = nn.Parameter(torch.full((1,), float(scale)))
        self.bias = nn.Parameter(torch.full((1,), float(bias)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.relu(x).square() + self.bias


class SquaredReLU(nn.Module):
    """``relu(x)**2`` (Primer); the activation of the MetaFormer MLP head."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


ACTIVATIONS: Registry[Callable[[], nn.Module]] = Registry("activation")
ACTIVATIONS.add("starrelu", StarReLU)
ACTIVATIONS.add("squaredrelu", SquaredReLU)
ACTIVATIONS.add("gelu", nn.GELU)
ACTIVATIONS.add("relu", nn.ReLU)
ACTIVATIONS.add("silu", nn.SiLU)
ACTIVATIONS.add("hardswish", nn.Hardswish)
ACTIVATIONS.add("identity", nn.Identity)


def make_act(name: str) -> nn.Module:
    """A fresh activation module by registered name (``starrelu``, ``gelu``, ``relu``, ...)."""
    return ACTIVATIONS.get(name)()


# --------------------------------------------------------------------------------------------------------- norms


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of each position of a ``(B, C, H, W)`` tensor."""

    def __init__(self, dim: int, eps: float = 1e-6, bias: bool = True):
        super().__init__(dim, eps=eps, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class GroupNorm1(nn.GroupNorm):
    """GroupNorm with one group: statistics over (C, H, W) of each sample, a per-channel affine."""

    def __init__(self, dim: int, eps: float = 1e-6, bias: bool = True):
        super().__init__(1, dim, eps=eps)
        if not bias:
            self.bias = None  # MetaFormer-v2 models have no norm bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, 1, self.weight, self.bias, self.eps)


def batch_norm2d(dim: int, eps: float = 1e-5, bias: bool = True) -> nn.BatchNorm2d:
    """``nn.BatchNorm2d`` with the (eps, bias) signature of the other norms; eps below 1e-5 is raised to 1e-5.

    A plain ``nn.BatchNorm2d``, not a subclass: torch.fx keeps ``torch.nn`` modules whole (a subclass would be
    traced into, and its input-rank check cannot run on a symbolic tensor) and torch-pruning knows it by type.
    """
    if not bias:
        raise MixerNASError("batchnorm always has a bias; use another norm for a bias-free model")
    return nn.BatchNorm2d(dim, eps=max(eps, 1e-5), affine=True)


def _identity_norm(dim: int, eps: float = 1e-6, bias: bool = True) -> nn.Module:
    return nn.Identity()


NORMS: Registry[Callable[..., nn.Module]] = Registry("norm")
NORMS.add("layernorm", lambda dim, eps=1e-6: LayerNorm2d(dim, eps, bias=True))
NORMS.add("layernorm_nobias", lambda dim, eps=1e-6: LayerNorm2d(dim, eps, bias=False))
NORMS.add("groupnorm", lambda dim, eps=1e-6: GroupNorm1(dim, eps, bias=True))
NORMS.add("groupnorm_nobias", lambda dim, eps=1e-6: GroupNorm1(dim, eps, bias=False))
NORMS.add("batchnorm", lambda dim, eps=1e-5: batch_norm2d(dim, eps))
NORMS.add("identity", lambda dim, eps=1e-6: nn.Identity())


def make_norm(name: str, dim: int, eps: float | None = None) -> nn.Module:
    """A channels-first norm by registered name; ``eps=None`` keeps the norm's own default."""
    factory = NORMS.get(name)
    return factory(dim) if eps is None else factory(dim, eps)


# -------------------------------------------------------------------------------------------------------- others


class Scale(nn.Module):
    """A learnable per-channel scale (layer-scale / res-scale); the broadcast shape comes from the input."""

    def __init__(self, dim: int, init: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a tuple sum, not *-unpacking: torch.fx can record ``(1, -1) + (1,) * (x.dim() - 2)`` but not iterate it
        return x * self.scale.view((1, -1) + (1,) * (x.dim() - 2))


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample while training."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class ConvMlp(nn.Module):
    """Two 1x1 convolutions with an activation between: the channel MLP of a MetaFormer block."""

    def __init__(self, dim: int, hidden: int, act: str = "starrelu", bias: bool = False, out: int | None = None):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1, bias=bias)
        self.act = make_act(act)
        self.fc2 = nn.Conv2d(hidden, out or dim, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))
