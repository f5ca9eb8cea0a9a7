"""PyTorch itself: eager mode, and ``torch.compile``."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import first_line
from .base import Prepared, Runtime, RuntimeInfo, RuntimeUnavailableError


class Eager(Runtime):
    """The ``nn.Module`` as it is, in inference mode."""

    name = "eager"

    def version(self) -> str:
        return torch.__version__.split("+")[0]

    def prepare(self, model: nn.Module, example: torch.Tensor, *, device: torch.device, threads: int) -> Prepared:
        return Prepared(lambda: model(example), RuntimeInfo(self.name, self.version()), owner=model)


class Compile(Runtime):
    """``torch.compile(model)`` with inductor (static shapes); compiled when prepared, so compile time is never
    timed. Each model gets a fresh compiler cache: models of one class with other shapes would otherwise share
    one, and past its recompile limit PyTorch quietly runs them eagerly. So models on this runtime are measured one
    after another, not interleaved (``exclusive``)."""

    name = "compile"
    exclusive = True
    backend = "inductor"

    def version(self) -> str:
        return torch.__version__.split("+")[0]

    def prepare(self, model: nn.Module, example: torch.Tensor, *, device: torch.device, threads: int) -> Prepared:
        torch.compiler.reset()
        compiled = torch.compile(model, backend=self.backend, dynamic=False)
        try:
            compiled(example)  # compiles now, not in the first timed run
        except Exception as exc:  # noqa: BLE001 - any compiler failure is the candidate's, reported in one line
            raise RuntimeUnavailableError(f"runtime 'compile' could not compile the model: "
                                          f"{type(exc).__name__}: {first_line(exc)}") from exc
        return Prepared(lambda: compiled(example), RuntimeInfo(self.name, self.version(), self.backend),
                        owner=compiled)
