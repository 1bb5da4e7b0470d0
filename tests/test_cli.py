import subprocess
import sys

import pytest

from mcd_hf.cli import main

SUBCOMMANDS = ["demo", "train-teacher", "distill", "sample", "evaluate", "convert-mdlm"]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "mcd_hf.cli", *args], capture_output=True, text=True, timeout=120)


def test_top_level_help_lists_every_subcommand():
    result = run_cli("--help")
    assert result.returncode == 0
    for name in SUBCOMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_each_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    assert "usage" in capsys.readouterr().out.lower()


def test_sample_with_a_wrong_path_is_one_line_and_non_zero(capsys):
    assert main(["sample", "./no/such/folder"]) != 0
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "no/such/folder" in error


def test_unknown_flag_is_rejected(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "x", "--no_such_flag"])
    assert exit_info.value.code != 0 and "no_such_flag" in capsys.readouterr().err


def test_no_subcommand_prints_help_and_fails(capsys):
    assert main([]) != 0 and "COMMAND" in capsys.readouterr().out
