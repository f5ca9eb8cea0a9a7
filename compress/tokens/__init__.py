"""Fewer tokens through attention blocks: pruning (EViT, EET) and merging (ToMe).

Three layers, as ToMe keeps ``merge.py`` apart from its per-model patches:

* :mod:`compress.tokens.ops` - the algorithm as pure functions on ``(B, N, C)`` tokens.
* :mod:`compress.tokens.wrappers` - :class:`TokenPruning` / :class:`TokenMerging`, sequences of a model's own
  blocks that run those functions between them, and the keep-rate schedule.
* :mod:`compress.adapters` - per model family: which block sequences hold attention, their token layout, class
  tokens, and how a block splits into its attention and MLP halves.

Applying it to a model is one call (:func:`compress.steps.tokens.apply_token_pruning` /
``apply_token_merging``, also the recipe steps ``token_prune`` / ``token_merge``).

**Pruning** (EViT, ICLR 2022; EET's progressive dropping): in chosen attention blocks, keep the ``keep_rate`` most
informative tokens and run the rest of the stage's attention blocks on them only. As in EViT, the selection happens
inside the block, between its attention and its MLP (``placement: inside``), so that block's MLP already runs on
the kept tokens; ``placement: after`` selects after the whole block. Blocks no adapter splits are reduced after
the block.

* Hierarchical models (ours, timm CAFormer; no class token): tokens are scored by the mean attention they receive
  in the block just run (``score: attention``) or by their feature norm (``score: norm``, content-based). Dropped
  tokens keep the value they had when dropped (the residual path carries them unchanged) and are put back into the
  grid before any block that needs it (a conv or pooling mixer) and at the end of the stage, so downsampling and
  convolutions always see the full grid.
* Class-token ViTs (timm ViT/DeiT): tokens are scored by the class token's attention (averaged over heads) and the
  dropped ones are fused into one token, their attention-weighted average (EViT).

**Merging** (ToMe, ICLR 2023): after each chosen attention block, bipartite soft matching merges the ``r`` most
similar token pairs (keys as the metric) into their size-weighted average. Token sizes are tracked; on timm ViTs
``proportional_attention`` adds ``log(size)`` to the attention logits through the block's ``attn_mask``.
Hierarchical models are unmerged (each token takes its group's value) before grid-bound blocks and at the end.

**Keep-rate warm-up** (EViT): with ``schedule: warmup`` the keep rate goes linearly from 1 to ``keep_rate`` over
``warmup_steps`` training steps. The shared :class:`KeepSchedule` counts one step per training-mode forward pass of
the model (so a finetune or distill loop advances it without knowing about it) and is also left in
``ctx.state["token_schedule"]``: a loop that wants exact control calls ``schedule.set_step(global_step)``.
Evaluation uses the rate reached so far.
"""

from __future__ import annotations

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
from .wrappers import KeepSchedule, TokenMerging, TokenPruning, TokenSequence

__all__ = [
    "KeepSchedule",
    "TokenMerging",
    "TokenPruning",
    "TokenSequence",
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
