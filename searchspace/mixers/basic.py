"""The MetaFormer Baselines mixers: identity, pooling, separable convolution and frozen random mixing.

Yu et al., "MetaFormer Baselines for Vision" (arXiv 2210.13452) and "MetaFormer Is Actually What You Need for
Vision" (PoolFormer, arXiv 2111.11418). Parameter names follow timm's ``metaformer.py`` (``pool``, ``pwconv1``,
``dwconv``, ...) so timm's mixer weights load by name.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

import torch
from torch import nn

from ..errors import MixerNASError
from ..layers import ACTIVATIONS, make_act
from . import register_mixer

METAFORMER_V2 = "Yu et al., MetaFormer Baselines for Vision (arXiv 2210.13452)"


def odd_kernel_problem(name: str, size: int) -> str | None:
    """Why ``size`` cannot be the side of a same-size convolution or pooling window, or None."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % 2 == 0:
        return f"{name} must be a positive odd integer, got {size!r} (so the output keeps the input size)"
    return None


def cacheable_size(height: int, width: int) -> bool:
    """Whether a tensor derived from ``(height, width)`` may be cached: only for concrete sizes in eager mode.

    Under torch.fx the sizes are proxies, under torch.compile and torch.export the tensors are fake (and the sizes
    may be symbolic); such tensors are computed in the graph and must never enter a cache.
    """
    return type(height) is int and type(width) is int and not torch.compiler.is_compiling()


