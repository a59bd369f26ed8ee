"""`mdlite teach` (rationales.py): checks, dedupe, records, stats, resume and fault tolerance.

The teacher here is tests/fake_ollama.py, a small server speaking Ollama's HTTP API that stands in for
Ollama because no Ollama server can be installed here; mdlite talks to it through the real `ollama`
client. Its scripted answers are deterministic per seed, so runs can be compared record by record. The
PoT programs run in the real sandbox. Real-model runs are in test_teacher.py.
"""

from __future__ import annotations

import fcntl
import json
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner
from fake_ollama import FakeOllama

from mdlite import MdliteError
from mdlite.answers import answers_match, extract_answer, format_number
from mdlite.cli import cli
from mdlite.config import TeachConfig
from mdlite.data import load_problems, problem_hash, write_problems
from mdlite.prompts import extract_program, prompt_hash
from mdlite.rationales import (
    normalize_rationale,
    read_rationales,
    run,
    sample_options,
    sample_seed,
    with_answer_sentence,
)

FAKE_OLLAMA = Path(__file__).with_name("fake_ollama.py")
FIELDS = {"key": str, "problem_id": str, "problem_hash": str, "style": str, "sample": int, "question": str,
          "gold": float, "text": str, "kept": bool, "teacher": str, "prompt_hash": str, "options": dict, "tokens": int,
          "latency_s": float}
N_PROBLEMS = 10


@pytest.fixture(scope="module")
def dataset(shared_data: Path) -> str:
    return str(shared_data / "svamp" / "train.jsonl")


@pytest.fixture(scope="module")
def script(dataset: str) -> dict[str, dict[str, list[str]]]:
    """Per problem four answers per style: right, wrong, right in other words (a duplicate), unusable (CoT: no
    answer, or every other problem the answer before its reasoning)."""
    script: dict[str, dict[str, list[str]]] = {"cot": {}, "pot": {}}
    for p in load_problems(dataset, limit=N_PROBLEMS):
        right, wrong = format_number(p.answer), format_number(p.answer + 1)
        script["cot"][p.question] = [f" We add it up: {right}. The answer is {right}.",
                                     f" It is {wrong}. The answer is {wrong}.",
                                     f" We  add it up:  {right}. So the answer is ${right}.",
                                     " I am not sure." if len(script["cot"]) % 2 else
                                     f" The answer is {right}. Explanation: we add it up."]
        script["pot"][p.question] = [f"def solution():\n    total = {right}\n    return total\n",
                                     f"def solution():\n    return {wrong}\n",
                                     f"def solution():\n    # the same\n    total = {right}\n    return total\n",
                                     "def solution():\n    return 1 / 0\n", "I cannot write this program."]
    return script


@pytest.fixture()
def server(script: dict) -> FakeOllama:
    with FakeOllama(model="teacher", parallel=4, script=script) as fake:
        yield fake


def _config(dataset: str, url: str, output_dir: Path, **overrides: object) -> TeachConfig:
    values = {"data": dataset, "limit": N_PROBLEMS, "teacher": "ollama:teacher", "endpoints": [url],
              "concurrency": 4, "n_cot": 4, "n_pot": 5, "output_dir": str(output_dir), "max_tokens": 64,
              "backoff_s": 0.05, **overrides}
    return TeachConfig(**values)


def _lines(path: Path) -> list[dict]:
    text = path.read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def _outcome(records: list[dict]) -> dict[str, tuple]:
    """What must not depend on timing or interruptions: per key, the text, answer, kept and reason."""
    keys = [r["key"] for r in records]
    assert len(keys) == len(set(keys)), "duplicate keys"
    return {r["key"]: (r["text"], r["answer"], r["kept"], r["reason"], r["options"]["seed"]) for r in records}


