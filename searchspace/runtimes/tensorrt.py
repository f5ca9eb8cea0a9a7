"""TensorRT on CUDA: through torch-tensorrt when it is installed, else ONNX Runtime's TensorRT execution provider."""

from __future__ import annotations

import importlib.util
import os
import tempfile

import torch
from torch import nn

from ..errors import first_line
from .base import Prepared, Runtime, RuntimeInfo, RuntimeUnavailableError
from .onnx import OnnxRuntime, bind_on_gpu, export_onnx


class TensorRT(Runtime):
    """An engine built for the input's shape and dtype (float32, float16 or bfloat16 precision enabled). CUDA
    only."""

    name = "tensorrt"
    extra = "tensorrt"
    devices = ("cuda",)

    def _backend(self) -> str:
        if importlib.util.find_spec("torch_tensorrt") is not None:
            return "torch_tensorrt"
        if importlib.util.find_spec("onnxruntime") is not None:
            ort = self.module("onnxruntime")
            if "TensorrtExecutionProvider" in ort.get_available_providers():
                return "onnxruntime"
        raise RuntimeUnavailableError("runtime 'tensorrt' needs torch-tensorrt, or onnxruntime-gpu with TensorRT; "
                                      "install it with: pip install -e '.[tensorrt]'")

    def version(self) -> str:
        backend = self._backend()
        return self.module("torch_tensorrt" if backend == "torch_tensorrt" else "onnxruntime").__version__

    def prepare(self, model: nn.Module, example: torch.Tensor, *, device: torch.device, threads: int) -> Prepared:
        self.check(device)
        if self._backend() == "torch_tensorrt":
            trt = self.module("torch_tensorrt")
            try:
                engine = trt.compile(model, ir="dynamo", inputs=[example], enabled_precisions={example.dtype})
                engine(example)
            except Exception as exc:  # noqa: BLE001 - a build failure is the model's, reported in one line
                raise RuntimeUnavailableError(f"torch-tensorrt could not build an engine: {first_line(exc)}"
                                              ) from exc
            return Prepared(lambda: engine(example), RuntimeInfo(self.name, self.version(), "torch_tensorrt"),
                            owner=engine)
        ort = OnnxRuntime()
        folder = tempfile.TemporaryDirectory(prefix="mixernas-trt-")
        path = export_onnx(model, example, os.path.join(folder.name, "model.onnx"))
        session = ort.session(path, device, threads, ["TensorrtExecutionProvider", "CUDAExecutionProvider"])
        binding = bind_on_gpu(session, session.get_inputs()[0].name, example)
        info = RuntimeInfo(self.name, self.version(), "onnxruntime TensorrtExecutionProvider")
        return Prepared(lambda: session.run_with_iobinding(binding), info, owner=(session, folder, example))
