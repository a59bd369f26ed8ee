"""The command line: every command's --help, the data commands, and one-line errors."""

import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from mdlite import __version__
from mdlite.cli import cli


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [prefix]
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            found += _commands(command, (*prefix, name))
        else:
            found.append((*prefix, name))
    return found


@pytest.mark.parametrize("path", _commands(cli), ids=lambda p: " ".join(p) or "mdlite")
def test_every_command_has_help(path: tuple[str, ...]) -> None:
    for flag in ("--help", "-h"):
        result = CliRunner().invoke(cli, [*path, flag], prog_name="mdlite")
        assert result.exit_code == 0, result.output
        assert "Usage: mdlite" in result.output


def test_expected_commands_exist() -> None:
    names = {" ".join(p) for p in _commands(cli)}
    assert {"data synth", "data check", "data stats", "models list", "models fetch", "models path"} <= names


def test_version() -> None:
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_synth_check_stats_roundtrip(tmp_path: Path) -> None:
    out = tmp_path / "p.jsonl"
    runner = CliRunner()
    result = runner.invoke(cli, ["data", "synth", "-n", "25", "--seed", "3", "-o", str(out)])
    assert result.exit_code == 0 and "wrote 25 problems" in result.output
    assert len(out.read_text().splitlines()) == 25
    result = runner.invoke(cli, ["data", "check", str(out)])
    assert result.exit_code == 0 and "ok, 25 problems" in result.output
    result = runner.invoke(cli, ["data", "stats", str(out), "--json"])
    assert json.loads(result.output)["problems"] == 25


def test_stats_of_a_named_dataset(shared_data: Path) -> None:
    result = CliRunner().invoke(cli, ["data", "stats", "svamp:test", "--data-dir", str(shared_data)])
    assert result.exit_code == 0 and "200" in result.output


@pytest.mark.parametrize(
    ("content", "needle"),
    [('{"id": 1}\n', "p.jsonl:1: missing field"), ("", "empty"), ('{"id":1,"question":"q","answer":"x"}', ":1:")],
)
def test_bad_input_is_one_line_exit_2(tmp_path: Path, content: str, needle: str) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    result = CliRunner().invoke(cli, ["data", "check", str(path)])
    assert result.exit_code == 2
    assert needle in result.output and result.output.count("\n") == 1
    assert result.output.startswith("mdlite: error: ") and "Traceback" not in result.output


def test_unknown_model_is_one_line_exit_2() -> None:
    result = CliRunner().invoke(cli, ["models", "path", "no-such-model"])
    assert result.exit_code == 2 and "unknown model 'no-such-model'" in result.output
