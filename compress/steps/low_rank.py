"""``low_rank``: factorise linear and 1x1-convolution projections by truncated SVD into two thinner layers.

A weight ``W`` (out x in) becomes ``U_r sqrt(S_r)`` after ``sqrt(S_r) V_r^T``: an ``in -> r`` layer without bias,
then an ``r -> out`` layer with the original bias. It costs ``r * (in + out)`` weights instead of ``in * out``, so a
layer is only factorised when that is smaller. The rank is ``rank_ratio * min(in, out)``, or - with ``energy`` -
the smallest rank whose singular values keep that share of ``sum(S^2)`` (the squared Frobenius norm), rounded up to
a multiple of ``round_to`` (narrow layers run at the speed of the next multiple of 8 anyway). Serving-latency work
such as Hiformer factorises projections this way; fine-tuning or distillation afterwards recovers the rest.

Layers are chosen by module name: ``include`` patterns (fnmatch, e.g. ``stages.3.*``; none = every eligible layer)
minus ``exclude`` patterns (e.g. ``head.*``). The change is recorded for :mod:`compress.saving`, so the saved model
rebuilds with the same layers.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Any

import torch
from torch import nn

from ..saving import record_rebuild, register_rebuild
from . import Param, RecipeError, StepContext, register_step


class LowRankLinear(nn.Sequential):
    """``Linear(in, out)`` as ``Linear(in, rank, bias=False)`` then ``Linear(rank, out)``."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True):
        super().__init__()
        self.first = nn.Linear(in_features, rank, bias=False)
        self.second = nn.Linear(rank, out_features, bias=bias)


class LowRankConv1x1(nn.Sequential):
    """``Conv2d(in, out, 1)`` as ``Conv2d(in, rank, 1, stride, bias=False)`` then ``Conv2d(rank, out, 1)``."""

    def __init__(self, in_channels: int, out_channels: int, rank: int, stride: Any = 1, bias: bool = True):
        super().__init__()
        self.first = nn.Conv2d(in_channels, rank, 1, stride=stride, bias=False)
        self.second = nn.Conv2d(rank, out_channels, 1, bias=bias)


FACTORISED = (LowRankLinear, LowRankConv1x1)


def eligible(module: nn.Module) -> bool:
    """A plain linear layer, or an ungrouped 1x1 convolution without padding."""
    if type(module) is nn.Linear:
        return True
    return (type(module) is nn.Conv2d and module.kernel_size == (1, 1) and module.groups == 1
            and module.padding in ((0, 0), "valid") and module.padding_mode == "zeros")


def candidates(model: nn.Module, include: list[str], exclude: list[str]) -> list[str]:
    """Names of the eligible layers matched by ``include`` (all if empty) and by no ``exclude`` pattern."""
    factorised = {name for name, m in model.named_modules() if isinstance(m, FACTORISED)}
    names = []
    for name, module in model.named_modules():
        if not name or name.rpartition(".")[0] in factorised or not eligible(module):
            continue
        if include and not any(fnmatch.fnmatchcase(name, p) for p in include):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        names.append(name)
    return names


def choose_rank(singular: torch.Tensor, *, rank_ratio: float, energy: float | None, round_to: int) -> int:
    """The kept rank for these singular values (descending)."""
    full = singular.numel()
    if energy is not None:
        share = torch.cumsum(singular.double() ** 2, 0) / (singular.double() ** 2).sum().clamp_min(1e-300)
        rank = int(torch.searchsorted(share, torch.tensor(energy, dtype=torch.float64) - 1e-12).item()) + 1
    else:
        rank = math.ceil(rank_ratio * full)
    rank = math.ceil(max(rank, 1) / round_to) * round_to
    return min(rank, full)


def factorise(module: nn.Module, rank: int, svd: tuple[torch.Tensor, ...] | None = None) -> nn.Module:
    """The SVD factorisation of ``module`` (an eligible layer) at ``rank``; ``svd`` = its ``(U, S, Vh)`` if known."""
    weight = module.weight.detach()
    u, s, vh = svd if svd is not None else _svd(weight)
    root = s[:rank].sqrt()
    first = (root[:, None] * vh[:rank]).to(weight.dtype)
    second = (u[:, :rank] * root[None, :]).to(weight.dtype)
    new = _empty_like(module, rank).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.first.weight.copy_(first.reshape(new.first.weight.shape))
        new.second.weight.copy_(second.reshape(new.second.weight.shape))
        if module.bias is not None:
            new.second.bias.copy_(module.bias)
    return new.train(module.training)


def _svd(weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(U, S, Vh)`` of the weight as an (out x in) matrix, in float32 at least."""
    matrix = weight.reshape(weight.shape[0], weight.shape[1])
    dtype = torch.float64 if matrix.dtype == torch.float64 else torch.float32
    return tuple(torch.linalg.svd(matrix.to(dtype), full_matrices=False))


def _empty_like(module: nn.Module, rank: int) -> nn.Module:
    if isinstance(module, nn.Linear):
        return LowRankLinear(module.in_features, module.out_features, rank, bias=module.bias is not None)
    return LowRankConv1x1(module.in_channels, module.out_channels, rank, stride=module.stride,
                          bias=module.bias is not None)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _check_runs(model: nn.Module, ctx: StepContext) -> None:
    """Some models read a layer's ``.weight`` directly (``F.linear(x, self.qkv.weight)``); say which to exclude."""
    if ctx.input_spec is None:
        return
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(ctx.input_spec.example(ctx.device))
    except (AttributeError, RuntimeError) as exc:
        raise RecipeError(f"low_rank: the model no longer runs after factorising ({str(exc).splitlines()[0]}); "
                          f"it reads some layer's weights directly: exclude that layer with exclude: [pattern]") \
            from None
    finally:
        model.train(was_training)


@register_rebuild("low_rank")
def _rebuild(model: nn.Module, config: dict[str, Any]) -> None:
    """Replace the recorded layers by factorised ones of the recorded ranks (weights come from the file)."""
    for name, rank in config["layers"].items():
        _set(model, name, _empty_like(model.get_submodule(name), int(rank)))


def _check(params: dict[str, Any]) -> str | None:
    for key in ("include", "exclude"):
        if not all(isinstance(p, str) for p in params[key]):
            return f"{key} must be a list of module name patterns (strings), got {list(params[key])!r}"
    if params["energy"] is None and params["rank_ratio"] <= 0:
        return "rank_ratio must be above 0 (or set energy)"
    return None


@register_step(
    "low_rank",
    description="factorise linear and 1x1-conv projections by SVD into two thinner layers (rank ratio or energy)",
    params={
        "rank_ratio": Param(float, 0.5, minimum=0.0, maximum=1.0,
                            help="kept rank as a share of min(in, out) (ignored when energy is set)"),
        "energy": Param(float, None, minimum=0.0, maximum=1.0,
                        help="keep the smallest rank whose singular values hold this share of sum(S^2), per layer"),
        "round_to": Param(int, 8, minimum=1, help="round ranks up to a multiple of this"),
        "include": Param((list, tuple), (), help="module name patterns to factorise (fnmatch); empty = all"),
        "exclude": Param((list, tuple), (), help="module name patterns to leave alone, e.g. head.*"),
    },
)
def low_rank(ctx: StepContext, rank_ratio: float, energy: float | None, round_to: int, include: list[str],
             exclude: list[str]) -> dict[str, Any]:
    problem = _check({"rank_ratio": rank_ratio, "energy": energy, "include": include, "exclude": exclude})
    if problem:
        raise RecipeError(f"low_rank: {problem}")
    model = ctx.model
    names = candidates(model, list(include), list(exclude))
    if include and not names:
        raise RecipeError(f"low_rank: include {list(include)} matches no linear or 1x1 conv layer of the model")
    ranks: dict[str, int] = {}
    kept_energy: list[float] = []
    before = after = skipped = 0
    for name in names:
        module = model.get_submodule(name)
        out_f, in_f = module.weight.shape[0], module.weight.shape[1]
        if round_to * (in_f + out_f) >= in_f * out_f:
            skipped += 1  # even the smallest rank would not save parameters
            continue
        svd = _svd(module.weight.detach())
        singular = svd[1].double()
        rank = choose_rank(singular, rank_ratio=rank_ratio, energy=energy, round_to=round_to)
        if rank * (in_f + out_f) >= in_f * out_f:
            skipped += 1  # no fewer parameters: leave the layer as it is
            continue
        new = factorise(module, rank, svd)
        before += _params(module)
        after += _params(new)
        _set(model, name, new)
        ranks[name] = rank
        total = (singular ** 2).sum().item()
        kept_energy.append((singular[:rank] ** 2).sum().item() / total if total > 0 else 1.0)
    if ranks:
        record_rebuild(model, "low_rank", {"layers": ranks})
        _check_runs(model, ctx)
    ctx.log(f"low_rank: factorised {len(ranks)} layers ({before:,} -> {after:,} weights), skipped {skipped} where "
            f"it would not save parameters")
    return {"layers": len(ranks), "skipped": skipped, "layer_params_before": before, "layer_params_after": after,
            "mean_energy_kept": sum(kept_energy) / len(kept_energy) if kept_energy else None}


low_rank.check = _check  # run by compress.recipe when the recipe is validated
