"""``fit_budget``: prune in steps until the measured latency meets a target, then distill.

Each step prunes a fresh copy of the incoming model with ``channel_prune`` at ratio ``step_ratio``,
``2 * step_ratio``, ... up to ``max_ratio`` and measures it (``searchspace.latency.measure_latency`` at the
recipe's input spec, device and threads); the first ratio that meets ``target`` wins. The budget is judged on
measured latency, never on MACs. If no ratio meets it the step fails naming the best latency reached.

The measurement can be replaced, e.g. to time the model on the deployment device: put a callable
``measure_ms(model, ctx) -> float`` in ``ctx.state["measure_ms"]``.

Recipe example::

    - fit_budget: {target: 5ms, step_ratio: 0.1, max_ratio: 0.8, distill_epochs: 3}
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from torch import nn

from searchspace.errors import MixerNASError
from searchspace.latency import DEFAULT_INPUT, format_ms, measure_latency, parse_budget

from . import Param, RecipeError, StepContext, get_step, register_step
from .channel import IMPORTANCES, channel_prune


def measure_ms(model: nn.Module, ctx: StepContext) -> float:
    """Measured latency of ``model`` in milliseconds (``ctx.state["measure_ms"]`` overrides the measurement)."""
    override = ctx.state.get("measure_ms")
    if override is not None:
        return float(override(model, ctx))
    from .measure import options  # the run's measurement settings (rounds, warm-up)

    settings = options(ctx)
    spec = settings.spec(ctx.input_spec or DEFAULT_INPUT)
    return measure_latency(model, spec, device=ctx.device, threads=ctx.threads, **settings.kwargs()).value_ms


def ratio_steps(step_ratio: float, max_ratio: float) -> list[float]:
    """``step_ratio, 2 * step_ratio, ...`` up to ``max_ratio`` (inclusive, rounded to avoid float drift).

    >>> ratio_steps(0.2, 0.7)
    [0.2, 0.4, 0.6]
    """
    count = int(max_ratio / step_ratio + 1e-9)
    return [round(step_ratio * i, 6) for i in range(1, count + 1)]


@register_step(
    "fit_budget",
    description="channel-prune in steps until the measured latency meets the target, then distill",
    params={
        "target": Param(str, help="latency budget as people write it: 5ms, 500us, 0.005s"),
        "step_ratio": Param(float, 0.1, minimum=0.01, maximum=0.9, help="pruning ratio added per step"),
        "max_ratio": Param(float, 0.9, minimum=0.01, maximum=0.95, help="give up beyond this ratio"),
        "importance": Param(str, "magnitude", choices=IMPORTANCES, help="channel ranking (see channel_prune)"),
        "global_pruning": Param(bool, False, help="rank all groups together"),
        "round_to": Param(int, 8, minimum=1, help="channel counts become multiples of this"),
        "ignore": Param((list, tuple), (), help="fnmatch patterns of layer names to leave alone"),
        "distill_epochs": Param(int, 3, minimum=0, help="epochs of the registered distill step afterwards, "
                                                        "from the unpruned model (needs data; 0 = none)"),
        "distill_steps": Param(int, None, minimum=1, help="optimizer steps of that distillation in all; overrides "
                                                         "distill_epochs"),
    },
)
def fit_budget(ctx: StepContext, target: str, step_ratio: float = 0.1, max_ratio: float = 0.9,
               importance: str = "magnitude", global_pruning: bool = False, round_to: int = 8,
               ignore: list[str] | tuple[str, ...] = (), distill_epochs: int = 3,
               distill_steps: int | None = None) -> dict[str, Any]:
    if problem := _check(dict(target=target, step_ratio=step_ratio, max_ratio=max_ratio)):
        raise RecipeError(f"fit_budget: {problem}")
    budget = parse_budget(target)
    original = copy.deepcopy(ctx.model)
    base = measure_ms(ctx.model, ctx)
    steps = [{"ratio": 0.0, "latency_ms": round(base, 4)}]
    ctx.log(f"fit_budget: target {format_ms(budget)}; unpruned {format_ms(base)}")
    chosen, latency = 0.0, base
    if base > budget:
        best = (base, 0.0)
        for ratio in ratio_steps(step_ratio, max_ratio):
            candidate = copy.deepcopy(original)
            sub = dataclasses.replace(ctx, model=candidate, log=lambda _msg: None)
            figures = channel_prune(sub, ratio=ratio, importance=importance, global_pruning=global_pruning,
                                    round_to=round_to, ignore=list(ignore))
            ms = measure_ms(candidate, ctx)
            steps.append({"ratio": ratio, "latency_ms": round(ms, 4), "params": figures["params_after"]})
            ctx.log(f"fit_budget: ratio {ratio:.2f} -> {format_ms(ms)} ({figures['params_after'] / 1e6:.2f}M params)")
            best = min(best, (ms, ratio))
            if ms <= budget:
                ctx.model, chosen, latency = candidate, ratio, ms
                break
        else:
            raise RecipeError(f"fit_budget: {format_ms(budget)} not met by pruning up to ratio {max_ratio}; the best "
                              f"was {format_ms(best[0])} at ratio {best[1]:.2f} - raise max_ratio or relax the target")
    result: dict[str, Any] = {"target_ms": budget, "ratio": chosen, "latency_ms": round(latency, 4), "steps": steps}
    if distill_epochs > 0 or distill_steps is not None:
        result["distill"] = _distill(ctx, original, distill_epochs, distill_steps)
    return result


def _check(params: dict[str, Any]) -> str | None:
    """Rules checked when a recipe is validated: a parsable target, step_ratio <= max_ratio."""
    try:
        parse_budget(params.get("target"))
    except MixerNASError as exc:
        return f"target: {exc}"
    if params.get("step_ratio", 0.1) > params.get("max_ratio", 0.9):
        return f"step_ratio {params['step_ratio']} is above max_ratio {params['max_ratio']}"
    return None


fit_budget.check = _check


def _distill(ctx: StepContext, teacher: nn.Module, epochs: int, steps: int | None) -> dict[str, Any] | None:
    if ctx.data is None:
        ctx.log("fit_budget: no data, distillation skipped")
        return None
    try:
        spec = get_step("distill")
    except MixerNASError:
        ctx.log("fit_budget: no 'distill' step registered, distillation skipped")
        return None
    missing = [name for name, p in spec.params.items() if p.required and name != "epochs"]
    if missing:
        ctx.log(f"fit_budget: the distill step requires {', '.join(missing)}; distillation skipped")
        return None
    kwargs = {name: p.default for name, p in spec.params.items() if not p.required}
    if "epochs" in spec.params:
        kwargs["epochs"] = max(epochs, 1)
        if steps is not None and "steps" in spec.params:
            kwargs["steps"] = steps
    else:
        ctx.log("fit_budget: the distill step takes no 'epochs'; running it with its defaults")
    if ctx.teacher is None:
        ctx.teacher = teacher  # the unpruned model
    return spec.fn(ctx, **kwargs)
