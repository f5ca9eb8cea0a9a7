"""Published hand-designed models (``preset(name) -> Arch``), eight of them points of the default space.

Each preset cites where its configuration comes from. Those that timm ships are checked parameter for parameter
against timm's model in the tests (``timm_name``); the others against the count their paper or code reports
(``published_params``, in millions). Presets are ordinary architectures: those that are points of the search space
(``space.params_of(preset(name))``) are a search's first trials, the others are evaluated beside it the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .arch import Arch, Blocks, Stage
from .errors import MixerNASError
from .registry import Registry


@dataclass(frozen=True)
class PresetSpec:
    name: str
    make: Callable[[], Arch]
    source: str  # paper and code the configuration is taken from
    timm_name: str | None = None  # timm model with the same architecture, for side-by-side parity
    published_params: float | None = None  # millions, as reported at 1000 classes and 224x224
    published_precision: float = 0.1  # millions: the rounding of the published figure (HorNet reports "22M")
    notes: str = ""


PRESETS: Registry[PresetSpec] = Registry("preset")
_listeners: list[Callable[[str], None]] = []


def register_preset(name: str, make: Callable[[], Arch], *, source: str = "", timm_name: str | None = None,
                    published_params: float | None = None, published_precision: float = 0.1, notes: str = "",
                    overwrite: bool = False) -> None:
    """Add a named architecture; ``make`` is called on each :func:`preset` lookup.

    Once ``searchspace`` is imported the preset is also a timm model (``searchspace.timm_compat``).
    """
    spec = PresetSpec(name, make, source, timm_name, published_params, published_precision, notes)
    PRESETS.add(name, spec, overwrite=overwrite)
    for callback in _listeners:
        callback(name)


def on_preset_registered(callback: Callable[[str], None]) -> None:
    """Call ``callback(name)`` for every preset registered so far and for each one registered later.

    This is how ``timm_compat`` makes every preset a timm model without this module importing timm.
    """
    _listeners.append(callback)
    for name in PRESETS.names():
        callback(name)


def preset(name: str) -> Arch:
    """The architecture of a named preset; unknown names raise an error listing the close matches."""
    arch = PRESETS.get(name).make()
    return arch.replace(name=name)


def list_presets() -> list[str]:
    return PRESETS.names()


def preset_spec(name: str) -> PresetSpec:
    return PRESETS.get(name)


def resolve_arch(arch_or_name: Arch | str | Path | dict[str, Any]) -> Arch:
    """An ``Arch`` from an ``Arch``, a preset name, a path to an arch JSON file, or a dict.

    >>> resolve_arch("CAFormer-S18").mixers
    ('sepconv', 'sepconv', 'attention', 'attention')
    """
    if isinstance(arch_or_name, Arch):
        return arch_or_name
    if isinstance(arch_or_name, dict):
        return Arch.from_dict(arch_or_name)
    if isinstance(arch_or_name, (str, Path)):
        text = str(arch_or_name)
        if text in PRESETS or not (text.endswith(".json") or Path(text).exists()):
            return preset(text)
        return Arch.load(text)
    raise MixerNASError(f"expected an Arch, a preset name or an arch JSON path, got {type(arch_or_name).__name__}")


# ------------------------------------------------------------------------------------ MetaFormer baselines (v2)

S12 = (2, 2, 6, 2)
S18 = (3, 3, 9, 3)
WIDTHS = (64, 128, 320, 512)
META = "MetaFormer Baselines for Vision, Yu et al. 2022 (arXiv 2210.13452); timm metaformer.py"


def _metaformer(mixers, depths, *, norm: str, head: str, mixer_args=None) -> Arch:
    mixer_args = mixer_args or [{}] * 4
    stages = tuple(
        Stage(mixer=m, depth=d, width=w, mixer_args=a, res_scale=1.0 if i >= 2 else None)
        for i, (m, d, w, a) in enumerate(zip(mixers, depths, WIDTHS, mixer_args))
    )
    return Arch(stages=stages, norm=norm, head=head)


register_preset(
    "IdentityFormer-S12",
    lambda: _metaformer(["identity"] * 4, S12, norm="groupnorm_nobias", head="linear"),
    source=META, published_params=11.9,
    notes="ImageNet-1k top-1 74.6 at 224",
)
register_preset(
    "RandFormer-S12",
    lambda: _metaformer(["identity", "identity", "random", "random"], S12, norm="groupnorm_nobias", head="linear"),
    source=META, published_params=11.9,
    notes="the paper counts 11.9M trainable + 0.2M frozen mixing matrices; ours regenerates the frozen matrices "
          "per input size from a seed, so they are not parameters. Top-1 76.6",
)
register_preset(
    "PoolFormerV2-S12",
    lambda: _metaformer(["pooling"] * 4, S12, norm="groupnorm_nobias", head="linear"),
    source=META, timm_name="poolformerv2_s12", published_params=11.9, notes="top-1 78.0",
)
register_preset(
    "ConvFormer-S18",
    lambda: _metaformer(["sepconv"] * 4, S18, norm="layernorm_nobias", head="mlp"),
    source=META, timm_name="convformer_s18", published_params=26.8, notes="top-1 83.0",
)
register_preset(
    "CAFormer-S18",
    lambda: _metaformer(["sepconv", "sepconv", "attention", "attention"], S18, norm="layernorm_nobias", head="mlp"),
    source=META, timm_name="caformer_s18", published_params=26.3, notes="top-1 83.6",
)


# -------------------------------------------------------------------------------------------------- EfficientMod

EMOD = "Ma et al., Efficient Modulation for Vision Networks, ICLR 2024 (arXiv 2403.19963); github ma-xu/EfficientMod"


def _efficientmod(widths, depths, attention_depths, expansion: int, att_ratios, drop_path: float = 0.0) -> Arch:
    """Fused modulation blocks (expansion alternating 1 and r, LayerScale 1e-4), then plain attention blocks.

    EfficientMod's attention uses 8 heads of max(width/8, 32) channels, a biased projection, LayerNorm with bias
    and a GELU MLP with bias, without LayerScale; its stem is a 7x7 stride-4 conv with padding 3, its downsampling
    a 3x3 stride-2 conv, each followed by LayerNorm; the head normalises the map before pooling.
    """
    stages = []
    for width, depth, n_att, ratio in zip(widths, depths, attention_depths, att_ratios):
        extra = ()
        if n_att:
            extra = (Blocks(mixer="attention", depth=n_att, mlp_ratio=float(ratio), block="metaformer",
                            mixer_args={"num_heads": 8, "min_head_dim": 32, "proj_bias": True}),)
        stages.append(Stage(mixer="modulation", depth=depth, width=width, mixer_args={"kernel_size": 7},
                            cycle={"expansion": (1, expansion)}, block="fused", layer_scale=1e-4, extra=extra))
    return Arch(stages=tuple(stages), stem="conv7_s4_p3", downsample="conv3_norm", embed_norm="layernorm",
                norm="layernorm", norm_eps=1e-5, act="gelu", mlp_bias=True, head="linear", head_norm="layernorm",
                head_norm_first=True, drop_path=drop_path)


register_preset(
    "EfficientMod-xxs",
    lambda: _efficientmod((32, 64, 128, 256), (2, 2, 6, 2), (0, 0, 1, 2), 6, (4, 4, 4, 4)),
    source=EMOD, published_params=4.7, notes="top-1 76.0; 3.0 ms P100, 10.2 ms Xeon CPU (ONNX, batch 1)",
)
register_preset(
    "EfficientMod-xs",
    lambda: _efficientmod((32, 64, 144, 288), (3, 3, 4, 2), (0, 0, 3, 3), 4, (4, 4, 4, 4)),
    source=EMOD, published_params=6.6,
    notes="the released code alternates expansion 1 and 4 for xs (1 and 6 for xxs and s); top-1 78.3",
)
register_preset(
    "EfficientMod-s",
    lambda: _efficientmod((32, 64, 144, 312), (4, 4, 8, 4), (0, 0, 4, 4), 6, (4, 4, 4, 5), drop_path=0.02),
    source=EMOD, published_params=12.9, notes="top-1 81.0; 5.5 ms P100, 23.5 ms Xeon CPU",
)


# ------------------------------------------------------------------------------------------------------ CAS-ViT

CASVIT = "Zhang et al., CAS-ViT: Convolutional Additive Self-attention Vision Transformers (arXiv 2408.03703); " \
         "github Tianfang-Zhang/CAS-ViT"


def _casvit(widths, depths) -> Arch:
    """CAS-ViT blocks with BatchNorm throughout; two-conv stem; 3x3 stride-2 conv + BN downsampling.

    The published parameter counts include the distillation head, so the preset keeps it.
    """
    stages = tuple(Stage(mixer="additive", depth=d, width=w) for w, d in zip(widths, depths))
    return Arch(stages=stages, stem="conv3x2", downsample="conv3_norm", embed_norm="batchnorm", norm="batchnorm",
                act="gelu", mlp_bias=True, block="casvit", head="linear_distill", head_norm="batchnorm",
                head_norm_first=True)


register_preset("CAS-ViT-XS", lambda: _casvit((48, 56, 112, 220), (2, 2, 4, 2)), source=CASVIT,
                published_params=3.20, published_precision=0.01, notes="top-1 77.5 (78.7 with distillation)")
register_preset("CAS-ViT-S", lambda: _casvit((48, 64, 128, 256), (3, 3, 6, 3)), source=CASVIT,
                published_params=5.76, published_precision=0.01, notes="top-1 80.2 (81.1 with distillation)")
register_preset("CAS-ViT-M", lambda: _casvit((64, 96, 192, 384), (3, 3, 6, 3)), source=CASVIT,
                published_params=12.42, published_precision=0.01, notes="top-1 82.2 (83.0 with distillation)")
register_preset("CAS-ViT-T", lambda: _casvit((96, 128, 256, 512), (3, 3, 6, 3)), source=CASVIT,
                published_params=21.76, published_precision=0.01, notes="top-1 83.0 (83.9 with distillation)")


# ----------------------------------------------------------------------------------- higher-order Hadamard (HorNet)

HORNET = "Rao et al., HorNet: Efficient High-Order Spatial Interactions with Recursive Gated Convolutions, " \
         "NeurIPS 2022 (arXiv 2207.14284); github raoyongming/HorNet"


def _hornet_t() -> Arch:
    """HorNet-T 7x7: g^n conv of orders 2-5 by stage, LayerNorm with bias, GELU MLP with bias, LayerScale 1e-6."""
    stages = tuple(
        Stage(mixer="hadamard", depth=d, width=w, mixer_args={"order": o, "kernel_size": 7}, layer_scale=1e-6)
        for w, d, o in zip((64, 128, 256, 512), (2, 3, 18, 2), (2, 3, 4, 5))
    )
    return Arch(stages=stages, stem="patch4", downsample="norm_conv2", embed_norm="layernorm", norm="layernorm",
                act="gelu", mlp_bias=True, head="linear", head_norm="layernorm")


register_preset("HorNet-T-7x7", _hornet_t, source=HORNET, published_params=22.0, published_precision=1.0,
                notes="the higher-order Hadamard mixer as published; 22.41M exactly; top-1 82.8")


# ---------------------------------------------------------------- small models of the newer mixers on the S12 frame

STYLE = "configuration defined by MixerNAS on the MetaFormer S12 frame (no published model to match); " \
        "mixers after "


register_preset(
    "S2AFormer-style-S12",
    lambda: _metaformer(["sepconv", "sepconv", "strip_attention", "strip_attention"], S12, norm="layernorm_nobias",
                        head="linear", mixer_args=[{}, {}, {"sr_ratio": 2}, {"sr_ratio": 1}]),
    source=STYLE + "S2AFormer (arXiv 2505.22195)",
    notes="convolutions in stages 1-2, strip attention with spatially reduced keys/values in stages 3-4",
)
register_preset(
    "ConViT-style-S12",
    lambda: _metaformer(["sepconv", "sepconv", "gpsa", "attention"], S12, norm="layernorm_nobias", head="linear"),
    source=STYLE + "ConViT (d'Ascoli et al., ICML 2021)",
    notes="gated positional self-attention (convolution-like at init) in stage 3, plain attention in stage 4",
)
register_preset(
    "Hadamard-S12",
    lambda: _metaformer(["hadamard"] * 4, S12, norm="layernorm_nobias", head="linear",
                        mixer_args=[{"order": o} for o in (2, 3, 4, 5)]),
    source=STYLE + "HorNet's recursive gated convolution and the Hadamard-product survey (arXiv 2504.13112)",
    notes="interaction order rising from 2 to 5 with depth, as in HorNet",
)
