"""The recipe steps ``token_prune`` and ``token_merge``, and the one call that applies each to a model.

The algorithm and the wrappers live in :mod:`compress.tokens` (read its docstring for EViT, ToMe and the keep-rate
warm-up); which block sequences hold attention, and in what layout, is the model family's adapter's answer
(:meth:`compress.adapters.ModelAdapter.attention_runs`). Here: choosing the reduction points, checking the
recipe's parameters, wrapping the sequences.

**Saving.** The wrappers are recorded as a structural change (:func:`compress.saving.record_rebuild`), so
``compress.save``/``compress.load`` re-wrap a reloaded model (with any warm-up finished).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from ..adapters import AttentionRun, adapter_for
from ..saving import record_rebuild, register_rebuild
from ..tokens import KeepSchedule, TokenMerging, TokenPruning, TokenSequence
from . import Param, RecipeError, StepContext, register_step

PLACEMENTS = ("inside", "after")  # where token_prune selects: between a block's attention and MLP, or after it


# ---------------------------------------------------------------------------------------------- reduction points


def default_points(count: int, inside: bool = True) -> list[int]:
    """EViT's placement generalised to ``L`` attention blocks: inside blocks ``floor(L * j / 4)`` for
    ``j = 1, 2, 3`` (EViT's 4th, 7th and 10th of 12: indices 3, 6, 9), or, selecting after whole blocks, the
    blocks before them (2, 5, 8); positions with no attention block after them are left out.

    >>> default_points(12), default_points(9), default_points(3), default_points(1)
    ([3, 6, 9], [2, 4, 6], [0, 1], [])
    >>> default_points(12, inside=False), default_points(9, inside=False)
    ([2, 5, 8], [1, 3, 5])
    """
    points = sorted({count * j // 4 - (0 if inside else 1) for j in (1, 2, 3)})
    return [p for p in points if 0 <= p < count - 1]


def _select_runs(model: nn.Module, stages: Sequence[int] | None) -> list[AttentionRun]:
    runs = adapter_for(model).attention_runs(model)
    for run in runs:
        if isinstance(run.blocks, TokenSequence):
            raise RecipeError(f"{run.label} already prunes or merges tokens; apply token_prune/token_merge once")
    if stages is None:
        return [r for r in runs if r.attention]
    if runs and runs[0].stage is None:
        raise RecipeError("stages applies to hierarchical models; a ViT has one sequence of blocks - use blocks")
    known = {r.stage: r for r in runs}
    for s in stages:
        if s not in known:
            raise RecipeError(f"stage {s!r} has no attention blocks; stages with attention: {sorted(known)}")
    return [known[s] for s in stages]


def _points(run: AttentionRun, blocks: Sequence[int] | None, default: Sequence[int] | None = None,
            inside: bool = True) -> list[int]:
    """Block indices (in the run) in or after which to reduce, from positions among its attention blocks."""
    attention_blocks = sorted(run.attention)
    positions = default_points(len(attention_blocks), inside) if blocks is None else list(blocks)
    if default is not None and blocks is None:
        positions = list(default)
    for p in positions:
        if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < len(attention_blocks):
            raise RecipeError(f"{run.label}: block position {p!r} does not exist; it has {len(attention_blocks)} "
                              f"attention blocks (positions 0-{len(attention_blocks) - 1})")
    return sorted({attention_blocks[p] for p in positions})


def _reducible(run: AttentionRun) -> list[bool]:
    return [j in run.attention for j in range(len(run.blocks))]


# ------------------------------------------------------------------------------------------- applying to a model


def apply_token_pruning(model: nn.Module, keep_rate: float | Sequence[float] = 0.7, *,
                        stages: Sequence[int] | None = None, blocks: Sequence[int] | None = None,
                        score: str = "attention", warmup_steps: int = 0, placement: str = "inside") -> KeepSchedule:
    """Wrap ``model``'s attention blocks for token pruning (in place); returns the shared keep schedule.

    Args:
        keep_rate: fraction of tokens kept at each reduction point, or one rate per point.
        stages: stage indices of a hierarchical model (default: every stage with attention blocks).
        blocks: positions among each stage's attention blocks after which tokens are selected (default: EViT's
            placement, :func:`default_points`).
        score: ``attention`` (attention received; class attention on ViTs) or ``norm`` (feature norm).
        warmup_steps: training steps over which the keep rate goes from 1 to ``keep_rate`` (0: constant).
        placement: ``inside`` selects between a block's attention and its MLP (EViT), ``after`` after the block.

    >>> schedule = apply_token_pruning(model, 0.7)  # doctest: +SKIP
    """
    rates = list(keep_rate) if isinstance(keep_rate, (list, tuple)) else None
    target = min(rates) if rates else float(keep_rate)
    for r in rates or [target]:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
            raise RecipeError(f"keep_rate must be in (0, 1], got {r!r}")
    if score not in ("attention", "norm"):
        raise RecipeError(f"score must be 'attention' or 'norm', got {score!r}")
    if placement not in PLACEMENTS:
        raise RecipeError(f"placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    schedule = KeepSchedule(target, int(warmup_steps))
    runs = _select_runs(model, stages)
    if not runs:
        raise RecipeError("the model has no attention blocks to prune tokens in")
    for n, run in enumerate(runs):
        points = _points(run, blocks, inside=placement == "inside")
        if rates is not None and len(rates) not in (1, len(points)):
            raise RecipeError(f"keep_rate lists {len(rates)} rates but {run.label} has {len(points)} reduction "
                              f"points; give one rate or one per point")
        wrapper = TokenPruning(*run.blocks, layout=run.layout, reducible=_reducible(run), reduce_after=points,
                               prefix=run.prefix, restore=run.restore, attention=run.attention, schedule=schedule,
                               rates=rates, score=score, owner=n == 0, placement=placement)
        setattr(run.parent, run.name, wrapper.train(run.blocks.training))
    record_rebuild(model, "token_prune", dict(keep_rate=rates or target, stages=_plain(stages), blocks=_plain(blocks),
                                              score=score, warmup_steps=int(warmup_steps), placement=placement))
    return schedule


def apply_token_merging(model: nn.Module, r: int, *, stages: Sequence[int] | None = None,
                        blocks: Sequence[int] | None = None, proportional_attention: bool = True) -> None:
    """Wrap ``model``'s attention blocks to merge ``r`` tokens after each (in place).

    ``blocks``: positions among each stage's attention blocks after which to merge (default: every one that has
    an attention block after it). ``proportional_attention`` applies where blocks take an ``attn_mask``.
    """
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise RecipeError(f"r must be an integer >= 0, got {r!r}")
    runs = _select_runs(model, stages)
    if not runs:
        raise RecipeError("the model has no attention blocks to merge tokens in")
    for run in runs:
        every = list(range(len(run.attention) - 1))
        points = _points(run, blocks, default=every)
        proportional = list(range(len(run.blocks))) if proportional_attention and run.proportional else []
        wrapper = TokenMerging(*run.blocks, layout=run.layout, reducible=_reducible(run), reduce_after=points,
                               prefix=run.prefix, restore=run.restore, attention=run.attention, r=r,
                               proportional=proportional)
        setattr(run.parent, run.name, wrapper.train(run.blocks.training))
    record_rebuild(model, "token_merge", dict(r=r, stages=_plain(stages), blocks=_plain(blocks),
                                              proportional_attention=bool(proportional_attention)))


def _plain(values: Sequence[int] | None) -> list[int] | None:
    return None if values is None else [int(v) for v in values]


@register_rebuild("token_prune")
def _rebuild_pruning(model: nn.Module, config: dict[str, Any]) -> None:
    """On a reloaded model: the same wrappers, with any keep-rate warm-up finished (a saved model is trained)."""
    schedule = apply_token_pruning(model, **config)
    schedule.set_step(schedule.warmup_steps)


@register_rebuild("token_merge")
def _rebuild_merging(model: nn.Module, config: dict[str, Any]) -> None:
    apply_token_merging(model, **config)


def remove_token_reduction(model: nn.Module) -> None:
    """Undo :func:`apply_token_pruning` / :func:`apply_token_merging`: plain ``nn.Sequential`` blocks again."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, TokenSequence):
                setattr(parent, name, nn.Sequential(*child).train(child.training))


