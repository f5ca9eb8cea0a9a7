"""Token mixers: one registry, every entry mapping ``(B, C, H, W)`` to ``(B, C, H, W)``.

A mixer is any ``nn.Module`` whose constructor takes the channel count first (``factory(dim, **args)``) and
whose forward accepts any height and width (odd, non-square, down to 1x1). Forwards read the channel count
from the input, so channel pruning cannot break them.

Register your own in a few lines and it becomes searchable like a built-in one::

    import torch.nn as nn
    import searchspace

    @searchspace.register_mixer("maxpool", description="3x3 max pooling minus the input")
    class MaxPoolMixer(nn.Module):
        def __init__(self, dim: int, size: int = 3):
            super().__init__()
            self.pool = nn.MaxPool2d(size, stride=1, padding=size // 2)

        def forward(self, x):
            return self.pool(x) - x

    arch = searchspace.preset("PoolFormerV2-S12").replace_mixer(2, "maxpool")

A mixer whose arguments can be wrong declares a static ``check(dim, **args) -> str | None`` that says why they
cannot build it (``None`` when they can). Architectures are validated with it, so a bad search space or arch file
fails before any module is built, and the built-in mixers' constructors raise :class:`MixerNASError` with the same
reason. Forwards are plain tensor code without branches on sizes, so models trace with ``torch.fx``,
``torch.export`` and ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..errors import MixerNASError
from ..registry import Registry


@dataclass(frozen=True)
class MixerSpec:
    """What the registry knows about a mixer.

    Attributes:
        name: registered name, used in architectures and search spaces (``"pooling"``).
        factory: ``factory(dim, **args) -> nn.Module``; usually the module class itself.
        description: one line shown by ``list_mixers(verbose=True)`` and the docs.
        reference: where the design comes from (paper, arXiv id).
        attention: the mixer computes token-to-token attention weights (declared, never guessed from the type);
            token pruning uses this to find the stages it may prune.
        defaults: the factory's keyword arguments and their defaults, read from its signature.
    """

    name: str
    factory: Callable[..., nn.Module]
    description: str = ""
    reference: str = ""
    attention: bool = False
    defaults: Mapping[str, Any] = field(default_factory=dict)

    def create(self, dim: int, **args: Any) -> nn.Module:
        unknown = sorted(set(args) - set(self.defaults))
        if unknown and not self._takes_kwargs():
            known = ", ".join(sorted(self.defaults)) or "none"
            raise MixerNASError(f"mixer {self.name!r} got unknown argument(s) {', '.join(unknown)}; it takes: {known}")
        return self.factory(dim, **args)

    def _takes_kwargs(self) -> bool:
        params = inspect.signature(self.factory).parameters.values()
        return any(p.kind is p.VAR_KEYWORD for p in params)


MIXERS: Registry[MixerSpec] = Registry("mixer")


def _signature_defaults(factory: Callable[..., nn.Module]) -> dict[str, Any]:
    params = list(inspect.signature(factory).parameters.values())
    if not params or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
        raise MixerNASError(f"a mixer factory must take the channel count as its first argument: {factory!r}")
    return {
        p.name: p.default
        for p in params[1:]
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is not p.empty
    }


def register_mixer(
    name: str,
    factory: Callable[..., nn.Module] | None = None,
    *,
    description: str = "",
    reference: str = "",
    attention: bool = False,
    overwrite: bool = False,
):
    """Register a token mixer under ``name``; usable directly or as a class decorator.

    ``factory(dim, **args)`` must return a module mapping ``(B, C, H, W)`` to the same shape.
    """

    def add(f: Callable[..., nn.Module]):
        spec = MixerSpec(name, f, description, reference, attention, _signature_defaults(f))
        MIXERS.add(name, spec, overwrite=overwrite)
        return f

    return add if factory is None else add(factory)


def get_mixer(name: str) -> MixerSpec:
    """The registered :class:`MixerSpec`; unknown names raise an error listing the close matches."""
    return MIXERS.get(name)


def create_mixer(name: str, dim: int, **args: Any) -> nn.Module:
    """Build mixer ``name`` for ``dim`` channels with the given keyword arguments."""
    return get_mixer(name).create(dim, **args)


def list_mixers() -> list[str]:
    """Names of all registered mixers, built-in and user-registered, sorted."""
    return MIXERS.names()


def unregister_mixer(name: str) -> None:
    MIXERS.remove(name)


def _register_builtins() -> None:
    import importlib

    for module in ("basic", "attention", "modulation", "additive"):  # each registers its mixers on import
        importlib.import_module(f"{__name__}.{module}")


_register_builtins()
