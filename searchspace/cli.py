"""What every MixerNAS command line shares: argument errors and user errors as one line with exit status 2.

``python -m searchspace.latency``, ``python -m compress`` and ``search.py`` all build their parser with
:class:`Parser` and run through :func:`main`, so a malformed flag, a bad budget or an unknown mixer reads the
same everywhere: ``error: <what is wrong and how to fix it>`` on stderr, status 2, no traceback. Ctrl-C is
status 130 with one line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from .errors import MixerNASError
from .latency.measure import DTYPES, RunOptions, default_dtype
from .runtimes import runtime_names

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(MixerNASError):
    """A malformed command line (unknown flag, missing value, wrong type)."""


class Parser(argparse.ArgumentParser):
    """``argparse`` whose errors are one line (with a pointer to ``--help``) instead of a usage block."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see --help)")


def error_line(exc: BaseException, prog: str | None = None) -> str:
    """``"<prog>: error: <message on one line>"``."""
    message = " ".join(str(exc).split())
    return f"{prog}: error: {message}" if prog else f"error: {message}"


def main(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], int],
         argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    """Parse ``argv`` and call ``run(args)``; its return value is the exit status."""
    try:
        return run(parser.parse_args(argv))
    except SystemExit as exc:  # --help, --version
        return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_USAGE
    except MixerNASError as exc:
        print(error_line(exc, prog), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


# ------------------------------------------------------------------------------- how the model runs while timed


def add_run_arguments(group: argparse._ActionsContainer) -> None:
    """``--runtime``, ``--dtype``, ``--channels-last``, ``--cuda-graphs``, ``--cudnn-benchmark``: the same in every
    command that measures latency (their defaults follow the device; see
    :class:`~searchspace.latency.measure.RunOptions`)."""
    group.add_argument("--runtime", default="eager", metavar="NAME",
                       help=f"what runs the model where you deploy it, so latency is judged there: "
                            f"{', '.join(runtime_names())} (default: eager PyTorch). onnxruntime and openvino need "
                            f"the extras (pip install -e '.[onnx]' / '.[openvino]'); tensorrt needs --device cuda. "
                            f"Each runtime has its own lookup table")
    group.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                       help="precision latency is measured in (default: float16 on CUDA, float32 on the CPU)")
    group.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                       help="channels-last memory format while timed (default: on for CUDA, off on the CPU)")
    group.add_argument("--cuda-graphs", action="store_true",
                       help="CUDA: capture the forward pass once and time its replay, as a deployment that uses "
                            "CUDA graphs runs it (batch-1 latency without kernel-launch overhead)")
    group.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=None,
                       help="CUDA: let cuDNN pick its fastest kernels during warm-up (default: on for CUDA)")


def run_options(args: argparse.Namespace, device: str) -> tuple[str, RunOptions]:
    """The dtype and :class:`RunOptions` that ``add_run_arguments``'s flags ask for on ``device``."""
    options = RunOptions.for_device(device, channels_last=args.channels_last, cuda_graphs=args.cuda_graphs,
                                    cudnn_benchmark=args.cudnn_benchmark)
    return args.dtype or default_dtype(device), options
