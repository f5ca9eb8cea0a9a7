"""OpenVINO: the model converted by ``openvino.convert_model`` and compiled for the CPU."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..errors import first_line
from .base import Prepared, Runtime, RuntimeInfo, RuntimeUnavailableError
from .onnx import numpy_input


class OpenVino(Runtime):
    """Compiled with the latency hint, one stream, ``INFERENCE_NUM_THREADS=threads`` and, for float32 inputs,
    float32 arithmetic (``INFERENCE_PRECISION_HINT``) on the CPU; with one
    thread a synchronous inference computes on the calling thread, so the thread clock times it. OpenVINO's
    ``GPU`` device is an Intel GPU, not CUDA: this runtime runs on the CPU only."""

    name = "openvino"
    extra = "openvino"
    devices = ("cpu",)

    def version(self) -> str:
        ov = self.module("openvino")
        return ov.__version__.split("-")[0]

    def prepare(self, model: nn.Module, example: torch.Tensor, *, device: torch.device, threads: int) -> Prepared:
        ov = self.module("openvino")
        converted = self._convert(ov, model, example)
        config = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}
        if example.dtype == torch.float32:
            # on CPUs with bfloat16 units (AMX, AVX512-BF16) OpenVINO computes a float32 model in bfloat16 unless
            # told otherwise: the latency would be of another precision than the one asked for, its outputs off
            config["INFERENCE_PRECISION_HINT"] = "f32"
        try:
            compiled = ov.Core().compile_model(converted, "CPU", config)
        except Exception as exc:  # noqa: BLE001 - a compile failure is the model's, reported in one line
            raise RuntimeUnavailableError(f"OpenVINO could not compile the model: {_first_line(exc)}") from exc
        request = compiled.create_infer_request()
        x = numpy_input(example)
        info = RuntimeInfo(self.name, self.version(), "CPU")
        return Prepared(lambda: request.infer({0: x}), info, owner=(compiled, request))

    @staticmethod
    def _convert(ov, model: nn.Module, example: torch.Tensor):
        """OpenVINO's PyTorch frontend on the traced model; on a ``torch.export`` program where tracing fails.
        (Its ``torch.export`` frontend lacks ops the random and GPSA mixers use; tracing converts every mixer.)"""
        problems = []
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")  # tracing's deprecation and tracer warnings
            x = example.clone()
            model(x)  # fills derived caches (the random mixer's matrix) so the graph holds them as constants
            for how in ("trace", "export"):
                try:
                    if how == "trace":
                        return ov.convert_model(model, example_input=x)
                    return ov.convert_model(torch.export.export(model, (x,)))
                except Exception as exc:  # noqa: BLE001 - try the other path, then report both
                    problems.append(f"{how}: {_first_line(exc)}")
        raise RuntimeUnavailableError(f"OpenVINO could not convert the model ({'; '.join(problems)})")


def _first_line(exc: Exception) -> str:
    text = str(exc)
    unconverted = text.find("No conversion rule")  # OpenVINO's report names the ops it lacks deep in the text
    if unconverted >= 0:
        return text[unconverted:].splitlines()[0]
    return f"{type(exc).__name__}: {first_line(exc)}"