def cached_by_size(cache: dict, height, width, device: torch.device, dtype: torch.dtype,
                   make: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """``make(height, width)``, kept in ``cache`` per size, device, dtype and inference mode where that is safe.

    Under ``torch.jit.trace`` the sizes arrive as tensors. A tensor the cache already holds (the module ran once
    at this size, as the runtimes' adapters make sure) is returned as it is, so the traced graph holds it as a
    constant; otherwise the graph computes it from the traced sizes, as under ``torch.export``, on every call,
    which OpenVINO, converting traced models, timed as part of each inference.
    """
    if torch.jit.is_tracing():
        key = (int(height), int(width), device, dtype, torch.is_inference_mode_enabled())
        return cache[key] if key in cache else make(height, width)
    if not cacheable_size(height, width):
        return make(height, width)
    key = (height, width, device, dtype, torch.is_inference_mode_enabled())  # inference tensors: no autograd
    value = cache.get(key)
    if value is None:
        value = cache[key] = make(height, width)
    return value


@register_mixer(
    "identity",
    description="returns its input (IdentityFormer); no parameters",
    reference=METAFORMER_V2,
)
class IdentityMixer(nn.Module):
    """No token mixing at all: the IdentityFormer baseline of MetaFormer Baselines (arXiv 2210.13452).

    >>> IdentityMixer(64)(torch.ones(1, 64, 5, 3)).shape
    torch.Size([1, 64, 5, 3])
    """

    def __init__(self, dim: int):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@register_mixer(
    "pooling",
    description="average pooling (padding not counted) minus the input (PoolFormer)",
    reference="Yu et al., MetaFormer Is Actually What You Need for Vision (PoolFormer, arXiv 2111.11418)",
)
class Pooling(nn.Module):
    """PoolFormer's mixer ``avgpool(x) - x`` (arXiv 2111.11418); same output as timm's ``metaformer.Pooling``.

    The input is subtracted because the block adds it back through its residual connection.

    >>> Pooling(64)(torch.ones(1, 64, 7, 7)).abs().max().item()
    0.0
    """

    @staticmethod
    def check(dim: int, pool_size: int = 3, **_) -> str | None:
        """Why these arguments cannot build the mixer, or None (architectures are validated with it)."""
        return odd_kernel_problem("pool_size", pool_size)

    def __init__(self, dim: int, pool_size: int = 3):
        super().__init__()
        if problem := self.check(dim, pool_size):
            raise MixerNASError(f"pooling: {problem}")
        self.pool = nn.AvgPool2d(pool_size, stride=1, padding=pool_size // 2, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x) - x


@register_mixer(
    "sepconv",
    description="inverted separable conv: 1x1 to 2C, StarReLU, depthwise 7x7, 1x1 back (ConvFormer)",
    reference=METAFORMER_V2,
)
class SepConv(nn.Module):
    """ConvFormer's inverted separable convolution (MetaFormer Baselines, arXiv 2210.13452; MobileNetV2).

    Pointwise ``C -> expansion*C``, activation, depthwise ``kernel_size`` conv, pointwise back to ``C``. With the
    defaults it has exactly the parameters of timm's ``metaformer.SepConv(dim)`` under the same names.

    >>> sum(p.numel() for p in SepConv(64).parameters())
    22658
    """

    @staticmethod
    def check(dim: int, expansion: float = 2.0, kernel_size: int = 7, act: str = "starrelu", **_) -> str | None:
        """Why these arguments cannot build the mixer, or None (architectures are validated with it)."""
        if int(expansion * dim) < 1:
            return f"expansion * dim must give at least one hidden channel, got {expansion} * {dim}"
        if act not in ACTIVATIONS:
            return f"unknown activation {act!r}; known: {', '.join(ACTIVATIONS.names())}"
        return odd_kernel_problem("kernel_size", kernel_size)

    def __init__(self, dim: int, expansion: float = 2.0, kernel_size: int = 7, act: str = "starrelu",
                 bias: bool = False):
        super().__init__()
        if problem := self.check(dim, expansion, kernel_size, act):
            raise MixerNASError(f"sepconv: {problem}")
        hidden = int(expansion * dim)
        self.pwconv1 = nn.Conv2d(dim, hidden, 1, bias=bias)
        self.act1 = make_act(act)
        self.dwconv = nn.Conv2d(hidden, hidden, kernel_size, padding=kernel_size // 2, groups=hidden, bias=bias)
        self.pwconv2 = nn.Conv2d(hidden, dim, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pwconv2(self.dwconv(self.act1(self.pwconv1(x))))


# ------------------------------------------------------------------------------------------------ random mixing

_MASK32 = 0xFFFFFFFF
_HASH_MUL = 0x45D9F3B  # below 2**27, so a 32-bit value times it stays inside int64 without overflow


def _mix32(x):
    """A 32-bit integer hash (xor-shift-multiply); works on Python ints and on int64 tensors alike."""
    x = (((x >> 16) ^ x) * _HASH_MUL) & _MASK32
    x = (((x >> 16) ^ x) * _HASH_MUL) & _MASK32
    return (x >> 16) ^ x


def random_mixing_matrix(height: int, width: int, seed: int = 0, device=None) -> torch.Tensor:
    """The frozen ``(N, N)`` token-mixing matrix of RandFormer for an ``height x width`` grid, ``N = height*width``.

    Each row is the softmax of uniform noise in [0, 1), as in the paper. The noise is a counter-based hash of
    ``(seed, height, width, row, column)`` computed with plain tensor ops: the same arguments give the same matrix
    on every device and in every process, without a random generator, so the mixer also traces under
    ``torch.export``.

    >>> m = random_mixing_matrix(3, 5, seed=1)
    >>> m.shape, bool(torch.allclose(m.sum(-1), torch.ones(15)))
    (torch.Size([15, 15]), True)
    """
    n = height * width
    key = _mix32(_mix32(_mix32(seed & _MASK32) ^ (height & _MASK32)) ^ (width & _MASK32))
    counter = torch.arange(n * n, device=device, dtype=torch.int64)
    bits = _mix32(_mix32((counter + key) & _MASK32) ^ key)
    noise = (bits >> 8).to(torch.float32) * (1.0 / (1 << 24))  # 24 random bits -> exact floats in [0, 1)
    return noise.view(n, n).softmax(dim=-1)


@register_mixer(
    "random",
    description="a frozen row-softmax random N x N token-mixing matrix, regenerated per input size (RandFormer)",
    reference=METAFORMER_V2,
)
class RandomMixing(nn.Module):
    """RandFormer's frozen random token mixing (MetaFormer Baselines, arXiv 2210.13452).

    The paper stores one fixed ``N x N`` matrix for 224x224 inputs. Here the matrix is a deterministic function of
    ``(seed, H, W)`` (:func:`random_mixing_matrix`), so any input size works. Matrices are cached per
    ``(H, W, device, dtype)`` outside the parameters and the state dict; nothing here is trainable.
    Under ``torch.compile`` and ``torch.export`` the matrix is computed in the graph, cached or not; under
    ``torch.jit.trace`` a matrix the mixer already holds for that size is a constant (:func:`cached_by_size`).

    >>> mixer = RandomMixing(64)
    >>> x = torch.randn(2, 64, 5, 3)
    >>> bool(torch.equal(mixer(x), RandomMixing(64)(x))), len(list(mixer.parameters()))
    (True, 0)
    """

    @staticmethod
    def check(dim: int, seed: int = 0, **_) -> str | None:
        """Why these arguments cannot build the mixer, or None (architectures are validated with it)."""
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            return f"seed must be an integer, got {seed!r}"
        return None

    def __init__(self, dim: int, seed: int = 0):
        super().__init__()
        if problem := self.check(dim, seed):
            raise MixerNASError(f"random: {problem}")
        self.seed = int(seed)
        self._cache: dict[tuple, torch.Tensor] = {}

    def mixing_matrix(self, height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
        """The ``(N, N)`` matrix applied as ``out[:, :, i] = sum_j M[i, j] * x[:, :, j]`` over flattened tokens."""
        return self._transposed(height, width, torch.device(device or "cpu"), dtype).t()

    def _transposed(self, height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        return cached_by_size(self._cache, height, width, device, dtype,
                              lambda h, w: random_mixing_matrix(h, w, self.seed, device).t().contiguous().to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        return torch.matmul(x.flatten(2), self._transposed(h, w, x.device, x.dtype)).unflatten(2, (h, w))

    def extra_repr(self) -> str:
        return f"seed={self.seed}"

    def __getstate__(self):  # the cache is derived data: keep it out of pickles and deep copies
        state = self.__dict__.copy()
        state["_cache"] = {}
        return state
