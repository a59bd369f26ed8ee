"""The command line: every command's --help, the data commands, and one-line errors."""

import json
import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from mdlite import __version__
from mdlite.cli import cli, config_options
from mdlite.config import ExportConfig, SolveConfig


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


@pytest.mark.parametrize("path", _commands(cli), ids=lambda p: " ".join(p) or "mdlite")
def test_every_command_shows_an_example(path: tuple[str, ...]) -> None:
    output = CliRunner().invoke(cli, [*path, "-h"], terminal_width=200).output
    assert re.search(r"Example:\n +mdlite ", output), output


def test_flags_show_their_defaults_and_one_spelling() -> None:
    output = CliRunner().invoke(cli, ["solve", "-h"], terminal_width=200).output
    assert "--paths INTEGER" in output and "[default: 10]" in output and "[default: mixed]" in output
    assert "--num-ctx INTEGER" in output and "--n-ctx" not in output  # the old spelling is hidden
    output = CliRunner().invoke(cli, ["export-gguf", "-h"], terminal_width=200).output
    assert "-q, --quant-types TEXT" in output and "[default: Q4_K_M]" in output and "--parity / --no-parity" in output


def test_only_given_flags_override_and_aliases_map_to_one_key() -> None:
    seen: dict = {}

    @click.command()
    @config_options(SolveConfig)
    def solve_probe(config: Path | None, overrides: dict) -> None:
        seen["solve"] = overrides

    @click.command()
    @config_options(ExportConfig)
    def export_probe(config: Path | None, overrides: dict) -> None:
        seen["export"] = overrides

    assert CliRunner().invoke(solve_probe, ["--paths", "10", "--n-ctx", "512", "--no-early-stop"]).exit_code == 0
    assert seen["solve"] == {"paths": 10, "num_ctx": 512, "early_stop": False}  # a default given explicitly counts
    assert CliRunner().invoke(export_probe, ["-q", "q8_0", "--quant-types", "F16"]).exit_code == 0
    assert seen["export"] == {"quant_types": ["q8_0", "F16"]}


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
