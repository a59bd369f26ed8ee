"""The `mdlite` command: parses flags, loads configs, calls one `run()` per stage.

User mistakes (MdliteError) become a one-line `mdlite: error: ...` on stderr and exit code 2.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from mdlite import MdliteError, __version__

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class _Group(click.Group):
    """A click group that turns MdliteError into a one-line error and exit code 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MdliteError as error:
            click.echo(f"mdlite: error: {error}", err=True)
            ctx.exit(2)


def config_options(cls: type) -> Callable:
    """Decorator: `--config FILE` plus one `--field-name` flag per field of config class `cls`;
    the command receives them as `config` and `overrides` (flags left out are None)."""
    hints = typing.get_type_hints(cls)

    def decorate(command: Callable) -> Callable:
        def wrapper(config: Path | None, **kwargs: Any) -> Any:
            overrides = {name: kwargs.pop(name) for name in list(kwargs) if name in hints}
            overrides = {k: (list(v) or None) if isinstance(v, tuple) else v
                         for k, v in overrides.items()}
            return command(config=config, overrides=overrides, **kwargs)

        wrapper.__name__, wrapper.__doc__ = command.__name__, command.__doc__
        for f in reversed(dataclasses.fields(cls)):
            flag = "--" + f.name.replace("_", "-")
            hint = hints[f.name]
            help_text = f.metadata.get("help", "")
            if hint is bool:
                wrapper = click.option(f"{flag}/--no-{flag[2:]}", f.name, default=None,
                                       help=help_text)(wrapper)
            elif typing.get_origin(hint) is list:
                wrapper = click.option(flag, f.name, multiple=True, help=help_text + " (repeatable)")(wrapper)
            else:
                base = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
                kind = {int: int, float: float}.get(base[0], str)
                wrapper = click.option(flag, f.name, type=kind, default=None, help=help_text)(wrapper)
        return click.option("--config", "-c", type=click.Path(path_type=Path), default=None,
                            help="YAML config file; flags override its values.")(wrapper)

    return decorate


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(__version__, "--version", "-V", prog_name="mdlite")
@click.option("-v", "--verbose", is_flag=True, help="Log progress details.")
def cli(verbose: bool) -> None:
    """mdlite: Mixed Distillation of CoT + PoT reasoning into small local models.

    Pipeline: teach -> train -> export-gguf -> solve / eval, or all of it with `distill`.
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


# ---- data ---------------------------------------------------------------------------------------


@cli.group(context_settings=CONTEXT)
def data() -> None:
    """Make, check and describe problem files (JSONL: id, question, answer, equation)."""


@data.command("synth")
@click.option("-n", "count", type=click.IntRange(1), default=100, show_default=True,
              help="Number of problems.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Output JSONL file.")
def data_synth(count: int, seed: int, output: Path) -> None:
    """Generate checked arithmetic word problems (1-4 steps), deterministic by seed."""
    from mdlite.data import synth_problems, write_problems

    problems = synth_problems(count, seed=seed)
    write_problems(problems, output)
    click.echo(f"wrote {len(problems)} problems to {output}")


@data.command("check")
@click.argument("source")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="Folder with <name>/<split>.jsonl (default $MDLITE_DATA).")
def data_check(source: str, data_dir: Path | None) -> None:
    """Validate a problem file or dataset (SOURCE: FILE or NAME[:SPLIT], e.g. svamp:test)."""
    from mdlite.data import load_problems

    problems = load_problems(source, data_dir=data_dir)
    click.echo(f"{source}: ok, {len(problems)} problems")


@data.command("stats")
@click.argument("source")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="Folder with <name>/<split>.jsonl (default $MDLITE_DATA).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def data_stats(source: str, data_dir: Path | None, as_json: bool) -> None:
    """Counts, answer range and duplicates of a problem file or dataset."""
    from mdlite.data import load_problems, problem_stats

    stats = problem_stats(load_problems(source, data_dir=data_dir))
    if as_json:
        click.echo(json.dumps(stats, indent=2))
        return
    for key, value in stats.items():
        click.echo(f"{key:>22}  {value:.4g}" if isinstance(value, float) else f"{key:>22}  {value}")


# ---- models -------------------------------------------------------------------------------------


@cli.group(context_settings=CONTEXT)
def models() -> None:
    """The model registry: list, fetch and locate known models."""


@models.command("list")
def models_list() -> None:
    """List registry models and whether their GGUF is cached."""
    from mdlite.models import cached_gguf, registry

    for card in registry().values():
        if card.gguf:
            state = "cached" if cached_gguf(card).exists() else f"{card.gguf['size'] / 1e6:.0f} MB"
        else:
            state = "hub only"
        click.echo(f"{card.name:<30} {state:<10} {card.description}")


@models.command("fetch")
@click.argument("name")
def models_fetch(name: str) -> None:
    """Download and assemble a registry model's GGUF into the cache."""
    from mdlite.models import fetch

    click.echo(fetch(name))


@models.command("path")
@click.argument("name")
def models_path(name: str) -> None:
    """Print a registry model's local GGUF path, fetching it first if needed."""
    from mdlite.models import model_path

    click.echo(model_path(name))
