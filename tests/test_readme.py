"""README's config reference is generated from the config dataclasses and must be current."""

import os
import re
from pathlib import Path

from mdlite.config import (
    DistillConfig,
    EvalConfig,
    ExportConfig,
    ServeConfig,
    SolveConfig,
    TeachConfig,
    TrainConfig,
    reference_markdown,
)

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"(<!-- config-reference -->\n).*?(<!-- /config-reference -->)", re.DOTALL)


def test_config_reference_is_current() -> None:
    reference = reference_markdown([DistillConfig, TeachConfig, TrainConfig, ExportConfig, SolveConfig, ServeConfig,
                                    EvalConfig])
    text = README.read_text(encoding="utf-8")
    current = BLOCK.sub(lambda m: m.group(1) + reference + m.group(2), text)
    if os.environ.get("UPDATE_README"):
        README.write_text(current, encoding="utf-8")
        text = current
    assert current == text, "README's config reference is stale: run `make readme`"


def test_readme_gives_the_two_setup_commands() -> None:
    text = README.read_text(encoding="utf-8")
    assert "make demo" in text and "make test" in text
