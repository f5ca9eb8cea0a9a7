"""ONNX: export a model (``torch.onnx.export`` with the dynamo exporter), and run it with ONNX Runtime."""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import first_line
from .base import Prepared, Runtime, RuntimeInfo, RuntimeUnavailableError, cpu_threads, require

ONNX_EXTRA = "onnx"


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path) -> Path:
    """Write ``model`` (in eval mode) traced on ``example`` to ``path`` as one self-contained ONNX file.

    The dynamo exporter (``torch.export`` underneath) exports every mixer of this project; the legacy
    TorchScript exporter fails on several. Raises :class:`RuntimeUnavailableError` with the reason if it fails.
    """
    require("onnxscript", "ONNX export", ONNX_EXTRA)  # the dynamo exporter's dependency
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")
            example = example.clone()  # a normal tensor, even when made in inference mode
            model(example)  # fills derived caches (the random mixer's matrix) so the graph holds them as constants
            program = torch.onnx.export(model, (example,), dynamo=True, verbose=False)
            program.save(str(path), external_data=False)
    except RuntimeUnavailableError:
        raise
    except Exception as exc:  # noqa: BLE001 - an exporter failure is the model's, reported in one line
        raise RuntimeUnavailableError(f"could not export the model to ONNX: {type(exc).__name__}: "
                                      f"{first_line(exc)}") from exc
    finally:
        model.train(was_training)
    return path


def numpy_input(example: torch.Tensor) -> np.ndarray:
    return example.detach().to("cpu").contiguous().numpy()


class OnnxRuntime(Runtime):
    """The model exported to ONNX and run by an ``onnxruntime.InferenceSession`` with all graph optimisations;
    on the CPU with ``intra_op_num_threads=threads`` and one inter-op thread (with one thread ONNX Runtime computes
    on the calling thread, so the thread clock times it), on CUDA with the CUDA execution provider and the input
    and output bound on the GPU."""

    name = "onnxruntime"
    extra = ONNX_EXTRA

    def version(self) -> str:
        return self.module("onnxruntime").__version__

    def providers(self, device: torch.device) -> list[str]:
        ort = self.module("onnxruntime")
        wanted = "CUDAExecutionProvider" if device.type == "cuda" else "CPUExecutionProvider"
        if wanted not in ort.get_available_providers():
            raise RuntimeUnavailableError(f"ONNX Runtime {ort.__version__} here has no {wanted} (it has "
                                          f"{', '.join(ort.get_available_providers())}); for CUDA install "
                                          f"onnxruntime-gpu")
        return [wanted]

    def session(self, path: Path, device: torch.device, threads: int, providers: list[str] | None = None):
        ort = self.module("onnxruntime")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = cpu_threads(device, threads)
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # no busy-waiting threads
        options.log_severity_level = 3
        provider_options = None
        if device.type == "cuda":
            provider_options = [{"device_id": str(device.index or 0)}] * len(providers or [])
        try:
            return ort.InferenceSession(str(path), sess_options=options, providers=providers or
                                        self.providers(device), provider_options=provider_options)
        except Exception as exc:  # noqa: BLE001 - a session that cannot load this model: one line
            raise RuntimeUnavailableError(f"ONNX Runtime could not load the model: {first_line(exc)}") from exc

    def prepare(self, model: nn.Module, example: torch.Tensor, *, device: torch.device, threads: int) -> Prepared:
        providers = self.providers(device)
        folder = tempfile.TemporaryDirectory(prefix="mixernas-onnx-")
        path = export_onnx(model, example, os.path.join(folder.name, "model.onnx"))
        session = self.session(path, device, threads, providers)
        info = RuntimeInfo(self.name, self.version(), session.get_providers()[0])
        name = session.get_inputs()[0].name
        if device.type != "cuda":
            feed = {name: numpy_input(example)}
            return Prepared(lambda: session.run(None, feed), info, owner=(session, folder))
        binding = bind_on_gpu(session, name, example)
        return Prepared(lambda: session.run_with_iobinding(binding), info, owner=(session, folder, example))


def bind_on_gpu(session, name: str, example: torch.Tensor):
    """An ``IOBinding`` that reads the input where it lies on the GPU and leaves the outputs there."""
    binding = session.io_binding()
    x = example.contiguous()
    element = {torch.float32: np.float32, torch.float16: np.float16}.get(x.dtype)
    if element is None:
        raise RuntimeUnavailableError(f"ONNX Runtime takes float32 or float16 inputs, not {x.dtype}")
    binding.bind_input(name=name, device_type="cuda", device_id=x.device.index or 0, element_type=element,
                       shape=tuple(x.shape), buffer_ptr=x.data_ptr())
    for out in session.get_outputs():
        binding.bind_output(out.name, "cuda", x.device.index or 0)
    return binding
