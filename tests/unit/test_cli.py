from __future__ import annotations

import pytest

from recps.cli.main import build_parser, main


def test_version_prints_the_installed_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    assert main(["version"]) == 0
    assert capsys.readouterr().out.strip() == version("recps")


def test_no_command_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: recps" in capsys.readouterr().out


def test_unknown_command_is_an_argparse_error() -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["no-such-command"])
    assert e.value.code == 2
