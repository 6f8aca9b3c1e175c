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


def test_ps_start_store_flags_reach_the_server_config(tmp_path) -> None:
    import argparse

    from recps.ps.main import add_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    plain = config_from_args(p.parse_args(["--data-dir", str(tmp_path)]))
    assert plain.store.mmap_reads is False
    args = ["--data-dir", str(tmp_path), "--mmap-reads", "--memory-mb", "32"]
    cfg = config_from_args(p.parse_args(args))
    assert cfg.store.mmap_reads is True
    assert cfg.store.memory_budget_bytes == 32 << 20
