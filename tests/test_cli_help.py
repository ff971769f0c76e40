"""What `--help` and `--version` tell a newcomer: every command described, every option explained, an example each."""

import argparse

import pytest

from edge import __version__
from edge.cli import build_parser as edge_parser
from quantize.cli import build_parser as quantize_parser
from quantize.cli import main as quantize_main
from trainer.cli import build_parser as trainer_parser

PARSERS = {"trainer": trainer_parser, "quantize": quantize_parser, "edge": edge_parser}


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


@pytest.mark.parametrize("program", PARSERS)
def test_every_subcommand_has_a_description_an_example_and_help_for_each_argument(program):
    for name, sub in _subcommands(PARSERS[program]()).items():
        assert sub.description, f"{program} {name}: no description"
        assert (sub.epilog or "").startswith(f"Example: {program} {name} "), f"{program} {name}: no example"
        unexplained = [a.dest for a in sub._actions if not a.help]
        assert not unexplained, f"{program} {name}: no help for {unexplained}"


@pytest.mark.parametrize("program", PARSERS)
def test_version(program, capsys):
    with pytest.raises(SystemExit) as exit_:
        PARSERS[program]().parse_args(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"{program} {__version__}"


@pytest.mark.parametrize("args", [["inspect", "--bundle", "/nonexistent"], ["inspect", "/nonexistent"],
                                  ["evaluate", "--bundle", "/nonexistent", "--data", "."]])
def test_the_bundle_is_positional_or_an_option_as_in_edge_replay(args, capsys):
    assert quantize_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "/nonexistent" in err and len(err.splitlines()) == 1


def test_no_bundle_is_one_line(capsys):
    assert quantize_main(["inspect"]) == 2
    assert capsys.readouterr().err.strip() == "quantize: error: no bundle given; quantize inspect BUNDLE (or --bundle BUNDLE)"
