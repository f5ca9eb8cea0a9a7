"""A second process that keeps the other core busy, for benchmarks that check a figure holds under load."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator

# A torch matmul loop on one thread: it competes for caches and memory bandwidth the way another job would.
_LOAD = "import torch\ntorch.set_num_threads(1)\na = torch.randn(1024, 1024)\nwhile True:\n    a = (a @ a).tanh_()\n"


@contextlib.contextmanager
def busy_core(enabled: bool = True) -> Iterator[None]:
    """Run a CPU-bound process on the core this one is not on (the last core) while the block runs."""
    if not enabled:
        yield
        return
    cores = sorted(os.sched_getaffinity(0))
    other = cores[-1]
    proc = subprocess.Popen([sys.executable, "-c", _LOAD],
                            preexec_fn=lambda: os.sched_setaffinity(0, {other}))  # noqa: PLW1509
    try:
        yield
    finally:
        proc.kill()
        proc.wait()