@pytest.fixture(scope="module")
def baseline(dataset: str, script: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    """The records of one uninterrupted run."""
    with FakeOllama(model="teacher", parallel=4, script=script) as fake:
        output_dir = tmp_path_factory.mktemp("baseline")
        run(_config(dataset, fake.url, output_dir))
    return _outcome(_lines(output_dir / "rationales.jsonl"))


# ---- pure helpers -------------------------------------------------------------------------------


def test_sample_seed_is_stable_and_distinct() -> None:
    seeds = {sample_seed(0, f"p{i}", style, k) for i in range(50) for style in ("cot", "pot") for k in range(4)}
    assert len(seeds) == 400 and all(0 <= s < 2**31 for s in seeds)
    assert sample_seed(0, "p1", "cot", 2) == sample_seed(0, "p1", "cot", 2) != sample_seed(1, "p1", "cot", 2)


@pytest.mark.parametrize(("text", "answer", "expected"), [
    ("3 + 4 = 7. The answer is 7.", 7, "3 + 4 = 7. The answer is 7."),
    ("3 + 4 = 7. So the answer is $7.00", 7, "3 + 4 = 7. The answer is 7."),
    ("3 + 4 = 7 apples.", 7, "3 + 4 = 7 apples. The answer is 7."),
    ("3 + 4 = 7\n#### 7", 7, "3 + 4 = 7\n#### 7 The answer is 7."),
    ("3 + 4 = 7. The answer is 7 apples in all.", 7, "3 + 4 = 7. The answer is 7."),
    # what follows the last "the answer is" besides the answer is kept, the sentence appended
    ("3 + 4 = 7. The answer is 7. Check: 7 - 4 = 3.", 7,
     "3 + 4 = 7. The answer is 7. Check: 7 - 4 = 3. The answer is 7."),
    ("Add: 3 + 4. The answer is 7 because 3 + 4 = 7.", 7,
     "Add: 3 + 4. The answer is 7 because 3 + 4 = 7. The answer is 7."),
    ("To find the answer, add 3 + 4 = 7. The answer is 7.", 7, "To find the answer, add 3 + 4 = 7. The answer is 7."),
    # no reasoning before the answer is first stated: dropped (None)
    ("The answer is 7. Explanation: 3 + 4 = 7.", 7, None),
    ("So the answer is 7.", 7, None),
    ("the answer is 7", 7, None),
    ("#### 2.5", 2.5, None),
    ("\\boxed{7} since 3 + 4 = 7.", 7, None),
    ("", 7, None),
])
def test_with_answer_sentence(text: str, answer: float, expected: str | None) -> None:
    assert with_answer_sentence(text, answer) == expected


def test_normalize_rationale() -> None:
    assert normalize_rationale("So  42-29 = 13.", style="cot") == normalize_rationale("so 42 - 29 = 13 .", style="cot")
    assert normalize_rationale("x = 1  # one\nreturn x", style="pot") == normalize_rationale("x=1\nreturn x",
                                                                                          style="pot")
    assert normalize_rationale("42 - 29", style="cot") != normalize_rationale("42 - 28", style="cot")


# ---- a run --------------------------------------------------------------------------------------


def test_teach_checks_dedupes_and_records(dataset: str, server: FakeOllama, tmp_path: Path) -> None:
    outputs = run(_config(dataset, server.url, tmp_path))
    records = _lines(tmp_path / "rationales.jsonl")
    problems = {p.id: p for p in load_problems(dataset, limit=N_PROBLEMS)}
    assert len(records) == N_PROBLEMS * (4 + 5) == server.stats["served"]
    assert {r["key"] for r in records} == {f"{pid}/{s}/{i}" for pid in problems for s, n in (("cot", 4), ("pot", 5))
                                          for i in range(n)}
    for r in records:
        for name, kind in FIELDS.items():
            assert isinstance(r[name], kind), (name, r)
        assert r["key"] == f"{r['problem_id']}/{r['style']}/{r['sample']}"
        assert r["gold"] == problems[r["problem_id"]].answer and r["question"] == problems[r["problem_id"]].question
        assert r["problem_hash"] == problem_hash(problems[r["problem_id"]])
        assert r["teacher"] == "ollama:teacher" and r["model_digest"] == server.digest
        assert r["prompt_hash"] == prompt_hash(r["style"])
        assert r["options"] == sample_options(_config(dataset, server.url, tmp_path), r["problem_id"], r["style"],
                                              r["sample"])
        assert r["kept"] == (r["reason"] is None) and r["tokens"] > 0
        if r["kept"]:
            assert answers_match(r["answer"], r["gold"])
        if r["kept"] and r["style"] == "cot":
            assert r["text"].endswith(f"The answer is {format_number(r['gold'])}.")
            assert extract_answer(r["text"], strict=True) == r["gold"]
        if r["kept"] and r["style"] == "pot":
            assert "```" not in r["text"] and extract_program(r["text"]) == r["text"]
    reasons = {r["reason"] for r in records}
    assert {None, "wrong answer", "no answer", "no reasoning", "no program", "duplicate"} <= reasons
    assert any(str(reason).startswith("program error: ZeroDivisionError") for reason in reasons)
    for pid in problems:  # no two kept rationales of a problem and style normalise alike
        for style in ("cot", "pot"):
            kept = [normalize_rationale(r["text"], style=style) for r in records
                    if r["problem_id"] == pid and r["style"] == style and r["kept"]]
            assert len(kept) == len(set(kept))
    # every duplicate repeats an earlier kept sample of its problem and style
    for d in (r for r in records if r["reason"] == "duplicate"):
        assert any(r["kept"] and r["sample"] < d["sample"] and r["problem_id"] == d["problem_id"]
                   and r["style"] == d["style"] for r in records)

    stats = json.loads((tmp_path / "teach_stats.json").read_text())
    assert outputs["stats"] == stats
    for style in ("cot", "pot"):
        group = [r for r in records if r["style"] == style]
        numbers = stats["styles"][style]
        assert numbers["samples"] == len(group) and numbers["kept"] == sum(r["kept"] for r in group)
        assert numbers["teacher_accuracy"] == pytest.approx(
            sum(r["kept"] or r["reason"] == "duplicate" for r in group) / len(group))
        assert sum(numbers["reasons"].values()) == len(group) and numbers["tokens_per_s"] > 0
    assert stats["session"]["requests"] == len(records) and stats["failures"] == []
    run_json = json.loads((tmp_path / "run.json").read_text())
    assert run_json["stage"] == "teach" and run_json["config"]["teacher"] == "ollama:teacher"
    assert run_json["teacher"]["model_digest"] == server.digest and run_json["inputs"]["problems"] == N_PROBLEMS
    assert run_json["inputs"]["prompt_hash"] == {s: prompt_hash(s) for s in ("cot", "pot")}
    assert {"mdlite", "ollama", "httpx"} <= run_json["versions"].keys()


def test_same_records_as_baseline_at_any_concurrency(dataset: str, server: FakeOllama, tmp_path: Path,
                                                     baseline: dict) -> None:
    run(_config(dataset, server.url, tmp_path, concurrency=1))
    assert _outcome(_lines(tmp_path / "rationales.jsonl")) == baseline


# ---- resume -------------------------------------------------------------------------------------


def test_rerun_skips_finished_and_draws_only_new_samples(dataset: str, server: FakeOllama, tmp_path: Path,
                                                         baseline: dict) -> None:
    run(_config(dataset, server.url, tmp_path, n_cot=2))
    first = server.stats["served"]
    assert first == N_PROBLEMS * (2 + 5)
    run(_config(dataset, server.url, tmp_path, n_cot=2))
    assert server.stats["served"] == first
    run(_config(dataset, server.url, tmp_path))  # n_cot 2 -> 4: only samples 2 and 3 of CoT
    assert server.stats["served"] == first + N_PROBLEMS * 2
    assert _outcome(_lines(tmp_path / "rationales.jsonl")) == baseline


def test_changed_prompt_redoes_only_that_style(dataset: str, server: FakeOllama, tmp_path: Path,
                                               baseline: dict) -> None:
    path = tmp_path / "rationales.jsonl"
    run(_config(dataset, server.url, tmp_path))
    records = _lines(path)
    for r in records:
        if r["style"] == "pot":
            r["prompt_hash"] = "older-prompt"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    served = server.stats["served"]
    run(_config(dataset, server.url, tmp_path))
    assert server.stats["served"] - served == N_PROBLEMS * 5
    replaced = _lines(tmp_path / "rationales.replaced.jsonl")
    assert len(replaced) == N_PROBLEMS * 5 and {r["style"] for r in replaced} == {"pot"}
    after = _lines(path)
    assert [r for r in after if r["style"] == "cot"] == [r for r in records if r["style"] == "cot"]
    assert _outcome(after) == baseline


def test_changed_teacher_or_options_redoes_everything(dataset: str, script: dict, server: FakeOllama,
                                                      tmp_path: Path) -> None:
    run(_config(dataset, server.url, tmp_path))
    with FakeOllama(model="other-teacher", parallel=4, script=script) as other:
        run(_config(dataset, other.url, tmp_path, teacher="ollama:other-teacher"))
        assert other.stats["served"] == N_PROBLEMS * 9
    served = server.stats["served"]
    run(_config(dataset, server.url, tmp_path, teacher="ollama:teacher", temperature=0.9))
    assert server.stats["served"] - served == N_PROBLEMS * 9
    records = _lines(tmp_path / "rationales.jsonl")
    assert len(records) == N_PROBLEMS * 9 and {r["options"]["temperature"] for r in records} == {0.9}
    assert len(_lines(tmp_path / "rationales.replaced.jsonl")) == 2 * N_PROBLEMS * 9


def test_changed_question_or_gold_redoes_that_problem(dataset: str, server: FakeOllama, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run(_config(dataset, server.url, out))
    path = out / "rationales.jsonl"
    before = _lines(path)
    problems = load_problems(dataset, limit=N_PROBLEMS)
    gold, question, old = problems[0].id, problems[1].id, problems[2].id
    problems[0] = replace(problems[0], answer=problems[0].answer + 1)
    problems[1] = replace(problems[1], question=problems[1].question + " Answer in whole numbers.")
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if r["problem_id"] != old or k != "problem_hash"})
                            + "\n" for r in before))  # records written before problem_hash existed
    write_problems(problems, tmp_path / "changed.jsonl")
    served = server.stats["served"]
    run(_config(str(tmp_path / "changed.jsonl"), server.url, out))
    assert server.stats["served"] - served == 3 * 9
    replaced = _lines(out / "rationales.replaced.jsonl")
    assert len(replaced) == 3 * 9 and {r["problem_id"] for r in replaced} == {gold, question, old}
    after = _lines(path)
    by_id = {p.id: p for p in problems}
    assert all(r["problem_hash"] == problem_hash(by_id[r["problem_id"]]) for r in after)
    assert {r["gold"] for r in after if r["problem_id"] == gold} == {problems[0].answer}
    assert {r["question"] for r in after if r["problem_id"] == question} == {problems[1].question}
    assert [r for r in after if r["problem_id"] not in (gold, question, old)] == [
        r for r in before if r["problem_id"] not in (gold, question, old)]


