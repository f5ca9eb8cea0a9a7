"""Export a model for deployment: ONNX (one self-contained file) or a ``torch.export`` program (``.pt2``).

Every export is checked: the exported model runs on a random input (ONNX with ONNX Runtime, the program with
PyTorch) and its outputs are compared with the PyTorch model's; the largest absolute difference is reported, and
an export whose outputs differ by more than ``atol`` is an error. For ONNX, ONNX Runtime's latency on this
machine is measured too (the search's protocol: one thread, thread clock).

>>> from searchspace.export import export_model
>>> spec = InputSpec(channels=1, height=32, width=32)
>>> print(export_model(model, spec, "onnx", "best/model.onnx"))  # doctest: +SKIP
best/model.onnx: onnx, outputs match PyTorch to 2.4e-07 (largest absolute difference); onnxruntime ... latency ...

From the shell: ``python -m searchspace.export runs/default-5ms --format onnx --out model.onnx``.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .._io import atomic_write_bytes
from ..errors import MixerNASError, first_line
from ..latency import InputSpec, LatencyResult, measure_latency
from ..runtimes import OnnxRuntime, RuntimeUnavailableError, export_onnx

FORMATS = ("onnx", "torch-export")
SUFFIX = {"onnx": ".onnx", "torch-export": ".pt2"}
DEFAULT_ATOL = 1e-3  # float32 exports reorder arithmetic (fused kernels); differences stay far below this


@dataclass
class ExportResult:
    path: Path
    format: str
    max_abs_diff: float  # largest |exported - PyTorch| over the outputs on one random input
    latency: LatencyResult | None = None  # ONNX Runtime's, for ONNX

    def __str__(self) -> str:
        line = (f"{self.path}: {self.format}, outputs match PyTorch to {self.max_abs_diff:.2g} (largest absolute "
                f"difference)")
        if self.latency is not None:
            line += f"; {self.latency.context.runtime} latency {self.latency.describe()}"
        return line


def export_model(model: nn.Module, input_spec: InputSpec, format: str, out: str | Path, *, atol: float = DEFAULT_ATOL,
                 measure: bool = True, threads: int = 1) -> ExportResult:
    """Write ``model`` for ``input_spec`` to ``out`` in ``format`` (``"onnx"`` or ``"torch-export"``), check its
    outputs against PyTorch's, and (ONNX, ``measure=True``) measure it with ONNX Runtime on ``threads`` threads.

    The file appears only once it is complete and checked (written beside ``out``, then renamed).
    """
    if format not in FORMATS:
        raise MixerNASError(f"unknown export format {format!r}; use one of {', '.join(FORMATS)}")
    out = Path(out)
    model = model.eval()
    torch.manual_seed(0)
    example = input_spec.example("cpu")
    with torch.no_grad():
        expected = _flat(model(example))
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=out.parent) as tmp:
        staged = Path(tmp) / out.name
        if format == "onnx":
            export_onnx(model, example, staged)
            got = _onnx_outputs(staged, example)
        else:
            got = _torch_export(model, example, staged)
        diff = _max_abs_diff(expected, got)
        if not diff <= atol:
            raise MixerNASError(f"the {format} export's outputs differ from PyTorch's by {diff:.3g} (more than "
                                f"{atol:g}); the file was not written")
        atomic_write_bytes(out, staged.read_bytes())
    latency = None
    if format == "onnx" and measure:
        latency = measure_latency(model, input_spec, threads=threads, runtime="onnxruntime", warmup=5)
    return ExportResult(out, format, diff, latency)


def _flat(output) -> list[np.ndarray]:
    if isinstance(output, torch.Tensor):
        return [output.detach().float().cpu().numpy()]
    if isinstance(output, (list, tuple)):
        return [a for o in output for a in _flat(o)]
    if isinstance(output, dict):
        return [a for k in sorted(output) for a in _flat(output[k])]
    return [np.asarray(output, dtype=np.float32)]


def _max_abs_diff(expected: list[np.ndarray], got: list[np.ndarray]) -> float:
    if len(expected) != len(got) or any(e.shape != g.shape for e, g in zip(expected, got)):
        raise MixerNASError(f"the export returns {[g.shape for g in got]}, PyTorch {[e.shape for e in expected]}")
    return max((float(np.max(np.abs(e - g))) if e.size else 0.0) for e, g in zip(expected, got))


def _onnx_outputs(path: Path, example: torch.Tensor) -> list[np.ndarray]:
    session = OnnxRuntime().session(path, torch.device("cpu"), 1)
    feed = {session.get_inputs()[0].name: example.numpy()}
    return [np.asarray(o, dtype=np.float32) for o in session.run(None, feed)]


def _torch_export(model: nn.Module, example: torch.Tensor, path: Path) -> list[np.ndarray]:
    try:
        program = torch.export.export(model, (example,))
        torch.export.save(program, str(path))
        loaded = torch.export.load(str(path))
    except Exception as exc:  # noqa: BLE001 - an export failure is the model's, reported in one line
        raise RuntimeUnavailableError(f"torch.export could not export the model: {type(exc).__name__}: "
                                      f"{first_line(exc)}") from exc
    with torch.no_grad():
        return _flat(loaded.module()(example))

