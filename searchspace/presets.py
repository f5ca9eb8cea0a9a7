"""Published hand-designed models as points of the space (``preset(name) -> Arch``).

Each preset cites where its configuration comes from. Those that timm ships are checked parameter for parameter
against timm's model in the tests (``timm_name``); the others against the count their paper or code reports
(``published_params``, in millions). Presets are ordinary architectures: the search evaluates the ones that fit the
latency budget as baselines beside its own candidates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .arch import Arch, Blocks, Stage
from .registry import Registry


@dataclass(frozen=True)
class PresetSpec:
    name: str
    make: Callable[[], Arch]
    source: str  # paper and code the configuration is taken from
    timm_name: str | None = None  # timm model with the same architecture, for side-by-side parity
    published_params: float | None = None  # millions, as reported at 1000 classes and 224x224
    notes: str = ""


PRESETS: Registry[PresetSpec] = Registry("preset")


def register_preset(name: str, make: Callable[[], Arch], *, source: str = "", timm_name: str | None = None,
                    published_params: float | None = None, notes: str = "", overwrite: bool = False) -> None:
    """Add a named architecture; ``make`` is called on each :func:`preset` lookup."""
    PRESETS.add(name, PresetSpec(name, make, source, timm_name, published_params, notes), overwrite=overwrite)
    from .timm_compat import register_timm_preset

    register_timm_preset(name)


def preset(name: str) -> Arch:
    """The architecture of a named preset; unknown names raise an error listing the close matches."""
    arch = PRESETS.get(name).make()
    return arch.replace(name=name)


def list_presets() -> list[str]:
    return PRESETS.names()


def preset_spec(name: str) -> PresetSpec:
    return PRESETS.get(name)


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
