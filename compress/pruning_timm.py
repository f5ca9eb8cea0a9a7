"""What structured channel pruning needs to know about layers it cannot infer by itself.

torch-pruning (1.6) prunes weights; it does not know the bookkeeping some modules keep next to them. On timm's
MetaFormers and ViTs, and on our own norms, that meant three walls (REFERENCE.md, "Channel pruning"):

* **bias-less GroupNorm** - timm's ``GroupNorm1NoBias`` and our ``GroupNorm1(bias=False)`` set ``bias = None``,
  which torch-pruning's GroupNorm handler indexes anyway. :class:`GroupNormPruner` is the same handler with the
  bias optional; :func:`customized_pruners` maps every GroupNorm class found in a model to it.
* **stale shapes** - timm's metaformer ``Scale`` reshapes its parameter to a ``shape`` stored at construction.
  :func:`sync_pruned_attributes` re-derives it (and every other stored size below) from the weights.
* **attention heads** - the head count, head width, width and softmax scale of an attention module are
  attributes. :func:`attention_layouts` describes each attention module of a model (ours, timm's MetaFormer
  ``Attention`` and timm's ViT ``Attention``, each known to its family's adapter in :mod:`compress.adapters`) as
  a :class:`HeadLayout`, which the channel pruning step uses to prune whole heads and head widths consistently,
  then sets the attributes through ``layout.set_heads``.

``sync_pruned_attributes`` is idempotent and needs only the weights and the head counts, so a model rebuilt from
its architecture, resized to pruned tensors and given back its head counts (:func:`head_counts` /
:func:`set_head_counts`) runs exactly like the pruned one::

    counts = head_counts(pruned)                 # {"stages.2.blocks.0.token_mixer": 8, ...}, saved with the weights
    set_head_counts(rebuilt, counts)             # after the rebuilt model's tensors were resized and loaded
"""

from __future__ import annotations

import torch_pruning as tp
from torch import nn

from . import adapters
from .adapters import HeadLayout

__all__ = [
    "GroupNormPruner",
    "HeadLayout",
    "attention_layouts",
    "customized_pruners",
    "head_counts",
    "set_head_counts",
    "sync_pruned_attributes",
]


class GroupNormPruner(tp.pruner.function.GroupNormPruner):
    """torch-pruning's GroupNorm handler, with an optional bias (``bias = None`` in MetaFormer-v2 norms)."""

    def prune_out_channels(self, layer: nn.GroupNorm, idxs) -> nn.Module:
        keep = sorted(set(range(layer.num_channels)) - set(int(i) for i in idxs))
        layer.num_channels = len(keep)
        if layer.weight is not None:
            layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 0)
        if layer.bias is not None:
            layer.bias = self._prune_parameter_and_grad(layer.bias, keep, 0)
        return layer

    prune_in_channels = prune_out_channels  # one norm: input and output channels are the same channels


def customized_pruners(model: nn.Module) -> dict[type, tp.pruner.function.BasePruningFunc]:
    """``customized_pruners`` for ``MetaPruner``: every GroupNorm class in ``model`` -> :class:`GroupNormPruner`.

    torch-pruning looks customized pruners up by exact class, so each subclass present is listed.
    """
    pruner = GroupNormPruner()
    return {type(m): pruner for m in model.modules() if isinstance(m, nn.GroupNorm)}


# ------------------------------------------------------------------------------------------------ attention heads


def attention_layouts(model: nn.Module) -> list[HeadLayout]:
    """A :class:`HeadLayout` for every attention module of ``model`` whose layout an adapter knows
    (:func:`compress.adapters.head_layout`): ours declare their heads through ``pruning_hints()["num_heads"]``;
    timm's MetaFormer ``Attention`` (CAFormer) and ``timm.layers.Attention`` (ViT, DeiT) are named by their
    adapters."""
    return [layout for m in model.modules() if (layout := adapters.head_layout(m)) is not None]


# ------------------------------------------------------------------------------------------- after pruning / reload


def sync_pruned_attributes(model: nn.Module) -> None:
    """Re-derive every size a pruned or resized model stores outside its tensors (idempotent).

    Norms' channel counts and shapes here; the family's own modules through their adapters
    (:func:`compress.adapters.sync_pruned`): timm metaformer ``Scale.shape`` (``(C, 1, 1)`` or ``(C,)``) and the
    head width, width and scale of timm attention modules (from ``qkv`` and their current ``num_heads``). Our own
    modules read sizes from their tensors and need nothing.
    """
    for m in model.modules():
        adapters.sync_pruned(m)
        if isinstance(m, nn.GroupNorm):
            m.num_channels = m.weight.numel() if m.weight is not None else m.num_channels
        elif isinstance(m, nn.LayerNorm) and m.weight is not None:
            m.normalized_shape = tuple(m.weight.shape)


def head_counts(model: nn.Module) -> dict[str, int]:
    """``{module name: num_heads}`` of every known attention module (what a pruned checkpoint must remember)."""
    names = {m: n for n, m in model.named_modules()}
    return {names[layout.module]: int(layout.module.num_heads) for layout in attention_layouts(model)}


def set_head_counts(model: nn.Module, counts: dict[str, int]) -> None:
    """Restore the head counts saved by :func:`head_counts`, then :func:`sync_pruned_attributes`."""
    modules = dict(model.named_modules())
    for name, heads in counts.items():
        if name not in modules:
            raise KeyError(f"no module {name!r} in the model to set num_heads={heads} on")
        modules[name].num_heads = int(heads)
    sync_pruned_attributes(model)
