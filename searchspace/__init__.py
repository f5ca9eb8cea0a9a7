"""MixerNAS search space: token mixers, MetaFormer architectures, presets and search spaces.

>>> import searchspace
>>> arch = searchspace.preset("CAFormer-S18")
>>> model = searchspace.build_model(arch, num_classes=10)
>>> searchspace.list_mixers()[:3]
['additive', 'attention', 'gpsa']
"""

from . import timm_compat  # noqa: F401  makes every preset (and "mixernas") a timm model
from .arch import Arch, Blocks, FrozenArgs, Stage
from .data import DataBundle, load_data
from .errors import InvalidArchError, MixerNASError, UnknownNameError
from .mixers import MixerSpec, create_mixer, get_mixer, list_mixers, register_mixer, unregister_mixer
from .model import MetaFormerNet, build_model
from .nas import SearchConfig, SearchResult, load_model, search
from .presets import list_presets, preset, preset_spec, register_preset, resolve_arch
from .space import ChoiceSpace, SearchSpace, StageChoices, get_space, list_spaces, register_space

__version__ = "0.1.0"

__all__ = [
    "Arch",
    "Blocks",
    "ChoiceSpace",
    "DataBundle",
    "FrozenArgs",
    "InvalidArchError",
    "MetaFormerNet",
    "MixerNASError",
    "MixerSpec",
    "SearchConfig",
    "SearchResult",
    "SearchSpace",
    "Stage",
    "StageChoices",
    "UnknownNameError",
    "build_model",
    "create_mixer",
    "get_mixer",
    "get_space",
    "list_mixers",
    "list_presets",
    "list_spaces",
    "load_data",
    "load_model",
    "preset",
    "preset_spec",
    "register_mixer",
    "register_preset",
    "register_space",
    "resolve_arch",
    "search",
    "unregister_mixer",
]
