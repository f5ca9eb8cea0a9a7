"""Compression steps: a registry of named, parameter-checked operations on a model.

A step is a function ``fn(ctx: StepContext, **params) -> dict`` registered with the parameters it takes; it
changes ``ctx.model`` (in place or by assigning a new module) and returns the figures it wants in the report.
A recipe (see :mod:`compress.recipe`) is validated whole against these declarations before any step runs::

    from compress.steps import Param, register_step

    @register_step("zero_bias", description="zero every bias (a toy example)",
                   params={"scale": Param(float, 0.0, minimum=0.0)})
    def zero_bias(ctx, scale):
        for m in ctx.model.modules():
            if getattr(m, "bias", None) is not None:
                m.bias.data.mul_(scale)
        return {}
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from searchspace.errors import MixerNASError
from searchspace.registry import Registry

_MISSING = object()


@dataclass(frozen=True)
class Param:
    """A step parameter: its type, default (omit for required), and allowed values or range."""

    type: type | tuple[type, ...]
    default: Any = _MISSING
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[Any, ...] | None = None
    help: str = ""

    @property
    def required(self) -> bool:
        return self.default is _MISSING


@dataclass
class StepContext:
    """What the steps share while a recipe runs."""

    model: nn.Module  # the model being compressed (steps replace or modify it)
    teacher: nn.Module | None = None  # the uncompressed model, for distillation
    reference: nn.Module | None = None  # the model as given, before any step: agreement is measured against it
    data: Any = None  # a searchspace.data.DataBundle, or None (steps that need data say so)
    input_spec: Any = None  # searchspace.latency.InputSpec the model is measured at
    device: str = "cpu"
    threads: int | None = None
    arch: Any = None  # searchspace Arch if the model is one of ours, else None
    model_name: str | None = None  # timm model name if the model is a timm model
    log: Callable[[str], None] = print
    state: dict[str, Any] = field(default_factory=dict)  # free-form notes shared between steps


@dataclass(frozen=True)
class StepSpec:
    name: str
    fn: Callable[..., dict]
    params: dict[str, Param]
    description: str = ""
    needs_data: bool = False


STEPS: Registry[StepSpec] = Registry("step")


def register_step(name: str, *, params: dict[str, Param] | None = None, description: str = "",
                  needs_data: bool = False, overwrite: bool = False):
    """Register ``fn(ctx, **params) -> dict`` as recipe step ``name``."""

    def add(fn: Callable[..., dict]) -> Callable[..., dict]:
        STEPS.add(name, StepSpec(name, fn, dict(params or {}), description, needs_data), overwrite=overwrite)
        return fn

    return add


def get_step(name: str) -> StepSpec:
    return STEPS.get(name)


def list_steps() -> list[str]:
    return STEPS.names()


class RecipeError(MixerNASError):
    """A recipe that cannot run as written; the message names the path (``steps[2].ratio``)."""


def _register_builtins() -> None:
    for module in ("measure", "finetune", "distill", "low_rank", "channel", "tokens", "budget"):
        importlib.import_module(f"{__name__}.{module}")  # each registers its steps


_register_builtins()
