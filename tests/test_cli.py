"""The `rlhf` entry point: help for every command, one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rlhf.cli import STAGE_COMMANDS, main


def rlhf(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlhf.cli", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_every_command():
    out = rlhf("--help")
    assert out.returncode == 0
    for name, _ in STAGE_COMMANDS + [("models", "")]:
        assert name in out.stdout


@pytest.mark.parametrize("command", [name for name, _ in STAGE_COMMANDS])
def test_every_stage_has_help_with_its_options_and_config(command, capsys):
    with pytest.raises(SystemExit) as exit:
        main([command, "--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    assert "--config" in out and "(default:" in out


def test_bad_config_file_is_one_line(tmp_path, capsys):
    assert main(["sample", "--config", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "config file not found" in err


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "COMMAND" in capsys.readouterr().out
