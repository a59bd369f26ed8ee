"""Bad input through the real CLI: exit code 2, one line `mdlite: error: ...` on stderr, no traceback, and
nothing written (no output folder, no .partial file). Add every newly found case to CASES."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from fake_ollama import FakeOllama

from mdlite.cli import cli
from mdlite.data import synth_problems, write_problems

UNWRITABLE = "/proc/mdlite-test"  # mkdir fails there, even for root

# (id, argv, a phrase the error must contain); run in a folder holding the files of `workdir`.
CASES = [
    # 8. a folder where a file is expected, a section that is not a mapping, a bad output folder
    ("config-is-a-folder", ["teach", "-c", "folder"], "folder: is a folder, not a config file"),
    ("eval-config-is-a-folder", ["eval", "-c", "folder"], "folder: is a folder, not a config file"),
    ("teach-data-is-a-folder", ["teach", "--data", "folder", "--output-dir", "out"], "folder: is a folder"),
    ("eval-data-is-a-folder", ["eval", "--model", "m.gguf", "--data", "folder", "--output-dir", "out"],
     "folder: is a folder"),
    ("data-check-a-folder", ["data", "check", "folder"], "folder: is a folder"),
    ("data-stats-a-folder", ["data", "stats", "folder"], "folder: is a folder"),
    ("rationales-is-a-folder", ["train", "--rationales", "folder", "--output-dir", "out"],
     "folder: is a folder, not a rationales file"),
    ("section-not-a-mapping", ["teach", "-c", "teach5.yaml"], "teach5.yaml [teach]: expected a mapping"),
    ("teach-output-unwritable", ["teach", "--data", "p.jsonl", "--output-dir", UNWRITABLE],
     "cannot create this folder"),
    ("teach-output-is-a-file", ["teach", "--data", "p.jsonl", "--output-dir", "file.txt"],
     "file.txt: is a file, not a folder; give another --output-dir"),
    ("eval-output-unwritable", ["eval", "--model", "m.gguf", "--data", "p.jsonl", "--output-dir", UNWRITABLE],
     "cannot create this folder"),
    ("eval-output-is-a-file", ["eval", "--model", "m.gguf", "--data", "p.jsonl", "--output-dir", "file.txt"],
     "is a file, not a folder"),
    ("export-output-unwritable", ["export-gguf", "model", "--output-dir", UNWRITABLE], "cannot create this folder"),
    ("export-output-is-a-file", ["export-gguf", "model", "--output-dir", "file.txt"], "is a file, not a folder"),
    ("train-output-is-a-file", ["train", "--rationales", "r.jsonl", "--output-dir", "file.txt"],
     "is a file, not a folder"),
    ("solve-output-is-a-file", ["solve", "2 + 2?", "--model", "m.gguf", "--output-dir", "file.txt"],
     "is a file, not a folder"),
    ("synth-output-unwritable", ["data", "synth", "-n", "3", "-o", f"{UNWRITABLE}/p.jsonl"],
     "cannot create this folder"),
    ("synth-output-under-a-file", ["data", "synth", "-n", "3", "-o", "file.txt/p.jsonl"], "give another -o"),
    ("synth-output-is-a-folder", ["data", "synth", "-n", "3", "-o", "folder"], "folder: is a folder"),
    ("train-model-not-gguf", ["train", "--rationales", "r.jsonl", "--model", "fake.gguf", "--output-dir", "out"],
     "fake.gguf: not a GGUF file"),
    ("train-model-text-file", ["train", "--rationales", "r.jsonl", "--model", "file.txt", "--output-dir", "out"],
     "file.txt: not a GGUF file"),
    ("eval-compare-a-file", ["eval", "compare", "file.txt"], "file.txt/report.json: no report"),
    ("solve-file-is-a-folder", ["solve", "--file", "folder", "--model", "m.gguf"], "folder: is a folder, not a file"),
    ("make-tiny-into-a-file", ["models", "make-tiny", "file.txt"], "file.txt: is a file, not a folder"),
    # 9. nonsense that used to be accepted
    ("unknown-section", ["teach", "-c", "teech.yaml"], "unknown section 'teech' (did you mean 'teach'?)"),
    ("unknown-section-eval", ["eval", "-c", "evaluation.yaml"], "unknown section 'evaluation'; sections: distill"),
    ("learning-rate-nan", ["train", "--learning-rate", "nan"], "learning_rate: expected a finite number"),
    ("temperature-nan", ["teach", "--temperature", "nan"], "temperature: expected a finite number"),
    ("top-p-inf", ["solve", "2 + 2?", "--model", "m.gguf", "--top-p", "inf"], "top_p: expected a finite number"),
    ("int-from-yaml-inf", ["train", "-c", "inf.yaml"], "lora_r: expected int"),
    ("lr-scheduler-bogus", ["train", "--lr-scheduler-type", "cosin"], "(did you mean 'cosine'?)"),
    ("optim-bogus", ["train", "--optim", "bogus"], "unknown optim 'bogus'"),
    ("keep-alive-banana", ["teach", "--keep-alive", "banana"], "keep_alive must be a duration"),
    ("export-dir-twice", ["export-gguf", "model", "--input-dir", "model"], "not both"),
    # 11. data folders
    ("data-dir-missing", ["data", "check", "svamp:test", "--data-dir", "no-such-folder"],
     "no-such-folder: no such folder (flag --data-dir)"),
    ("teach-data-dir-missing", ["teach", "--data", "svamp:train", "--data-dir", "no-such-folder"],
     "no such folder (flag --data-dir)"),
]


@pytest.fixture()
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A current folder with a problem file, rationales, a plain file, a folder, a fake GGUF, a model folder
    and broken configs."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MDLITE_HOME", str(tmp_path / "home"))
    write_problems(synth_problems(3), tmp_path / "p.jsonl")
    record = {"problem_id": "p1", "style": "cot", "question": "1 + 1?", "text": "The answer is 2.", "kept": True}
    (tmp_path / "r.jsonl").write_text(json.dumps(record) + "\n")
    (tmp_path / "file.txt").write_text("not a folder\n")
    (tmp_path / "fake.gguf").write_text("not a GGUF either\n")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "folder").mkdir()
    (tmp_path / "model").mkdir()
    for name in ("config.json", "tokenizer_config.json", "tokenizer.json"):
        (tmp_path / "model" / name).write_text("{}")
    (tmp_path / "teach5.yaml").write_text("teach: 5\n")
    (tmp_path / "teech.yaml").write_text("teech:\n  n_cot: 2\n")
    (tmp_path / "evaluation.yaml").write_text("evaluation:\n  paths: 2\n")
    (tmp_path / "inf.yaml").write_text("train:\n  lora_r: .inf\n")
    return tmp_path


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _assert_one_error_line(exit_code: int, stdout: str, stderr: str, needle: str) -> None:
    assert exit_code == 2, stdout + stderr
    assert "Traceback" not in stdout + stderr
    assert stderr.startswith("mdlite: error: ") and stderr.count("\n") == 1, stderr
    assert needle in stderr
    assert stdout == ""


@pytest.mark.parametrize(("argv", "needle"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(workdir: Path, argv: list[str], needle: str) -> None:
    before = _files(workdir)
    result = CliRunner().invoke(cli, argv)
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    _assert_one_error_line(result.exit_code, result.stdout, result.stderr, needle)
    assert _files(workdir) == before
    assert not Path(UNWRITABLE).exists()


def test_unreachable_hub_fails_in_one_line_within_seconds(tmp_path: Path) -> None:
    """Without a local copy, an unreachable hub is one line at once, not ~25 s of retry warnings."""
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "MDLITE_HOME": str(tmp_path / "home")}
    env.pop("HF_HUB_OFFLINE", None)
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "mdlite", "data", "check", "svamp:test", "--data-dir",
                             str(tmp_path)], capture_output=True, text=True, env=env, timeout=60)
    assert time.monotonic() - started < 15
    _assert_one_error_line(result.returncode, result.stdout, result.stderr, "svamp:test: no local copy and ")
    assert f"looked in {tmp_path}" in result.stderr


def test_a_teacher_that_answers_nothing_fails_teach_in_one_line(workdir: Path) -> None:
    questions = [p.question for p in synth_problems(3)]
    script = {style: {q: ["!error 400"] for q in questions} for style in ("cot", "pot")}
    with FakeOllama(model="teacher", script=script) as fake:
        result = CliRunner().invoke(cli, ["teach", "--data", "p.jsonl", "--teacher", "ollama:teacher",
                                          "--endpoints", fake.url, "--output-dir", "out"])
    _assert_one_error_line(result.exit_code, result.stdout, result.stderr, "answered none of 6 requests")
