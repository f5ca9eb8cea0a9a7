"""Latency budgets written the way people write them: ``5ms``, ``5 ms``, ``2.5ms``, ``500us``, ``0.005s``.

>>> parse_budget("2.5ms"), parse_budget("500 µs"), parse_budget("0.005s")
(2.5, 0.5, 5.0)
"""

from __future__ import annotations

import math
import re

from ..errors import MixerNASError

ACCEPTED_FORMS = "a positive number with a unit, e.g. 5ms, 5 ms, 2.5ms, 500us, 500µs or 0.005s"

# Milliseconds per unit. Keys are casefolded, and casefold() maps the micro sign U+00B5 to the Greek mu U+03BC,
# so "µs" and "μs" (which look alike but are different characters) both land on the same key.
_UNIT_MS = {"s": 1000.0, "ms": 1.0, "us": 1e-3, "\u03bcs": 1e-3}

# A decimal number (optional sign, optional exponent), optional spaces (not line breaks), then letters.
# "nan" and "inf" are not decimal numbers, so they fail here with the other garbage.
_BUDGET = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)[ \t]*([^\W\d_]*)\s*", re.UNICODE)


class BudgetError(MixerNASError, ValueError):
    """A latency budget that cannot be read; the message names the accepted forms."""

    def __init__(self, text: object, problem: str):
        shown = repr(text) if len(repr(text)) <= 40 else repr(text)[:37] + "..."
        super().__init__(f"invalid latency budget {shown}: {problem}; write {ACCEPTED_FORMS}")
        self.text = text


def parse_budget(text: str) -> float:
    """The budget ``text`` in milliseconds.

    Units (case-insensitive): ``s``, ``ms``, ``us``, ``µs``/``μs``; a space between number and unit is allowed.
    A bare number, zero, a negative value, an unknown unit, nan/inf or anything else raises :class:`BudgetError`.

    >>> parse_budget("5 ms")
    5.0
    >>> parse_budget("5")
    Traceback (most recent call last):
      ...
    searchspace.latency.budget.BudgetError: invalid latency budget '5': a unit is missing; write ...
    """
    if not isinstance(text, str):
        raise BudgetError(text, f"expected text, got {type(text).__name__}")
    match = _BUDGET.fullmatch(text)
    if match is None:
        raise BudgetError(text, "not a number followed by a unit")
    number, unit = match.groups()
    if not unit:
        raise BudgetError(text, "a unit is missing")
    scale = _UNIT_MS.get(unit.casefold())
    if scale is None:
        raise BudgetError(text, f"unknown unit {unit!r}")
    value = float(number) * scale
    if not math.isfinite(value):
        raise BudgetError(text, "the value is not finite")
    if value <= 0:
        raise BudgetError(text, "a budget must be greater than zero")
    return value


def format_ms(ms: float) -> str:
    """A latency in milliseconds as a short human string, in the unit that suits it: ``"1.23 ms"``, ``"450 µs"``.

    >>> format_ms(0.45), format_ms(12.3456), format_ms(1500.0)
    ('450 µs', '12.3 ms', '1.50 s')
    """
    if math.isfinite(ms) and ms > 0:
        ms = float(f"{ms:.3g}")  # round first, so 9.996 is "10.0 ms" and 0.9996 is "1.00 ms", not 4 digits
    if ms < 1.0:
        return f"{_three_digits(ms * 1000)} µs"
    if ms < 1000.0:
        return f"{_three_digits(ms)} ms"
    return f"{_three_digits(ms / 1000)} s"


def _three_digits(x: float) -> str:
    """Three significant digits, trailing zeros kept (``1.50``), never an exponent or a trailing point."""
    if not math.isfinite(x) or x <= 0:
        return f"{x:g}"
    return f"{x:.{max(0, 2 - math.floor(math.log10(x)))}f}"
