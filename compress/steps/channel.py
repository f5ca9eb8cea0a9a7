"""``channel_prune``: structured channel pruning with torch-pruning's dependency graph.

Every group of coupled channels (a residual stream, an MLP's hidden layer, a depthwise conv with its
neighbours) is ranked by an importance criterion and cut to ``1 - ratio`` of its width, rounded down to a
multiple of ``round_to``; the classifier's outputs and layers named by ``ignore`` are left alone. Works on our
models and on timm's MetaFormers (PoolFormerV2, ConvFormer, CAFormer) and ViTs (ViT, DeiT)::

    from compress.steps.channel import prune_channels
    figures = prune_channels(model, torch.randn(1, 3, 224, 224), ratio=0.5)
    figures["params_after"] / figures["params_before"]   # 0.26 for convformer_s18 (10 classes)

**Attention heads.** The inner width of each attention module whose head layout is known
(:func:`compress.pruning_timm.attention_layouts`) is not left to torch-pruning: torch-pruning 1.6 rounds a
head's width against the whole projection (``ratio=0.3`` cuts 32-wide heads to 16) and timm's MetaFormer
attention needs its inner width to equal its input width. After the dependency-graph pass, each such module is
cut to the keep fraction of its block's channels: whole heads by mean importance, then the same number of
dimensions in every kept head (the same indices in q, k and v), preferring a head count that divides the new
width exactly. ``num_heads`` (and timm's ``head_dim``, ``attention_dim``/``attn_dim``, ``scale``) are then set
from the weights, and the new head counts are left in ``ctx.state["num_heads"]`` for checkpoints.

**MACs are not latency** (REFERENCE.md): measure before and after (``measure`` step, ``bench/compress.py``).
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from searchspace.pruning import pruning_kwargs

from .. import adapters, pruning_timm
from ..tokens import TokenSequence
from . import Param, RecipeError, StepContext, register_step

IMPORTANCES = ("magnitude", "taylor", "lamp", "random")


def make_importance(name: str) -> tp.importance.Importance:
    """A torch-pruning importance criterion by name (``magnitude``: L2 norm of the group's weights)."""
    if name == "magnitude":
        return tp.importance.MagnitudeImportance(p=2)
    if name == "taylor":  # |weight * gradient|: needs gradients of the loss on a few batches first
        return tp.importance.TaylorImportance()
    if name == "lamp":
        return tp.importance.LAMPImportance(p=2)
    if name == "random":
        return tp.importance.RandomImportance()
    raise RecipeError(f"unknown importance {name!r}; use one of {', '.join(IMPORTANCES)}")


# ----------------------------------------------------------------------------------------------- pure helpers


def head_shape(target: int, heads: int, head_dim: int, *, exact: bool = False,
               whole_heads: bool = False) -> tuple[int, int] | None:
    """``(heads', head_dim')`` whose product is ``target`` (or, unless ``exact``, at most ``target``).

    The most heads that split ``target`` evenly with at most ``head_dim`` channels each; ``whole_heads`` keeps
    ``head_dim``. None when ``exact`` and no such split exists.

    >>> head_shape(160, 10, 32), head_shape(224, 10, 32), head_shape(96, 3, 64), head_shape(64, 2, 64, whole_heads=True)
    ((10, 16), (8, 28), (3, 32), (1, 64))
    """
    target = max(int(target), 1)
    if whole_heads:
        h = min(heads, max(target // head_dim, 1))
        return None if exact and h * head_dim != target else (h, head_dim)
    for h in range(min(heads, target), 0, -1):
        if target % h == 0 and target // h <= head_dim:
            return h, target // h
    return None if exact else (heads, max(target // heads, 1))


def kept_head_channels(importance: torch.Tensor, heads: int, head_dim: int, new_heads: int,
                       new_head_dim: int) -> list[int]:
    """Indices (into the ``heads * head_dim`` attention width) to keep: the ``new_heads`` heads of highest mean
    importance, and in each the ``new_head_dim`` most important dimensions, in their original order.

    >>> kept_head_channels(torch.tensor([1., 2, 9, 8, 0, 0]), 3, 2, 2, 1)
    [1, 2]
    """
    imp = importance.detach().float().reshape(heads, head_dim)
    chosen = torch.topk(imp.mean(1), new_heads).indices.sort().values
    keep = []
    for h in chosen.tolist():
        dims = torch.topk(imp[h], new_head_dim).indices.sort().values
        keep += (h * head_dim + dims).tolist()
    return keep


def _round_down(n: float, multiple: int | None) -> int:
    if not multiple or multiple <= 1:
        return max(int(round(n)), 1)
    return max(int(n // multiple) * multiple, multiple)


# -------------------------------------------------------------------------------------------- model structure


def classifier_layers(model: nn.Module) -> list[nn.Module]:
    """The layers producing the logits (left alone by pruning): in the classifier the model's adapter names
    (timm's ``get_classifier()``), every linear or conv layer with ``num_classes`` outputs (DeiT/CAS-ViT
    distillation heads have two), else its last one."""
    head = _adapter(model).classifier(model)
    if head is None:
        head = model
    layers = [m for m in head.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not layers:
        return []
    num_classes = getattr(model, "num_classes", None)
    logits = [m for m in layers if getattr(m, "out_features", getattr(m, "out_channels", None)) == num_classes]
    return logits or layers[-1:]


def stage_modules(model: nn.Module) -> list[nn.Module]:
    """The stages of a hierarchical model (ours and timm MetaFormers: ``model.stages``); empty for a ViT."""
    return _adapter(model).stages(model)


def _adapter(model: nn.Module) -> adapters.ModelAdapter:
    """The model's family adapter; a model of no known family gets the defaults (``get_classifier()``,
    ``model.stages``), since torch-pruning needs nothing more."""
    return adapters.find_adapter(model) or adapters.ModelAdapter()


@torch.no_grad()
def stage_widths(model: nn.Module, example: torch.Tensor) -> list[int]:
    """Channels of each stage's output (hierarchical models), or ``[embed_dim]`` for a ViT."""
    stages = stage_modules(model)
    if not stages:
        embed = getattr(getattr(model, "patch_embed", None), "proj", None)
        return [embed.out_channels] if isinstance(embed, nn.Conv2d) else []
    widths: list[int] = []
    hooks = [s.register_forward_hook(lambda m, i, o: widths.append(int(o.shape[1]))) for s in stages]
    try:
        was_training = model.training
        model.eval()
        model(example)
        model.train(was_training)
    finally:
        for h in hooks:
            h.remove()
    return widths


def matching_modules(model: nn.Module, patterns: Sequence[str]) -> list[nn.Module]:
    """Modules whose dotted names match any fnmatch pattern; a pattern matching nothing is an error."""
    named = [(n, m) for n, m in model.named_modules() if n]
    found: list[nn.Module] = []
    for pattern in patterns:
        hits = [m for n, m in named if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            examples = ", ".join(n for n, _ in named[:6])
            raise RecipeError(f"ignore pattern {pattern!r} matches no layer of the model (names look like: "
                              f"{examples}, ...)")
        found += hits
    return found


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------------- pruning


def prune_channels(
    model: nn.Module,
    example: torch.Tensor,
    *,
    ratio: float = 0.5,
    importance: str = "magnitude",
    global_pruning: bool = False,
    stage_ratios: Mapping[int, float] | None = None,
    round_to: int | None = 8,
    ignore: Sequence[str] = (),
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> dict[str, Any]:
    """Prune ``model`` in place; returns the figures (params and widths before and after, head counts).

    Args:
        model: our ``MetaFormerNet``, a timm MetaFormer or ViT, or any module torch-pruning can trace.
        example: one input batch for tracing (the size the model runs at; a ViT needs its image size).
        ratio: fraction of channels removed from every group (or the whole model with ``global_pruning``).
        importance: ``magnitude``, ``taylor`` (needs ``batches``), ``lamp`` or ``random``.
        global_pruning: rank all groups together, so some layers lose more than ``ratio`` and others less.
        stage_ratios: ``{stage index: ratio}`` overriding ``ratio`` for those stages of a hierarchical model.
        round_to: channel counts are rounded down to multiples of this (8 suits CPU and GPU kernels); None = off.
        ignore: fnmatch patterns of layer names left alone (``"stages.0.*"``); the classifier always is.
        batches: ``(images, labels)`` batches whose cross-entropy gradients feed ``taylor``.
    """
    if not 0.0 <= ratio < 1.0:
        raise RecipeError(f"ratio must be in [0, 1), got {ratio!r}")
    imp = make_importance(importance)
    stage_dict = _stage_ratio_dict(model, stage_ratios or {})
    if importance == "taylor" and batches is None:
        raise RecipeError("importance 'taylor' needs data for its gradients; give the recipe --data or use "
                          "importance: magnitude")
    was_training = model.training
    model.eval()
    params_before = n_params(model)
    widths_before = stage_widths(model, example)

    layouts = pruning_timm.attention_layouts(model)
    kwargs = pruning_kwargs(model)
    for layout in layouts:  # their inner width is pruned below, head by head
        kwargs["num_heads"].pop(layout.qkv, None)
    user_ignored = matching_modules(model, ignore)
    ignored_set = {id(m) for root in user_ignored for m in root.modules()}
    ignored = kwargs["ignored_layers"] + classifier_layers(model) + user_ignored + [x.qkv for x in layouts]
    inputs_before = {id(x.module): x.qkv.in_features for x in layouts}

    if importance == "taylor":
        _accumulate_gradients(model, batches)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch-pruning warns about every unwrapped parameter it finds
        pruner = tp.pruner.MetaPruner(
            model, example, importance=imp, global_pruning=global_pruning, pruning_ratio=ratio,
            pruning_ratio_dict=stage_dict or None, round_to=round_to or None, ignored_layers=ignored,
            num_heads=kwargs["num_heads"], unwrapped_parameters=kwargs["unwrapped_parameters"],
            customized_pruners=pruning_timm.customized_pruners(model),
        )
        pruner.step()
        for layout in layouts:
            if layout.width_equals_input:
                _trim_to_splittable(pruner.DG, imp, layout, round_to)
        heads = {}
        names = {m: n for n, m in model.named_modules()}
        for layout in layouts:
            before = layout.num_heads
            if id(layout.module) in ignored_set and not layout.width_equals_input:
                continue
            after = _prune_heads(pruner.DG, imp, layout, inputs_before[id(layout.module)], round_to)
            heads[names[layout.module]] = [before, after]
    pruning_timm.sync_pruned_attributes(model)
    model.zero_grad(set_to_none=True)
    widths_after = stage_widths(model, example)
    model.train(was_training)
    params_after = n_params(model)
    return {
        "params_before": params_before,
        "params_after": params_after,
        "params_kept": round(params_after / max(params_before, 1), 4),
        "widths_before": widths_before,
        "widths_after": widths_after,
        "heads": heads,
    }


def _stage_index(key: Any) -> int | None:
    index = int(key) if isinstance(key, str) and key.strip().isdigit() else key
    return index if isinstance(index, int) and not isinstance(index, bool) and index >= 0 else None


def _check(params: Mapping[str, Any]) -> str | None:
    """What is wrong with these parameters before any model is seen (run when a recipe is validated), or None."""
    ignore = params.get("ignore", ())
    if isinstance(ignore, str) or not isinstance(ignore, (list, tuple)) or not all(isinstance(p, str) for p in ignore):
        return f"ignore must be a list of layer-name patterns (strings), got {ignore!r}"
    stage_ratios = params.get("stage_ratios") or {}
    if not isinstance(stage_ratios, Mapping):
        return f"stage_ratios must be a mapping {{stage index: ratio}}, got {stage_ratios!r}"
    for key, value in stage_ratios.items():
        if _stage_index(key) is None:
            return f"stage_ratios: {key!r} is not a stage index (0, 1, ...)"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            return f"stage_ratios.{key}: ratio must be a number in [0, 1), got {value!r}"
    return None


def _stage_ratio_dict(model: nn.Module, stage_ratios: Mapping[Any, float]) -> dict[tuple[nn.Module, ...], float]:
    if problem := _check({"stage_ratios": stage_ratios}):
        raise RecipeError(problem)
    if not stage_ratios:
        return {}
    stages = stage_modules(model)
    if not stages:
        raise RecipeError("stage_ratios needs a model with stages (ours, timm MetaFormers); this one has none - "
                          "use ratio")
    out = {}
    for key, value in stage_ratios.items():
        index = _stage_index(key)
        if index >= len(stages):
            raise RecipeError(f"stage_ratios: stage {key!r} does not exist; the model has stages 0-{len(stages) - 1}")
        # only the stage's own conv/linear layers: a norm at the start of its downsampling carries the previous
        # stage's channels, and torch-pruning would give that stage this ratio
        layers = tuple(m for m in stages[index].modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
        if layers:
            out[layers] = float(value)
    return out


def _accumulate_gradients(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
    device = next(model.parameters()).device
    model.zero_grad(set_to_none=True)
    seen = 0
    for images, labels in batches:
        loss = F.cross_entropy(model(images.to(device)), labels.to(device))
        loss.backward()
        seen += 1
    if not seen:
        raise RecipeError("importance 'taylor' got no batches of data")


def _trim_to_splittable(graph: tp.DependencyGraph, importance: tp.importance.Importance,
                        layout: pruning_timm.HeadLayout, round_to: int | None) -> None:
    """timm's MetaFormer attention needs ``heads * head_dim == width``: if the pruned width of its block cannot be
    split into at most ``num_heads`` heads of at most ``head_dim`` (456 into 16 x 32), remove the least important
    channels of the block's residual stream down to the next width that can (448 = 16 x 28)."""
    width = layout.qkv.in_features
    step = round_to or 1
    target = width
    while target > 0 and (target % step or head_shape(target, layout.num_heads, layout.head_dim, exact=True,
                                                        whole_heads=layout.whole_heads_only) is None):
        target -= 1
    if target <= 0:
        raise RecipeError(f"cannot split {width} channels into at most {layout.num_heads} heads of at most "
                          f"{layout.head_dim}; change ratio or round_to")
    if target == width:
        return
    group = graph.get_pruning_group(layout.qkv, tp.prune_linear_in_channels, list(range(width)))
    scores = importance(group)
    if scores is None or len(scores) != width:
        scores = layout.qkv.weight.detach().abs().pow(2).sum(0)
    drop = torch.argsort(scores.detach().float())[: width - target].tolist()
    graph.get_pruning_group(layout.qkv, tp.prune_linear_in_channels, drop).prune()


def _prune_heads(graph: tp.DependencyGraph, importance: tp.importance.Importance, layout: pruning_timm.HeadLayout,
                 input_before: int, round_to: int | None) -> int:
    """Cut one attention module's inner width to its block's keep fraction, whole heads first; new head count."""
    width = layout.width
    input_after = layout.qkv.in_features
    if layout.width_equals_input:
        target = input_after
    else:
        target = min(_round_down(width * input_after / input_before, round_to), width)
    shape = head_shape(target, layout.num_heads, layout.head_dim, exact=layout.width_equals_input,
                       whole_heads=layout.whole_heads_only)
    if shape is None:
        raise RecipeError(f"cannot split {target} channels into at most {layout.num_heads} heads of at most "
                          f"{layout.head_dim}; change ratio or round_to")
    new_heads, new_head_dim = shape
    if new_heads * new_head_dim >= width:
        layout.set_heads(layout.num_heads)
        return layout.num_heads
    group = graph.get_pruning_group(layout.proj, tp.prune_linear_in_channels, list(range(width)))
    scores = importance(group)
    if scores is None or len(scores) != width:  # no parameterised layer scored: fall back to the projection
        scores = layout.proj.weight.detach().abs().pow(2).sum(0)
    keep = set(kept_head_channels(scores, layout.num_heads, layout.head_dim, new_heads, new_head_dim))
    drop = [i for i in range(width) if i not in keep]
    graph.get_pruning_group(layout.proj, tp.prune_linear_in_channels, drop).prune()
    layout.set_heads(new_heads)
    return new_heads


def _taylor_batches(ctx: StepContext, count: int, batch_size: int):
    if ctx.data is None:
        raise RecipeError("importance 'taylor' needs data for its gradients; give the recipe --data or use "
                          "importance: magnitude")
    generator = torch.Generator().manual_seed(0)
    loader = torch.utils.data.DataLoader(ctx.data.train, batch_size=batch_size, shuffle=True, generator=generator)
    for i, (images, labels) in enumerate(loader):
        if i >= count:
            break
        if not ctx.data.labelled:  # no labels of the model's classes: the original model's top-1 stands in
            reference = ctx.reference or ctx.model
            was_training = reference.training
            with torch.no_grad():
                labels = reference.eval()(images.to(ctx.device)).argmax(-1).cpu()
            reference.train(was_training)
        yield images, labels


def example_input(ctx: StepContext) -> torch.Tensor:
    """One input for tracing: the recipe's input spec, else the data's image shape, else the model's own size."""
    model = ctx.model
    if ctx.input_spec is not None:
        spec = ctx.input_spec
        shape = (1, spec.channels, spec.height, spec.width)
    elif ctx.data is not None:
        shape = (1, *ctx.data.input_shape)
    else:
        side = adapters.native_input_size(model) or 224
        shape = (1, adapters.first_conv_in(model) or 3, side, side)
    device = next(model.parameters()).device
    return torch.randn(shape, device=device)


def _check_no_token_wrappers(model: nn.Module) -> None:
    if any(isinstance(m, TokenSequence) for m in model.modules()):
        raise RecipeError("channel_prune must run before token_prune/token_merge in the recipe")


@register_step(
    "channel_prune",
    description="structured channel pruning (torch-pruning dependency graph), multiples of round_to, "
                "attention heads kept consistent",
    params={
        "ratio": Param(float, 0.5, minimum=0.0, maximum=0.95, help="fraction of channels removed per group"),
        "importance": Param(str, "magnitude", choices=IMPORTANCES,
                            help="channel ranking; taylor uses gradients on a few batches of the data"),
        "global_pruning": Param(bool, False, help="rank all groups together instead of each group alone"),
        "stage_ratios": Param((dict, type(None)), None, help="{stage index: ratio} overriding ratio per stage"),
        "round_to": Param(int, 8, minimum=1, help="channel counts become multiples of this (1 = no rounding)"),
        "ignore": Param((list, tuple), (), help="fnmatch patterns of layer names to leave alone"),
        "taylor_batches": Param(int, 4, minimum=1, help="batches of training data for taylor gradients"),
        "batch_size": Param(int, 32, minimum=1, help="batch size of those batches"),
    },
)
def channel_prune(ctx: StepContext, ratio: float = 0.5, importance: str = "magnitude", global_pruning: bool = False,
                  stage_ratios: Mapping[Any, float] | None = None, round_to: int = 8, ignore: Sequence[str] = (),
                  taylor_batches: int = 4, batch_size: int = 32) -> dict[str, Any]:
    _check_no_token_wrappers(ctx.model)
    if problem := _check({"ignore": ignore, "stage_ratios": stage_ratios}):
        raise RecipeError(problem)
    batches = _taylor_batches(ctx, taylor_batches, batch_size) if importance == "taylor" else None
    figures = prune_channels(ctx.model, example_input(ctx), ratio=ratio, importance=importance,
                             global_pruning=global_pruning, stage_ratios=stage_ratios, round_to=round_to,
                             ignore=list(ignore), batches=batches)
    ctx.state["num_heads"] = pruning_timm.head_counts(ctx.model)
    kept = figures["params_kept"]
    ctx.log(f"channel_prune: {figures['params_before'] / 1e6:.2f}M -> {figures['params_after'] / 1e6:.2f}M params "
            f"({kept:.0%} kept), widths {figures['widths_before']} -> {figures['widths_after']}")
    return figures


channel_prune.check = _check  # run by compress.recipe when a recipe is validated

__all__ = ["IMPORTANCES", "channel_prune", "classifier_layers", "head_shape", "kept_head_channels",
           "make_importance", "prune_channels", "stage_widths"]
