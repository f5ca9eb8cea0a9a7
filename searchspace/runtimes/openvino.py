"""OpenVINO: the model exported by ``torch.export``, converted by ``openvino.convert_model``, compiled for the CPU."""

from __future__ import annotations

import torch
from torch import nn

from .base import Prepared, Runtime, RuntimeInfo, RuntimeUnavailableError
from .onnx import numpy_input


class OpenVino(Runtime):
    """Compiled with the latency hint, one stream and ``INFERENCE_NUM_THREADS=threads`` on the CPU; with one
    thread a synchronous inference computes on the calling thread, so the thread clock times it. OpenVINO's
    ``GPU`` device is an Intel GPU, not CUDA: this runtime runs on the CPU only."""

    name = "openvino"
    extra = "openvino"
    devices = ("cpu",)
    exports = True

    def version(self) -> str:
        ov = self.module("openvino")
        return ov.__version__.split("-")[0]

    def prepare(self, model: nn.Module, example: torch.Tensor, *, device: torch.device, threads: int) -> Prepared:
        ov = self.module("openvino")
        try:
            with torch.inference_mode(False), torch.no_grad():
                converted = ov.convert_model(torch.export.export(model, (example.clone(),)))
            core = ov.Core()
            compiled = core.compile_model(converted, "CPU", {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
                                                             "PERFORMANCE_HINT": "LATENCY"})
        except Exception as exc:  # noqa: BLE001 - a conversion failure is the model's, reported in one line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise RuntimeUnavailableError(f"OpenVINO could not convert or compile the model: {type(exc).__name__}: "
                                          f"{first}") from exc
        request = compiled.create_infer_request()
        x = numpy_input(example)
        info = RuntimeInfo(self.name, self.version(), "CPU")
        return Prepared(lambda: request.infer({0: x}), info, owner=(compiled, request))
