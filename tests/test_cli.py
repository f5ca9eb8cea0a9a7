"""The shared command-line shell: every MixerNAS command reports bad input the same way."""

from __future__ import annotations

import pytest

from searchspace import cli
from searchspace.errors import MixerNASError


def parser() -> cli.Parser:
    p = cli.Parser(prog="tool")
    p.add_argument("--count", type=int, default=1)
    return p


@pytest.mark.parametrize("argv, expected", [(["--colour", "red"], "unrecognized arguments: --colour red"),
                                            (["--count", "many"], "invalid int value: 'many'")])
def test_malformed_command_lines_are_one_line_and_status_2(argv, expected, capsys):
    assert cli.main(parser(), lambda args: 0, argv, prog="tool") == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith("tool: error: ") and expected in err and "(see --help)" in err


def test_user_errors_are_folded_onto_one_line(capsys):
    def run(args):
        raise MixerNASError("the budget 5 has no unit;\n  write it as 5ms, 500us or 0.005s")

    assert cli.main(parser(), run, []) == 2
    assert capsys.readouterr().err == "error: the budget 5 has no unit; write it as 5ms, 500us or 0.005s\n"


def test_success_help_and_interrupt_statuses(capsys):
    assert cli.main(parser(), lambda args: args.count + 4, ["--count", "3"]) == 7
    assert cli.main(parser(), lambda args: 0, ["--help"]) == 0
    assert "--count" in capsys.readouterr().out

    def interrupted(args):
        raise KeyboardInterrupt

    assert cli.main(parser(), interrupted, []) == 130
    assert capsys.readouterr().err == "interrupted\n"
