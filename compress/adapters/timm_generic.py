"""Any model ``timm.create_model`` made: rebuilt from its timm name. The timm MetaFormer and ViT adapters extend it.

A model of another timm family (ResNet, ConvNeXt, ...) is channel-pruned, saved and reloaded through this adapter;
it declares no attention runs, so token pruning refuses it with a message saying so.
"""

from __future__ import annotations

import timm
from torch import nn

import searchspace  # noqa: F401  (registers the mixernas_* timm models, which build() may be asked for)

from .base import AdapterError, ModelAdapter, Source, first_conv_in


class TimmAdapter(ModelAdapter):
    name = "timm"
    description = "any other model timm.create_model makes (rebuilt from its timm name)"
    source_kind = "timm"

    def matches(self, model: nn.Module) -> bool:
        return type(model).__module__.split(".")[0] == "timm" or timm_architecture(model) is not None

    def describe(self, model: nn.Module, recorded: Source | None = None) -> Source | None:
        if recorded is not None:
            source = dict(recorded)
            source["kwargs"] = dict(source.get("kwargs") or {})
        else:
            name = timm_architecture(model)
            if name is None:
                return None
            source = {"kind": "timm", "name": name, "kwargs": {}}
            if (first_conv_in(model) or 3) != 3:
                source["kwargs"]["in_chans"] = first_conv_in(model)
        if isinstance(getattr(model, "num_classes", None), int):
            source["kwargs"]["num_classes"] = model.num_classes  # reset_classifier changes it
        return source

    def build(self, source: Source) -> nn.Module:
        kwargs = dict(source.get("kwargs") or {})
        if isinstance(kwargs.get("img_size"), list):
            kwargs["img_size"] = tuple(kwargs["img_size"])
        try:
            return timm.create_model(source["name"], pretrained=False, **kwargs)
        except RuntimeError as exc:
            raise AdapterError(f"timm cannot create {source['name']!r} with {kwargs}: {exc}") from None


def timm_architecture(model: nn.Module) -> str | None:
    """The timm name ``model`` was created under (``pretrained_cfg["architecture"]``), or None."""
    name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    return name if isinstance(name, str) and name else None


# ------------------------------------------------------------------------------ timm's multi-head attention


def set_timm_heads(module: nn.Module, num_heads: int) -> None:
    module.num_heads = num_heads
    sync_timm_attention(module)


def sync_timm_attention(module: nn.Module) -> None:
    """head_dim, width and softmax scale of a timm attention module from its ``qkv`` width and ``num_heads``
    (timm's fused path uses ``1/sqrt(head_dim)`` regardless of ``scale``; the unfused path reads ``scale``: keep
    them the same)."""
    head_dim = module.qkv.out_features // (3 * module.num_heads)
    module.head_dim = head_dim
    module.scale = head_dim**-0.5
    for name in ("attention_dim", "attn_dim"):  # timm MetaFormer / timm.layers spelling
        if hasattr(module, name):
            setattr(module, name, module.num_heads * head_dim)
