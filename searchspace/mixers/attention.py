"""Token mixers that compute token-to-token attention weights.

* ``attention`` - full multi-head self-attention (CAFormer; also EfficientMod's attention blocks).
* ``strip_attention`` - S2AFormer-style strip self-attention: spatially reduced keys/values, channel-compressed
  queries/keys.
* ``gpsa`` - ConViT's gated positional self-attention, initialised to behave like a convolution.

All take and return ``(B, C, H, W)``. Each keeps a fixed head count (an attribute, or the length of a per-head
parameter) and reads channel counts and head widths from the input and the weight shapes in the forward, so
structured pruning of the projections leaves them runnable. What torch-pruning needs for each is in its docstring
under "Pruning" and returned by its ``pruning_hints()``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MixerNASError
from . import register_mixer
from .basic import cached_by_size


def head_layout(dim: int, head_dim: int = 32, num_heads: int = 0, min_head_dim: int = 0) -> tuple[int, int]:
    """``(num_heads, head_width)`` for ``dim`` channels.

    ``num_heads=0``: heads of ``head_dim`` channels, ``max(dim // head_dim, 1)`` of them (CAFormer, timm).
    ``num_heads > 0``: that many heads sharing ``dim`` (``dim // num_heads`` each, ViT convention; ``head_dim`` is
    not used). Either way the width is raised to at least ``min_head_dim``, so the attention width
    ``heads * head_width`` may exceed ``dim``. EfficientMod: ``num_heads=8, min_head_dim=32``.

    >>> head_layout(320), head_layout(64, num_heads=8, min_head_dim=32), head_layout(288, num_heads=8)
    ((10, 32), (8, 32), (8, 36))
    """
    if problem := _head_problem(dim, head_dim, num_heads, min_head_dim, need_divisible=False):
        raise MixerNASError(problem)
    if num_heads:
        return num_heads, max(dim // num_heads, min_head_dim, 1)
    return max(dim // head_dim, 1), max(head_dim, min_head_dim)


def _head_problem(dim: int, head_dim: int, num_heads: int, min_head_dim: int = 0,
                  need_divisible: bool = True) -> str | None:
    if head_dim < 1 or num_heads < 0 or min_head_dim < 0:
        return f"need head_dim >= 1, num_heads >= 0 and min_head_dim >= 0; got {head_dim}, {num_heads}, {min_head_dim}"
    if need_divisible and not num_heads and dim % head_dim:
        return f"width {dim} is not a multiple of head_dim {head_dim} (or give num_heads)"
    return None


@torch.fx.wrap  # a loop on a size read from the tensor: torch.fx records the call instead of tracing into it
def _heads_dividing(width: int, heads: int) -> int:
    """``heads``, or the largest smaller count that splits ``width`` evenly (after pruning that ignored the heads)."""
    heads = max(min(heads, width), 1)
    while width % heads:
        heads -= 1
    return heads


def _to_tokens(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, N, C)`` as a view (no copy); ``nn.Linear`` reads the transposed layout directly."""
    return x.flatten(2).transpose(1, 2)


def _from_tokens(t: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(B, N, C)`` -> ``(B, C, H, W)`` as a view: the result is channels-last in memory, which every op accepts."""
    return t.transpose(1, 2).unflatten(2, (height, width))


# --------------------------------------------------------------------------------------------- full attention


@register_mixer(
    "attention",
    description="full multi-head self-attention, head width 32, no positional encoding (CAFormer)",
    reference="Vaswani et al. 2017; CAFormer in Yu et al., MetaFormer Baselines for Vision (arXiv 2210.13452)",
    attention=True,
)
class Attention(nn.Module):
    """Multi-head self-attention over all ``H*W`` tokens, as in CAFormer (MetaFormer Baselines, arXiv 2210.13452).

    Same parameters, names and output as timm's ``metaformer.Attention(dim)`` (``qkv`` and ``proj`` linear layers,
    no biases by default). EfficientMod's attention (Ma et al., ICLR 2024) is
    ``Attention(dim, num_heads=8, min_head_dim=32, proj_bias=True)``: 8 heads of ``max(dim // 8, 32)`` channels,
    so the attention width may differ from ``dim`` (see :func:`head_layout`).

    The forward keeps the head count ``num_heads`` and reads the head width from ``qkv``'s output width.

    Pruning (torch-pruning): pass ``num_heads={mixer.qkv: mixer.num_heads}`` (:meth:`pruning_hints`). Pruning head
    widths (torch-pruning's default, ``prune_head_dims=True``) needs nothing else. After removing whole heads
    (``prune_num_heads=True``) set ``mixer.num_heads = pruner.num_heads[mixer.qkv]``, as for timm's attention.
    Without ``num_heads`` torch-pruning treats ``qkv``'s output as plain channels: the result runs (the heads are
    regrouped) but no longer computes the same attention.

    >>> mixer = Attention(64)
    >>> mixer(torch.randn(2, 64, 5, 3)).shape, mixer.num_heads
    (torch.Size([2, 64, 5, 3]), 2)
    """

    @staticmethod
    def check(dim: int, head_dim: int = 32, num_heads: int = 0, min_head_dim: int = 0, **_) -> str | None:
        """Why these arguments cannot build the mixer, or None: with heads derived from ``head_dim``, the width
        must be a multiple of it (as timm requires; architectures are validated with this)."""
        return _head_problem(dim, head_dim, num_heads, min_head_dim)

    def __init__(self, dim: int, head_dim: int = 32, num_heads: int = 0, min_head_dim: int = 0,
                 qkv_bias: bool = False, proj_bias: bool = False):
        super().__init__()
        if problem := self.check(dim, head_dim, num_heads, min_head_dim):
            raise MixerNASError(f"attention: {problem}")
        self.num_heads, hd = head_layout(dim, head_dim, num_heads, min_head_dim)
        self.qkv = nn.Linear(dim, 3 * self.num_heads * hd, bias=qkv_bias)
        self.proj = nn.Linear(self.num_heads * hd, dim, bias=proj_bias)

    @property
    def head_dim(self) -> int:
        return self.qkv.out_features // (3 * self.num_heads)

    def pruning_hints(self) -> dict:
        """Keyword arguments torch-pruning's ``MetaPruner`` needs for this module (merge them across modules)."""
        return {"num_heads": {self.qkv: self.num_heads}}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        qkv = self.qkv(_to_tokens(x))
        width = qkv.shape[-1] // 3
        heads = _heads_dividing(width, self.num_heads)
        q, k, v = qkv.reshape(b, h * w, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(b, h * w, width)
        return _from_tokens(self.proj(out), h, w)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}"


# -------------------------------------------------------------------------------------------- strip attention


@register_mixer(
    "strip_attention",
    description="S2AFormer-style strip self-attention: strided depthwise-reduced keys/values, "
                "channel-compressed queries/keys",
    reference="Xu et al., S2AFormer: Strip Self-Attention for Efficient Vision Transformer (arXiv 2505.22195); "
              "S2AFormer-style, unverified details",
    attention=True,
)
class StripAttention(nn.Module):
    """S2AFormer-style strip self-attention (Xu et al., arXiv 2505.22195). Unverified details, see below.

    What the paper states: keys and values are spatially reduced by a strided depthwise convolution, queries and
    keys are compressed in channels by 1x1 convolutions to ``c'`` (much smaller than ``C``), values keep their
    width, and the output is projected back to ``C``. No public code exists; these choices are ours:

    * reduction: depthwise ``sr_ratio x sr_ratio`` conv with stride ``sr_ratio`` (with bias), after zero-padding
      the bottom/right edge up to a multiple of ``sr_ratio``, so ``ceil(H/sr) x ceil(W/sr)`` keys (at least one,
      even at 1x1); ``sr_ratio=1`` skips it. No norm after the reduction.
    * ``c' = qk_dim``, or ``round(qk_ratio * C)`` when ``qk_dim=0``, rounded up to a multiple of ``num_heads``.
    * one head by default; with ``num_heads > 1`` queries/keys and values are split into that many heads.
    * 1x1 convs without bias for q, k, v; the output projection has a bias.

    Pruning (torch-pruning): pass ``ignored_layers=[mixer.q, mixer.k]`` (:meth:`pruning_hints`). torch-pruning
    treats ``scaled_dot_product_attention`` as elementwise and would align the ``c'`` query/key channels with the
    ``C`` value channels, which fails; with ``q``/``k`` ignored the mixer's input and output channels prune and
    the inner widths stay. The head count is stored; widths are read from the weights.

    >>> StripAttention(64, sr_ratio=4)(torch.randn(2, 64, 1, 1)).shape
    torch.Size([2, 64, 1, 1])
    """

    @staticmethod
    def check(dim: int, sr_ratio: int = 2, qk_ratio: float = 0.25, qk_dim: int = 0, num_heads: int = 1,
              **_) -> str | None:
        """Why these arguments cannot build the mixer, or None (architectures are validated with it)."""
        if sr_ratio < 1 or num_heads < 1 or qk_dim < 0 or qk_ratio <= 0:
            return (f"need sr_ratio >= 1, num_heads >= 1, qk_dim >= 0 and qk_ratio > 0; got {sr_ratio}, {num_heads}, "
                    f"{qk_dim}, {qk_ratio}")
        if dim % num_heads:
            return f"width {dim} is not a multiple of num_heads {num_heads}"
        return None

    def __init__(self, dim: int, sr_ratio: int = 2, qk_ratio: float = 0.25, qk_dim: int = 0, num_heads: int = 1,
                 qkv_bias: bool = False, proj_bias: bool = True):
        super().__init__()
        if problem := self.check(dim, sr_ratio, qk_ratio, qk_dim, num_heads):
            raise MixerNASError(f"strip_attention: {problem}")
        qk = qk_dim or max(round(qk_ratio * dim), 1)
        qk = -(-qk // num_heads) * num_heads
        self.num_heads = num_heads
        self.sr_ratio = sr_ratio
        self.q = nn.Conv2d(dim, qk, 1, bias=qkv_bias)
        self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio, groups=dim) if sr_ratio > 1 else nn.Identity()
        self.k = nn.Conv2d(dim, qk, 1, bias=qkv_bias)
        self.v = nn.Conv2d(dim, dim, 1, bias=qkv_bias)
        self.proj = nn.Conv2d(dim, dim, 1, bias=proj_bias)

    def pruning_hints(self) -> dict:
        """Keyword arguments torch-pruning's ``MetaPruner`` needs for this module (merge them across modules)."""
        return {"ignored_layers": [self.q, self.k]}

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """``(B, c, h, w)`` -> ``(B, heads, h*w, c // heads)``."""
        b, c, h, w = t.shape
        return t.view(b, self.num_heads, c // self.num_heads, h * w).transpose(-1, -2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        reduced = x
        s = self.sr_ratio
        if s > 1:
            # padding by zero rows is a copy, not a branch on the size, so torch.fx can trace it
            reduced = self.sr(F.pad(reduced, (0, -w % s, 0, -h % s)))
        q, k, v = self._heads(self.q(x)), self._heads(self.k(reduced)), self._heads(self.v(reduced))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, H*W, C_v // heads)
        out = out.transpose(-1, -2).reshape(b, -1, h, w)
        return self.proj(out)

    def extra_repr(self) -> str:
        return f"sr_ratio={self.sr_ratio}, num_heads={self.num_heads}"


# ----------------------------------------------------------------------------------------------------- GPSA


def relative_offsets(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """``(N, N, 3)`` features ``(dx, dy, dx^2 + dy^2)`` from query token ``i`` to key token ``j`` (row-major grid).

    ``dx`` is the column offset of the key minus that of the query, ``dy`` the row offset (ConViT's convention).

    >>> relative_offsets(1, 2)[0, 1].tolist()
    [1.0, 0.0, 1.0]
    """
    rows = torch.arange(height, device=device, dtype=dtype).repeat_interleave(width)
    cols = torch.arange(width, device=device, dtype=dtype).repeat(height)
    dx = cols.unsqueeze(0) - cols.unsqueeze(1)
    dy = rows.unsqueeze(0) - rows.unsqueeze(1)
    return torch.stack((dx, dy, dx * dx + dy * dy), dim=-1)


_LOGIT_FLOOR = 50.0  # positional logits are clamped to (row max - this): exp(-50) ~ 2e-22, far from subnormal


def conv_offsets(num_heads: int) -> list[tuple[int, int]]:
    """One ``(dx, dy)`` offset per head: the ``num_heads`` grid points nearest the centre (a 3x3 kernel for 9).

    >>> conv_offsets(5)
    [(0, 0), (1, 0), (0, 1), (-1, 0), (0, -1)]
    """
    r = math.isqrt(num_heads) + 1
    grid = [(dx, dy) for dx in range(-r, r + 1) for dy in range(-r, r + 1)]
    grid.sort(key=lambda o: (o[0] ** 2 + o[1] ** 2, math.atan2(o[1], o[0]) % (2 * math.pi)))
    return grid[:num_heads]


@register_mixer(
    "gpsa",
    description="gated positional self-attention, initialised as a convolution (ConViT)",
    reference="d'Ascoli et al., ConViT: Improving Vision Transformers with Soft Convolutional Inductive Biases "
              "(ICML 2021, arXiv 2103.10697)",
    attention=True,
)
class GPSA(nn.Module):
    """ConViT's gated positional self-attention (d'Ascoli et al., ICML 2021, arXiv 2103.10697).

    Per head ``attn = (1 - sigmoid(l)) * softmax(q k^T / sqrt(d)) + sigmoid(l) * softmax(pos)``, where ``pos`` is a
    learned per-head linear map (``pos_weight``, heads x 3) of the relative offsets ``(dx, dy, dx^2 + dy^2)``
    between tokens and ``l`` is the per-head ``gating_param``. Both softmaxes have rows summing to one and the
    gates sum to one, so the mixture is already row-normalised (ConViT's explicit renormalisation is a no-op and
    is left out). The content part runs through ``scaled_dot_product_attention``:
    ``out = (1 - g) * sdpa(q, k, v) + g * softmax(pos) @ v``.

    Offsets are rebuilt from ``(H, W)`` in the forward with tensor ops, so any size and ``torch.export`` work.
    Like ConViT, ``qk``/``v`` have no bias, ``proj`` has one and ``gating_param`` starts at 1. Unlike ConViT, the
    positional map has no bias (it would add one constant to a whole softmax row and never get a gradient) and is a
    plain parameter rather than an ``nn.Linear``, so model-wide initialisers of linear layers leave the local init
    alone and torch-pruning does not take its head dimension for channels.

    Local init (``local_init=True``, ConViT's): ``v`` is the identity and head ``i`` has positional logits
    ``-locality_strength * |(dx, dy) - c_i|^2`` (up to a constant per row) with ``c_i = conv_offsets(heads)[i]``,
    so it attends mostly to the token at offset ``c_i``: at initialisation the layer acts like a convolution with
    one tap per head. ConViT uses a ``floor(sqrt(heads))`` square grid and leaves extra heads random; here every
    head gets the next-nearest offset. :meth:`init_weights` re-applies all of it, e.g. after a model-wide
    re-initialisation has overwritten ``v``.

    Pruning (torch-pruning): nothing to pass. The mixer's input and output channels prune; torch-pruning leaves
    ``qk``/``v`` whole because their group contains ``gating_param`` (one entry per head). The head count is
    ``gating_param``'s length and the head widths are read from ``qk`` and ``v``, so a pruner that shrinks head
    widths (equally in both halves of ``qk`` and in ``v``) keeps it runnable; removing whole heads is not supported.

    >>> mixer = GPSA(64)
    >>> mixer(torch.randn(2, 64, 5, 3)).shape, mixer.num_heads
    (torch.Size([2, 64, 5, 3]), 2)
    """

    @staticmethod
    def check(dim: int, head_dim: int = 32, num_heads: int = 0, **_) -> str | None:
        """Why these arguments cannot build the mixer, or None: the heads must split the width evenly."""
        if problem := _head_problem(dim, head_dim, num_heads):
            return problem
        if num_heads and dim % num_heads:
            return f"width {dim} is not a multiple of num_heads {num_heads}"
        return None

    def __init__(self, dim: int, head_dim: int = 32, num_heads: int = 0, qkv_bias: bool = False,
                 proj_bias: bool = True, locality_strength: float = 1.0, local_init: bool = True):
        super().__init__()
        if problem := self.check(dim, head_dim, num_heads):
            raise MixerNASError(f"gpsa: {problem}")
        heads, hd = head_layout(dim, head_dim, num_heads)
        self.locality_strength = float(locality_strength)
        self.local_init = bool(local_init)
        self.qk = nn.Linear(dim, 2 * heads * hd, bias=qkv_bias)
        self.v = nn.Linear(dim, heads * hd, bias=qkv_bias)
        self.proj = nn.Linear(heads * hd, dim, bias=proj_bias)
        self.pos_weight = nn.Parameter(torch.zeros(heads, 3))
        self.gating_param = nn.Parameter(torch.ones(heads))
        self._offset_cache: dict[tuple, torch.Tensor] = {}
        self.init_weights()

    @property
    def num_heads(self) -> int:
        return self.gating_param.shape[0]

    def pruning_hints(self) -> dict:
        """Keyword arguments torch-pruning's ``MetaPruner`` needs for this module: none."""
        return {}

    @torch.no_grad()
    def init_weights(self) -> None:
        """ConViT's initialisation: truncated-normal linears, zero biases, then the local (convolution-like) init."""
        for m in (self.qk, self.v, self.proj):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_weight, std=0.02)
        self.gating_param.fill_(1.0)
        if not self.local_init:
            return
        n = min(self.v.out_features, self.v.in_features)
        self.v.weight.zero_()
        self.v.weight[:n, :n] = torch.eye(n)
        offsets = torch.tensor(conv_offsets(self.num_heads), dtype=self.pos_weight.dtype)
        # -a * ((dx - cx)^2 + (dy - cy)^2) = a * (2 cx dx + 2 cy dy - (dx^2 + dy^2)) + const: a linear map of features
        weight = torch.cat((2 * offsets, -torch.ones(len(offsets), 1)), dim=1)
        self.pos_weight.copy_(self.locality_strength * weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        n = h * w
        heads = self.gating_param.shape[0]
        t = _to_tokens(x)
        q, k = self.qk(t).reshape(b, n, 2, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        v = self.v(t).reshape(b, n, heads, -1).transpose(1, 2)  # (B, heads, N, d_v)
        content = F.scaled_dot_product_attention(q, k, v)
        # (heads, 3) @ (3, N*N): the logits land in (heads, N, N) order, contiguous for the softmax
        logits = torch.matmul(self.pos_weight, self._offsets(h, w, x.device, x.dtype)).view(heads, n, n)
        # Far tokens get logits hundreds below the row maximum; their exp() would be subnormal floats, which make
        # the softmax and the matmul below several times slower on x86 CPUs. Their weight is ~0 either way.
        logits = torch.maximum(logits, logits.detach().amax(dim=-1, keepdim=True) - _LOGIT_FLOOR)
        positional = logits.softmax(dim=-1)
        gate = torch.sigmoid(self.gating_param).view(1, heads, 1, 1)
        out = torch.lerp(content, torch.matmul(positional, v), gate)
        out = out.transpose(1, 2).reshape(b, n, -1)
        return _from_tokens(self.proj(out), h, w)

    def _offsets(self, height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``relative_offsets`` as a ``(3, N*N)`` matrix, cached per size outside the state dict."""
        return cached_by_size(self._offset_cache, height, width, device, dtype,
                              lambda h, w: relative_offsets(h, w, device, dtype).view(-1, 3).t().contiguous())

    def __getstate__(self):  # the cache is derived data: keep it out of pickles and deep copies
        state = self.__dict__.copy()
        state["_offset_cache"] = {}
        return state

    def extra_repr(self) -> str:
        return f"locality_strength={self.locality_strength}"
