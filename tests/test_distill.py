"""`mdlite distill` end to end on a tiny synthetic set: the real Qwen2.5-Coder 0.5B GGUF teaches in-process,
a tiny random LLaMA is the student; every stage's outputs exist and agree; reruns skip, resume and redo
exactly what they should (slow). The fast tests check `--dry-run`, `-c` and `--force` offline, with fake stage
runners where a run is needed."""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

from mdlite import MdliteError
from mdlite.cli import cli
from mdlite.distill import plan, run
from mdlite.models import make_tiny_model

STAGES = ["teach", "eval-teacher", "eval-base", "eval-base-fewshot", "train", "export", "eval-student"]


def _config(folder: Path, student: Path) -> Path:
    loose = {"min_token_match": 0.0, "min_greedy_match": 0.0, "min_answer_agreement": 0.0, "min_stop_rate": 0.0}
    config = {
        "distill": {"output_dir": str(folder / "out"), "train_data": "synth:4:11", "test_data": "synth:3:12",
                    "teacher": "llamacpp:qwen2.5-coder-0.5b-instruct", "student": str(student),
                    "teacher_eval": True, "base_eval": ["student", "few-shot"]},
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


@pytest.mark.slow
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
    for name in ("eval-teacher", "eval-base", "eval-base-fewshot", "eval-student"):  # every row: the same problems
        samples = [json.loads(line) for line in (out / name / "samples.jsonl").read_text().splitlines()]
        assert sorted({s["id"] for s in samples}) == sorted(test_ids) and len(test_ids) == 3
        assert json.loads((out / name / "report.json").read_text())["problems"] == 3
    summary = (out / "summary.md").read_text()
    assert summary == pipeline["result"]["summary"]
    for part in ("## Teacher", "| cot |", "## Training", "student-F16.gguf", "| teacher llamacpp:", "| teach |",
                 "| base student (few-shot prompt) |", "| student |"):
        assert part in summary
    assert (out / "accuracy.png").exists()


@pytest.mark.slow
def test_second_run_does_no_work(pipeline: dict) -> None:
    out = pipeline["out"]
    redone = (out / "summary.md", out / "accuracy.png")  # the report, rewritten by every run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p not in redone}
    stamps = {name: record["stamp"] for name, record in _state(out).items()}
    run(pipeline["config"], {})
    assert {name: record["stamp"] for name, record in _state(out).items()} == stamps
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p not in redone}
    changed = [str(p) for p in after if before.get(p) != after[p] and p.name != "pipeline.json"]
    assert changed == []


@pytest.mark.slow
def test_deleting_the_export_reruns_only_export_and_eval(pipeline: dict) -> None:
    import shutil

    out = pipeline["out"]
    stamps = {name: record["stamp"] for name, record in _state(out).items()}
    shutil.rmtree(out / "export")
    run(pipeline["config"], {})
    rerun = {name for name, record in _state(out).items() if record["stamp"] != stamps[name]}
    assert rerun == {"export", "eval-student"}
    assert (out / "export" / "student-F16.gguf").exists()


@pytest.mark.slow
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


@pytest.mark.slow
def test_dry_run_and_config_errors(pipeline: dict, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["distill", str(pipeline["config"]), "--dry-run"])
    assert result.exit_code == 0 and "0 of 8 stages would run" in result.output, result.output
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


# ---- fast: dry run, flags and bad input, offline -------------------------------------------------

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
RUN_ORDER = ["teach", "export-base", "eval-base", "train", "export", "eval-student"]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty MDLITE_HOME; any model download fails the test."""
    folder = tmp_path / "home"
    folder.mkdir()
    monkeypatch.setenv("MDLITE_HOME", str(folder))
    monkeypatch.setattr("mdlite.models._download_wheel", lambda *args: pytest.fail("dry run downloaded a model"))
    return folder


def _small_config(folder: Path, **sections: dict) -> Path:
    config = {"distill": {"output_dir": str(folder / "out"), "train_data": "synth:6:1", "test_data": "synth:5:2",
                          "teacher": "ollama:qwen2.5:0.5b", "student": "codellama-7b"},
              "teach": {"n_cot": 2, "n_pot": 1}, "train": {"max_steps": 4}, "eval": {"paths": 0}}
    for name, values in sections.items():
        config[name] = config.get(name, {}) | values
    path = folder / "distill.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _one_line_error(result: Result, needle: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.output.startswith("mdlite: error: ") and result.output.count("\n") == 1
    assert needle in result.output and "Traceback" not in result.output


def test_dry_run_of_the_demo_prints_the_plan_offline(home: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["distill", str(DEMO), "--dry-run", "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    stage_lines = [line.split()[1] for line in lines if line.strip()[:2].rstrip(".").isdigit()]
    assert stage_lines == ["teach", "eval-base-fewshot", "train", "export", "eval-student"]  # student has a GGUF
    assert "48 problems x (1 CoT + 2 PoT) = 144 teacher samples" in result.output
    assert "run (never ran)" in result.output and "GiB (fits" in result.output
    assert "not cached: the run fetches 491 MB" in result.output
    assert "5 of 5 stages would run" in result.output and "warning" not in result.output
    assert list(home.rglob("*")) == [] and not out.exists()


def test_dry_run_warns_about_keys_that_distill_sets(home: Path, tmp_path: Path) -> None:
    config = _small_config(tmp_path, teach={"teacher": "ollama:other", "output_dir": "elsewhere"},
                           train={"model": "gemma-3-270m"}, eval={"data": "svamp:test"})
    result = CliRunner().invoke(cli, ["distill", "-c", str(config), "--dry-run"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning: ")]
    assert [w.split()[1] for w in warnings] == ["teach.output_dir", "teach.teacher", "eval.data", "train.model"]
    assert "set distill.teacher instead" in warnings[1] and "set distill.student instead" in warnings[3]


def test_config_flag_and_positional(home: Path, tmp_path: Path) -> None:
    config = _small_config(tmp_path)
    runner = CliRunner()
    by_flag = runner.invoke(cli, ["distill", "-c", str(config), "--dry-run"])
    by_argument = runner.invoke(cli, ["distill", str(config), "--config", str(config), "--dry-run"])
    assert by_flag.exit_code == 0 and by_flag.output == by_argument.output
    assert "6 problems x (2 CoT + 1 PoT) = 18 teacher samples" in by_flag.output
    _one_line_error(runner.invoke(cli, ["distill", str(config), "-c", str(DEMO), "--dry-run"]), "give one")
    _one_line_error(runner.invoke(cli, ["distill", "--dry-run"]), "no config file given")


def test_force_takes_every_stage_the_dry_run_lists(home: Path, tmp_path: Path) -> None:
    config = _small_config(tmp_path)
    forced = [flag for stage in RUN_ORDER for flag in ("--force", stage)]
    result = CliRunner().invoke(cli, ["distill", str(config), "--dry-run", *forced])
    assert result.exit_code == 0, result.output
    assert result.output.count("run (forced)") == 6
    gguf_student = _small_config(tmp_path, distill={"student": str(tmp_path / "student.gguf")})
    (tmp_path / "student.gguf").write_bytes(b"GGUF")
    result = CliRunner().invoke(cli, ["distill", str(gguf_student), "--dry-run", "--force", "export-base"])
    _one_line_error(result, "--force export-base: this config has no such stage")


def test_help_shows_defaults_and_an_example() -> None:
    result = CliRunner().invoke(cli, ["distill", "--help"])
    assert "mdlite distill -c configs/demo.yaml --dry-run" in result.output and "[default: " in result.output


@pytest.mark.parametrize(("section", "needle"), [
    ({"train_data": "missing.jsonl"}, "missing.jsonl: no such file"),
    ({"test_data": "synth:6:1"}, "distill.test_data is train_data"),
    ({"test_data": "synth:3:1"}, "every test problem also appears in train_data"),
    ({"student": "no-such-model"}, "unknown model 'no-such-model'"),
    ({"teacher": "llamacpp:no-such.gguf"}, "distill.teacher: no-such.gguf: no such model file"),
    ({"teacher": "vllm:x"}, "unknown backend 'vllm'"),
])
def test_dry_run_bad_input_is_one_line(home: Path, tmp_path: Path, section: dict, needle: str) -> None:
    config = _small_config(tmp_path, distill=section)
    _one_line_error(CliRunner().invoke(cli, ["distill", str(config), "--dry-run"]), needle)
    assert not (tmp_path / "out").exists()


def test_dry_run_output_dir_must_be_a_writable_folder(home: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    config = _small_config(tmp_path)
    for command in (["--dry-run"], []):
        result = CliRunner().invoke(cli, ["distill", str(config), "--output-dir", str(tmp_path / "file" / "out"),
                                          *command])
        _one_line_error(result, "is not a folder")


def _fake_runners(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stage runners that write just the files distill checks, so `run` completes in milliseconds."""
    import mdlite.distill as distill

    def make(files: list[str], result: dict | None = None) -> Callable[[Any], dict]:
        def runner(cfg: Any) -> dict:
            folder = Path(cfg.output_dir)
            for name in files:
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                (folder / name).write_text("{}")
            return {"gguf": str(folder / "x.gguf")} if result is None else result
        return runner

    monkeypatch.setattr(distill, "_teach", make(["rationales.jsonl", "teach_stats.json"], {}))
    monkeypatch.setattr(distill, "_train", make(["adapter/adapter_config.json"], {}))
    monkeypatch.setattr(distill, "_export", make(["run.json", "x.gguf"]))
    monkeypatch.setattr(distill, "_evaluate", make(["report.json"], {}))


