"""Token reduction as pure tensor functions: scores, top-k, gather/scatter, EViT's fused token, ToMe's matching.

Tokens are ``(B, N, C)``; no function here knows a model, a block or a layout (:mod:`compress.tokens.wrappers`
runs them inside a model, :mod:`compress.adapters` says where).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "attention_received",
    "bipartite_matching",
    "class_attention",
    "fuse_tokens",
    "gather_tokens",
    "keep_count",
    "merge_tokens",
    "scatter_tokens",
    "split_qkv",
    "top_tokens",
]


def keep_count(n: int, rate: float) -> int:
    """Tokens kept of ``n`` at ``rate`` (at least one): ``ceil(rate * n)``.

    >>> keep_count(196, 0.7), keep_count(10, 1.0), keep_count(3, 0.01)
    (138, 10, 1)
    """
    return n if rate >= 1.0 else max(1, min(n, math.ceil(rate * n - 1e-9)))


def split_qkv(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys ``(B, heads, N, d)`` from a fused ``[q | k | v]`` output ``(B, N, 3 * heads * d)``."""
    b, n, width = qkv.shape
    q, k, _ = qkv.reshape(b, n, 3, heads, width // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k


def attention_received(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``(B, N)``: the attention each token receives, averaged over heads and queries (hierarchical models)."""
    attn = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)
    return attn.mean(dim=(1, 2))


def class_attention(q: torch.Tensor, k: torch.Tensor, prefix: int = 1) -> torch.Tensor:
    """``(B, N - prefix)``: the class token's (token 0) attention to every non-prefix token, averaged over heads."""
    attn = (q[:, :, :1] @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)
    return attn[:, :, 0, prefix:].mean(dim=1)


def top_tokens(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``(B, k)`` of the ``k`` highest scores, in their original (spatial) order."""
    return torch.topk(scores, k, dim=1, sorted=False).indices.sort(dim=1).values


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b]]`` for ``x`` ``(B, N, C)`` and ``index`` ``(B, K)``."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def scatter_tokens(full: torch.Tensor, index: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``full`` with rows ``index`` replaced by ``tokens`` (out of place, so gradients flow to both)."""
    return full.scatter(1, index.unsqueeze(-1).expand(-1, -1, full.shape[-1]), tokens)


def fuse_tokens(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``(B, 1, C)``: the ``weights``-weighted average of the tokens ``x`` ``(B, N, C)`` (EViT's fused token)."""
    w = weights.unsqueeze(-1)
    return (x * w).sum(dim=1, keepdim=True) / w.sum(dim=1, keepdim=True).clamp_min(1e-12)


def bipartite_matching(metric: torch.Tensor, r: int) -> tuple[torch.Tensor, int]:
    """ToMe's bipartite soft matching as an index map: ``(dest, n_out)``.

    Tokens alternate between sets A (even positions) and B (odd); each A token is paired with its most similar
    B token (cosine similarity of ``metric``), and the ``r`` best-matched A tokens merge into their partners.
    ``dest[b, i]`` is where token ``i`` goes among the ``n_out = N - r`` output tokens: the unmerged A tokens
    first, in order, then every B token. (Class tokens are left out of ``metric`` by the caller.)

    >>> dest, n = bipartite_matching(torch.tensor([[[1., 0], [1, 0], [0, 1], [0, 1]]]), 1)
    >>> dest.tolist(), n
    ([[1, 1, 0, 2]], 3)
    """
    b, n, _ = metric.shape
    r = max(0, min(r, n // 2))
    device = metric.device
    if r == 0:
        return torch.arange(n, device=device).expand(b, n), n
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    a, bb = metric[:, ::2], metric[:, 1::2]
    n_a, n_b = a.shape[1], bb.shape[1]
    best, partner = (a @ bb.transpose(-1, -2)).max(dim=-1)  # (B, n_a)
    order = best.argsort(dim=-1, descending=True, stable=True)
    merged = torch.zeros(b, n_a, dtype=torch.bool, device=device).scatter(1, order[:, :r], True)
    kept_rank = (~merged).long().cumsum(dim=1) - 1  # position of each unmerged A token among them
    n_kept_a = n_a - r
    dest_a = torch.where(merged, n_kept_a + partner, kept_rank)
    dest_b = (n_kept_a + torch.arange(n_b, device=device)).expand(b, n_b)
    dest = torch.empty(b, n, dtype=torch.long, device=device)
    dest[:, ::2], dest[:, 1::2] = dest_a, dest_b
    return dest, n - r


def merge_tokens(x: torch.Tensor, dest: torch.Tensor, n_out: int,
                 size: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average of the tokens ``x`` ``(B, N, C)`` sent to the same place by ``dest``; new sizes."""
    b, _, c = x.shape
    if size is None:
        size = x.new_ones(b, x.shape[1], 1)
    index = dest.unsqueeze(-1)
    total = x.new_zeros(b, n_out, c).scatter_add(1, index.expand(-1, -1, c), x * size)
    new_size = size.new_zeros(b, n_out, 1).scatter_add(1, index, size)
    return total / new_size, new_size
