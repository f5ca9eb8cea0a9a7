"""Make presets and saved architectures creatable with ``timm.create_model``.

After ``import searchspace`` every preset is a timm model named ``mixernas_`` + the preset name in lower case with
dashes as underscores (``mixernas_caformer_s18``), and any architecture can be created with
``timm.create_model("mixernas", arch=...)`` where ``arch`` is an ``Arch``, a dict or a path to an arch JSON file.
timm's training script, benchmark and feature extraction (``features_only=True``) then work on them::

    import searchspace, timm
    model = timm.create_model("mixernas_poolformerv2_s12", num_classes=10, drop_path_rate=0.1)
    feats = timm.create_model("mixernas", arch="runs/best/arch.json", features_only=True)
"""

from __future__ import annotations

import re
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, register_model

from .arch import Arch
from .errors import MixerNASError
from .model import MetaFormerNet, resolve_arch

default_cfgs: dict[str, dict[str, Any]] = {}
__all__: list[str] = ["timm_name", "register_timm_preset"]


def timm_name(preset_name: str) -> str:
    """``"CAFormer-S18"`` -> ``"mixernas_caformer_s18"``."""
    return "mixernas_" + re.sub(r"[^0-9a-z]+", "_", preset_name.lower()).strip("_")


def _cfg() -> dict[str, Any]:
    return dict(url="", num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.9,
                interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                first_conv="stem.conv", classifier="head.fc", license="apache-2.0")


class _TimmMetaFormer(MetaFormerNet):
    """``MetaFormerNet`` with timm's constructor keywords (``drop_rate``, ``drop_path_rate``, ``global_pool``)."""

    def __init__(self, arch: Arch | str | dict, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0,
                 drop_path_rate: float | None = None, global_pool: str = "avg", **unused: Any):
        if global_pool not in ("avg", ""):
            raise MixerNASError(f"global_pool={global_pool!r} is not supported; MixerNAS models use 'avg'")
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
    return build_model_with_cfg(_TimmMetaFormer, variant, pretrained=False,
                                feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
                                arch=arch, **kwargs)


def register_timm_preset(preset_name: str) -> str:
    """Register preset ``preset_name`` as a timm model; returns the timm model name."""
    name = timm_name(preset_name)

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> MetaFormerNet:
        from .presets import preset

        return _create(name, preset(preset_name), pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"MixerNAS preset {preset_name} (see searchspace.preset_spec)."
    default_cfgs[name] = _cfg()
    register_model(entrypoint)
    return name


def mixernas(pretrained: bool = False, arch: Any = None, **kwargs: Any) -> MetaFormerNet:
    """Any MixerNAS architecture: ``timm.create_model("mixernas", arch=<Arch | dict | path.json>)``."""
    return _create("mixernas", arch, pretrained, **kwargs)


default_cfgs["mixernas"] = _cfg()
register_model(mixernas)
