"""The contract every model adapter honours, as a pytest class to subclass (like ``searchspace.testing``'s mixers).

For a small model of the family: the adapter is the one detected for it; every block it splits computes the same
as its halves composed; its attention runs point at the model's own blocks and attention modules, and token
pruning and merging through them run (exact at keep rate 1, fewer tokens below); its head layouts fit their
projections; its classifier produces the logits; and the source it describes builds the same architecture::

    class TestMyNetAdapter(AdapterContract):
        adapter = "mynet"

        def make_model(self):
            return MyNet(num_classes=10)
"""

from __future__ import annotations

import copy
import json
from typing import ClassVar

import pytest
import torch
from torch import nn

from ..steps.tokens import apply_token_merging, apply_token_pruning
from . import adapter_for_source, find_adapter, get_adapter, split_block


class AdapterContract:
    """Subclass, set ``adapter`` (a registered name) and define :meth:`make_model`."""

    adapter: ClassVar[str] = ""
    input_size: ClassVar[int] = 64  # side of the square test image
    splits_blocks: ClassVar[bool] = True  # the family has blocks with a mixer and an MLP half
    has_attention: ClassVar[bool] = True  # models of the family (this one) have attention runs

    def make_model(self) -> nn.Module:
        raise NotImplementedError

    @pytest.fixture
    def model(self) -> nn.Module:
        if not self.adapter:
            pytest.skip("set `adapter` on the AdapterContract subclass")
        torch.manual_seed(0)
        return self.make_model().eval()

    def example(self, batch: int = 2) -> torch.Tensor:
        return torch.randn(batch, 3, self.input_size, self.input_size, generator=torch.Generator().manual_seed(1))

    def test_the_model_is_detected_as_its_family(self, model):
        assert find_adapter(model) is get_adapter(self.adapter)

    def test_block_halves_compose_to_the_block(self, model):
        inputs: dict[nn.Module, torch.Tensor] = {}
        hooks = [m.register_forward_pre_hook(lambda m, a: inputs.setdefault(m, a[0]))
                 for m in model.modules() if split_block(m) is not None]
        try:
            with torch.no_grad():
                model(self.example())
        finally:
            for h in hooks:
                h.remove()
        assert bool(inputs) == self.splits_blocks
        with torch.no_grad():
            for block, x in inputs.items():
                mixer_half, mlp_half = split_block(block)
                assert torch.equal(mlp_half(mixer_half(x)), block(x)), type(block).__name__

    def test_attention_runs_point_into_the_model(self, model):
        runs = get_adapter(self.adapter).attention_runs(model)
        assert bool(runs) == self.has_attention
        modules = set(model.modules())
        for run in runs:
            assert run.blocks in modules and run.layout in ("nchw", "nlc") and run.attention
            for j, attention in run.attention.items():
                assert any(m is attention for m in run.blocks[j].modules())

    def test_token_pruning_and_merging_run_through_the_runs(self, model):
        if not self.has_attention:
            pytest.skip("no attention runs")
        x = self.example()
        with torch.no_grad():
            reference = model(x)
            same = copy.deepcopy(model)
            apply_token_pruning(same, 1.0)
            assert torch.equal(same(x), reference)
            pruned = copy.deepcopy(model)
            apply_token_pruning(pruned, 0.5, blocks=[0], placement="after")
            merged = copy.deepcopy(model)
            apply_token_merging(merged, 1)
            for reduced in (pruned, merged):
                assert sum(_tokens_seen(reduced, x, self.adapter)) < sum(_tokens_seen(model, x, self.adapter))
                y = reduced(x)
                assert y.shape == reference.shape and torch.isfinite(y).all()

    def test_head_layouts_fit_their_projections(self, model):
        adapter = get_adapter(self.adapter)
        for layout in filter(None, map(adapter.head_layout, model.modules())):
            assert layout.qkv.out_features == 3 * layout.width and layout.proj.in_features == layout.width

    def test_the_classifier_produces_the_logits(self, model):
        head = get_adapter(self.adapter).classifier(model)
        assert any(m is head for m in model.modules())
        seen = []
        handle = head.register_forward_hook(lambda m, i, o: seen.append(o))
        with torch.no_grad():
            logits = model(self.example())
        handle.remove()
        assert torch.equal(seen[-1], logits)

    def test_the_described_source_rebuilds_the_architecture(self, model):
        source = get_adapter(self.adapter).describe(model)
        assert source is not None and source["kind"] == get_adapter(self.adapter).source_kind
        source = json.loads(json.dumps(source))  # plain data, as saved
        rebuilt = adapter_for_source(source).build(source).eval()
        rebuilt.load_state_dict(model.state_dict(), strict=True)
        with torch.no_grad():
            x = self.example()
            assert torch.equal(rebuilt(x), model(x))


def _tokens_seen(model: nn.Module, x: torch.Tensor, adapter: str) -> list[int]:
    """Tokens entering each attention module of ``model`` in one forward pass."""
    seen: list[int] = []

    def count(module, args):
        t = args[0]
        seen.append(t.shape[2] * t.shape[3] if t.dim() == 4 else t.shape[1])

    attention = [a for run in get_adapter(adapter).attention_runs(model) for a in run.attention.values()]
    handles = [a.register_forward_pre_hook(count) for a in attention]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen
