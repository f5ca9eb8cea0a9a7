"""The runtime interface: prepare a model for an input, device and thread count; time what comes back."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import MixerNASError


class RuntimeUnavailableError(MixerNASError):
    """A runtime that is not installed, does not run on this device, or cannot prepare this model."""


@dataclass(frozen=True)
class RuntimeInfo:
    """What ran the model: recorded with every latency measured on it."""

    name: str
    version: str
    provider: str = ""  # e.g. ONNX Runtime's execution provider, OpenVINO's device, torch.compile's backend

    def __str__(self) -> str:
        return f"{self.name} {self.version}" + (f" ({self.provider})" if self.provider else "")


@dataclass
class Prepared:
    """A model made ready on a runtime for one fixed input: ``run()`` is one inference and returns its output."""

    run: Callable[[], Any]
    info: RuntimeInfo
    # keeps alive what ``run`` needs (a session, a temporary folder, a compiled module)
    owner: Any = None


class Runtime:
    """One way of running a model. Subclasses set ``name`` (and ``extra``, the pip extra that installs it) and
    implement :meth:`version` and :meth:`prepare`.

    ``thread_clock``: whether, with one thread on the CPU, the runtime computes on the calling thread, so that the
    measuring thread's CPU time is the inference's time (the search's default clock). Where it computes on
    threads of its own, latency is timed on the wall clock instead (and :func:`~searchspace.latency.measure_many`
    refuses the thread clock for a runtime that claims otherwise but leaves the calling thread idle).
    """

    name: ClassVar[str] = ""
    extra: ClassVar[str | None] = None  # ``pip install -e '.[<extra>]'`` installs it
    devices: ClassVar[tuple[str, ...]] = ("cpu", "cuda")
    thread_clock: ClassVar[bool] = True
    exclusive: ClassVar[bool] = False  # models are prepared and measured one at a time, not side by side

    def version(self) -> str:
        """The installed version; raises :class:`RuntimeUnavailableError` (naming the fix) if it is missing."""
        raise NotImplementedError

    def check(self, device: torch.device | str = "cpu") -> RuntimeInfo:
        """Raise :class:`RuntimeUnavailableError` unless this runtime is installed and runs on ``device``."""
        kind = torch.device(device).type
        if kind not in self.devices:
            where = " or ".join(f"--device {d}" for d in self.devices)
            raise RuntimeUnavailableError(f"runtime {self.name!r} does not run on {kind}; use {where}, or another "
                                          f"runtime")
        return RuntimeInfo(self.name, self.version())

    def prepare(self, model: nn.Module, example: torch.Tensor, *, device: torch.device, threads: int) -> Prepared:
        """Make ``model`` (in eval mode, already on ``device`` in the input's dtype) ready to run on ``example``
        with ``threads`` threads on the CPU."""
        raise NotImplementedError

    def module(self, name: str) -> ModuleType:
        """Import ``name``, or say which extra installs it."""
        return require(name, f"runtime {self.name!r}", self.extra)

    def __repr__(self) -> str:
        return f"<runtime {self.name}>"


def require(name: str, who: str, extra: str | None) -> ModuleType:
    """Import the module ``name`` that ``who`` needs, or raise :class:`RuntimeUnavailableError` naming the fix."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        fix = f"pip install -e '.[{extra}]'" if extra else f"pip install {name}"
        raise RuntimeUnavailableError(f"{who} needs the Python package {name!r} ({exc}); install it with: "
                                      f"{fix}") from None


def cpu_threads(device: torch.device, threads: int) -> int:
    """The thread count a runtime is given: as asked on the CPU, its own choice (0) on a GPU."""
    return threads if device.type == "cpu" else 0
