"""``token_prune`` and ``token_merge``: fewer tokens through attention blocks.

**Pruning** (EViT, ICLR 2022; EET's progressive dropping): in chosen attention blocks, keep the
``keep_rate`` most informative tokens and run the rest of the stage's attention blocks on them only. As in EViT,
the selection happens inside the block, between its attention and its MLP (``placement: inside``), so that
block's MLP already runs on the kept tokens; ``placement: after`` selects after the whole block. Blocks whose
halves are not known (see :func:`split_block`) are always reduced after the block.

* Hierarchical models (ours, timm CAFormer; no class token): tokens are scored by the mean attention they
  receive in the block just run (``score: attention``) or by their feature norm (``score: norm``, content-based).
  Dropped tokens keep the value they had when dropped (the residual path carries them unchanged) and are put
  back into the grid before any block that needs it (a conv or pooling mixer) and at the end of the stage, so
  downsampling and convolutions always see the full grid.
* Class-token ViTs (timm ViT/DeiT): tokens are scored by the class token's attention (averaged over heads) and
  the dropped ones are fused into one token, their attention-weighted average (EViT).

**Merging** (ToMe, ICLR 2023): after each chosen attention block, bipartite soft matching merges the ``r`` most
similar token pairs (keys as the metric) into their size-weighted average. Token sizes are tracked; on timm ViTs
``proportional_attention`` adds ``log(size)`` to the attention logits through the block's ``attn_mask``.
Hierarchical models are unmerged (each token takes its group's value) before grid-bound blocks and at the end.

The algorithm is the pure functions below; the integration is :class:`TokenSequence`, an ``nn.Sequential`` of
the same blocks under the same names (the state dict does not change) that replaces a stage's ``blocks``.
Which blocks are attention blocks is declared, never guessed: for our models the mixer registry's
``attention=True`` flag; for timm, its MetaFormer ``Attention`` and ViT ``Attention`` classes named explicitly.

**Keep-rate warm-up** (EViT): with ``schedule: warmup`` the keep rate goes linearly from 1 to ``keep_rate`` over
``warmup_steps`` training steps. The shared :class:`KeepSchedule` counts one step per training-mode forward pass
of the model (so a finetune or distill loop advances it without knowing about it) and is also left in
``ctx.state["token_schedule"]``: a loop that wants exact control calls ``schedule.set_step(global_step)``.
Evaluation uses the rate reached so far.

**Saving.** The wrappers are recorded as a structural change (:func:`compress.saving.record_rebuild`), so
``compress.save``/``compress.load`` re-wrap a reloaded model (with any warm-up finished).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..saving import record_rebuild, register_rebuild
from . import Param, RecipeError, StepContext, register_step

# ------------------------------------------------------------------------------------------- the algorithm (pure)


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


# -------------------------------------------------------------------------------------------- the keep schedule


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


# --------------------------------------------------------------------------------------------- the integration


Half = Callable[[torch.Tensor], torch.Tensor]


def split_block(block: nn.Module) -> tuple[Half, Half] | None:
    """A block's two residual halves, ``(attention half, MLP half)``, whose composition is its ``forward``; None
    for a block of another kind (or without an MLP). Known: our ``MetaFormerBlock``, timm's ``MetaFormerBlock``
    and timm's ViT ``Block`` (exact classes, since a subclass may compute something else)."""
    from timm.models.metaformer import MetaFormerBlock as TimmMetaFormerBlock
    from timm.models.vision_transformer import Block as TimmViTBlock

    from searchspace.blocks import MetaFormerBlock

    b: Any = block
    kind = type(block)
    if kind is MetaFormerBlock and b.has_mlp:
        return (lambda x: b.res_scale1(x) + b.layer_scale1(b.drop_path(b.mixer(b.norm1(x)))),
                lambda x: b.res_scale2(x) + b.layer_scale2(b.drop_path(b.mlp(b.norm2(x)))))
    if kind is TimmMetaFormerBlock:
        return (lambda x: b.res_scale1(x) + b.layer_scale1(b.drop_path1(b.token_mixer(b.norm1(x)))),
                lambda x: b.res_scale2(x) + b.layer_scale2(b.drop_path2(b.mlp(b.norm2(x)))))
    if kind is TimmViTBlock:
        return (lambda x: x + b.drop_path1(b.ls1(b.attn(b.norm1(x)))),
                lambda x: x + b.drop_path2(b.ls2(b.mlp(b.norm2(x)))))
    return None


