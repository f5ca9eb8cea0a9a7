"""The integration: block sequences that reduce tokens as they run, and the keep-rate schedule.

:class:`TokenSequence` is an ``nn.Sequential`` of the same blocks under the same names (the state dict does not
change) that replaces a block sequence of the model; :class:`TokenPruning` (EViT) and :class:`TokenMerging` (ToMe)
run the pure functions of :mod:`compress.tokens.ops` between its blocks. Where the sequences are and how a block
splits into its attention and MLP halves come from :mod:`compress.adapters`; placing them in a model is
:func:`compress.steps.tokens.apply_token_pruning` / ``apply_token_merging``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..adapters import split_block
from .ops import (
    attention_received,
    bipartite_matching,
    class_attention,
    fuse_tokens,
    gather_tokens,
    keep_count,
    merge_tokens,
    scatter_tokens,
    split_qkv,
    top_tokens,
)

__all__ = ["KeepSchedule", "TokenMerging", "TokenPruning", "TokenSequence"]


@dataclass
class KeepSchedule:
    """A keep rate, optionally warmed up linearly from 1 over ``warmup_steps`` training steps (EViT).

    >>> s = KeepSchedule(0.7, warmup_steps=10); s.set_step(5); round(s.rate(), 2)
    0.85
    """

    target: float
    warmup_steps: int = 0
    step: int = 0

    def rate(self) -> float:
        if self.warmup_steps <= 0 or self.step >= self.warmup_steps:
            return self.target
        return 1.0 - (1.0 - self.target) * self.step / self.warmup_steps

    def set_step(self, step: int) -> None:
        self.step = int(step)

    def advance(self, steps: int = 1) -> None:
        self.step += steps


class TokenSequence(nn.Sequential):
    """Blocks run in order, the ones in ``reduce_after`` followed by a token reduction; same names as the
    ``nn.Sequential`` it replaces. Subclasses implement the reduction; unconfigured, it is a plain Sequential.

    Configuration (set by :func:`compress.steps.tokens.apply_token_pruning` / ``apply_token_merging`` from the
    adapter's :class:`~compress.adapters.AttentionRun`):
        layout: ``"nchw"`` (blocks take ``(B, C, H, W)``; a reduced set runs as a ``(B, C, K, 1)`` grid) or
            ``"nlc"`` (blocks take ``(B, N, C)`` tokens).
        reducible: per block, whether it may run on a reduced token set (attention blocks).
        reduce_after: block indices after which tokens are reduced.
        prefix: leading class/distillation tokens, never reduced (class-token ViTs).
        restore: put the full grid back before a non-reducible block and at the end (hierarchical models).
        attention: per block index, its attention module (``qkv`` linear and ``num_heads``), for scoring.
    """

    def __init__(self, *modules: nn.Module, layout: str = "nlc", reducible: Sequence[bool] = (),
                 reduce_after: Sequence[int] = (), prefix: int = 0, restore: bool = True,
                 attention: dict[int, nn.Module] | None = None):
        super().__init__(*modules)
        self.layout = layout
        self.reducible = tuple(reducible) or (False,) * len(self)
        self.reduce_after = frozenset(reduce_after)
        self.prefix = prefix
        self.restore = restore
        self._attention = dict(attention or {})  # plain dict: the modules stay registered only under the blocks

    # ---- layouts

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2) if self.layout == "nchw" else x

    def _grid(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return tokens.transpose(1, 2).unflatten(2, (height, width)) if self.layout == "nchw" else tokens

    def _size(self, x: torch.Tensor) -> tuple[int, int]:
        return (x.shape[2], x.shape[3]) if self.layout == "nchw" else (x.shape[1], 1)

    # ---- attention capture

    @contextlib.contextmanager
    def _capture(self, index: int) -> Iterator[dict[str, Any]]:
        """Record the ``qkv`` output of block ``index``'s attention while it runs (no copy of its forward)."""
        found: dict[str, Any] = {}
        module = self._attention.get(index)
        qkv = getattr(module, "qkv", None)
        if not isinstance(qkv, nn.Linear):
            yield found
            return
        handle = qkv.register_forward_hook(lambda m, i, o: found.__setitem__("qkv", o))
        try:
            yield found
        finally:
            handle.remove()
        if "qkv" in found:
            found["heads"] = int(module.num_heads)

    def _more_reducible_after(self, index: int) -> bool:
        rest = self.reducible[index + 1:]
        return bool(rest) and rest[0]

    def extra_repr(self) -> str:
        return f"layout={self.layout}, reduce_after={sorted(self.reduce_after)}, prefix={self.prefix}"


class TokenPruning(TokenSequence):
    """Keep the top tokens in (``placement="inside"``) or after the blocks in ``reduce_after`` (EViT; see
    :mod:`compress.tokens`)."""

    def __init__(self, *modules: nn.Module, schedule: KeepSchedule | None = None,
                 rates: Sequence[float] | None = None, score: str = "attention", owner: bool = False,
                 placement: str = "inside", **config: Any):
        super().__init__(*modules, **config)
        self.placement = placement  # "inside": between a block's attention and its MLP (EViT); "after" the block
        self.schedule = schedule or KeepSchedule(1.0)
        self.rates = tuple(rates) if rates else None  # one keep rate per reduction point (target = their minimum)
        self.score = score
        self.owner = owner  # this sequence advances the shared schedule once per training forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rate = self.schedule.rate()
        if self.training and self.owner:
            self.schedule.advance()
        if rate >= 1.0 or not self.reduce_after:
            return super().forward(x)  # exactly the unpruned computation
        height, width = self._size(x)
        full = index = None  # the full token set while reduced, and the original positions of the kept tokens
        point = 0
        for i, block in enumerate(self):
            if index is not None and not self.reducible[i]:
                x, full, index = self._restore(x, full, index, height, width), None, None
            if i not in self.reduce_after or not self._more_reducible_after(i):
                x = block(x)
                continue
            halves = split_block(block) if self.placement == "inside" else None
            with self._capture(i) as seen:
                x = halves[0](x) if halves else block(x)
            keep = self._rate_at(point, rate)
            point += 1
            x, full, index = self._select(x, seen, keep, full, index)
            if halves:
                x = halves[1](x)
        if index is not None and self.restore:
            x = self._restore(x, full, index, height, width)
        return x

    def _rate_at(self, point: int, rate: float) -> float:
        if self.rates is None:
            return rate
        target = self.schedule.target
        scale = 1.0 if target >= 1.0 else (1.0 - rate) / (1.0 - target)  # warm-up progress in [0, 1]
        return 1.0 - (1.0 - self.rates[min(point, len(self.rates) - 1)]) * scale

    def _scores(self, tokens: torch.Tensor, seen: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.score == "attention" and "qkv" in seen:
            q, k = split_qkv(seen["qkv"], seen["heads"])
            if self.prefix:
                return class_attention(q, k, self.prefix)
            return attention_received(q, k)
        return tokens[:, self.prefix:].norm(dim=-1)

    def _select(self, x, seen, keep, full, index):
        tokens = self._tokens(x)
        n = tokens.shape[1] - self.prefix
        k = keep_count(n, keep)
        if k >= n:
            return x, full, index
        with torch.no_grad():
            scores = self._scores(tokens, seen)
        local = top_tokens(scores, k)
        if self.prefix:  # EViT: keep the class token(s) and the top tokens, fuse the others into one
            body = tokens[:, self.prefix:]
            dropped = torch.ones_like(scores, dtype=torch.bool).scatter(1, local, False)
            weights = torch.where(dropped, scores, torch.zeros_like(scores))
            kept = torch.cat([tokens[:, : self.prefix], gather_tokens(body, local), fuse_tokens(body, weights)], 1)
            return self._as_input(kept), full, index
        if index is None:
            full, index = tokens, local
        else:
            full, index = scatter_tokens(full, index, tokens), index.gather(1, local)
        return self._as_input(gather_tokens(tokens, local)), full, index

    def _as_input(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._grid(tokens, tokens.shape[1], 1)

    def _restore(self, x, full, index, height, width):
        return self._grid(scatter_tokens(full, index, self._tokens(x)), height, width)


class TokenMerging(TokenSequence):
    """Merge ``r`` tokens after each block in ``reduce_after`` (ToMe; see :mod:`compress.tokens`)."""

    def __init__(self, *modules: nn.Module, r: int = 0, proportional: Sequence[int] = (), **config: Any):
        super().__init__(*modules, **config)
        self.r = int(r)
        self.proportional = frozenset(proportional)  # blocks taking an additive ``attn_mask`` (timm ViT Block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.r <= 0 or not self.reduce_after:
            return super().forward(x)
        height, width = self._size(x)
        source = size = None  # original token -> current token; current token sizes (B, n, 1)
        for i, block in enumerate(self):
            if source is not None and not self.reducible[i]:
                x, source, size = self._unmerge(x, source, height, width), None, None
            kwargs = {}
            if size is not None and i in self.proportional:
                kwargs["attn_mask"] = size.log().transpose(1, 2).unsqueeze(1)  # (B, 1, 1, n): + log(size)
            if i not in self.reduce_after or not self._more_reducible_after(i):
                x = block(x, **kwargs)
                continue
            with self._capture(i) as seen:
                x = block(x, **kwargs)
            tokens = self._tokens(x)
            p = self.prefix
            with torch.no_grad():
                metric = tokens
                if "qkv" in seen:
                    metric = split_qkv(seen["qkv"], seen["heads"])[1].mean(dim=1)  # keys, mean over heads
                dest, n_out = bipartite_matching(metric[:, p:], self.r)  # class tokens are never merged
            if n_out == tokens.shape[1] - p:
                continue
            if p:  # class tokens stay first
                dest = torch.cat([torch.arange(p, device=dest.device).expand(dest.shape[0], p), dest + p], dim=1)
                n_out += p
            tokens, size = merge_tokens(tokens, dest, n_out, size)
            source = dest if source is None else dest.gather(1, source)
            x = self._grid(tokens, n_out, 1)
        if source is not None and self.restore:
            x = self._unmerge(x, source, height, width)
        return x

    def _unmerge(self, x, source, height, width):
        return self._grid(gather_tokens(self._tokens(x), source), height, width)
