"""Parameters and multiply-accumulates (MACs) from one named counter: torch's ``FlopCounterMode``.

What it counts: matrix multiplies, convolutions (including depthwise), linear layers and attention, for the
forward pass on the given input (so MACs scale with batch and input size). MACs = FLOPs / 2.

What it does not: pooling, normalisation, activations, softmax and other element-wise work count as zero, so the
pooling and identity mixers have 0 MACs. On the CPU, ``scaled_dot_product_attention`` runs as
``aten._scaled_dot_product_flash_attention_for_cpu``, which torch's counter has no formula for (it would count
0 for the attention itself, only the projections); we register torch's own SDPA formula (``sdpa_flop_count``:
``Q @ K^T`` and ``attn @ V``) for it, so attention costs the same on every device.

>>> params, macs = count_params_macs(torch.nn.Conv2d(3, 8, 3, bias=False), InputSpec(height=10, width=10))
>>> params, macs  # 8*3*3*3 weights, each used at 10*10 output positions (padding 0: 8*8)
(216, 13824)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from .measure import DEFAULT_INPUT, InputSpec, _eval_mode, as_model

COUNTER_NAME = "torch FlopCounterMode"


class Counts(NamedTuple):
    """``(params, macs)``; ``counter`` names what counted them."""

    params: int
    macs: int

    @property
    def counter(self) -> str:
        return COUNTER_NAME


def _sdpa_flops(query_shape, key_shape, value_shape, *args: Any, out_shape=None, **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# Registered for both the public op and the CPU kernel it decomposes into; the counter counts whichever it meets
# first and does not decompose a counted op, so attention is never counted twice.
_EXTRA_FORMULAS = {
    torch.ops.aten.scaled_dot_product_attention: _sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops,
}


def count_params(model: nn.Module) -> int:
    """Parameters of ``model`` (shared tensors once, trainable or not, buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_spec: InputSpec = DEFAULT_INPUT) -> int:
    """MACs of one forward pass of ``model`` in eval mode on a random input of ``input_spec``."""
    first = next(iter([*model.parameters(), *model.buffers()]), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else input_spec.torch_dtype
    x = input_spec.example(device, dtype)
    with _eval_mode(model), torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) \
            as counter:
        model(x)
    return counter.get_total_flops() // 2


def count_params_macs(model_or_arch: nn.Module | Any, input_spec: InputSpec = DEFAULT_INPUT) -> Counts:
    """``(params, macs)`` of a module, ``Arch``, preset name or arch JSON path, counted by :data:`COUNTER_NAME`.

    >>> counts = count_params_macs("PoolFormerV2-S12")  # doctest: +SKIP
    >>> counts.params, counts.macs, counts.counter  # doctest: +SKIP
    (11891712, 1812267008, 'torch FlopCounterMode')
    """
    model = as_model(model_or_arch, input_spec)
    return Counts(count_params(model), count_macs(model, input_spec))
