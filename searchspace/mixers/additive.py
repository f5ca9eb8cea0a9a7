"""CAS-ViT's convolutional additive token mixer, and the local-integration branch of the CAS-ViT block.

Additive attention replaces the N x N softmax of self-attention with gated sums: query and key each pass a spatial
gate and a channel gate, their sum is mixed by a depthwise convolution and multiplies the value. Cost is linear
in the number of tokens and there is no attention matrix, so it is not an ``attention=True`` mixer.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers import batch_norm2d, make_act, make_norm
from . import register_mixer


def _dwconv3x3(dim: int) -> nn.Conv2d:
    return nn.Conv2d(dim, dim, 3, padding=1, groups=dim)


class SpatialGate(nn.Module):
    """``x * sigmoid(sum_c score_c * relu(bn(dwconv3x3(x)))_c)``: one weight per position, shared by the channels.

    The weighted channel sum is CAS-ViT's 1x1 conv C->1 without bias, with the same C weights held as a ``(C,)``
    parameter: torch-pruning 1.6 couples the single output channel of a C->1 conv with the C channels it
    multiplies and cannot prune the mixer, while it prunes a ``(C,)`` parameter (an "unwrapped parameter", along
    its only dimension) together with the channels it weighs. A depthwise 1x1 conv would also prune correctly
    but runs about 60x slower than this sum on CPU (C=320, 14x14).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = _dwconv3x3(dim)
        self.norm = batch_norm2d(dim)
        self.act = nn.ReLU()
        bound = dim**-0.5  # the default init of the C->1 conv it replaces
        self.score = nn.Parameter(torch.empty(dim).uniform_(-bound, bound))

    def pruning_hints(self) -> dict:
        """``score`` is pruned along its only dimension, with the channels it weighs."""
        return {"unwrapped_parameters": [(self.score, 0)]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.norm(self.dwconv(x)))
        return x * torch.sigmoid((h * self.score.view(1, -1, 1, 1)).sum(dim=1, keepdim=True))


class ChannelGate(nn.Module):
    """``x * sigmoid(conv1x1_{C->C}(mean over positions of x))``: one weight per channel, shared by the positions."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc = nn.Conv2d(dim, dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc(x.mean(dim=(2, 3), keepdim=True)))


@register_mixer(
    "additive",
    description="CAS-ViT convolutional additive attention: dwconv(phi(q) + phi(k)) * v, linear in tokens",
    reference="CAS-ViT, Zhang et al., arXiv 2408.03703",
)
class AdditiveMixer(nn.Module):
    """CAS-ViT's convolutional additive token mixer (CATM).

    ``q, k, v`` are 1x1 convs C->C of x; ``phi(z) = channel_gate(spatial_gate(z))`` with separate gates for q and
    k; ``out = proj(dwc(phi(q) + phi(k)) * v)`` where ``dwc`` and ``proj`` are depthwise 3x3 convs with bias.
    Same parameters as CAS-ViT's ``AdditiveTokenMixer(dim)``: ``5*C*C + 46*C`` (+ ``3*C`` with ``qkv_bias``).
    CAS-ViT computes q, k, v with one conv C->3C and chunks it; three convs hold the same weights, and
    torch-pruning 1.6 mis-maps channel indices when the chunks feed several operations each.

    Args:
        dim: channels in and out.
        qkv_bias: bias on the qkv projection (CAS-ViT: none).

    Example::

        >>> m = AdditiveMixer(48)
        >>> m(torch.randn(2, 48, 7, 5)).shape
        torch.Size([2, 48, 7, 5])
    """

    def __init__(self, dim: int, qkv_bias: bool = False):
        super().__init__()
        self.q = nn.Conv2d(dim, dim, 1, bias=qkv_bias)
        self.k = nn.Conv2d(dim, dim, 1, bias=qkv_bias)
        self.v = nn.Conv2d(dim, dim, 1, bias=qkv_bias)
        self.q_gate = nn.Sequential(SpatialGate(dim), ChannelGate(dim))
        self.k_gate = nn.Sequential(SpatialGate(dim), ChannelGate(dim))
        self.dwc = _dwconv3x3(dim)
        self.proj = _dwconv3x3(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context = self.dwc(self.q_gate(self.q(x)) + self.k_gate(self.k(x)))
        return self.proj(context * self.v(x))


class LocalIntegration(nn.Module):
    """The first residual branch of a CAS-ViT block: 1x1 (C->mid), norm, depthwise 3x3, act, 1x1 (mid->C).

    ``mid = round(ratio * dim)``; every convolution has a bias. CAS-ViT uses ``ratio=1``, GELU and BatchNorm.
    Not a registered mixer: the CAS-ViT block builder uses it as ``x + local(x)`` before the token mixer.

    Example::

        >>> LocalIntegration(48)(torch.randn(1, 48, 7, 7)).shape
        torch.Size([1, 48, 7, 7])
    """

    def __init__(self, dim: int, ratio: float = 1.0, act: str = "gelu", norm: str = "batchnorm"):
        super().__init__()
        mid = round(ratio * dim)
        self.fc1 = nn.Conv2d(dim, mid, 1)
        self.norm = make_norm(norm, mid)
        self.dwconv = _dwconv3x3(mid)
        self.act = make_act(act)
        self.fc2 = nn.Conv2d(mid, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.dwconv(self.norm(self.fc1(x)))))