def test_dry_run_reads_pipeline_json_as_the_run_does(home: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_runners(monkeypatch)
    config = _small_config(tmp_path)
    run(config, {})
    runner = CliRunner()
    result = runner.invoke(cli, ["distill", str(config), "--dry-run"])
    assert result.exit_code == 0 and result.output.count("skip (up to date)") == 6, result.output
    assert "0 of 6 stages would run" in result.output
    changed = _small_config(tmp_path, train={"max_steps": 5})
    result = runner.invoke(cli, ["distill", str(changed), "--dry-run"])
    fates = {line.split()[1]: " ".join(line.split()[2:4]) for line in result.output.splitlines()
             if line.strip()[:2].rstrip(".").isdigit()}
    assert fates == {"teach": "skip (up", "train": "run (inputs", "export": "run (train",
                     "export-base": "skip (up", "eval-base": "skip (up", "eval-student": "run (export"}
    (tmp_path / "out" / "eval-base" / "report.json").unlink()
    result = runner.invoke(cli, ["distill", str(changed), "--dry-run"])
    assert "eval-base         run (outputs missing)" in result.output


# ---- variants and baseline rows (fake stage runners: what distill links, not what the stages compute) ----

VARIANTS = {"mixed": {}, "cot-only": {"train": {"styles": ["cot"]}}, "pot-only": {"train": {"styles": ["pot"]},
                                                                                   "eval": {"mode": ["pot"]}}}


def _recording_runners(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    """Fake runners (see _fake_runners) that also record (kind, config) of every stage that ran."""
    import mdlite.distill as distill

    _fake_runners(monkeypatch)
    calls: list[tuple[str, Any]] = []
    for kind in ("teach", "train", "export", "evaluate"):
        inner = getattr(distill, f"_{kind}")
        monkeypatch.setattr(distill, f"_{kind}", lambda cfg, inner=inner, kind=kind: calls.append((kind, cfg))
                            or inner(cfg))
    return calls


def test_variants_share_one_teach_stage_and_the_test_problems(home: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _recording_runners(monkeypatch)
    config = _small_config(tmp_path, distill={"variants": VARIANTS, "teacher_eval": True,
                                              "base_eval": ["student", "few-shot"], "base_paths": 2})
    run(config, {})
    out = tmp_path / "out"
    assert [kind for kind, _ in calls].count("teach") == 1
    trains = {Path(cfg.output_dir).name: cfg for kind, cfg in calls if kind == "train"}
    assert {name: cfg.styles for name, cfg in trains.items()} == {
        "train-mixed": ["cot", "pot"], "train-cot-only": ["cot"], "train-pot-only": ["pot"]}
    assert {cfg.rationales for cfg in trains.values()} == {str(out / "teach" / "rationales.jsonl")}
    evals = {Path(cfg.output_dir).name: cfg for kind, cfg in calls if kind == "evaluate"}
    assert list(evals) == ["eval-teacher", "eval-base", "eval-base-fewshot",  # then the variants in file order
                           "eval-cot-only", "eval-mixed", "eval-pot-only"]  # (safe_dump sorts them)
    assert {cfg.data for cfg in evals.values()} == {str(out / "data" / "test.jsonl")}
    assert evals["eval-teacher"].model == "ollama:qwen2.5:0.5b"
    assert evals["eval-base-fewshot"].prompt_style == "few-shot"
    assert evals["eval-mixed"].model == str(out / "export-mixed" / "x.gguf")
    assert [cfg.paths for cfg in evals.values()] == [0, 2, 2, 0, 0, 0] and evals["eval-pot-only"].mode == ["pot"]


def test_changing_one_variant_reruns_only_that_variant(home: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _recording_runners(monkeypatch)
    run(_small_config(tmp_path, distill={"variants": VARIANTS}), {})
    calls.clear()
    changed = {**VARIANTS, "cot-only": {"train": {"styles": ["cot"], "max_steps": 9}}}
    run(_small_config(tmp_path, distill={"variants": changed}), {})
    assert [Path(cfg.output_dir).name for _, cfg in calls] == ["train-cot-only", "export-cot-only", "eval-cot-only"]


@pytest.mark.parametrize(("variants", "needle"), [
    ({"base": {}}, "'base' is not a usable name"),
    ({"Mixed Run": {}}, "'Mixed Run' is not a usable name"),
    ({"a": {"teach": {"n_cot": 1}}}, "variants.a: expected a mapping of train, export, eval"),
    ({"a": {"train": {"output_dir": "x"}}}, "variants.a: train.output_dir: distill sets it"),
    ({"a": {"train": {"styles": ["prose"]}}}, "variants.a: "),
])
def test_bad_variants_are_one_line(home: Path, tmp_path: Path, variants: dict, needle: str) -> None:
    config = _small_config(tmp_path, distill={"variants": variants})
    _one_line_error(CliRunner().invoke(cli, ["distill", str(config), "--dry-run"]), needle)


def test_summary_has_a_row_per_model_and_the_plot(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mdlite.distill as distill

    _fake_runners(monkeypatch)

    def evaluate(cfg: Any) -> dict:
        folder = Path(cfg.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        accuracy = 0.5 if "teacher" in folder.name else 0.75
        report = {"problems": 5, "paths": 2, "greedy_accuracy": {"cot": 0.25, "pot": accuracy},
                  "accuracy": {"mixed": accuracy}, "maj_at_k": {"mixed": {"1": 0.4, "2": accuracy}}}
        (folder / "report.json").write_text(json.dumps(report))
        return {}

    monkeypatch.setattr(distill, "_evaluate", evaluate)
    result = run(_small_config(tmp_path, distill={"variants": {"mixed": {}}, "teacher_eval": True}), {})
    rows = [line for line in result["summary"].splitlines() if line.startswith(("| teacher", "| base", "| student"))]
    assert [row.split("|")[1].strip() for row in rows] == [
        "teacher ollama:qwen2.5:0.5b (few-shot)", "base student (student prompt)", "student mixed"]
    assert rows[0].split("|")[2:9] == [" 25.0% ", " 50.0% ", " 2 ", " - ", " - ", " 50.0% ", " - "]
    assert "## Accuracy on the test split (5 problems)" in result["summary"]
    assert (tmp_path / "out" / "accuracy.png").stat().st_size > 1000


# ---- teach_from: another run's finished teach stage (and teacher row), copied, never taught again ----------

def _teach_from_config(folder: Path, source: Path | None = None, **sections: dict) -> Path:
    """A config whose teach and eval-teacher stages talk to a fake Ollama teacher; `source`: teach_from."""
    config = {"distill": {"teacher": "ollama:teacher", "teacher_eval": True, "base_eval": []}
              | ({"teach_from": str(source)} if source else {})}
    for name, values in sections.items():
        config[name] = config.get(name, {}) | values
    folder.mkdir(exist_ok=True)
    return _small_config(folder, **config)


@pytest.fixture
def teacher_server(home: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A fake Ollama teacher ($OLLAMA_HOST); the teach and eval-teacher stages are real, train/export/eval fake."""
    from fake_ollama import FakeOllama

    import mdlite.distill as distill

    real_teach, real_evaluate = distill._teach, distill._evaluate
    _fake_runners(monkeypatch)
    fake_evaluate = distill._evaluate
    monkeypatch.setattr(distill, "_teach", real_teach)
    monkeypatch.setattr(distill, "_evaluate", lambda cfg: (real_evaluate if cfg.model.startswith("ollama:")
                                                           else fake_evaluate)(cfg))
    with FakeOllama(model="teacher", parallel=2) as server:
        monkeypatch.setenv("OLLAMA_HOST", server.url)
        yield server


def test_teach_from_copies_the_teach_stage_and_teacher_row_without_the_teacher(
        teacher_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mdlite.distill as distill

    source = tmp_path / "src" / "out"
    run(_teach_from_config(tmp_path / "src"), {})
    asked = len(teacher_server.requests)
    assert asked == 6 * 3 + 5 * 2  # teach: 6 problems x (2 CoT + 1 PoT); eval-teacher: 5 x greedy CoT + PoT
    config = _teach_from_config(tmp_path / "copy", source / "teach", distill={"student": "llama-2-7b"})
    out = tmp_path / "copy" / "out"
    plan_text = CliRunner().invoke(cli, ["distill", str(config), "--dry-run"]).output
    assert f"teach             copy (reused from {source / 'teach'})" in plan_text, plan_text
    assert f"eval-teacher      copy (reused from {source / 'eval-teacher'})" in plan_text
    assert "not run here: its stages are copied from" in plan_text and "no teacher calls" in plan_text

    calls = _recording_runners(monkeypatch)
    monkeypatch.setattr("mdlite.teacher.make_pool", lambda *a, **k: pytest.fail("the teacher was started"))
    result = run(config, {})
    assert len(teacher_server.requests) == asked  # no request reached the teacher
    assert [kind for kind, _ in calls] == ["train", "export", "evaluate"]  # only the new student's stages ran
    for name in ("teach/rationales.jsonl", "teach/teach_stats.json", "eval-teacher/report.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes()
    assert calls[0][1].rationales == str(out / "teach" / "rationales.jsonl")
    state = _state(out)
    assert state["teach"]["reused_from"]["folder"] == str(source / "teach")
    assert "| teacher ollama:teacher (few-shot) |" in result["summary"]
    assert f"(copied from {source / 'teach'}, where it took" in result["summary"]
    assert "0 of 5 stages would run" in CliRunner().invoke(cli, ["distill", str(config), "--dry-run"]).output

    calls.clear()  # the source teaches again (a new stamp): the copy and everything after it rerun
    monkeypatch.setattr(distill, "_teach", lambda cfg: {"rationales": str(Path(cfg.output_dir) / "rationales.jsonl")})
    run(_teach_from_config(tmp_path / "src"), {}, force=("teach",))
    calls.clear()
    run(config, {})
    assert [Path(cfg.output_dir).name for _, cfg in calls] == ["train", "export", "eval-student"]
    assert _state(out)["teach"]["stamp"] != state["teach"]["stamp"]


def test_a_packed_teach_stage_is_reused_without_the_data_or_the_run_folder(
        teacher_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--pack-reusable keeps teach/, eval-teacher/, their records and the data files' sha256, not the data:
    the packed folder alone is accepted by teach_from (as rationales:NAME when shipped), and refused when the
    data differs, with the message naming it. A stage it does not hold runs here."""
    import shutil

    import mdlite.distill as distill

    source_config = _teach_from_config(tmp_path / "src")
    run(source_config, {})
    packed = tmp_path / "packed"
    result = CliRunner().invoke(cli, ["distill", str(source_config), "--pack-reusable", str(packed)])
    assert result.exit_code == 0 and "packed teach, eval-teacher of" in result.output, result.output
    shutil.rmtree(tmp_path / "src")  # the run folder is gone (another machine)
    assert sorted(p.name for p in packed.iterdir()) == ["eval-teacher", "inputs.json", "pipeline.json", "teach"]
    assert set(json.loads((packed / "inputs.json").read_text())) == {"train.jsonl", "test.jsonl"}  # hashes only

    shipped = tmp_path / "shipped"
    shipped.mkdir()
    shutil.copytree(packed, shipped / "tiny")
    monkeypatch.setattr(distill, "shipped_folder", lambda: shipped)
    assert distill.shipped_names() == ["tiny"]
    for teach_from in (packed, "rationales:tiny"):
        config = _teach_from_config(tmp_path / "copy", teach_from)
        plan_text = CliRunner().invoke(cli, ["distill", str(config), "--dry-run"]).output
        assert "teach             copy (reused from" in plan_text and "eval-teacher      copy" in plan_text, plan_text
    calls = _recording_runners(monkeypatch)
    monkeypatch.setattr("mdlite.teacher.make_pool", lambda *a, **k: pytest.fail("the teacher was started"))
    run(config, {})
    assert [kind for kind, _ in calls] == ["train", "export", "evaluate"]
    out = tmp_path / "copy" / "out"
    assert (out / "teach" / "rationales.jsonl").read_bytes() == (packed / "teach" / "rationales.jsonl").read_bytes()

    teach_only = shipped / "tiny"  # packed before its run's teacher row finished: that stage runs here
    shutil.rmtree(teach_only / "eval-teacher")
    (teach_only / "pipeline.json").write_text(json.dumps({"teach": _state(teach_only)["teach"]}))
    plan_text = CliRunner().invoke(cli, ["distill", str(_teach_from_config(tmp_path / "again", "rationales:tiny")),
                                         "--dry-run"]).output
    assert "teach             copy (reused from" in plan_text and "eval-teacher      run (never ran)" in plan_text

    other_data = _teach_from_config(tmp_path / "other", "rationales:tiny", distill={"train_data": "synth:6:3"})
    _one_line_error(CliRunner().invoke(cli, ["distill", str(other_data), "--dry-run"]), "holds other problems")
    unknown = _teach_from_config(tmp_path / "x", "rationales:nope")
    _one_line_error(CliRunner().invoke(cli, ["distill", str(unknown), "--dry-run"]),
                    "no rationales 'nope' ship with mdlite; known: rationales:tiny")


def test_a_teacher_row_is_packed_beside_the_teach_stage_it_was_copied_with(teacher_server: Any,
                                                                           tmp_path: Path) -> None:
    """A run copies a packed teach stage, runs its teacher row here and packs it into the same folder: teach
    keeps the record of the run that made it, and every run copying from there finds its stages up to date."""
    import shutil

    run(_teach_from_config(tmp_path / "src"), {})
    packed = tmp_path / "packed"
    assert CliRunner().invoke(cli, ["distill", str(_teach_from_config(tmp_path / "src")), "--pack-reusable",
                                    str(packed)]).exit_code == 0
    shutil.rmtree(packed / "eval-teacher")  # packed before the teacher row finished
    (packed / "pipeline.json").write_text(json.dumps({"teach": _state(packed)["teach"]}))
    teach_record = _state(packed)["teach"]
    config = _teach_from_config(tmp_path / "copy", packed)
    run(config, {})
    requests = len(teacher_server.requests)
    result = CliRunner().invoke(cli, ["distill", str(config), "--pack-reusable", str(packed)])
    assert result.exit_code == 0 and "packed teach, eval-teacher of" in result.output, result.output
    assert _state(packed) == {"teach": teach_record, "eval-teacher": _state(tmp_path / "copy" / "out")["eval-teacher"]}
    plan_text = CliRunner().invoke(cli, ["distill", str(config), "--dry-run"]).output
    assert "teach             skip" in plan_text and "eval-teacher      skip" in plan_text, plan_text
    plan_text = CliRunner().invoke(cli, ["distill", str(_teach_from_config(tmp_path / "other", packed)),
                                         "--dry-run"]).output
    assert "teach             copy (reused from" in plan_text and "eval-teacher      copy" in plan_text, plan_text
    assert len(teacher_server.requests) == requests
    shutil.rmtree(packed)  # the copy's source is gone: its teach stage cannot be packed again
    _one_line_error(CliRunner().invoke(cli, ["distill", str(config), "--pack-reusable", str(tmp_path / "again")]),
                    "this run copied teach/ from")


@pytest.mark.parametrize(("changes", "needle"), [
    ({"distill": {"teacher": "ollama:other"}}, "distill.teacher 'ollama:teacher' there, 'ollama:other' here"),
    ({"distill": {"train_data": "synth:6:3"}}, "data/train.jsonl holds other problems"),
    ({"teach": {"n_cot": 1}}, "teach.n_cot 2 there, 1 here"),
    ({"teach": {"temperature": 0.9}}, "teach.temperature"),
    ({"teach": {"max_tokens": 99}}, "teach.max_tokens 256 there, 99 here"),
    ({"teach": {"seed": 1}}, "teach.seed 0 there, 1 here"),
    ({"teach": {"limit": 4}}, "teach.limit 0 there, 4 here"),
    ({"eval": {"paths": 2}}, "eval.paths 0 there, 2 here"),
    ({"eval": {"max_tokens": 64}}, "eval.max_tokens 256 there, 64 here"),
])
def test_teach_from_is_refused_when_the_stage_would_differ(teacher_server: Any, tmp_path: Path, changes: dict,
                                                            needle: str) -> None:
    source = tmp_path / "src" / "out"
    run(_teach_from_config(tmp_path / "src"), {})
    config = _teach_from_config(tmp_path / "copy", source, **changes)
    result = CliRunner().invoke(cli, ["distill", str(config), "--dry-run"])
    _one_line_error(result, needle)
    assert "distill.teach_from: " in result.output and "make this config's" in result.output
    with pytest.raises(MdliteError, match="distill.teach_from: "):
        run(config, {})
    assert not (tmp_path / "copy" / "out" / "teach").exists() and len(teacher_server.requests) == 28


def test_teach_from_is_refused_after_the_prompts_changed(teacher_server: Any, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import mdlite.prompts as prompts

    source = tmp_path / "src" / "out"
    run(_teach_from_config(tmp_path / "src"), {})
    text = prompts.prompt_text
    monkeypatch.setattr(prompts, "prompt_text", lambda name: text(name) + ("\n" if name == "teacher_pot" else ""))
    result = CliRunner().invoke(cli, ["distill", str(_teach_from_config(tmp_path / "copy", source)), "--dry-run"])
    _one_line_error(result, "mdlite's teacher prompts changed since")


def test_teach_from_must_be_another_finished_run(teacher_server: Any, tmp_path: Path) -> None:
    source = tmp_path / "src" / "out"
    runner = CliRunner()
    (tmp_path / "empty").mkdir()
    config = _teach_from_config(tmp_path / "copy", tmp_path / "empty")
    _one_line_error(runner.invoke(cli, ["distill", str(config), "--dry-run"]), "is not a distill run folder")
    run(_teach_from_config(tmp_path / "src"), {})
    state = _state(source)
    del state["eval-teacher"]["stamp"]  # as while that run's eval-teacher is still going
    (source / "pipeline.json").write_text(json.dumps(state))
    config = _teach_from_config(tmp_path / "copy", source)
    _one_line_error(runner.invoke(cli, ["distill", str(config), "--dry-run"]),
                    f"{source / 'eval-teacher'} is not finished")
    assert "or set distill.teacher_eval: false" in runner.invoke(cli, ["distill", str(config), "--dry-run"]).output
    no_teacher_row = _teach_from_config(tmp_path / "copy", source, distill={"teacher_eval": False})
    assert "copy (reused from" in runner.invoke(cli, ["distill", str(no_teacher_row), "--dry-run"]).output
    itself = _teach_from_config(tmp_path / "src", source)
    _one_line_error(runner.invoke(cli, ["distill", str(itself), "--dry-run"]), "is this run's own output_dir")


@pytest.fixture
def fresh_home(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty folder in tmp_path as HOME (and MDLITE_HOME) and working directory: a shipped config's run
    folder (under HOME, or `runs/demo`) names nothing that exists."""
    folder = tmp_path / "fresh-home"
    folder.mkdir()
    monkeypatch.setenv("HOME", str(folder))
    monkeypatch.chdir(folder)
    return folder


def _under(home: Path, path: str) -> Path:
    """A config's path as it reads with HOME = `home` (a leading "~/" is that folder)."""
    return home / path[2:] if path.startswith("~/") else Path(path)


@pytest.mark.parametrize("config", sorted(p.name for p in DEMO.parent.glob("*.yaml")))
def test_every_shipped_configs_dry_run_works_on_a_fresh_machine(fresh_home: Path, shared_data: Path, config: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """No run folder exists (the benchmark data does, as for a user who set MDLITE_DATA): the plan is printed in
    full; a `teach_from` run that is not there yet is the line of the stage that copies it, naming the config
    that makes it, and only then is the exit non-zero; shipped rationales (`rationales:NAME`) pass every check
    (teacher, data hash, teach and eval settings, prompts) and are copied, the teacher row too."""
    monkeypatch.setenv("MDLITE_DATA", str(shared_data))
    path = DEMO.parent / config
    distill = yaml.safe_load(path.read_text())["distill"]
    teach_from = distill.get("teach_from")
    result = CliRunner().invoke(cli, ["distill", str(path), "--dry-run"])
    assert "Traceback" not in result.output and "error" not in result.output, result.output
    assert result.output.startswith(f"distill plan for {path}") and "stages would run" in result.output
    assert "up to date" not in result.output and "resume" not in result.output  # nothing ran here
    if teach_from is None or teach_from.startswith("rationales:"):  # nothing to wait for: they ship with mdlite
        assert result.exit_code == 0, result.output
        assert teach_from is None or "teach             copy (reused from" in result.output
        assert not (teach_from and distill.get("teacher_eval")) or "eval-teacher      copy (reused" in result.output
        return
    source = _under(fresh_home, teach_from)
    makes = [p for p in DEMO.parent.glob("*.yaml")
             if _under(fresh_home, yaml.safe_load(p.read_text())["distill"]["output_dir"]) == source]
    assert result.exit_code == 1 and len(makes) == 1
    teach_line = next(line for line in result.output.splitlines() if line.strip().startswith("1. teach"))
    assert f"copy (waits for {source}: run `mdlite distill {makes[0]}` first)" in teach_line
    assert result.output.splitlines()[-1].startswith("the run would stop before teach: waits for")


def test_the_gemma_config_would_reuse_svamp_smalls_teach_and_teacher_row(fresh_home: Path, tmp_path: Path) -> None:
    """configs/svamp-gemma.yaml's teach and eval-teacher stages have svamp-small's fingerprints (paths aside)."""
    import dataclasses

    from mdlite.distill import _stage_fingerprint

    configs = DEMO.parent
    small = plan(configs / "svamp-small.yaml", {"output_dir": str(tmp_path / "small")}, download=False)
    gemma = plan(configs / "svamp-gemma.yaml", {"output_dir": str(tmp_path / "gemma")}, download=False)
    small_run = yaml.safe_load((configs / "svamp-small.yaml").read_text())["distill"]["output_dir"]
    assert gemma["distill"].teach_from == str(_under(fresh_home, small_run))  # svamp-small's own run folder
    for name in ("teach", "eval-teacher"):
        theirs = small["stages"][name]
        ours = dataclasses.replace(gemma["stages"][name], data=theirs.data, output_dir=theirs.output_dir)
        assert _stage_fingerprint(ours, [], {}, "h") == _stage_fingerprint(theirs, [], {}, "h"), name
    assert [gemma["distill"].train_data, gemma["distill"].test_data] == ["svamp:train", "svamp:test"]
    assert gemma["distill"].student == "gemma-3-270m" and list(gemma["distill"].variants) == [
        "mixed", "cot-only", "pot-only"]


def test_the_shipped_svamp_strong_rationales_are_whole() -> None:
    """rationales:svamp-strong holds every sample of its teach stage (kept or not) once, as its stats count them,
    and its teacher row's every path, as its report counts them."""
    from mdlite.distill import shipped_rationales

    folder = shipped_rationales("svamp-strong")
    records = [json.loads(line) for line in (folder / "teach" / "rationales.jsonl").read_text().splitlines()]
    stats = json.loads((folder / "teach" / "teach_stats.json").read_text())["styles"]
    assert len({r["key"] for r in records}) == len(records) == 1600
    for style in ("cot", "pot"):
        mine = [r for r in records if r["style"] == style]
        assert len(mine) == stats[style]["samples"] and sum(r["kept"] for r in mine) == stats[style]["kept"]
    assert {r["teacher"] for r in records} == {"llamacpp:qwen2.5-coder-1.5b-instruct"}
    assert all(r["answer"] == r["gold"] for r in records if r["kept"])
    teacher_row = folder / "eval-teacher"
    report = json.loads((teacher_row / "report.json").read_text())
    paths = [json.loads(line) for line in (teacher_row / "samples.jsonl").read_text().splitlines()]
    assert len(paths) == report["paths_decoded"] == 200 * (1 + 4) * 2 and report["problems"] == 200
    for style in ("cot", "pot"):
        greedy = [p["correct"] for p in paths if p["style"] == style and p["greedy"]]
        assert sum(greedy) / len(greedy) == report["greedy_accuracy"][style]
