"""Hadamard-product mixers: EfficientMod's modulation and HorNet's recursive gated convolution.

Both mix tokens by multiplying a cheap spatial "context" (a depthwise convolution) into a linear projection of the
input, elementwise. Channel counts are never stored: structured channel pruning (torch-pruning) may shrink any of
the convolutions and the forward still runs. The one stored size, modulation's expansion ``r``, is a ratio that
pruning keeps (a context channel and the ``r`` value channels it multiplies form one pruning group).
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

from ..errors import MixerNASError
from ..layers import ACTIVATIONS, make_act
from . import register_mixer
from .basic import odd_kernel_problem


def _positive_int_problem(name: str, value: object) -> str | None:
    """Why ``value`` is not a whole number >= 1 (an int, or a float such as 2.0 read from a file), or None."""
    whole = isinstance(value, numbers.Integral) or isinstance(value, float) and value.is_integer()
    if isinstance(value, bool) or not whole or value < 1:
        return f"{name} must be an integer >= 1, got {value!r}"
    return None


@register_mixer(
    "modulation",
    description="EfficientMod modulation: p(v(x) * g(act(dwconv(f(x))))), value widened r times",
    reference="EfficientMod, Ma et al., ICLR 2024 (arXiv 2403.19963)",
)
class Modulation(nn.Module):
    """EfficientMod's modulation, fused with the channel MLP as in its ``Mlp`` + ``ContextLayer``.

    ``context = g(act(dwconv(f(x))))`` (``f``, ``g`` 1x1 convs C->C, ``dwconv`` depthwise ``kernel_size``);
    ``value = fc1(x)`` (1x1, C->rC), followed by ``act`` only when ``r != 1`` (EfficientMod's ``expand_dim`` rule);
    ``out = fc2(value * context tiled r times along channels)`` (1x1, rC->C).
    The parameter count equals EfficientMod's ``Mlp`` with ``mlp_ratio = conv_group_dim = r``, and, as there,
    ``bias`` switches the biases of ``fc1``/``fc2`` only (``f``, ``g`` and ``dwconv`` always have one).
    Because it already contains the channel MLP, EfficientMod blocks have no separate MLP step.

    Args:
        dim: channels in and out.
        expansion: r, an integer >= 1; EfficientMod alternates r=1 and r=6 (r=4 in its xs model).
        kernel_size: side of the depthwise context convolution (odd).
        act: activation of the context branch and, when r > 1, of the value branch.
        bias: biases of the value and output projections.

    Example::

        >>> m = Modulation(64, expansion=6)
        >>> m(torch.randn(2, 64, 7, 9)).shape
        torch.Size([2, 64, 7, 9])
    """

    @staticmethod
    def check(dim: int, expansion: int = 1, kernel_size: int = 7, act: str = "gelu", **_) -> str | None:
        """Why these arguments cannot build the mixer, or None (architectures are validated with it)."""
        if problem := _positive_int_problem("expansion", expansion) or odd_kernel_problem("kernel_size", kernel_size):
            return problem
        if act not in ACTIVATIONS:
            return f"unknown activation {act!r}; known: {', '.join(ACTIVATIONS.names())}"
        return None

    def __init__(self, dim: int, expansion: int = 1, kernel_size: int = 7, act: str = "gelu", bias: bool = True):
        super().__init__()
        if problem := self.check(dim, expansion, kernel_size, act):
            raise MixerNASError(f"modulation: {problem}")
        self.expansion = expansion = int(expansion)
        self.f = nn.Conv2d(dim, dim, 1)
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.context_act = make_act(act)
        self.g = nn.Conv2d(dim, dim, 1)
        self.fc1 = nn.Conv2d(dim, expansion * dim, 1, bias=bias)
        # EfficientMod has no activation on the value when it is not widened.
        self.value_act = make_act(act) if expansion != 1 else nn.Identity()
        self.fc2 = nn.Conv2d(expansion * dim, dim, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context = self.g(self.context_act(self.dwconv(self.f(x))))
        value = self.value_act(self.fc1(x))
        if self.expansion > 1:
            # cat, not Tensor.repeat: torch-pruning maps cat indices (context channel j <-> value channels
            # j, C+j, ...) but treats repeat as elementwise and would prune mismatched channels. The stored
            # ratio, not one read from the tensors, keeps the forward traceable by torch.fx.
            context = torch.cat([context] * self.expansion, dim=1)
        return self.fc2(value * context)


@register_mixer(
    "hadamard",
    description="higher-order Hadamard mixer: HorNet's recursive gated convolution (g^n conv)",
    reference="HorNet, Rao et al., NeurIPS 2022 (arXiv 2207.14284)",
)
class RecursiveGatedConv(nn.Module):
    """HorNet's ``gnconv``: ``order`` nested elementwise products with depthwise-convolved gates.

    With ``dims = [C // 2**(n-1), ..., C // 2, C]`` for ``n = order``: ``p0 = proj_p(x)`` and gates
    ``q_k = scale * dws[k](proj_q[k](x))`` (1x1 convs C->dims[k], depthwise ``kernel_size`` convs);
    ``p1 = p0 * q0``, ``p{k+1} = pws[k-1](p{k}) * q{k}`` (1x1 convs dims[k-1]->dims[k]); out ``proj_out(p{n})``.
    Every convolution has a bias. HorNet computes ``proj_p`` and all ``proj_q`` with one 1x1 conv (C->2C) and all
    gates with one depthwise conv, then splits the result by channels; here they are separate convolutions
    (same parameters: equal to HorNet's ``gnconv(dim, order, s=scale)`` whenever ``2**(order-1)`` divides C,
    as in all HorNet widths) because torch-pruning 1.6 mis-maps channel indices through ``torch.split`` with
    more than two outputs and would prune mismatched channels. Each order is its own pruning group, and the
    forward reads every size from the tensors, so any pruning of those groups leaves the mixer runnable.

    Args:
        dim: channels in and out; at least ``2**(order-1)``.
        order: n, the number of recursive products (HorNet-T uses 2, 3, 4, 5 in its four stages).
        kernel_size: side of the depthwise convolutions (odd; HorNet uses 7).
        scale: factor on the gates (HorNet uses 1/3).

    Example::

        >>> m = RecursiveGatedConv(64, order=4)
        >>> m(torch.randn(1, 64, 5, 3)).shape
        torch.Size([1, 64, 5, 3])
    """

    @staticmethod
    def check(dim: int, order: int = 3, kernel_size: int = 7, **_) -> str | None:
        """Why these arguments cannot build the mixer, or None (architectures are validated with it)."""
        if problem := _positive_int_problem("order", order):
            return problem
        if dim < 2 ** (int(order) - 1):
            return f"order {int(order)} needs dim >= {2 ** (int(order) - 1)} channels, got {dim}"
        return odd_kernel_problem("kernel_size", kernel_size)

    def __init__(self, dim: int, order: int = 3, kernel_size: int = 7, scale: float = 1 / 3):
        super().__init__()
        if problem := self.check(dim, order, kernel_size):
            raise MixerNASError(f"hadamard: {problem}")
        order = int(order)
        dims = [dim // 2**i for i in reversed(range(order))]
        self.proj_p = nn.Conv2d(dim, dims[0], 1)
        self.proj_q = nn.ModuleList(nn.Conv2d(dim, d, 1) for d in dims)
        self.dws = nn.ModuleList(nn.Conv2d(d, d, kernel_size, padding=kernel_size // 2, groups=d) for d in dims)
        self.pws = nn.ModuleList(nn.Conv2d(dims[i], dims[i + 1], 1) for i in range(order - 1))
        self.proj_out = nn.Conv2d(dims[-1], dim, 1)
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = [dw(proj(x)) * self.scale for proj, dw in zip(self.proj_q, self.dws)]
        p = self.proj_p(x) * gates[0]
        for pw, gate in zip(self.pws, gates[1:]):
            p = pw(p) * gate
        return self.proj_out(p)

    def extra_repr(self) -> str:
        return f"order={len(self.dws)}, scale={self.scale:.4g}"