def test_torn_last_line_is_dropped_and_redone(dataset: str, server: FakeOllama, tmp_path: Path,
                                              baseline: dict) -> None:
    path = tmp_path / "rationales.jsonl"
    run(_config(dataset, server.url, tmp_path))
    data = path.read_bytes()
    path.write_bytes(data[: data.rindex(b"\n", 0, len(data) - 1) + 40])  # cut inside the last record
    assert len(read_rationales(path)) == N_PROBLEMS * 9 - 1
    served = server.stats["served"]
    run(_config(dataset, server.url, tmp_path))
    assert server.stats["served"] - served == 1
    assert _outcome(_lines(path)) == baseline


def test_a_second_run_on_the_same_folder_is_refused(dataset: str, server: FakeOllama, tmp_path: Path) -> None:
    with (tmp_path / ".teach.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(MdliteError, match="another `mdlite teach`"):
            run(_config(dataset, server.url, tmp_path))


def test_corrupt_middle_line_names_file_and_line(dataset: str, server: FakeOllama, tmp_path: Path) -> None:
    path = tmp_path / "rationales.jsonl"
    run(_config(dataset, server.url, tmp_path, limit=2))
    lines = path.read_text().splitlines(keepends=True)
    lines[3] = "{not json\n"
    path.write_text("".join(lines))
    with pytest.raises(MdliteError, match=r"rationales.jsonl:4: .*delete that line"):
        run(_config(dataset, server.url, tmp_path, limit=2))


# ---- faults -------------------------------------------------------------------------------------


def test_failed_problem_is_recorded_skipped_and_retried_next_run(dataset: str, script: dict, tmp_path: Path,
                                                                 baseline: dict) -> None:
    problem = load_problems(dataset, limit=N_PROBLEMS)[3]
    broken = {"cot": {**script["cot"], problem.question: ["!error 500"]}, "pot": script["pot"]}
    with FakeOllama(model="teacher", parallel=4, script=broken) as fake:
        stats = run(_config(dataset, fake.url, tmp_path, retries=2))["stats"]
        assert stats["failures"] == [{"key": f"{problem.id}/cot/0", "error": stats["failures"][0]["error"]}]
        assert "HTTP 500" in stats["failures"][0]["error"] and stats["session"]["failed"] == 1
        records = _lines(tmp_path / "rationales.jsonl")
        assert len(records) == N_PROBLEMS * 9 - 4  # the problem's 4 CoT samples are skipped
        assert fake.stats["requests"] - fake.stats["served"] == 3  # one request and 2 retries
        fake.script = script  # the server is fixed: the next run fills the gap
        assert run(_config(dataset, fake.url, tmp_path))["stats"]["failures"] == []
    assert _outcome(_lines(tmp_path / "rationales.jsonl")) == baseline


def test_client_errors_are_not_retried(dataset: str, script: dict, tmp_path: Path) -> None:
    problem = load_problems(dataset, limit=1)[0]
    with FakeOllama(model="teacher", script={"cot": {problem.question: ["!error 400"]}, "pot": {}}) as fake:
        with pytest.raises(MdliteError, match="answered none of 1 requests.*HTTP 400"):  # the only request failed
            run(_config(dataset, fake.url, tmp_path, limit=1, n_pot=0, retries=3))
    stats = json.loads((tmp_path / "teach_stats.json").read_text())
    assert fake.stats["requests"] == 1 and "HTTP 400" in stats["failures"][0]["error"]


def test_busy_server_503_is_retried(dataset: str, script: dict, tmp_path: Path, baseline: dict) -> None:
    with FakeOllama(model="teacher", parallel=1, latency_s=0.01, script=script) as fake:
        stats = run(_config(dataset, fake.url, tmp_path, concurrency=4, retries=20, backoff_s=0.01))["stats"]
    assert fake.stats["busy_503"] > 0 and fake.stats["max_in_flight"] == 1 and stats["failures"] == []
    assert _outcome(_lines(tmp_path / "rationales.jsonl")) == baseline


def test_work_is_spread_over_endpoints(dataset: str, script: dict, tmp_path: Path, baseline: dict) -> None:
    with FakeOllama(model="teacher", parallel=1, latency_s=0.01, script=script) as one, \
            FakeOllama(model="teacher", parallel=1, latency_s=0.01, script=script) as two:
        run(_config(dataset, one.url, tmp_path, endpoints=[one.url, two.url], concurrency=1))
    assert one.stats["served"] > 10 and two.stats["served"] > 10
    assert one.stats["busy_503"] == two.stats["busy_503"] == 0  # never more in flight than an endpoint's slots
    assert _outcome(_lines(tmp_path / "rationales.jsonl")) == baseline


def _teach_process(dataset: str, url: str, output_dir: Path, *extra: str) -> subprocess.Popen:
    args = ["-v", "teach", "--data", dataset, "--limit", str(N_PROBLEMS), "--teacher", "ollama:teacher",
            "--endpoints", url, "--concurrency", "2", "--n-cot", "4", "--n-pot", "5", "--max-tokens", "64",
            "--output-dir", str(output_dir), *extra]
    # Ctrl-C as a shell delivers it, whatever this test process inherited (a SIGINT ignored or blocked here
    # is ignored or blocked in the child too)
    start = ("import signal; signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT}); "
             "signal.signal(signal.SIGINT, signal.default_int_handler); from mdlite.cli import cli; cli()")
    return subprocess.Popen([sys.executable, "-c", start, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_lines(path: Path, count: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= count:
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.02)
    raise AssertionError(f"{path} did not reach {count} lines")


def test_kill_9_then_resume_gives_the_uninterrupted_records(dataset: str, script: dict, tmp_path: Path,
                                                            baseline: dict) -> None:
    path = tmp_path / "rationales.jsonl"
    with FakeOllama(model="teacher", parallel=2, latency_s=0.03, script=script) as fake:
        process = _teach_process(dataset, fake.url, tmp_path)
        _wait_for_lines(path, 30, process)
        process.send_signal(signal.SIGKILL)
        process.communicate()
        assert 30 <= len(read_rationales(path)) < N_PROBLEMS * 9
        assert run(_config(dataset, fake.url, tmp_path, concurrency=2))["stats"]["failures"] == []
    assert _outcome(_lines(path)) == baseline


def test_server_killed_and_restarted_mid_run(dataset: str, script: dict, tmp_path: Path, baseline: dict) -> None:
    (tmp_path / "script.json").write_text(json.dumps(script))
    port = _free_port()
    command = [sys.executable, str(FAKE_OLLAMA), "--port", str(port), "--model", "teacher", "--parallel", "2",
               "--latency", "0.03", "--script", str(tmp_path / "script.json")]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    out = tmp_path / "out"
    try:
        assert server.stdout.readline().startswith("listening")
        process = _teach_process(dataset, f"http://127.0.0.1:{port}", out, "--retries", "10", "--backoff-s", "0.2")
        _wait_for_lines(out / "rationales.jsonl", 30, process)
        server.send_signal(signal.SIGKILL)
        server.wait()
        time.sleep(1.0)
        server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        assert server.stdout.readline().startswith("listening")
        stdout, stderr = process.communicate(timeout=120)
    finally:
        server.kill()
        server.wait()
    assert process.returncode == 0, stderr
    assert "0 failed" in stdout and "retry 1/10" in stderr  # the restart was bridged by retries
    assert json.loads((out / "teach_stats.json").read_text())["failures"] == []
    assert _outcome(_lines(out / "rationales.jsonl")) == baseline


def test_ctrl_c_stops_cleanly_and_saves(dataset: str, script: dict, tmp_path: Path) -> None:
    path = tmp_path / "rationales.jsonl"
    with FakeOllama(model="teacher", parallel=2, latency_s=0.05, script=script) as fake:
        process = _teach_process(dataset, fake.url, tmp_path)
        _wait_for_lines(path, 10, process)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "run the same command again to resume" in stderr, (
        process.returncode, signal.getsignal(signal.SIGINT), signal.pthread_sigmask(signal.SIG_BLOCK, []),
        stderr[-500:])
    assert "Traceback" not in stderr
    records = _lines(path)  # complete lines only
    stats = json.loads((tmp_path / "teach_stats.json").read_text())
    assert stats["session"]["interrupted"] is True and stats["session"]["requests"] == len(records)
    assert len(records) < N_PROBLEMS * 9


# ---- command line -------------------------------------------------------------------------------


def test_teach_help_lists_the_knobs() -> None:
    result = CliRunner().invoke(cli, ["teach", "--help"])
    assert result.exit_code == 0
    for flag in ("--teacher", "--endpoints", "--concurrency", "--n-cot", "--n-pot", "--temperature", "--seed"):
        assert flag in result.output


def test_teach_command_runs_and_reports(dataset: str, server: FakeOllama, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["teach", "--data", dataset, "--limit", "2", "--teacher", "ollama:teacher",
                                      "--endpoints", server.url, "--n-cot", "2", "--n-pot", "2",
                                      "--output-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "cot: kept" in result.output and "pot: kept" in result.output and "0 failed" in result.output
    assert len(_lines(tmp_path / "rationales.jsonl")) == 8


@pytest.mark.parametrize(("flags", "message"), [
    (["--teacher", "gpt:4"], "unknown backend 'gpt'"),
    (["--teacher", "llamacpp:x.gguf", "--endpoints", "http://h:1"], "takes no --endpoints"),
    (["--n-cot", "0", "--n-pot", "0"], "nothing to do"),
    (["--temperature", "0"], "temperature 0"),
])
def test_teach_config_mistakes_are_one_line_errors(flags: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, ["teach", *flags])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_unreachable_teacher_is_a_one_line_error(dataset: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["teach", "--data", dataset, "--limit", "1", "--teacher", "ollama:teacher",
                                      "--endpoints", f"http://127.0.0.1:{_free_port()}", "--output-dir", str(tmp_path)])
    assert result.exit_code == 2 and "cannot reach Ollama" in result.output


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]

