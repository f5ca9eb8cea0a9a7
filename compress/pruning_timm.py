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
  ``Attention`` and timm's ViT ``Attention``) as a :class:`HeadLayout`, which the channel pruning step uses to
  prune whole heads and head widths consistently, then sets the attributes through ``layout.set_heads``.

``sync_pruned_attributes`` is idempotent and needs only the weights and the head counts, so a model rebuilt from
its architecture, resized to pruned tensors and given back its head counts (:func:`head_counts` /
:func:`set_head_counts`) runs exactly like the pruned one::

    counts = head_counts(pruned)                 # {"stages.2.blocks.0.token_mixer": 8, ...}, saved with the weights
    set_head_counts(rebuilt, counts)             # after the rebuilt model's tensors were resized and loaded
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch_pruning as tp
from torch import nn

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


@dataclass(frozen=True, eq=False)
class HeadLayout:
    """How one multi-head attention module lays its heads out, for head-consistent pruning.

    ``qkv`` produces ``[q | k | v]``, each ``num_heads * head_dim`` wide, head after head; ``proj`` reads the
    ``num_heads * head_dim`` attention output. After the inner width is pruned to ``heads' x head_dim'``,
    ``set_heads(heads')`` updates the module's attributes.
    """

    module: nn.Module
    qkv: nn.Linear
    proj: nn.Linear
    num_heads: int
    head_dim: int
    width_equals_input: bool  # the forward reshapes to the input width: heads * head_dim must equal it
    whole_heads_only: bool  # per-head-dim layers (qk norm) that a dependency graph cannot see: keep head_dim
    set_heads: Callable[[int], None]

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim


def attention_layouts(model: nn.Module) -> list[HeadLayout]:
    """A :class:`HeadLayout` for every attention module of ``model`` whose layout is known.

    Ours: modules that declare their heads through ``pruning_hints()["num_heads"]`` and keep them in a settable
    ``num_heads`` attribute next to ``qkv`` and ``proj`` (``searchspace.mixers.attention.Attention``). timm: the
    MetaFormer ``Attention`` (CAFormer) and ``timm.layers.Attention`` (ViT, DeiT), named explicitly.
    """
    layouts = []
    for module in model.modules():
        layout = _timm_layout(module) or _declared_layout(module)
        if layout is not None:
            layouts.append(layout)
    return layouts


def _declared_layout(module: nn.Module) -> HeadLayout | None:
    hints = module.pruning_hints() if hasattr(module, "pruning_hints") else {}
    qkv, proj = getattr(module, "qkv", None), getattr(module, "proj", None)
    heads = hints.get("num_heads", {}).get(qkv) if qkv is not None else None
    if not heads or not isinstance(proj, nn.Linear) or not _settable(module, "num_heads"):
        return None

    def set_heads(n: int) -> None:
        module.num_heads = n

    return HeadLayout(module, qkv, proj, heads, qkv.out_features // (3 * heads), False, False, set_heads)


def _settable(module: nn.Module, name: str) -> bool:
    return name in vars(module) or not isinstance(getattr(type(module), name, None), property)


def _timm_classes() -> tuple[type, type]:
    from timm.layers import Attention as TimmAttention
    from timm.models.metaformer import Attention as MetaFormerAttention

    return MetaFormerAttention, TimmAttention


def _timm_layout(module: nn.Module) -> HeadLayout | None:
    metaformer_attention, timm_attention = _timm_classes()
    if type(module) is metaformer_attention:
        # forward: x.transpose(1, 2).reshape(B, N, C) with C the input width, so the widths must stay equal
        return HeadLayout(module, module.qkv, module.proj, module.num_heads, module.head_dim, True, False,
                          lambda n: _set_timm_heads(module, n))
    if type(module) is timm_attention:
        qk_norm = not (isinstance(module.q_norm, nn.Identity) and isinstance(module.k_norm, nn.Identity))
        return HeadLayout(module, module.qkv, module.proj, module.num_heads, module.head_dim, False, qk_norm,
                          lambda n: _set_timm_heads(module, n))
    return None


def _set_timm_heads(module: nn.Module, num_heads: int) -> None:
    module.num_heads = num_heads
    _sync_timm_attention(module)


def _sync_timm_attention(module: nn.Module) -> None:
    """head_dim, width and softmax scale from the ``qkv`` width and ``num_heads`` (timm's fused path uses
    ``1/sqrt(head_dim)`` regardless of ``scale``; the unfused path reads ``scale``: keep them the same)."""
    head_dim = module.qkv.out_features // (3 * module.num_heads)
    module.head_dim = head_dim
    module.scale = head_dim**-0.5
    for name in ("attention_dim", "attn_dim"):  # timm MetaFormer / timm.layers spelling
        if hasattr(module, name):
            setattr(module, name, module.num_heads * head_dim)


# ------------------------------------------------------------------------------------------- after pruning / reload


def sync_pruned_attributes(model: nn.Module) -> None:
    """Re-derive every size a pruned or resized model stores outside its tensors (idempotent).

    timm metaformer ``Scale.shape`` (``(C, 1, 1)`` or ``(C,)``) and the head width, width and scale of timm
    attention modules (from ``qkv`` and their current ``num_heads``). Our own modules read sizes from their
    tensors and need nothing.
    """
    from timm.models.metaformer import Scale as TimmScale

    metaformer_attention, timm_attention = _timm_classes()
    for m in model.modules():
        if type(m) is TimmScale:
            m.shape = (m.scale.numel(),) + (1,) * (len(m.shape) - 1)
        elif type(m) in (metaformer_attention, timm_attention):
            _sync_timm_attention(m)
        elif isinstance(m, nn.GroupNorm):
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