class TokenSequence(nn.Sequential):
    """Blocks run in order, the ones in ``reduce_after`` followed by a token reduction; same names as the
    ``nn.Sequential`` it replaces. Subclasses implement the reduction; unconfigured, it is a plain Sequential.

    Configuration (set by :func:`apply_token_pruning` / :func:`apply_token_merging`):
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
    """Keep the top tokens in (``placement="inside"``) or after the blocks in ``reduce_after`` (see the module
    docstring)."""

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
    """Merge ``r`` tokens after each block in ``reduce_after`` (see the module docstring)."""

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


# ------------------------------------------------------------------------------ finding the attention blocks


@dataclass(frozen=True, eq=False)
class AttentionRun:
    """One sequence of blocks that may hold attention blocks: where it lives and how it is laid out."""

    parent: nn.Module  # owner of the ``blocks`` attribute
    name: str  # attribute name (``blocks``)
    label: str  # dotted path for messages (``stages.2.blocks``)
    stage: int | None  # stage index of a hierarchical model; None for a ViT
    layout: str
    attention: dict[int, nn.Module]  # block index -> its attention module (declared or timm's class)
    prefix: int
    restore: bool
    proportional: bool  # blocks take ``attn_mask`` (timm ViT blocks)

    @property
    def blocks(self) -> nn.Sequential:
        return getattr(self.parent, self.name)


def attention_runs(model: nn.Module) -> list[AttentionRun]:
    """Every block sequence of ``model`` with its attention blocks: ours (``MetaFormerNet``, from the mixer
    registry's ``attention`` flag), timm MetaFormers (their ``Attention`` mixer) and timm ViTs (every block)."""
    from searchspace.model import MetaFormerNet

    if isinstance(model, MetaFormerNet):
        return _ours(model)
    from timm.models.metaformer import Attention as MetaFormerAttention
    from timm.models.metaformer import MetaFormer
    from timm.models.vision_transformer import Block, VisionTransformer

    if isinstance(model, MetaFormer):
        runs = []
        for i, stage in enumerate(model.stages):
            attention = {j: b.token_mixer for j, b in enumerate(stage.blocks)
                         if type(b.token_mixer) is MetaFormerAttention}
            if attention:  # timm runs these stages on (B, N, C) tokens
                runs.append(AttentionRun(stage, "blocks", f"stages.{i}.blocks", i, "nlc", attention, 0, True, False))
        return runs
    if isinstance(model, VisionTransformer):
        from timm.layers import Attention as TimmAttention

        attention = {j: b.attn for j, b in enumerate(model.blocks) if type(getattr(b, "attn", None)) is TimmAttention}
        prefix = int(getattr(model, "num_prefix_tokens", 0))
        proportional = all(type(b) is Block for b in model.blocks)
        return [AttentionRun(model, "blocks", "blocks", None, "nlc", attention, prefix, prefix == 0, proportional)]
    raise RecipeError(f"token pruning supports our models, timm MetaFormers and timm ViTs; got "
                      f"{type(model).__name__}")


def _ours(model: nn.Module) -> list[AttentionRun]:
    from searchspace import get_mixer

    runs = []
    for i, (stage_arch, stage) in enumerate(zip(model.arch.stages, model.stages)):
        flags = [get_mixer(run.mixer).attention for run in stage_arch.runs for _ in range(run.depth)]
        attention = {j: stage.blocks[j].mixer for j, flag in enumerate(flags) if flag}
        if attention:
            runs.append(AttentionRun(stage, "blocks", f"stages.{i}.blocks", i, "nchw", attention, 0, True, False))
    return runs


def default_points(count: int, inside: bool = True) -> list[int]:
    """EViT's placement generalised to ``L`` attention blocks: inside blocks ``floor(L * j / 4)`` for
    ``j = 1, 2, 3`` (EViT's 4th, 7th and 10th of 12: indices 3, 6, 9), or, selecting after whole blocks, the
    blocks before them (2, 5, 8); positions with no attention block after them are left out.

    >>> default_points(12), default_points(9), default_points(3), default_points(1)
    ([3, 6, 9], [2, 4, 6], [0, 1], [])
    >>> default_points(12, inside=False), default_points(9, inside=False)
    ([2, 5, 8], [1, 3, 5])
    """
    points = sorted({count * j // 4 - (0 if inside else 1) for j in (1, 2, 3)})
    return [p for p in points if 0 <= p < count - 1]


def _select_runs(model: nn.Module, stages: Sequence[int] | None) -> list[AttentionRun]:
    runs = attention_runs(model)
    for run in runs:
        if isinstance(run.blocks, TokenSequence):
            raise RecipeError(f"{run.label} already prunes or merges tokens; apply token_prune/token_merge once")
    if stages is None:
        return [r for r in runs if r.attention]
    if runs and runs[0].stage is None:
        raise RecipeError("stages applies to hierarchical models; a ViT has one sequence of blocks - use blocks")
    known = {r.stage: r for r in runs}
    for s in stages:
        if s not in known:
            raise RecipeError(f"stage {s!r} has no attention blocks; stages with attention: {sorted(known)}")
    return [known[s] for s in stages]


def _points(run: AttentionRun, blocks: Sequence[int] | None, default: Sequence[int] | None = None,
            inside: bool = True) -> list[int]:
    """Block indices (in the run) in or after which to reduce, from positions among its attention blocks."""
    attention_blocks = sorted(run.attention)
    positions = default_points(len(attention_blocks), inside) if blocks is None else list(blocks)
    if default is not None and blocks is None:
        positions = list(default)
    for p in positions:
        if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < len(attention_blocks):
            raise RecipeError(f"{run.label}: block position {p!r} does not exist; it has {len(attention_blocks)} "
                              f"attention blocks (positions 0-{len(attention_blocks) - 1})")
    return sorted({attention_blocks[p] for p in positions})


def _reducible(run: AttentionRun) -> list[bool]:
    return [j in run.attention for j in range(len(run.blocks))]


PLACEMENTS = ("inside", "after")


def apply_token_pruning(model: nn.Module, keep_rate: float | Sequence[float] = 0.7, *,
                        stages: Sequence[int] | None = None, blocks: Sequence[int] | None = None,
                        score: str = "attention", warmup_steps: int = 0, placement: str = "inside") -> KeepSchedule:
    """Wrap ``model``'s attention blocks for token pruning (in place); returns the shared keep schedule.

    Args:
        keep_rate: fraction of tokens kept at each reduction point, or one rate per point.
        stages: stage indices of a hierarchical model (default: every stage with attention blocks).
        blocks: positions among each stage's attention blocks after which tokens are selected (default: EViT's
            placement, :func:`default_points`).
        score: ``attention`` (attention received; class attention on ViTs) or ``norm`` (feature norm).
        warmup_steps: training steps over which the keep rate goes from 1 to ``keep_rate`` (0: constant).
        placement: ``inside`` selects between a block's attention and its MLP (EViT), ``after`` after the block.

    >>> schedule = apply_token_pruning(model, 0.7)  # doctest: +SKIP
    """
    rates = list(keep_rate) if isinstance(keep_rate, (list, tuple)) else None
    target = min(rates) if rates else float(keep_rate)
    for r in rates or [target]:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
            raise RecipeError(f"keep_rate must be in (0, 1], got {r!r}")
    if score not in ("attention", "norm"):
        raise RecipeError(f"score must be 'attention' or 'norm', got {score!r}")
    if placement not in PLACEMENTS:
        raise RecipeError(f"placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    schedule = KeepSchedule(target, int(warmup_steps))
    runs = _select_runs(model, stages)
    if not runs:
        raise RecipeError("the model has no attention blocks to prune tokens in")
    for n, run in enumerate(runs):
        points = _points(run, blocks, inside=placement == "inside")
        if rates is not None and len(rates) not in (1, len(points)):
            raise RecipeError(f"keep_rate lists {len(rates)} rates but {run.label} has {len(points)} reduction "
                              f"points; give one rate or one per point")
        wrapper = TokenPruning(*run.blocks, layout=run.layout, reducible=_reducible(run), reduce_after=points,
                               prefix=run.prefix, restore=run.restore, attention=run.attention, schedule=schedule,
                               rates=rates, score=score, owner=n == 0, placement=placement)
        setattr(run.parent, run.name, wrapper.train(run.blocks.training))
    record_rebuild(model, "token_prune", dict(keep_rate=rates or target, stages=_plain(stages), blocks=_plain(blocks),
                                              score=score, warmup_steps=int(warmup_steps), placement=placement))
    return schedule


def apply_token_merging(model: nn.Module, r: int, *, stages: Sequence[int] | None = None,
                        blocks: Sequence[int] | None = None, proportional_attention: bool = True) -> None:
    """Wrap ``model``'s attention blocks to merge ``r`` tokens after each (in place).

    ``blocks``: positions among each stage's attention blocks after which to merge (default: every one that has
    an attention block after it). ``proportional_attention`` applies where blocks take an ``attn_mask``.
    """
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise RecipeError(f"r must be an integer >= 0, got {r!r}")
    runs = _select_runs(model, stages)
    if not runs:
        raise RecipeError("the model has no attention blocks to merge tokens in")
    for run in runs:
        every = list(range(len(run.attention) - 1))
        points = _points(run, blocks, default=every)
        proportional = list(range(len(run.blocks))) if proportional_attention and run.proportional else []
        wrapper = TokenMerging(*run.blocks, layout=run.layout, reducible=_reducible(run), reduce_after=points,
                               prefix=run.prefix, restore=run.restore, attention=run.attention, r=r,
                               proportional=proportional)
        setattr(run.parent, run.name, wrapper.train(run.blocks.training))
    record_rebuild(model, "token_merge", dict(r=r, stages=_plain(stages), blocks=_plain(blocks),
                                              proportional_attention=bool(proportional_attention)))


def _plain(values: Sequence[int] | None) -> list[int] | None:
    return None if values is None else [int(v) for v in values]


@register_rebuild("token_prune")
def _rebuild_pruning(model: nn.Module, config: dict[str, Any]) -> None:
    """On a reloaded model: the same wrappers, with any keep-rate warm-up finished (a saved model is trained)."""
    schedule = apply_token_pruning(model, **config)
    schedule.set_step(schedule.warmup_steps)


@register_rebuild("token_merge")
def _rebuild_merging(model: nn.Module, config: dict[str, Any]) -> None:
    apply_token_merging(model, **config)


def remove_token_reduction(model: nn.Module) -> None:
    """Undo :func:`apply_token_pruning` / :func:`apply_token_merging`: plain ``nn.Sequential`` blocks again."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, TokenSequence):
                setattr(parent, name, nn.Sequential(*child).train(child.training))


# ------------------------------------------------------------------------------------------------------ steps


def _int_list(value: Any, name: str) -> list[int] | None:
    if problem := _list_problem(value, name):
        raise RecipeError(problem)
    return None if value is None else list(value)


def _list_problem(value: Any, name: str) -> str | None:
    if value is None or (isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool)
                                                                  and v >= 0 for v in value)):
        return None
    return f"{name} must be a list of indices (integers >= 0), got {value!r}"


def _check_prune(params: dict[str, Any]) -> str | None:
    """Rules of ``token_prune`` no single parameter expresses (run when a recipe is validated)."""
    rates = params.get("keep_rate", 0.7)
    for r in rates if isinstance(rates, (list, tuple)) else [rates]:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
            return f"keep_rate must be in (0, 1] (or a list of such rates), got {rates!r}"
    if params.get("schedule") == "warmup" and not params.get("warmup_steps"):
        return "schedule 'warmup' needs warmup_steps > 0 (the fine-tuning steps it spans)"
    return _list_problem(params.get("stages"), "stages") or _list_problem(params.get("blocks"), "blocks")


def _check_merge(params: dict[str, Any]) -> str | None:
    return _list_problem(params.get("stages"), "stages") or _list_problem(params.get("blocks"), "blocks")


@register_step(
    "token_prune",
    description="keep the most informative tokens in attention blocks (EViT/EET); dropped tokens return to "
                "the grid before convs and downsampling",
    params={
        "keep_rate": Param((float, list), 0.7, help="fraction of tokens kept at each reduction point (0, 1], "
                                                    "or one rate per point"),
        "stages": Param((list, type(None)), None, help="stage indices (hierarchical models); default: all "
                                                       "stages with attention"),
        "blocks": Param((list, type(None)), None, help="positions among a stage's attention blocks in which "
                                                       "tokens are selected; default EViT's (3, 6, 9 of 12)"),
        "score": Param(str, "attention", choices=("attention", "norm"), help="attention received (class "
                                                                            "attention on ViTs) or feature norm"),
        "schedule": Param(str, "constant", choices=("constant", "warmup"),
                          help="warmup: keep rate goes from 1 to keep_rate over warmup_steps training steps"),
        "warmup_steps": Param(int, 0, minimum=0, help="training steps of the warm-up"),
        "placement": Param(str, "inside", choices=PLACEMENTS,
                           help="inside: select between a block's attention and its MLP, so that MLP already runs "
                                "on the kept tokens (EViT); after: after the whole block"),
    },
)
def token_prune(ctx: StepContext, keep_rate: float | list[float] = 0.7, stages: list[int] | None = None,
                blocks: list[int] | None = None, score: str = "attention", schedule: str = "constant",
                warmup_steps: int = 0, placement: str = "inside") -> dict[str, Any]:
    if problem := _check_prune(dict(keep_rate=keep_rate, stages=stages, blocks=blocks, schedule=schedule,
                                    warmup_steps=warmup_steps)):
        raise RecipeError(problem)
    sched = apply_token_pruning(ctx.model, keep_rate, stages=_int_list(stages, "stages"),
                                blocks=_int_list(blocks, "blocks"), score=score,
                                warmup_steps=warmup_steps if schedule == "warmup" else 0, placement=placement)
    ctx.state["token_schedule"] = sched
    figures = token_figures(ctx.model)
    ctx.log(f"token_prune: keep {keep_rate} {'in' if placement == 'inside' else 'after'} blocks "
            f"{figures['reduce_after']} (score: {score}, schedule: {schedule})")
    if figures["scored_by_norm"]:
        ctx.log(f"token_prune: no fused qkv to score attention after {', '.join(figures['scored_by_norm'])}; "
                f"feature norms are used there")
    return figures


@register_step(
    "token_merge",
    description="ToMe bipartite soft matching: merge r tokens after each attention block",
    params={
        "r": Param(int, 8, minimum=0, help="tokens merged after each attention block"),
        "stages": Param((list, type(None)), None, help="stage indices (hierarchical models); default: all "
                                                       "stages with attention"),
        "blocks": Param((list, type(None)), None, help="positions among a stage's attention blocks after which "
                                                       "to merge; default: all but the last"),
        "proportional_attention": Param(bool, True, help="add log(token size) to attention logits (timm ViTs)"),
    },
)
def token_merge(ctx: StepContext, r: int = 8, stages: list[int] | None = None, blocks: list[int] | None = None,
                proportional_attention: bool = True) -> dict[str, Any]:
    apply_token_merging(ctx.model, r, stages=_int_list(stages, "stages"), blocks=_int_list(blocks, "blocks"),
                        proportional_attention=proportional_attention)
    figures = token_figures(ctx.model)
    ctx.log(f"token_merge: r={r} after blocks {figures['reduce_after']}")
    return figures


token_prune.check = _check_prune  # run by compress.recipe when a recipe is validated
token_merge.check = _check_merge


def token_figures(model: nn.Module) -> dict[str, Any]:
    """Where tokens are reduced (``{"reduce_after": {"stages.2.blocks": [1, 3, 5]}}``), and the reduction points
    whose attention has no fused ``qkv`` projection to score with, so feature norms are used there instead."""
    names = {m: n for n, m in model.named_modules()}
    sequences = [m for m in model.modules() if isinstance(m, TokenSequence)]
    fallback = [f"{names[m]}.{i}" for m in sequences for i in sorted(m.reduce_after)
                if getattr(m, "score", "attention") == "attention"
                and not isinstance(getattr(m._attention.get(i), "qkv", None), nn.Linear)]
    return {"reduce_after": {names[m]: sorted(m.reduce_after) for m in sequences}, "scored_by_norm": fallback}


__all__ = [
    "KeepSchedule", "TokenMerging", "TokenPruning", "TokenSequence", "apply_token_merging", "apply_token_pruning",
    "attention_received", "bipartite_matching", "class_attention", "default_points", "fuse_tokens", "gather_tokens",
    "keep_count", "merge_tokens", "remove_token_reduction", "scatter_tokens", "split_block", "split_qkv",
    "top_tokens",
]
