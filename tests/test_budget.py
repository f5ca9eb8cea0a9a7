"""Latency budgets parse as people write them; everything else is a one-line error naming the accepted forms."""

import pytest

from searchspace import MixerNASError
from searchspace.latency import BudgetError, format_ms, parse_budget


@pytest.mark.parametrize(
    "text, ms",
    [
        ("5ms", 5.0),
        ("5 ms", 5.0),
        ("2.5ms", 2.5),
        ("500us", 0.5),
        ("500µs", 0.5),  # micro sign U+00B5
        ("500μs", 0.5),  # Greek mu U+03BC
        ("500 µs", 0.5),
        ("0.005s", 5.0),
        ("1s", 1000.0),
        ("5MS", 5.0),
        ("5Ms", 5.0),
        ("500US", 0.5),
        ("500µS", 0.5),
        ("0.005S", 5.0),
        ("  5ms  ", 5.0),
        (".5ms", 0.5),
        ("5.ms", 5.0),
        ("1e-3s", 1.0),
        ("+5ms", 5.0),
    ],
)
def test_good_budgets(text, ms):
    assert parse_budget(text) == pytest.approx(ms)


@pytest.mark.parametrize(
    "text, problem",
    [
        ("5", "a unit is missing"),
        ("2.5", "a unit is missing"),
        ("0ms", "greater than zero"),
        ("0.0 s", "greater than zero"),
        ("-5ms", "greater than zero"),
        ("5 minutes", "unknown unit 'minutes'"),
        ("5ns", "unknown unit 'ns'"),
        ("5 m s", "not a number followed by a unit"),
        ("ms", "not a number followed by a unit"),
        ("", "not a number followed by a unit"),
        ("fast", "not a number followed by a unit"),
        ("5ms!", "not a number followed by a unit"),
        ("5ms 3ms", "not a number followed by a unit"),
        ("nanms", "not a number followed by a unit"),
        ("nan ms", "not a number followed by a unit"),
        ("inf ms", "not a number followed by a unit"),
        ("1e999ms", "not finite"),
        ("5\nms", "not a number followed by a unit"),
    ],
)
def test_bad_budgets_name_the_problem_and_the_accepted_forms(text, problem):
    with pytest.raises(BudgetError) as info:
        parse_budget(text)
    message = str(info.value)
    assert problem in message
    assert "5ms, 5 ms, 2.5ms, 500us, 500µs or 0.005s" in message
    assert "\n" not in message


@pytest.mark.parametrize("value", [5, 5.0, None, b"5ms"])
def test_non_text_is_rejected(value):
    with pytest.raises(BudgetError, match="expected text"):
        parse_budget(value)


def test_budget_error_is_a_user_facing_error():
    assert issubclass(BudgetError, MixerNASError)
    with pytest.raises(MixerNASError):
        parse_budget("5")


def test_long_garbage_is_shortened_in_the_message():
    with pytest.raises(BudgetError) as info:
        parse_budget("x" * 500)
    assert len(str(info.value)) < 200


@pytest.mark.parametrize("ms, text", [(0.45, "450 µs"), (12.3456, "12.3 ms"), (1.5, "1.50 ms"), (1500.0, "1.50 s"),
                                      (0.0123, "12.3 µs")])
def test_format_ms(ms, text):
    assert format_ms(ms) == text


@pytest.mark.parametrize("ms, text", [(9.996, "10.0 ms"), (99.96, "100 ms"), (999.6, "1.00 s"), (0.9996, "1.00 ms"),
                                      (0.09996, "100 µs")])
def test_format_ms_keeps_three_digits_when_rounding_reaches_the_next_decade(ms, text):
    # a latency's interval is printed with format_ms: "9.99 ms to 10.00 ms" or "999 ms to 1000 ms" read as a
    # change of precision or unit that is not there
    assert format_ms(ms) == text
