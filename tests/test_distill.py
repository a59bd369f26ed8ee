"""`mdlite distill` end to end on a tiny synthetic set: the real Qwen2.5-Coder 0.5B GGUF teaches in-process,
a tiny random LLaMA is the student; every stage's outputs exist and agree; reruns skip, resume and redo
exactly what they should."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from mdlite import MdliteError
from mdlite.cli import cli
from mdlite.distill import plan, run
from mdlite.models import make_tiny_model

pytestmark = pytest.mark.slow
STAGES = ["teach", "train", "export-base", "eval-base", "export", "eval-student"]


def _config(folder: Path, student: Path) -> Path:
    loose = {"min_token_match": 0.0, "min_greedy_match": 0.0, "min_answer_agreement": 0.0, "min_stop_rate": 0.0}
    config = {
        "distill": {"output_dir": str(folder / "out"), "train_data": "synth:4:11", "test_data": "synth:3:12",
                    "teacher": "llamacpp:qwen2.5-coder-0.5b-instruct", "student": str(student)},
        "teach": {"n_cot": 1, "n_pot": 1, "temperature": 0.5, "max_tokens": 96, "n_threads": 2},
        "train": {"quantization": "none", "max_steps": 6, "save_steps": 2, "eval_steps": 3, "logging_steps": 1,
                  "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "val_fraction": 0.0,
                  "gradient_checkpointing": False},
        "export": {"quant_types": ["F16"], "parity_problems": 1, "parity_max_tokens": 8} | loose,
        "eval": {"mode": ["cot", "pot", "hybrid"], "paths": 2, "max_tokens": 12},
    }
    path = folder / "distill.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("distill")
    student = make_tiny_model(folder / "tiny")
    config = _config(folder, student)
    result = run(config, {})
    return {"config": config, "out": folder / "out", "result": result, "folder": folder}


def _state(out: Path) -> dict:
    return json.loads((out / "pipeline.json").read_text())


def test_every_stage_ran_and_outputs_agree(pipeline: dict) -> None:
    out, state = pipeline["out"], _state(pipeline["out"])
    assert [name for name in STAGES if state[name].get("stamp")] == STAGES
    rationales = [json.loads(line) for line in (out / "teach" / "rationales.jsonl").read_text().splitlines()]
    assert len(rationales) == 4 * 2 and any(r["kept"] for r in rationales)
    train_log = [json.loads(line) for line in (out / "train" / "trainer_log.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in train_log) == 6
    gguf = Path(state["export"]["result"]["gguf"])
    assert gguf.exists() and gguf.parent == out / "export"
    assert json.loads((out / "eval-student" / "run.json").read_text())["model"]["path"] == str(gguf)
    test_ids = [json.loads(line)["id"] for line in (out / "data" / "test.jsonl").read_text().splitlines()]
    for name in ("eval-base", "eval-student"):
        report = json.loads((out / name / "report.json").read_text())
        assert report["problems"] == len(test_ids) == 3
    summary = (out / "summary.md").read_text()
    assert summary == pipeline["result"]["summary"]
    for part in ("## Teacher", "| cot |", "## Training", "student-F16.gguf", "| greedy pot |", "| teach |"):
        assert part in summary


def test_second_run_does_no_work(pipeline: dict) -> None:
    out = pipeline["out"]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "summary.md"}
    stamps = {name: record["stamp"] for name, record in _state(out).items()}
    run(pipeline["config"], {})
    assert {name: record["stamp"] for name, record in _state(out).items()} == stamps
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "summary.md"}
    changed = [str(p) for p in after if before.get(p) != after[p] and p.name != "pipeline.json"]
    assert changed == []


def test_deleting_the_export_reruns_only_export_and_eval(pipeline: dict) -> None:
    import shutil

    out = pipeline["out"]
    stamps = {name: record["stamp"] for name, record in _state(out).items()}
    shutil.rmtree(out / "export")
    run(pipeline["config"], {})
    rerun = {name for name, record in _state(out).items() if record["stamp"] != stamps[name]}
    assert rerun == {"export", "eval-student"}
    assert (out / "export" / "student-F16.gguf").exists()


def test_kill_during_training_then_rerun_finishes(pipeline: dict, tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "out"
    (out / "teach").parent.mkdir(parents=True)
    shutil.copytree(pipeline["out"] / "teach", out / "teach")  # teach resumes from these: no new samples
    command = [sys.executable, "-m", "mdlite", "distill", str(pipeline["config"]), "--output-dir", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.time() + 300
    while not list((out / "train").glob("checkpoint-*/adapter_model.safetensors")):
        assert process.poll() is None and time.time() < deadline, "training never reached a checkpoint"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not _state(out)["train"].get("stamp")
    run(pipeline["config"], {"output_dir": str(out)})
    state = _state(out)
    assert state["train"]["result"]["global_step"] == 6 and state["eval-student"].get("stamp")


def test_dry_run_and_config_errors(pipeline: dict, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["distill", str(pipeline["config"]), "--dry-run"])
    assert result.exit_code == 0 and "eval-student:" in result.output
    bad = yaml.safe_load(pipeline["config"].read_text())
    bad["train"]["lora_r"] = 0
    bad["eval"]["mode"] = ["vote"]
    bad["distill"]["teachr"] = "x"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(MdliteError) as error:
        plan(path, {})
    assert "unknown key 'teachr'" in str(error.value)
    bad["distill"].pop("teachr")
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(MdliteError) as error:
        plan(path, {})
    assert "lora_r must be >= 1" in str(error.value) and "mode must be" in str(error.value)
