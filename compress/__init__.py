"""MixerNAS compression: YAML recipes of steps (channel pruning, token pruning, distillation, low-rank,
fine-tuning, measurement) applied to a search winner or to an existing timm checkpoint.

>>> import compress
>>> from searchspace.data import load_data
>>> loaded = compress.create_model("poolformerv2_s12", checkpoint="ps12.pth")          # doctest: +SKIP
>>> model, data, notes = compress.adapt_to_data(loaded.model, load_data(input_size=224))  # doctest: +SKIP
>>> small, report = compress.apply("recipes/prune-50-kd.yaml", model, data=data)         # doctest: +SKIP
>>> report.speedup, report.after["agreement"]                                            # doctest: +SKIP
(1.9, 0.93)

``adapt_to_data`` keeps the model's classifier: data of other classes (the digits, for an ImageNet checkpoint) is
used without labels, the training steps learn the original model's outputs, and the report gives the compressed
model's agreement with the original instead of accuracy.
>>> compress.save(small, "out/model"); compress.load("out/model")                     # doctest: +SKIP

The model given to :func:`apply` is left as it is; the compressed copy is returned. Steps live in a registry
(:func:`compress.steps.register_step`), so a recipe can use a step of yours like a built-in one. The command line,
``python -m compress``, is a thin shell over these functions. This package uses :mod:`searchspace`, never the
other way round.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from searchspace.errors import MixerNASError
from searchspace.latency.measure import num_threads

from .adapters.timm_generic import timm_architecture
from .checkpoint import HEAD_RESET_ATTR, LoadedModel, adapt_to_data, create_model, read_state_dict
from .recipe import Recipe, as_recipe, load_recipe, recipe_from_dict, recipe_from_yaml
from .report import Report, StepRecord, environment
from .saving import load, save
from .steps import Param, RecipeError, StepContext, list_steps, register_step
from .steps.measure import MeasureOptions, measure_model

__all__ = [
    "LoadedModel",
    "MeasureOptions",
    "Param",
    "Recipe",
    "RecipeError",
    "Report",
    "StepContext",
    "StepError",
    "adapt_to_data",
    "apply",
    "as_recipe",
    "create_model",
    "list_steps",
    "load",
    "load_recipe",
    "read_state_dict",
    "recipe_from_dict",
    "recipe_from_yaml",
    "register_step",
    "save",
]

TRAINING_STEPS = ("measure", "finetune")  # steps before which the teacher is not yet fixed (see apply)
TEACHER_STEPS = ("fit_budget",)  # steps besides distill that distil from ctx.teacher


class StepError(MixerNASError):
    """A step that could not run on this model; the message names the step (``steps[2] (channel_prune)``)."""


def apply(recipe: Recipe | str | Path | Mapping[str, Any], model: nn.Module, data: Any = None, *,
          teacher: nn.Module | None = None, input_spec: Any = None, device: str = "cpu", threads: int | None = None,
          measure: MeasureOptions | None = None, step_latency: bool = True, side_by_side: bool = True,
          label: str | None = None, notes: Iterable[str] = (), log: Callable[[str], None] = print,
          ) -> tuple[nn.Module, Report]:
    """Run ``recipe`` on a copy of ``model``; returns the compressed model and the :class:`Report`.

    Args:
        recipe: a :class:`Recipe`, a YAML file path or a mapping; validated whole before anything runs.
        model: the model to compress (left unchanged).
        data: a ``searchspace.data.DataBundle`` (training and validation data), or None; a recipe with steps that
            train (``finetune``, ``distill``, ...) needs it. Its channels must match the model's
            (:func:`adapt_to_data` makes grey data and a foreign classifier fit).
        teacher: the teacher for distillation; None = the model as it is before the first step that is neither
            ``measure`` nor ``finetune`` (the uncompressed model, after any fine-tuning to the data). On unlabelled
            data (``data.labelled`` False, see :func:`adapt_to_data`) every training step learns the teacher's
            outputs, and before there is one the model's own as given.
        input_spec: the ``searchspace.latency.InputSpec`` latency and MACs are measured at; None = one image of
            the data's size and channels (else the recipe's ``input_size``, else 224).
        device, threads: where it runs and is measured (``"cpu"``, ``"cuda"``), torch threads (None = torch's).
        measure: latency settings (:class:`MeasureOptions`: warm-up, rounds, round length).
        step_latency: measure latency after every step (False: only params, MACs and accuracy per step).
        side_by_side: measure the original and the compressed model together at the end for the speed-up.
        label, notes: how the report names the model, and notes it must carry (e.g. from :func:`adapt_to_data`).
    """
    from searchspace.latency import InputSpec, measure_many, resolve_device

    from .checkpoint import model_in_chans

    start = time.perf_counter()
    recipe = as_recipe(recipe)
    recipe.check_data(data is not None)
    device = str(resolve_device(device))
    channels = model_in_chans(model) or (data.in_chans if data is not None else 3)
    if data is not None and data.in_chans != channels:
        raise MixerNASError(f"the model takes {channels} input channels but the data has {data.in_chans}; "
                            f"compress.adapt_to_data(model, data) makes grey data fit an RGB model")
    if input_spec is None:
        size = data.input_size if data is not None else recipe.input_size or 224
        input_spec = InputSpec(batch=1, channels=channels, height=size, width=size)
    with num_threads(threads):  # training and evaluation too, not only the measurements
        work = copy.deepcopy(model).to(device)
        reference = copy.deepcopy(model).to(device).eval() if data is not None else None
        ctx = StepContext(model=work, teacher=teacher, reference=reference, data=data, input_spec=input_spec,
                          device=device, threads=threads, arch=getattr(work, "arch", None),
                          model_name=_timm_name(work), log=log)
        ctx.state["measure_options"] = measure or MeasureOptions()

        log(f"recipe {recipe.name}: {len(recipe.steps)} steps on {label or type(model).__name__}, input "
            f"{'x'.join(map(str, input_spec.shape))}, {device}")
        report = Report(recipe=recipe.to_dict(), model=label or type(model).__name__, input_shape=input_spec.shape,
                        device=device, data=data.describe() if data is not None else None, notes=list(notes),
                        environment=environment())
        for note in report.notes:
            log(f"note: {note}")
        report.before = measure_model(work, ctx, latency=step_latency)
        log(f"before: {_figures(report.before)}")
        trained = False
        uses_teacher = any((c.name == "distill" and c.params.get("teacher") is None) or c.name in TEACHER_STEPS
                           for c in recipe.steps)
        for call in recipe.steps:
            if ctx.teacher is None and call.name not in TRAINING_STEPS:
                ctx.teacher = copy.deepcopy(ctx.model).eval()
                if work.__dict__.get(HEAD_RESET_ATTR) and not trained and uses_teacher:
                    _note(report, log, f"the teacher (the model before {call.where}, {call.name}) has a classifier "
                                       f"that was replaced and never trained, so distilling from it pulls towards "
                                       f"chance; put a finetune step before {call.where}")
            trained = trained or call.name == "finetune"
            log(f"{call.where} {call.name}: running")
            step_start = time.perf_counter()
            try:
                figures = call.spec.fn(ctx, **copy.deepcopy(call.params)) or {}
            except MixerNASError as exc:
                raise StepError(f"recipe {recipe.name!r}, {call.where} ({call.name}): {exc}") from exc
            seconds = time.perf_counter() - step_start
            if call.name == "measure":
                after = dict(figures)
            else:
                after = measure_model(ctx.model, ctx, latency=step_latency)
            report.steps.append(StepRecord(call.index, call.name, dict(call.params), seconds, dict(figures), after))
            log(f"{call.where} {call.name}: done in {seconds:.1f} s; {_figures(after)}")
        if side_by_side:
            settings = ctx.state["measure_options"]
            before, after = measure_many([model, ctx.model], settings.spec(input_spec), device=device,
                                         threads=threads, **settings.kwargs())
            report.side_by_side = {"before_ms": before.value_ms, "after_ms": after.value_ms,
                                   "speedup": before.value_ms / after.value_ms, "before_spread": before.spread,
                                   "after_spread": after.spread, "context": str(after.context),
                                   "before": before.to_dict(), "after": after.to_dict()}
        report.seconds = time.perf_counter() - start
        return ctx.model.eval(), report


def _note(report: Report, log: Callable[[str], None], note: str) -> None:
    report.notes.append(note)
    log(f"note: {note}")


def _timm_name(model: nn.Module) -> str | None:
    source = model.__dict__.get("_mixernas_source") or {}
    if source.get("kind") == "timm":
        return source.get("name")
    return timm_architecture(model)


def _figures(f: Mapping[str, Any]) -> str:
    from searchspace.latency import format_ms

    parts = [f"params {f['params']:,}", f"MACs {f['macs']:,}"]
    if f.get("latency_ms") is not None:
        parts.append(f"latency {format_ms(f['latency_ms'])}")
    if f.get("accuracy") is not None:
        parts.append(f"accuracy {f['accuracy']:.4f}")
    return ", ".join(parts)
