"""Model families as adapters: the one place compression learns a model's structure.

Each family (ours, timm MetaFormers, timm ViTs, any other timm model) is a :class:`ModelAdapter` saying whether a
model belongs to it, where attention runs, how a block splits into its mixer and MLP halves, where the head is and
how the model is rebuilt. Token pruning, channel pruning and saving ask the adapter (:func:`find_adapter`) instead
of checking a model's type themselves.

===================  =================================================  ============================================
adapter              family                                             rebuilt from
===================  =================================================  ============================================
``mixernas``         our ``MetaFormerNet`` (presets, searched archs)    its ``Arch`` (``kind: mixernas``)
``timm_metaformer``  timm PoolFormerV2, ConvFormer, CAFormer            the timm name (``kind: timm``)
``timm_vit``         timm ViT and DeiT (``VisionTransformer``)          the timm name (``kind: timm``)
``timm``             any other model ``timm.create_model`` made         the timm name (``kind: timm``)
===================  =================================================  ============================================

Add your own family in a few lines; the most recently registered adapter that matches a model is used, so yours
takes precedence over a built-in one for the models it claims::

    from compress.adapters import ModelAdapter, register_adapter

    @register_adapter
    class MyNetAdapter(ModelAdapter):
        name, description = "mynet", "MyNet backbones"

        def matches(self, model):
            return isinstance(model, MyNet)

        def split_block(self, block):  # block(x) == block.feed_forward(block.attend(x))
            return (block.attend, block.feed_forward) if type(block) is MyBlock else None

        # attention_runs, classifier, describe and build as the family has them (see ModelAdapter)

    find_adapter(my_model).name   # "mynet"

:class:`compress.adapters.contract.AdapterContract` is the test suite an adapter should pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from searchspace.errors import MixerNASError
from searchspace.registry import Registry

from .base import AdapterError, AttentionRun, Half, HeadLayout, ModelAdapter, Source, first_conv_in, native_input_size
from .mixernas import MixerNASAdapter
from .timm_generic import TimmAdapter
from .timm_metaformer import TimmMetaFormerAdapter
from .timm_vit import TimmViTAdapter

ADAPTERS: Registry[ModelAdapter] = Registry("model adapter")
_order: list[str] = []  # registration order; detection tries the newest first


def register_adapter(adapter: ModelAdapter | type[ModelAdapter], *, overwrite: bool = False):
    """Register an adapter (an instance, or a class taking no arguments: usable as a class decorator).

    Returns what it was given. Registering under a name already taken needs ``overwrite=True``.
    """
    instance = adapter() if isinstance(adapter, type) else adapter
    if not isinstance(instance, ModelAdapter):
        raise MixerNASError(f"an adapter must be a ModelAdapter (or a subclass of it), got {adapter!r}")
    if type(instance).matches is ModelAdapter.matches:
        raise MixerNASError(f"adapter {instance.name!r} must define matches(model)")
    ADAPTERS.add(instance.name, instance, overwrite=overwrite)
    if instance.name in _order:
        _order.remove(instance.name)
    _order.append(instance.name)
    return adapter


def unregister_adapter(name: str) -> None:
    ADAPTERS.remove(name)
    _order.remove(name)


def get_adapter(name: str) -> ModelAdapter:
    """The adapter registered as ``name``; unknown names raise an error listing the close matches."""
    return ADAPTERS.get(name)


def list_adapters() -> list[str]:
    """Names of the registered adapters, in the order :func:`find_adapter` tries them (newest first)."""
    return list(reversed(_order))


def _adapters() -> list[ModelAdapter]:
    return [ADAPTERS.get(name) for name in reversed(_order)]


# ------------------------------------------------------------------------------------------------- detection


def find_adapter(model: nn.Module) -> ModelAdapter | None:
    """The adapter of ``model``'s family (the newest registered that matches), or None."""
    return next((a for a in _adapters() if a.matches(model)), None)


def adapter_for(model: nn.Module) -> ModelAdapter:
    """Like :func:`find_adapter`, but a model of no known family is an :class:`AdapterError`."""
    adapter = find_adapter(model)
    if adapter is None:
        known = "; ".join(f"{a.name} ({a.description})" for a in _adapters())
        raise AdapterError(f"no model adapter describes a {type(model).__name__}; known families: {known}. Add "
                           f"one with compress.adapters.register_adapter")
    return adapter


def adapter_for_source(source: Mapping[str, Any]) -> ModelAdapter:
    """The adapter that builds sources of ``source["kind"]`` (the first registered for that kind)."""
    kind = source.get("kind")
    for name in _order:
        if ADAPTERS.get(name).source_kind == kind:
            return ADAPTERS.get(name)
    kinds = sorted({a.source_kind for a in _adapters() if a.source_kind})
    raise AdapterError(f"no model adapter builds sources of kind {kind!r}; known kinds: {', '.join(kinds)}")


# ---------------------------------------------------------------------------- questions about one module


def split_block(block: nn.Module) -> tuple[Half, Half] | None:
    """A block's ``(mixer half, MLP half)``, whose composition is its forward, from the adapter that knows the
    block's class; None for a block no adapter splits (token pruning then reduces after the whole block)."""
    return next((h for a in _adapters() if (h := a.split_block(block)) is not None), None)


def head_layout(module: nn.Module) -> HeadLayout | None:
    """The :class:`HeadLayout` of an attention module, from the adapter that knows its class; None otherwise."""
    return next((h for a in _adapters() if (h := a.head_layout(module)) is not None), None)


def sync_pruned(module: nn.Module) -> None:
    """Let every adapter re-derive the sizes ``module`` keeps outside its tensors (if it owns its class)."""
    for adapter in _adapters():
        adapter.sync_pruned(module)


for _builtin in (TimmAdapter, TimmViTAdapter, TimmMetaFormerAdapter, MixerNASAdapter):  # generic first: tried last
    register_adapter(_builtin)

__all__ = [
    "ADAPTERS",
    "AdapterError",
    "AttentionRun",
    "Half",
    "HeadLayout",
    "MixerNASAdapter",
    "ModelAdapter",
    "Source",
    "TimmAdapter",
    "TimmMetaFormerAdapter",
    "TimmViTAdapter",
    "adapter_for",
    "adapter_for_source",
    "find_adapter",
    "first_conv_in",
    "get_adapter",
    "head_layout",
    "list_adapters",
    "native_input_size",
    "register_adapter",
    "split_block",
    "sync_pruned",
    "unregister_adapter",
]