# ------------------------------------------------------------------------------------------------------ steps


def _int_list(value: Any, name: str) -> list[int] | None:
    if problem := _list_problem(value, name):
        raise RecipeError(problem)
    return None if value is None else list(value)


def _list_problem(value: Any, name: str) -> str | None:
    if value is None or (isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool)
                                                                  and v >= 0 for v in value)):
        return None
    return f"{name} must be a list of indices (integers >= 0), got {value!r}"


def _check_prune(params: dict[str, Any]) -> str | None:
    """Rules of ``token_prune`` no single parameter expresses (run when a recipe is validated)."""
    rates = params.get("keep_rate", 0.7)
    for r in rates if isinstance(rates, (list, tuple)) else [rates]:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
            return f"keep_rate must be in (0, 1] (or a list of such rates), got {rates!r}"
    if params.get("schedule") == "warmup" and not params.get("warmup_steps"):
        return "schedule 'warmup' needs warmup_steps > 0 (the fine-tuning steps it spans)"
    return _list_problem(params.get("stages"), "stages") or _list_problem(params.get("blocks"), "blocks")


def _check_merge(params: dict[str, Any]) -> str | None:
    return _list_problem(params.get("stages"), "stages") or _list_problem(params.get("blocks"), "blocks")


@register_step(
    "token_prune",
    description="keep the most informative tokens in attention blocks (EViT/EET); dropped tokens return to "
                "the grid before convs and downsampling",
    params={
        "keep_rate": Param((float, list), 0.7, help="fraction of tokens kept at each reduction point (0, 1], "
                                                    "or one rate per point"),
        "stages": Param((list, type(None)), None, help="stage indices (hierarchical models); default: all "
                                                       "stages with attention"),
        "blocks": Param((list, type(None)), None, help="positions among a stage's attention blocks in which "
                                                       "tokens are selected; default EViT's (3, 6, 9 of 12)"),
        "score": Param(str, "attention", choices=("attention", "norm"), help="attention received (class "
                                                                            "attention on ViTs) or feature norm"),
        "schedule": Param(str, "constant", choices=("constant", "warmup"),
                          help="warmup: keep rate goes from 1 to keep_rate over warmup_steps training steps"),
        "warmup_steps": Param(int, 0, minimum=0, help="training steps of the warm-up"),
        "placement": Param(str, "inside", choices=PLACEMENTS,
                           help="inside: select between a block's attention and its MLP, so that MLP already runs "
                                "on the kept tokens (EViT); after: after the whole block"),
    },
)
def token_prune(ctx: StepContext, keep_rate: float | list[float] = 0.7, stages: list[int] | None = None,
                blocks: list[int] | None = None, score: str = "attention", schedule: str = "constant",
                warmup_steps: int = 0, placement: str = "inside") -> dict[str, Any]:
    if problem := _check_prune(dict(keep_rate=keep_rate, stages=stages, blocks=blocks, schedule=schedule,
                                    warmup_steps=warmup_steps)):
        raise RecipeError(problem)
    sched = apply_token_pruning(ctx.model, keep_rate, stages=_int_list(stages, "stages"),
                                blocks=_int_list(blocks, "blocks"), score=score,
                                warmup_steps=warmup_steps if schedule == "warmup" else 0, placement=placement)
    ctx.state["token_schedule"] = sched
    figures = token_figures(ctx.model)
    ctx.log(f"token_prune: keep {keep_rate} {'in' if placement == 'inside' else 'after'} blocks "
            f"{figures['reduce_after']} (score: {score}, schedule: {schedule})")
    if figures["scored_by_norm"]:
        ctx.log(f"token_prune: no fused qkv to score attention after {', '.join(figures['scored_by_norm'])}; "
                f"feature norms are used there")
    return figures


