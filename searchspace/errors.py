"""Errors a user can act on.

Every error raised for bad input derives from :class:`MixerNASError`; the command-line tools catch that one class,
print its message on one line and exit with status 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def first_line(exc: BaseException) -> str:
    """The first non-blank line of an exception's message ("" if it has none): long library errors in one line."""
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), "")


class MixerNASError(Exception):
    """Base class of the errors caused by input (names, architectures, budgets, files)."""


class UnknownNameError(MixerNASError, KeyError):
    """A mixer, preset, space, block or other registered name that does not exist."""

    def __init__(self, kind: str, name: str, known: Iterable[str]):
        known = sorted(known)
        close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(repr(c) for c in close)}?" if close else f"known: {', '.join(known)}"
        super().__init__(f"unknown {kind} {name!r}; {hint}")
        self.kind, self.name, self.close_matches = kind, name, close

    def __str__(self) -> str:  # KeyError would otherwise quote the whole message
        return str(self.args[0])


class InvalidArchError(MixerNASError, ValueError):
    """An architecture description that cannot be built; the message names the offending field."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"invalid architecture: {field}: {problem}")
        self.field = field


class EvaluationError(MixerNASError):
    """An evaluation that produced no usable number (the trial fails; a search goes on)."""


class TrainingDiverged(EvaluationError):
    """The training loss or the weights became NaN or infinite."""
