"""Export: ONNX and torch.export files that compute what the PyTorch model computes, from every kind of source."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

import searchspace
import searchspace.export as export_mod
from searchspace import Arch, Stage, build_model
from searchspace.errors import MixerNASError
from searchspace.export import export_model
from searchspace.export.__main__ import main as export_main
from searchspace.latency import InputSpec
from searchspace.nas.results import save_model

SPEC = InputSpec(channels=1, height=16, width=16)
needs_onnx = pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("onnxruntime", "onnxscript")),
                                reason="needs the onnx extra")


def tiny_arch():
    return Arch(stages=(Stage(mixer="sepconv", depth=1, width=8), Stage(mixer="attention", depth=1, width=32)))


def tiny_model():
    torch.manual_seed(0)
    return build_model(tiny_arch(), num_classes=4, in_chans=1).eval()


@needs_onnx
def test_onnx_export_matches_pytorch_and_is_measured_on_onnxruntime(tmp_path):
    import onnxruntime as ort

    out = tmp_path / "m.onnx"
    result = export_model(tiny_model(), SPEC, "onnx", out)
    assert out.is_file() and result.path == out and result.max_abs_diff < 1e-4
    assert result.latency is not None and result.latency.context.runtime.startswith("onnxruntime ")
    assert "outputs match PyTorch" in str(result) and "latency" in str(result)
    x = torch.randn(*SPEC.shape)
    session = ort.InferenceSession(str(out))
    [got] = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, tiny_model()(x).numpy(), rtol=1e-4, atol=1e-4)  # any input, not one


def test_torch_export_program_loads_and_matches(tmp_path):
    out = tmp_path / "m.pt2"
    result = export_model(tiny_model(), SPEC, "torch-export", out)
    assert result.latency is None and result.max_abs_diff < 1e-5
    program = torch.export.load(str(out))
    x = torch.randn(*SPEC.shape)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), tiny_model()(x))


def test_an_export_whose_outputs_differ_is_an_error_and_leaves_no_file(tmp_path, monkeypatch):
    real = export_mod._torch_export
    monkeypatch.setattr(export_mod, "_torch_export", lambda m, x, p: [a + 0.5 for a in real(m, x, p)])
    out = tmp_path / "m.pt2"
    with pytest.raises(MixerNASError, match="differ from PyTorch's by 0.5"):
        export_model(tiny_model(), SPEC, "torch-export", out)
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_format_names_the_known_ones(tmp_path):
    with pytest.raises(MixerNASError, match="onnx, torch-export"):
        export_model(tiny_model(), SPEC, "tflite", tmp_path / "m")


def results_folder(tmp_path):
    folder = tmp_path / "run"
    save_model(folder / "best", tiny_model(), tiny_arch(), num_classes=4, in_chans=1)
    (folder / "best.json").write_text(json.dumps({"input_size": 16}))
    return folder


@needs_onnx
def test_the_command_exports_a_results_folder_at_its_searched_size(tmp_path, capsys):
    out = tmp_path / "winner.onnx"
    assert export_main([str(results_folder(tmp_path)), "--format", "onnx", "--out", str(out), "--no-latency"]) == 0
    captured = capsys.readouterr()
    assert out.is_file() and "outputs match PyTorch" in captured.out and "1x1x16x16" in captured.err
    import onnx

    dims = [d.dim_value for d in onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 1, 16, 16]


def test_the_command_exports_an_arch_json_with_weights(tmp_path, capsys):
    from safetensors.torch import save_file

    arch_path, weights = tmp_path / "arch.json", tmp_path / "w.safetensors"
    tiny_arch().save(arch_path)
    save_file({k: v.contiguous() for k, v in tiny_model().state_dict().items()}, str(weights))
    out = tmp_path / "m.pt2"
    assert export_main([str(arch_path), "--weights", str(weights), "--format", "torch-export", "--out", str(out),
                        "--input-size", "16"]) == 0
    program = torch.export.load(str(out))
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), tiny_model()(x))  # the weights given, not random ones


def test_the_command_answers_bad_input_in_one_line(tmp_path, capsys):
    assert export_main([str(tmp_path / "missing.json"), "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err and "Traceback" not in err
    assert export_main(["PoolFormerV2-S12", "--format", "tflite"]) == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.slow
@needs_onnx
@pytest.mark.parametrize("name", searchspace.list_presets())
def test_every_preset_exports_to_onnx(name, tmp_path):
    torch.manual_seed(0)
    model = build_model(searchspace.preset(name), num_classes=10, in_chans=3).eval()
    result = export_model(model, InputSpec(height=32, width=32), "onnx", tmp_path / "m.onnx", measure=False)
    assert result.max_abs_diff < 1e-3
