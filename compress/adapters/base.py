"""What compression asks of a model family (:class:`ModelAdapter`), and the descriptions it gets back.

A family answers five questions, each one method (the defaults fit a family that lacks the thing asked about):

========================  ==========================================================================================
belongs to it?            :meth:`ModelAdapter.matches`
where attention runs      :meth:`~ModelAdapter.attention_runs` (token reduction), :meth:`~ModelAdapter.head_layout`
                          (channel pruning of heads) and :meth:`~ModelAdapter.sync_pruned` (sizes kept as attributes)
a block's two halves      :meth:`~ModelAdapter.split_block`: ``(mixer half, MLP half)``, composing to its forward
where the head is         :meth:`~ModelAdapter.classifier`, and the stages before it (:meth:`~ModelAdapter.stages`)
how it is rebuilt         :meth:`~ModelAdapter.describe` (a JSON source) and :meth:`~ModelAdapter.build` (a fresh model)
========================  ==========================================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from searchspace.errors import MixerNASError

Half = Callable[[torch.Tensor], torch.Tensor]
Source = dict[str, Any]  # JSON data: {"kind": "timm", "name": ..., "kwargs": {...}} or {"kind": "mixernas", ...}


class AdapterError(MixerNASError):
    """A model no registered adapter describes, or a source no adapter can build."""


@dataclass(frozen=True, eq=False)
class AttentionRun:
    """One sequence of blocks holding attention blocks: where it lives and how its tokens are laid out."""

    parent: nn.Module  # owner of the ``blocks`` attribute
    name: str  # attribute name (``blocks``)
    label: str  # dotted path for messages (``stages.2.blocks``)
    stage: int | None  # stage index of a hierarchical model; None for a ViT
    layout: str  # "nchw": blocks take (B, C, H, W); "nlc": blocks take (B, N, C) tokens
    attention: dict[int, nn.Module]  # block index -> its attention module (declared, or the family's class)
    prefix: int  # leading class/distillation tokens, never reduced
    restore: bool  # put the full grid back at the end of the run (hierarchical models)
    proportional: bool  # blocks take an additive ``attn_mask`` (ToMe's proportional attention)

    @property
    def blocks(self) -> nn.Sequential:
        return getattr(self.parent, self.name)


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


class ModelAdapter:
    """One model family as compression sees it. Subclass, set ``name``, override what the family has, register.

    Block- and module-level questions (:meth:`split_block`, :meth:`head_layout`, :meth:`sync_pruned`) are asked of
    every registered adapter, since a model may hold another family's modules; answer only for the classes the
    family owns (by exact class: a subclass may compute something else) and return None for the rest.

    >>> class MyAdapter(ModelAdapter):                               # doctest: +SKIP
    ...     name, description = "mynet", "MyNet backbones"
    ...     def matches(self, model): return isinstance(model, MyNet)
    ...     def attention_runs(self, model): ...
    >>> compress.adapters.register_adapter(MyAdapter())               # doctest: +SKIP
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""  # the family in a few words, for messages
    source_kind: ClassVar[str | None] = None  # the "kind" of the sources it describes and builds; None: cannot

    def matches(self, model: nn.Module) -> bool:
        """Whether ``model`` belongs to this family."""
        raise NotImplementedError

    # ---- structure

    def attention_runs(self, model: nn.Module) -> list[AttentionRun]:
        """Every block sequence of ``model`` that holds attention blocks (where token reduction applies)."""
        return []

    def split_block(self, block: nn.Module) -> tuple[Half, Half] | None:
        """``(mixer half, MLP half)`` of one of this family's blocks, with ``mlp(mixer(x)) == block(x)``."""
        return None

    def stages(self, model: nn.Module) -> list[nn.Module]:
        """The stages of a hierarchical model, input side first; empty for a plain sequence of blocks (ViT)."""
        stages = getattr(model, "stages", None)
        return list(stages) if isinstance(stages, (nn.Sequential, nn.ModuleList)) else []

    def classifier(self, model: nn.Module) -> nn.Module | None:
        """The module producing the logits (timm's ``get_classifier()``)."""
        get = getattr(model, "get_classifier", None)
        return get() if callable(get) else None

    # ---- channel pruning

    def head_layout(self, module: nn.Module) -> HeadLayout | None:
        """The head layout of one of this family's attention modules."""
        return None

    def sync_pruned(self, module: nn.Module) -> None:
        """Re-derive the sizes one of this family's modules keeps outside its tensors (idempotent)."""

    # ---- rebuilding

    def describe(self, model: nn.Module, recorded: Source | None = None) -> Source | None:
        """How to build ``model``'s architecture afresh (JSON data with ``"kind": source_kind``), or None if it
        cannot tell. ``recorded``: the source of this kind noted when the model was created, to bring up to date
        (a classifier reset since changes the class count)."""
        return None

    def build(self, source: Source) -> nn.Module:
        """A freshly initialised model of ``source`` (one this adapter's :meth:`describe` wrote)."""
        raise AdapterError(f"the {self.name!r} adapter cannot build models")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


def native_input_size(model: nn.Module) -> int | None:
    """The image side a model is built for: a fixed grid's (ViT), else its timm configuration's, else None."""
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size:
        return int(img_size[-1] if isinstance(img_size, (tuple, list)) else img_size)
    size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
    return int(size[-1]) if size else None


def first_conv_in(model: nn.Module) -> int | None:
    """Input channels of the first convolution (the stem's), or None."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return None if conv is None else conv.in_channels
