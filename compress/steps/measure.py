"""``measure``: parameters, MACs, measured latency and validation accuracy of the model at this point.

Latency follows :mod:`searchspace.latency`'s protocol (inference mode, fixed threads, warm-up until steady, short
interleaved rounds, on the CPU corrected by the reference workload timed in the same rounds; the median with its
95% interval) and carries its context (device, threads, input, dtype, torch version).
``compress.apply`` calls :func:`measure_model` before the recipe and after every step, so the report has the
figures step by step; a ``measure`` step in a recipe records them again at that point, with its own settings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import nn

from searchspace.latency import InputSpec
from searchspace.latency.measure import RunOptions
from searchspace.training import agreement, top1, validate

from . import Param, StepContext, register_step


@dataclass(frozen=True)
class MeasureOptions:
    """How latency is measured (see :func:`searchspace.latency.measure_latency`)."""

    warmup: int = 10  # untimed runs at least (warm-up goes on until steady)
    rounds: int = 10  # interleaved rounds before the interval is checked; the statistic is their median
    target_round_ms: float = 20.0  # a round lasts about this long (sets the runs per round)
    max_extra_rounds: int = 40  # more rounds while the 95% interval is wider than +-2%, at most this many
    runtime: str = "eager"  # what runs the model (searchspace.runtimes): the budget is judged where it deploys
    dtype: str | None = None  # precision of the timed model; None = the input spec's
    run: RunOptions = RunOptions()  # channels-last, CUDA graphs, cuDNN benchmark

    def kwargs(self) -> dict[str, Any]:
        return {"warmup": self.warmup, "rounds": self.rounds, "target_round_ms": self.target_round_ms,
                "max_extra_rounds": self.max_extra_rounds, "runtime": self.runtime, **self.run.kwargs()}

    def spec(self, spec: InputSpec) -> InputSpec:
        """The input latency is measured on: ``spec`` in this precision."""
        return spec if self.dtype is None else dataclasses.replace(spec, dtype=self.dtype)


def options(ctx: StepContext) -> MeasureOptions:
    """The measurement settings of this run (``compress.apply(measure=...)``, ``--rounds``)."""
    return ctx.state.get("measure_options") or MeasureOptions()


def measure_model(model: nn.Module, ctx: StepContext, *, latency: bool = True, accuracy: bool = True,
                  settings: MeasureOptions | None = None) -> dict[str, Any]:
    """``params``, ``macs``, and (if asked) ``latency_ms`` with ``latency_spread``/``latency_context``, and on
    ``ctx.data.val``: ``agreement`` (share of images whose top-1 class is the original model's) when there is data,
    ``accuracy`` (top-1 in [0, 1]) and ``val_loss`` (cross-entropy) when it has labels."""
    from searchspace.latency import count_macs, count_params, measure_latency

    spec = ctx.input_spec
    figures: dict[str, Any] = {"params": count_params(model), "macs": count_macs(model, spec)}
    if latency:
        settings = settings or options(ctx)
        result = measure_latency(model, settings.spec(spec), device=ctx.device, threads=ctx.threads,
                                 **settings.kwargs())
        figures.update(latency_ms=result.value_ms, latency_spread=result.spread,
                       latency_context=str(result.context))
    if accuracy and ctx.data is not None:
        was_training = model.training
        if ctx.data.labelled:
            figures["accuracy"], figures["val_loss"] = validate(model, ctx.data.val, device=ctx.device)
        if ctx.reference is not None:
            if "reference_top1" not in ctx.state:  # the original never changes: its classes are computed once
                ctx.state["reference_top1"] = top1(ctx.reference, ctx.data.val, device=ctx.device)
            figures["agreement"] = agreement(model, ctx.state["reference_top1"], ctx.data.val, device=ctx.device)
        model.train(was_training)
    return figures


@register_step(
    "measure",
    description="record params, MACs, measured latency and (with data) validation accuracy at this point",
    params={
        "latency": Param(bool, True, help="measure latency on the device (false: counts and accuracy only)"),
        "accuracy": Param(bool, True, help="validation top-1 accuracy (with labels) and agreement with the "
                                            "original model, when there is data"),
        "rounds": Param(int, None, minimum=1, help="latency rounds (default: the run's setting, 10)"),
    },
)
def measure(ctx: StepContext, latency: bool, accuracy: bool, rounds: int | None) -> dict[str, Any]:
    settings = options(ctx)
    if rounds is not None:
        settings = dataclasses.replace(settings, rounds=rounds)
    return measure_model(ctx.model, ctx, latency=latency, accuracy=accuracy, settings=settings)
