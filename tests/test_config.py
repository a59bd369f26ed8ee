"""Config loading: YAML + overrides, type coercion, and every problem reported at once."""

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from mdlite import MdliteError
from mdlite.config import OPTIMIZERS, SCHEDULERS, TeachConfig, TrainConfig, knob, load_config, reference_markdown


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


def test_sections_are_mappings_with_known_names(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train: {}\ntrian:\n  lora_r: 4\n")
    with pytest.raises(MdliteError, match=r"unknown section 'trian' \(did you mean 'train'\?\); sections: distill"):
        load_config(ExampleConfig, path, section="train")
    path.write_text("train: 5\n")
    with pytest.raises(MdliteError, match=r"c.yaml \[train\]: expected a mapping of config keys, got 5"):
        load_config(ExampleConfig, path, section="train")


@pytest.mark.parametrize(("overrides", "message"), [
    ({"learning_rate": "nan"}, "learning_rate: expected a finite number"),
    ({"learning_rate": float("inf")}, "learning_rate: expected a finite number"),
    ({"lora_r": float("inf")}, "lora_r: expected int"),
])
def test_non_finite_numbers_are_refused(overrides: dict, message: str) -> None:
    with pytest.raises(MdliteError, match=message):
        load_config(ExampleConfig, None, overrides)


@pytest.mark.parametrize(("value", "ok"), [
    ("30m", True), ("1h30m", True), ("1.5h", True), ("300ms", True), ("0", True), ("-1", True), ("3600", True),
    ("-1m", True), ("banana", False), ("", False), ("30 m", False), ("m", False), ("1d", False)])
def test_keep_alive_takes_ollama_durations(value: str, ok: bool) -> None:
    problems = TeachConfig(keep_alive=value).problems()
    assert any("keep_alive" in p for p in problems) is not ok


def test_scheduler_and_optimizer_names_are_those_of_transformers() -> None:
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    assert SCHEDULERS == tuple(s.value for s in SchedulerType)
    assert OPTIMIZERS == tuple(o.value for o in OptimizerNames)
    problems = TrainConfig(lr_scheduler_type="cosin", optim="adamw").problems()
    assert any("did you mean 'cosine'" in p for p in problems) and any("unknown optim 'adamw'" in p for p in problems)
    assert TrainConfig(lr_scheduler_type="linear", optim="paged_adamw_8bit").problems() == []


def test_config_validation_imports_no_stage_module() -> None:
    """config.py checks quant types without importing export.py (no config -> export -> train -> config circle)."""
    code = ("import sys; from mdlite.config import ExportConfig; "
            "assert not ExportConfig(quant_types=['Q4_K_M']).problems(); "
            "print(sorted(m for m in sys.modules if m in ('mdlite.export', 'mdlite.train')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
