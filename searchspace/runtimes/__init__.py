"""Runtimes a model is deployed on, each an adapter with one small interface, so latency is measured where it runs.

A runtime prepares a model for one input on one device with a number of threads, and hands back the callable to
time (one inference on that input) and what to record with the figure: the runtime, its version, its provider.
Everything that measures latency (:func:`~searchspace.latency.measure_many`, the lookup table, the search, the
latency CLI, compress) takes a runtime by name; nothing else knows how a runtime works.

=============  ===============================================================  ==============================
name           what is timed                                                    needs
=============  ===============================================================  ==============================
eager          the ``nn.Module`` in PyTorch, in inference mode                  (always there)
compile        ``torch.compile(model)`` (inductor; a C++ compiler on the CPU)   (always there)
onnxruntime    the model exported to ONNX, run by an ONNX Runtime session       ``pip install -e '.[onnx]'``
openvino       the model converted by OpenVINO and compiled for the CPU/GPU     ``pip install -e '.[openvino]'``
tensorrt       torch-tensorrt, or ONNX Runtime's TensorRT provider (CUDA only)  ``pip install -e '.[tensorrt]'``
=============  ===============================================================  ==============================

>>> from searchspace.runtimes import get_runtime
>>> rt = get_runtime("onnxruntime")  # doctest: +SKIP
>>> prepared = rt.prepare(model, torch.randn(1, 3, 224, 224), device=torch.device("cpu"), threads=1)  # doctest: +SKIP
>>> prepared.run(); str(prepared.info)  # doctest: +SKIP
'onnxruntime 1.32.0 (CPUExecutionProvider)'

Your own runtime: subclass :class:`Runtime` and :func:`register_runtime` an instance.
"""

from __future__ import annotations

from ..registry import Registry
from .base import Prepared, Runtime, RuntimeInfo, RuntimeUnavailableError
from .eager import Compile, Eager
from .onnx import OnnxRuntime, export_onnx
from .openvino import OpenVino
from .tensorrt import TensorRT

RUNTIMES: Registry[Runtime] = Registry("runtime")
DEFAULT_RUNTIME = "eager"


def register_runtime(runtime: Runtime, *, overwrite: bool = False) -> Runtime:
    """Make ``runtime`` available by its ``name`` everywhere a runtime is accepted."""
    return RUNTIMES.add(runtime.name, runtime, overwrite=overwrite)


def get_runtime(runtime: str | Runtime | None = None) -> Runtime:
    """The registered runtime of this name (None = eager); a :class:`Runtime` is returned as it is."""
    if isinstance(runtime, Runtime):
        return runtime
    return RUNTIMES.get(DEFAULT_RUNTIME if runtime is None else runtime)


def runtime_names() -> list[str]:
    return RUNTIMES.names()


for _runtime in (Eager(), Compile(), OnnxRuntime(), OpenVino(), TensorRT()):
    register_runtime(_runtime)

__all__ = [
    "DEFAULT_RUNTIME",
    "RUNTIMES",
    "Compile",
    "Eager",
    "OnnxRuntime",
    "OpenVino",
    "Prepared",
    "Runtime",
    "RuntimeInfo",
    "RuntimeUnavailableError",
    "TensorRT",
    "export_onnx",
    "get_runtime",
    "register_runtime",
    "runtime_names",
]
