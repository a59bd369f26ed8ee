"""Stage configurations: one dataclass per stage, loaded from YAML with command-line overrides.

Every field has a `help` (its docstring, shown by `--help` and in README's config reference).
`load_config(Cls, path, overrides)` reads the YAML file, applies the flags that were given, checks
types and values, and raises one MdliteError listing every problem at once.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from mdlite import MdliteError

T = TypeVar("T")


def knob(default: Any, help: str, **kwargs: Any) -> Any:
    """A config field with its docstring (`help`)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


# ---- stage configs (each stage's module documents how it uses them) ------------------------------


# ---- loading and validation ---------------------------------------------------------------------


def load_config(cls: type[T], path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                *, section: str | None = None) -> T:
    """`cls` from the YAML file at `path` (its `section` key when given), with `overrides` applied."""
    values: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        values = _read_yaml(Path(path))
        source = str(path)
        if section is not None:
            values = values.get(section) or {}
            source = f"{path} [{section}]"
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    problems = []
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            close = [name for name in known if name.split("_")[0] == key.split("_")[0]]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            problems.append(f"unknown key {key!r}{hint}")
    hints = typing.get_type_hints(cls)
    clean = {}
    for key, value in values.items():
        if key in known:
            try:
                clean[key] = coerce(value, hints[key])
            except (TypeError, ValueError) as error:
                problems.append(f"{key}: {error} (flag --{key.replace('_', '-')})")
    if not problems:
        config = cls(**clean)
        validate = getattr(config, "problems", None)
        problems = validate() if validate else []
    if problems:
        raise MdliteError(f"{source}: " + "; ".join(problems))
    return config


def coerce(value: Any, hint: Any) -> Any:
    """`value` converted to the annotated type, or TypeError/ValueError saying why not."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0])
    if typing.get_origin(hint) is list:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise TypeError(f"expected a list, got {value!r}")
        return [coerce(item, args[0]) for item in items]
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        if not isinstance(value, bool):
            raise TypeError(f"expected true or false, got {value!r}")
        return value
    if hint in (int, float):
        if isinstance(value, bool):
            raise TypeError(f"expected a number, got {value!r}")
        try:
            number = hint(value)
        except (TypeError, ValueError):
            raise TypeError(f"expected {hint.__name__}, got {value!r}") from None
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise TypeError(f"expected an integer, got {value!r}")
        return number
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise TypeError(f"expected a string, got {value!r}")
        return str(value)
    return value


def to_dict(config: Any) -> dict[str, Any]:
    """A config as plain data (for run.json and --dry-run)."""
    return dataclasses.asdict(config)


def reference_markdown(classes: list[type]) -> str:
    """The config reference for README: one table per stage from the field docstrings."""
    out = []
    for cls in classes:
        out.append(f"### `{cls.__name__}`\n\n{(cls.__doc__ or '').strip()}\n")
        out.append("| key | default | meaning |\n| --- | --- | --- |")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out.append(f"| `{f.name}` | `{default!r}` | {f.metadata.get('help', '')} |")
        out.append("")
    return "\n".join(out)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise MdliteError(f"{path}: config file not found")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise MdliteError(f"{where}: not valid YAML ({getattr(error, 'problem', error)})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise MdliteError(f"{path}: expected a mapping of config keys, got {type(values).__name__}")
    return values