@register_step(
    "token_merge",
    description="ToMe bipartite soft matching: merge r tokens after each attention block",
    params={
        "r": Param(int, 8, minimum=0, help="tokens merged after each attention block"),
        "stages": Param((list, type(None)), None, help="stage indices (hierarchical models); default: all "
                                                       "stages with attention"),
        "blocks": Param((list, type(None)), None, help="positions among a stage's attention blocks after which "
                                                       "to merge; default: all but the last"),
        "proportional_attention": Param(bool, True, help="add log(token size) to attention logits (timm ViTs)"),
    },
)
def token_merge(ctx: StepContext, r: int = 8, stages: list[int] | None = None, blocks: list[int] | None = None,
                proportional_attention: bool = True) -> dict[str, Any]:
    apply_token_merging(ctx.model, r, stages=_int_list(stages, "stages"), blocks=_int_list(blocks, "blocks"),
                        proportional_attention=proportional_attention)
    figures = token_figures(ctx.model)
    ctx.log(f"token_merge: r={r} after blocks {figures['reduce_after']}")
    return figures


token_prune.check = _check_prune  # run by compress.recipe when a recipe is validated
token_merge.check = _check_merge


def token_figures(model: nn.Module) -> dict[str, Any]:
    """Where tokens are reduced (``{"reduce_after": {"stages.2.blocks": [1, 3, 5]}}``), and the reduction points
    whose attention has no fused ``qkv`` projection to score with, so feature norms are used there instead."""
    names = {m: n for n, m in model.named_modules()}
    sequences = [m for m in model.modules() if isinstance(m, TokenSequence)]
    fallback = [f"{names[m]}.{i}" for m in sequences for i in sorted(m.reduce_after)
                if getattr(m, "score", "attention") == "attention"
                and not isinstance(getattr(m._attention.get(i), "qkv", None), nn.Linear)]
    return {"reduce_after": {names[m]: sorted(m.reduce_after) for m in sequences}, "scored_by_norm": fallback}


__all__ = ["PLACEMENTS", "apply_token_merging", "apply_token_pruning", "default_points", "remove_token_reduction",
           "token_figures", "token_merge", "token_prune"]
