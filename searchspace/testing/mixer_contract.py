"""The contract every token mixer honours, as a pytest class to subclass.

A mixer maps ``(B, C, H, W)`` to ``(B, C, H, W)`` at any height and width, lets gradients reach all of its
trainable parameters, exports with ``torch.export`` and to ONNX (run by ONNX Runtime, when the onnx extra is
installed), is deterministic in eval mode, and keeps working after
structured channel pruning removes half of the channels flowing through it.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

from ..arch import Arch, Stage
from ..mixers import create_mixer, get_mixer
from ..model import build_model
from ..pruning import pruning_kwargs

# Odd, non-square and degenerate sizes are where shape bugs hide.
SIZES = [(1, 1), (2, 3), (5, 9), (7, 7), (13, 6)]


class MixerContract:
    """Subclass and set ``mixer`` (and optionally ``mixer_args``, ``dim``) to run the contract."""

    mixer: ClassVar[str] = ""
    mixer_args: ClassVar[dict[str, Any]] = {}
    dim: ClassVar[int] = 64

    @pytest.fixture
    def mixer_name(self) -> str:
        if not self.mixer:
            pytest.skip("set `mixer` on the MixerContract subclass")
        return self.mixer

    @pytest.fixture
    def make(self, mixer_name: str):
        def make(dim: int | None = None, seed: int = 0) -> nn.Module:
            torch.manual_seed(seed)
            return create_mixer(mixer_name, dim or self.dim, **self.mixer_args)

        return make

    # ------------------------------------------------------------------------------------------------- tests

    def test_registered_with_json_arguments(self, mixer_name: str):
        spec = get_mixer(mixer_name)
        json.dumps(dict(spec.defaults))  # arguments must be storable in an Arch
        assert spec.description, "give the mixer a one-line description"

    @pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
    def test_shape_preserved_at_any_size(self, make, size):
        mixer = make().eval()
        x = torch.randn(2, self.dim, *size)
        with torch.no_grad():
            y = mixer(x)
        assert y.shape == x.shape
        assert torch.isfinite(y).all()

    def test_gradients_reach_every_parameter(self, make):
        mixer = make().train()
        x = torch.randn(2, self.dim, 7, 9, requires_grad=True)
        y = mixer(x)
        (y * torch.randn_like(y)).sum().backward()
        for name, p in mixer.named_parameters():
            if not p.requires_grad:
                continue
            assert p.grad is not None, f"{name} receives no gradient"
            assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
            assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"

    def test_trains_after_an_inference_mode_forward(self, make):
        # latency is measured under inference_mode, then the same model is trained: no cached state may leak
        mixer = make()
        x = torch.randn(1, self.dim, 6, 5)
        with torch.inference_mode():
            mixer.eval()(x)
        y = mixer.train()(x.clone().requires_grad_())
        y.sum().backward()

    def test_eval_is_deterministic(self, make):
        mixer = make().eval()
        x = torch.randn(1, self.dim, 9, 7)
        with torch.no_grad():
            assert torch.equal(mixer(x), mixer(x))

    def test_torch_export(self, make):
        mixer = make().eval()
        x = torch.randn(1, self.dim, 7, 5)
        exported = torch.export.export(mixer, (x,))
        with torch.no_grad():
            torch.testing.assert_close(exported.module()(x), mixer(x), rtol=1e-4, atol=1e-5)

    def test_onnx_export_runs_in_onnxruntime(self, make, tmp_path):
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
        from ..runtimes import OnnxRuntime, export_onnx

        mixer = make().eval()
        x = torch.randn(1, self.dim, 7, 5)
        session = OnnxRuntime().session(export_onnx(mixer, x, tmp_path / "mixer.onnx"), torch.device("cpu"), 1)
        [got] = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(got), mixer(x), rtol=1e-4, atol=1e-4)

    def test_survives_half_channel_pruning(self, make):
        import torch_pruning as tp

        model = nn.Sequential(nn.Conv2d(8, self.dim, 1), make(), nn.Conv2d(self.dim, 8, 1)).eval()
        example = torch.randn(1, 8, 8, 8)
        kwargs = pruning_kwargs(model)  # what the mixer declares about its heads and inner widths
        kwargs["ignored_layers"].append(model[2])
        pruner = tp.pruner.MetaPruner(
            model, example, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.5, round_to=8,
            **kwargs,
        )
        pruner.step()
        assert model[0].out_channels == self.dim // 2, "the pruner did not reach the mixer's channels"
        with torch.no_grad():
            for size in [(8, 8), (5, 7), (1, 1)]:
                y = model(torch.randn(2, 8, *size))
                assert y.shape == (2, 8, *size)
                assert torch.isfinite(y).all()

    def test_builds_into_a_metaformer(self, mixer_name):
        arch = Arch(stages=tuple(
            Stage(mixer=mixer_name, mixer_args=self.mixer_args, depth=1, width=w, mlp_ratio=2.0)
            for w in (32, 64, 64, 96)
        ))
        model = build_model(arch, num_classes=5).eval()
        with torch.no_grad():
            for size in [(33, 47), (64, 64)]:
                assert model(torch.randn(1, 3, *size)).shape == (1, 5)
