"""What a structured channel pruner needs to know about our modules.

Modules whose inner structure a dependency-graph pruner cannot infer (attention heads, narrow query/key
projections, the AdditiveMixer's per-channel gate scores) declare it through ``pruning_hints() -> dict`` holding
torch-pruning ``MetaPruner`` keyword arguments. :func:`pruning_kwargs` merges them over a whole model, so the
mixer contract test and the compression steps prune exactly the same way.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def pruning_kwargs(model: nn.Module) -> dict[str, Any]:
    """``num_heads``, ``ignored_layers`` and ``unwrapped_parameters`` for ``MetaPruner``, merged over ``model``."""
    num_heads: dict[nn.Module, int] = {}
    ignored: list[nn.Module] = []
    unwrapped: list[tuple[nn.Parameter, int]] = []
    for module in model.modules():
        hints = module.pruning_hints() if hasattr(module, "pruning_hints") else {}
        num_heads.update(hints.get("num_heads", {}))
        ignored += [m for m in hints.get("ignored_layers", []) if not any(m is seen for seen in ignored)]
        unwrapped += list(hints.get("unwrapped_parameters", []))
    return {"num_heads": num_heads, "ignored_layers": ignored, "unwrapped_parameters": unwrapped}
