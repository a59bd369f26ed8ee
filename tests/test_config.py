"""Config loading: YAML + overrides, type coercion, and every problem reported at once."""

from dataclasses import dataclass
from pathlib import Path

import pytest

from mdlite import MdliteError
from mdlite.config import knob, load_config, reference_markdown


@dataclass
class ExampleConfig:
    """A stage config for the tests."""

    output_dir: str = knob("out", "Where outputs go.")
    lora_r: int = knob(8, "LoRA rank.")
    learning_rate: float = knob(2e-4, "Peak learning rate.")
    packing: bool = knob(True, "Pack sequences.")
    styles: list[str] = knob(["cot", "pot"], "Rationale styles.")
    limit: int | None = knob(None, "Use at most this many problems.")

    def problems(self) -> list[str]:
        return ["lora_r must be >= 1 (flag --lora-r)"] if self.lora_r < 1 else []


def test_defaults_yaml_and_overrides(tmp_path: Path) -> None:
    assert load_config(ExampleConfig).lora_r == 8
    path = tmp_path / "c.yaml"
    path.write_text("lora_r: 16\nlearning_rate: '1e-4'\nstyles: cot\npacking: false\nlimit: null\n")
    config = load_config(ExampleConfig, path, {"lora_r": 32, "output_dir": None})
    assert (config.lora_r, config.learning_rate, config.styles, config.packing, config.limit) == (
        32, 1e-4, ["cot"], False, None)
    assert config.output_dir == "out"


def test_sections(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lora_r: 4\nteach: {}\n")
    assert load_config(ExampleConfig, path, section="train").lora_r == 4
    assert load_config(ExampleConfig, path, section="teach").lora_r == 8


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("lora_rank: 4\nlearning_rate: fast\npacking: maybe\nlimit: 2.5\n")
    with pytest.raises(MdliteError) as error:
        load_config(ExampleConfig, path)
    message = str(error.value)
    assert message.startswith(str(path))
    for part in ["unknown key 'lora_rank' (did you mean lora_r?)", "learning_rate: expected float",
                 "packing: expected true or false", "limit: expected an integer", "--learning-rate"]:
        assert part in message


def test_value_checks_run_after_types() -> None:
    with pytest.raises(MdliteError, match="lora_r must be >= 1"):
        load_config(ExampleConfig, None, {"lora_r": 0})


@pytest.mark.parametrize(("text", "message"), [("a: [1\n", ":2: not valid YAML"), ("- 1\n", "expected a mapping")])
def test_bad_yaml(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(MdliteError, match=message):
        load_config(ExampleConfig, path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(MdliteError, match="config file not found"):
        load_config(ExampleConfig, tmp_path / "none.yaml")


def test_reference_lists_every_field() -> None:
    text = reference_markdown([ExampleConfig])
    assert "### `ExampleConfig`" in text and "| `lora_r` | `8` | LoRA rank. |" in text
