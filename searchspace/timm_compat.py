"""Make presets and saved architectures creatable with ``timm.create_model``.

After ``import searchspace`` every preset is a timm model named ``mixernas_`` + the preset name in lower case with
dashes as underscores (``mixernas_caformer_s18``), and any architecture can be created with
``timm.create_model("mixernas", arch=...)`` where ``arch`` is an ``Arch``, a dict or a path to an arch JSON file.
Presets registered later (``searchspace.register_preset``) become timm models too.

The models have timm's interface (:class:`~searchspace.model.MetaFormerNet`): ``forward_features``,
``forward_head(x, pre_logits=True)``, ``forward_intermediates``, ``prune_intermediate_layers``,
``reset_classifier``, ``set_grad_checkpointing``, ``feature_info`` and a ``pretrained_cfg`` (MixerNAS ships no
weights; the cfg gives the input size, normalisation, first convolution and classifier names). So timm's
training script, benchmark and feature extraction work on them, with every feature wrapper
(``feature_cls="list"`` by default, ``"hook"``, ``"getter"``, ``"fx"``), and the models trace with ``torch.fx``
(timm's and torchvision's ``create_feature_extractor``), ``torch.export`` and ``torch.compile``::

    import searchspace, timm
    model = timm.create_model("mixernas_poolformerv2_s12", num_classes=10, drop_path_rate=0.1)
    feats = timm.create_model("mixernas", arch="runs/best/arch.json", features_only=True, out_indices=(1, 2, 3))
    final, maps = model.forward_intermediates(images, indices=2)   # the last two stages' maps
"""

from __future__ import annotations

import re
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, register_model
from torch import nn

from .arch import Arch
from .blocks import HEADS, STEMS
from .errors import MixerNASError
from .model import MetaFormerNet, check_global_pool, stage_resolutions
from .presets import on_preset_registered, preset, resolve_arch

default_cfgs: dict[str, dict[str, Any]] = {}
__all__: list[str] = ["timm_name", "register_timm_preset"]


def timm_name(preset_name: str) -> str:
    """``"CAFormer-S18"`` -> ``"mixernas_caformer_s18"``."""
    return "mixernas_" + re.sub(r"[^0-9a-z]+", "_", preset_name.lower()).strip("_")


def _cfg(**arch_cfg: Any) -> dict[str, Any]:
    cfg = dict(url="", num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.9,
               interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
               first_conv="stem.conv", classifier="head.fc", license="apache-2.0")
    return {**cfg, **arch_cfg}


def _arch_cfg(arch: Arch) -> dict[str, Any]:
    """The ``pretrained_cfg`` entries the architecture decides: first convolution, classifier, pooled map size.

    The stem is built without storage (on the meta device, so no random numbers are drawn) and asked for its first
    convolution; a head names its final layers in ``classifier_names`` (``searchspace.blocks``), and a head that
    does not is named as a whole.
    """
    with torch.device("meta"):
        stem = STEMS.get(arch.stem)(3, arch.stages[0].width, arch)
    first_conv = next((f"stem.{n}" if n else "stem" for n, m in stem.named_modules() if isinstance(m, nn.Conv2d)),
                      None)
    names = getattr(HEADS.get(arch.head), "classifier_names", ())
    classifier = tuple(f"head.{n}" for n in names) or ("head",)
    return dict(first_conv=first_conv, classifier=classifier[0] if len(classifier) == 1 else classifier,
                pool_size=stage_resolutions(arch, 224, 224)[-1])


class _TimmMetaFormer(MetaFormerNet):
    """``MetaFormerNet`` with timm's constructor keywords (``drop_rate``, ``drop_path_rate``, ``global_pool``)."""

    def __init__(self, arch: Arch | str | dict, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0,
                 drop_path_rate: float | None = None, global_pool: str | None = "avg", **unused: Any):
        check_global_pool(global_pool)
        unknown = sorted(k for k, v in unused.items() if v is not None)
        if unknown:
            raise MixerNASError(f"unsupported model argument(s) for a MixerNAS model: {', '.join(unknown)}")
        arch = resolve_arch(arch)
        if drop_rate:
            arch = arch.replace(head_dropout=drop_rate)
        super().__init__(arch, num_classes=num_classes, in_chans=in_chans, drop_path=drop_path_rate)


def _create(variant: str, arch: Any, pretrained: bool = False, **kwargs: Any) -> MetaFormerNet:
    if pretrained:
        raise MixerNASError("MixerNAS ships no pretrained weights; train the model or load your own checkpoint")
    if arch is None:
        raise MixerNASError("timm.create_model('mixernas', arch=...) needs an Arch, a dict or an arch JSON path")
    arch = resolve_arch(arch)
    out_indices = kwargs.pop("out_indices", tuple(range(len(arch.stages))))
    overlay = {**_arch_cfg(arch), **(kwargs.pop("pretrained_cfg_overlay", None) or {})}
    return build_model_with_cfg(_TimmMetaFormer, variant, pretrained=False, pretrained_cfg_overlay=overlay,
                                feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
                                arch=arch, **kwargs)


def register_timm_preset(preset_name: str) -> str:
    """Register preset ``preset_name`` as a timm model; returns the timm model name."""
    name = timm_name(preset_name)

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> MetaFormerNet:
        return _create(name, preset(preset_name), pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"MixerNAS preset {preset_name} (see searchspace.preset_spec)."
    default_cfgs[name] = _cfg(**_arch_cfg(preset(preset_name)))
    register_model(entrypoint)
    return name


def mixernas(pretrained: bool = False, arch: Any = None, **kwargs: Any) -> MetaFormerNet:
    """Any MixerNAS architecture: ``timm.create_model("mixernas", arch=<Arch | dict | path.json>)``."""
    return _create("mixernas", arch, pretrained, **kwargs)


default_cfgs["mixernas"] = _cfg()
register_model(mixernas)
on_preset_registered(register_timm_preset)
