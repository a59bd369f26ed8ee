"""mdlite eval: the maj@k estimator against brute force, the report files, resume, compare, errors; evals
through the real Ollama client (fake server: a teacher, and a served student across two endpoints) and,
marked slow, evals of the real Qwen2.5-Coder 0.5B GGUF (files and numbers, kill -9 and resume) and of a tiny
trained student served by two real `llama_cpp.server`s and by `mdlite serve`."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner
from fake_ollama import FakeOllama

from mdlite import MdliteError
from mdlite.answers import answers_match, format_number
from mdlite.cli import cli
from mdlite.config import EvalConfig, load_config
from mdlite.data import load_problems, write_problems
from mdlite.evaluate import (
    compare_reports,
    hybrid_at_k,
    k_values,
    load_samples,
    majority_at_k,
    mode_at_k,
    paired_p,
    sign_test_p,
    vote_at_k,
)
from mdlite.llamacpp import server_command
from mdlite.prompts import STUDENT_STOP, student_prompt
from mdlite.vote import vote

REPORT_FILES = ("samples.jsonl", "report.json", "report.md", "accuracy.png", "run.json")


# ---- brute force: vote over every k-subset -----------------------------------------------------


def _brute(mode: str, pot: list, cot: list, gold: float, k_pot: int, k_cot: int) -> float:
    """How often mdlite.vote's `mode` vote is right over every ordered k_pot-subset of `pot` x every ordered
    k_cot-subset of `cot` (every subset, in every path order: what `mdlite solve` meets)."""
    right = [answers_match(vote(mode, pot=p, cot=c).answer, gold) for p in itertools.permutations(pot, k_pot)
             for c in itertools.permutations(cot, k_cot)]
    return sum(right) / len(right)


def _brute_majority(answers: list[float | None], gold: float, k: int) -> float:
    return _brute("cot", [], answers, gold, 0, k)


GOLD = 2.5


def _random_answers(rng: random.Random, n: int) -> list[float | None]:
    # Few distinct values so that ties and repeats are common; 2.5000015 and 2.4999985 both match the gold
    # answer but not each other, so they vote apart (two correct groups). No value matches two others that
    # do not match each other: then the groups would depend on the path order.
    return [rng.choice([2.5000015, 2.5000015, 3.0, 5.5, 2.4999985, None, -2.0]) for _ in range(n)]


def test_majority_at_k_equals_brute_force_on_small_cases() -> None:
    rng = random.Random(1)
    for _ in range(100):
        answers = _random_answers(rng, rng.randint(1, 6))
        for k in range(1, len(answers) + 1):
            assert majority_at_k(answers, GOLD, k) == pytest.approx(_brute_majority(answers, GOLD, k), abs=1e-12), (
                answers, k)


def test_majority_at_k_known_values() -> None:
    assert majority_at_k([1.0, 1.0, 2.0], 1.0, 1) == pytest.approx(2 / 3)
    assert majority_at_k([1.0, 1.0, 2.0], 1.0, 3) == 1.0
    assert majority_at_k([1.0, 2.0], 1.0, 2) == 0.5  # a two-way tie: the first path's answer, either one
    assert majority_at_k([None, None, 4.0], 4.0, 2) == pytest.approx(2 / 3)  # unanswered paths take no vote
    assert majority_at_k([None, None], 4.0, 1) == 0.0
    # Not "the first k": the first path is wrong, but 3 of the 4 paths are right.
    assert majority_at_k([9.0, 4.0, 4.0, 4.0], 4.0, 1) == 0.75
    with pytest.raises(ValueError):
        majority_at_k([1.0], 1.0, 2)


def test_mixed_ties_go_to_pot_as_solve_breaks_them() -> None:
    # The example: at k=2 (one PoT, one CoT path) a PoT 5 beats a CoT 4; a PoT 3 beats a CoT 5.
    pools = {"pot": [5.0, 5.0, 5.0, 3.0], "cot": [4.0, 4.0, 5.0, 2.0]}
    assert mode_at_k("mixed", pools, 5.0, 2) == 0.75 == _brute("mixed", pools["pot"], pools["cot"], 5.0, 1, 1)
    # Tied groups that both have PoT paths: each wins with its share of them (the first PoT path decides).
    # 1 (one PoT, one CoT path) ties with 2 (two PoT paths): 1 wins when its PoT path comes first.
    assert vote_at_k([([1.0, 2.0, 2.0], 3), ([1.0], 1)], 1.0) == pytest.approx(1 / 3)


def test_two_pool_votes_equal_brute_force() -> None:
    rng = random.Random(2)
    for _ in range(40):
        pot, cot = _random_answers(rng, rng.randint(1, 4)), _random_answers(rng, rng.randint(1, 4))
        for k_pot, k_cot in itertools.product(range(len(pot) + 1), range(len(cot) + 1)):
            if k_pot + k_cot:
                assert vote_at_k([(pot, k_pot), (cot, k_cot)], GOLD) == pytest.approx(
                    _brute("mixed", pot, cot, GOLD, k_pot, k_cot), abs=1e-12), (pot, cot, k_pot, k_cot)


def test_modes_equal_brute_force() -> None:
    rng = random.Random(3)
    for _ in range(40):
        n = rng.randint(1, 4)
        pools = {"pot": _random_answers(rng, n), "cot": _random_answers(rng, n)}
        for k in range(1, n + 1):
            expected = {"cot": _brute("cot", [], pools["cot"], GOLD, 0, k),
                        "pot": _brute("pot", pools["pot"], [], GOLD, k, 0),
                        "mixed": _brute("mixed", pools["pot"], pools["cot"], GOLD, k - k // 2, k // 2),
                        "hybrid": _brute("hybrid", pools["pot"], pools["cot"], GOLD, k, k)}
            for mode, value in expected.items():
                assert mode_at_k(mode, pools, GOLD, k) == pytest.approx(value, abs=1e-12), (mode, pools, k)
            assert hybrid_at_k(pools["pot"], pools["cot"], GOLD, k) == pytest.approx(expected["hybrid"], abs=1e-12)


def test_k_values() -> None:
    assert k_values(16) == [1, 2, 4, 8, 16]
    assert k_values(6) == [1, 2, 4, 6]
    assert k_values(1) == [1] and k_values(0) == []


# ---- config ---------------------------------------------------------------------------------------


def test_config_splits_modes_and_reports_every_problem() -> None:
    assert load_config(EvalConfig, None, {"model": "m", "mode": ["cot,pot", "hybrid"]}).mode == ["cot", "pot", "hybrid"]
    with pytest.raises(MdliteError) as error:
        load_config(EvalConfig, None, {"mode": ["cot,vote"], "paths": 4, "temperature": 0.0, "prompt_style": "chat"})
    message = str(error.value)
    for part in ("no model given", "--mode", "--temperature", "--prompt-style"):
        assert part in message


# ---- samples.jsonl ------------------------------------------------------------------------------


def _record(pid: str, path: int) -> str:
    return json.dumps({"id": pid, "style": "cot", "greedy": False, "path": path, "answer": 1.0}) + "\n"


def test_load_samples_drops_torn_line_and_unfinished_problem(tmp_path: Path) -> None:
    path = tmp_path / "samples.jsonl"
    path.write_text(_record("a", 0) + _record("a", 1) + _record("b", 0) + '{"id": "b", "sty')
    done = load_samples(path, per_problem=2, hashes={})
    assert list(done) == ["a"] and len(done["a"]) == 2
    assert path.read_text() == _record("a", 0) + _record("a", 1)  # the file keeps only finished problems
    path.write_text(_record("a", 0) + "not json\n" + _record("a", 1))
    with pytest.raises(MdliteError, match=r"samples.jsonl:2: not a sample record"):
        load_samples(path, per_problem=2, hashes={})


# ---- a whole eval through the real Ollama client ------------------------------------------------


@pytest.fixture
def problems_file(tmp_path: Path, shared_data: Path) -> Path:
    path = tmp_path / "problems.jsonl"
    lines = (shared_data / "svamp" / "tiny.jsonl").read_text().splitlines()[:3]
    path.write_text("\n".join(lines) + "\n")
    return path


def _teacher_script(problems_file: Path) -> dict:
    """CoT: right on the first two problems, wrong on the third; PoT: every program fails."""
    problems = load_problems(problems_file)
    cot = {p.question: [f" Some steps. The answer is {format_number(p.answer + (i == 2))}."]
           for i, p in enumerate(problems)}
    pot = {p.question: ["def solution():\n    return 1 / 0\n```"] for p in problems}
    return {"cot": cot, "pot": pot}


def _eval(args: list[str]) -> None:
    result = CliRunner().invoke(cli, ["eval", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output


def test_eval_of_a_teacher_writes_reports_with_exact_numbers(tmp_path: Path, problems_file: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "teacher"
    with FakeOllama(model="teacher", parallel=4, script=_teacher_script(problems_file)) as server:
        monkeypatch.setenv("OLLAMA_HOST", server.url)
        _eval(["--model", "ollama:teacher", "--data", str(problems_file), "--paths", "4", "--concurrency", "4",
               "--output-dir", str(out)])
    assert all((out / name).stat().st_size > 0 for name in REPORT_FILES)
    report = json.loads((out / "report.json").read_text())
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 * (2 + 4 + 4) and report["paths_decoded"] == len(samples)
    assert report["greedy_accuracy"] == {"cot": pytest.approx(2 / 3), "pot": 0.0}
    assert report["pot_exec_failure_rate"] == 1.0 and report["parse_failure_rate"] == 0.0
    # CoT: 2 of 3 problems right at every k; PoT never answers, so hybrid falls back to CoT.
    assert report["maj_at_k"]["cot"] == report["maj_at_k"]["hybrid"] == {k: pytest.approx(2 / 3) for k in "124"}
    assert report["maj_at_k"]["pot"] == {"1": 0.0, "2": 0.0, "4": 0.0}
    # Mixed with k paths votes ceil(k/2) PoT + floor(k/2) CoT paths: one failed program alone answers nothing.
    assert report["maj_at_k"]["mixed"] == pytest.approx({"1": 0.0, "2": 2 / 3, "4": 2 / 3})
    assert report["accuracy"] == pytest.approx({"cot": 2 / 3, "pot": 0.0, "mixed": 2 / 3, "hybrid": 2 / 3})
    run = json.loads((out / "run.json").read_text())
    assert run["model"]["kind"] == "served" and run["model"]["digest"] == server.digest
    assert run["model"]["prompts"] == report["prompt_style"] == "few-shot"  # auto: few-shot for a served model
    assert run["inputs"]["problems"] == 3 and len(run["inputs"]["problems_sha256"]) == 64
    table = (out / "report.md").read_text()
    assert "| cot | 66.7% | 66.7% | 66.7% | 66.7% |" in table and "| pot | 0.0% |" in table
    assert "| PoT programs that failed to run | 100.0% |" in table

    # A rerun finds every problem done and decodes nothing (no server is running now).
    _eval(["--model", "ollama:teacher", "--data", str(problems_file), "--paths", "4", "--output-dir", str(out)])
    assert json.loads((out / "report.json").read_text())["maj_at_k"] == report["maj_at_k"]
    # Other sampling settings in the same folder are refused.
    result = CliRunner().invoke(cli, ["eval", "--model", "ollama:teacher", "--data", str(problems_file), "--paths", "2",
                                      "--output-dir", str(out)])
    assert result.exit_code == 2 and "holds samples made with other settings" in result.output

    # compare: two folders side by side.
    other = tmp_path / "other"
    other.mkdir()
    (other / "report.json").write_text(json.dumps(report | {"greedy_accuracy": {"cot": 0.25, "pot": 0.5}}))
    text = compare_reports([out, other])
    assert "| teacher" in text.splitlines()[0] and "other" in text.splitlines()[0]
    assert "| greedy cot" in text and "66.7%" in text and "25.0%" in text
    result = CliRunner().invoke(cli, ["eval", "compare", str(out), str(other)])
    assert result.exit_code == 0 and result.output.strip() == text


def test_sign_test_p_is_mcnemars_exact_test() -> None:
    assert sign_test_p(0, 0) == sign_test_p(3, 3) == 1.0
    assert sign_test_p(0, 5) == sign_test_p(5, 0) == pytest.approx(2 / 32)
    assert sign_test_p(20, 6) == pytest.approx(0.00936, abs=1e-5)  # Gemma's mixed vs cot-only in README
    assert sign_test_p(11, 15) == pytest.approx(0.557, abs=1e-3)


def test_paired_p_is_mcnemar_for_right_or_wrong_scores_and_a_sign_flip_test_for_fractions() -> None:
    right_wrong = ([1.0] * 20 + [0.0] * 6 + [1.0] * 50, [0.0] * 20 + [1.0] * 6 + [1.0] * 50)
    assert paired_p(*right_wrong) == sign_test_p(20, 6)
    # Ten problems each 0.5 higher in the first: only the two sign patterns with every flip alike are as extreme.
    assert paired_p([0.5] * 10 + [1.0] * 5, [0.0] * 10 + [1.0] * 5) == pytest.approx(2 / 2**10, abs=0.001)
    # The same total difference spread over a few large and many small ones is weaker evidence.
    spread = paired_p([1.0, 1.0, 1.0, 0.25, 0.25], [0.0, 0.0, 0.0, 0.5, 0.5])
    assert 0.2 < spread < 0.3  # 8 of 32 sign patterns reach |sum| >= 2.5
    assert paired_p([0.25, 0.75], [0.25, 0.75]) == 1.0


def test_two_evals_are_compared_problem_by_problem(tmp_path: Path, problems_file: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    with FakeOllama(model="teacher", parallel=4, script=_teacher_script(problems_file)) as server:
        monkeypatch.setenv("OLLAMA_HOST", server.url)
        _eval(["--model", "ollama:teacher", "--data", str(problems_file), "--paths", "2", "--mode", "cot,pot",
               "--output-dir", str(first)])
    # first: greedy CoT right on problems 1 and 2, every sampled CoT path too (the third's is wrong).
    # second: greedy CoT right on problems 2 and 3, every sampled CoT path right.
    records = [json.loads(line) for line in (first / "samples.jsonl").read_text().splitlines()]
    ids = list(dict.fromkeys(r["id"] for r in records))
    for record in records:
        if record["style"] == "cot":
            record |= {"correct": record["id"] != ids[0]} if record["greedy"] else {"answer": record["gold"]}
    second.mkdir()
    for name in ("run.json", "report.json"):  # second's report.json is first's: only the paired table reads samples
        (second / name).write_text((first / name).read_text())
    (second / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    result = CliRunner().invoke(cli, ["eval", "compare", str(first), str(second)])
    assert result.exit_code == 0, result.output
    header = "| metric (first vs second, 3 problems) | first | second | higher in first | higher in second | p |"
    assert header in result.output
    assert "| greedy cot | 66.7% | 66.7% | 1 | 1 | 1 |" in result.output
    assert "| cot@2 | 66.7% | 100.0% | 0 | 1 | 1 |" in result.output
    assert "| pot@2 | 0.0% | 0.0% | 0 | 0 | 1 |" in result.output and "cot@1" not in result.output
    result = CliRunner().invoke(cli, ["eval", "compare", str(first), str(second), "--paired", "cot@2:greedy-cot"])
    assert result.exit_code == 0 and "| cot@2 vs greedy cot | 66.7% | 66.7% | 1 | 1 | 1 |" in result.output
    assert "| greedy pot |" not in result.output

    result = CliRunner().invoke(cli, ["eval", "compare", str(first), str(second), "--paired", "mixed@2"])
    assert result.exit_code == 2
    assert f"{first} has no score 'mixed@2'; it has: greedy cot, greedy pot, cot@1, cot@2, pot@1" in result.output
    (second / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records if r["id"] != ids[2]))
    result = CliRunner().invoke(cli, ["eval", "compare", str(first), str(second)])
    assert result.exit_code == 2 and "hold different problems (3 and 2, 1 not in both)" in result.output


def test_samples_of_one_file_are_not_reused_for_another_with_the_same_ids(
        tmp_path: Path, problems_file: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    problems = load_problems(problems_file)
    other = [replace(problems[0], question="Tom has 40 apples and buys 2 more. How many apples does he have?",
                     answer=42.0), replace(problems[1], answer=problems[1].answer + 1), problems[2]]
    write_problems(other, tmp_path / "other.jsonl")
    script = {"cot": {p.question: [f" The answer is {format_number(p.answer)}."] for p in [*problems, other[0]]}}
    args = ["--model", "ollama:teacher", "--mode", "cot", "--paths", "1", "--concurrency", "4",
            "--output-dir", str(tmp_path / "out")]
    with FakeOllama(model="teacher", parallel=4, script=script) as server:
        monkeypatch.setenv("OLLAMA_HOST", server.url)
        _eval(["--data", str(problems_file), *args])
        assert server.stats["served"] == 3 * 2
        _eval(["--data", str(tmp_path / "other.jsonl"), *args])
        assert server.stats["served"] == 3 * 2 + 2 * 2  # the two changed problems are redone, the third is not
    assert "dropping the records of 2 problems whose question or gold answer changed" in caplog.text
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 * 2 and {(r["id"], r["gold"], r["correct"]) for r in samples} == {
        (other[0].id, 42.0, True), (other[1].id, other[1].answer, False), (other[2].id, other[2].answer, True)}
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["greedy_accuracy"] == {"cot": pytest.approx(2 / 3)}


def _student_script(problems: list) -> dict:
    """A served student: CoT right on every problem, PoT programs that return the gold answer but for the last."""
    cot = {p.question: [f"Some steps. The answer is {format_number(p.answer)}."] for p in problems}
    pot = {p.question: [f"```python\ndef solution():\n    return {format_number(p.answer + (i == len(problems) - 1))}"
                        "\n```"] for i, p in enumerate(problems)}
    return {"cot": cot, "pot": pot}


def test_eval_of_a_served_student_sends_the_raw_student_prompt_across_endpoints(tmp_path: Path,
                                                                                problems_file: Path) -> None:
    problems = load_problems(problems_file)
    script = _student_script(problems)
    out = tmp_path / "student"
    with FakeOllama(model="student", parallel=2, script=script) as one, \
            FakeOllama(model="student", parallel=2, script=script) as two:
        _eval(["--model", "ollama:student", "--prompt-style", "student", "--endpoints", f"{one.url},{two.url}",
               "--concurrency", "2", "--data", str(problems_file), "--paths", "2", "--output-dir", str(out)])
    requests = one.requests + two.requests
    assert len(requests) == 3 * (2 + 2 + 2) and one.requests and two.requests  # spread over both servers
    expected = {(student_prompt(p.question, style=style), style) for p in problems for style in ("cot", "pot")}
    assert {(r["prompt"], "pot" if "program" in r["prompt"] else "cot") for r in requests} == expected
    assert all(r["raw"] and r["options"]["stop"] == STUDENT_STOP for r in requests)  # no template of the server's
    report = json.loads((out / "report.json").read_text())
    assert report["prompt_style"] == "student"
    assert report["greedy_accuracy"] == {"cot": 1.0, "pot": pytest.approx(2 / 3)}
    run = json.loads((out / "run.json").read_text())
    assert run["model"] == {"spec": "ollama:student", "kind": "served", "prompts": "student",
                            "endpoints": [one.url, two.url], "digest": one.digest}


def test_student_prompts_through_a_chat_endpoint_are_refused(tmp_path: Path, problems_file: Path) -> None:
    result = CliRunner().invoke(cli, ["eval", "--model", "openai-chat:http://127.0.0.1:9/v1", "--prompt-style",
                                      "student", "--data", str(problems_file), "--output-dir", str(tmp_path / "o")])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "use openai:http://127.0.0.1:9/v1 (flag --model)" in result.output


def test_help() -> None:
    for args in (["eval", "--help"], ["eval", "compare", "--help"]):
        result = CliRunner().invoke(cli, args, prog_name="mdlite")
        assert result.exit_code == 0 and "Usage: mdlite eval" in result.output
    assert "--prompt-style" in CliRunner().invoke(cli, ["eval", "-h"]).output


@pytest.mark.parametrize(
    ("args", "needle"),
    [(["--model", "qwen2.5-coder-0.5b-instruct", "--data", "{tmp}/missing.jsonl"], "missing.jsonl: no such file"),
     (["--model", "qwen2.5-coder-0.5b-instruct", "--data", "{tmp}/bad.jsonl"], "bad.jsonl:1: broken JSON"),
     (["--model", "{tmp}/nope.gguf"], "nope.gguf: no such model file"),
     (["--model", "{tmp}/bad.gguf"], "could not load this file"),
     (["--model", "no-such-model"], "unknown model 'no-such-model'"),
     (["--model", "ollama:"], "no model given"),
     ([], "no model given")],
)
def test_bad_data_or_model_is_one_line_exit_2(tmp_path: Path, problems_file: Path, args: list[str],
                                               needle: str) -> None:
    (tmp_path / "bad.jsonl").write_text('{"id": "1", "question": \n')
    (tmp_path / "bad.gguf").write_bytes(b"GGUF but not really" * 10)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--data" not in args:
        args += ["--data", str(problems_file)]
    result = CliRunner().invoke(cli, ["eval", *args, "--output-dir", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert needle in result.output and result.output.startswith("mdlite: error: ")
    assert result.output.count("\n") == 1 and "Traceback" not in result.output


def test_compare_without_report_is_an_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["eval", "compare", str(tmp_path)])
    assert result.exit_code == 2 and "no report" in result.output


# ---- the real Qwen2.5-Coder 0.5B GGUF -----------------------------------------------------------


def _independent_report(samples: list[dict], paths: int) -> dict:
    """Greedy and maj@paths accuracy per mode recomputed from samples.jsonl by brute force."""
    by_problem: dict[str, list[dict]] = {}
    for record in samples:
        assert record["correct"] == answers_match(record["answer"], record["gold"])
        by_problem.setdefault(record["id"], []).append(record)
    totals: Counter[str] = Counter()
    for records in by_problem.values():
        gold = records[0]["gold"]
        for record in records:
            if record["greedy"]:
                totals[f"greedy {record['style']}"] += record["correct"]
        pools = {style: [r["answer"] for r in sorted(records, key=lambda r: r["path"])
                         if r["style"] == style and not r["greedy"]] for style in ("cot", "pot")}
        totals["cot"] += _brute("cot", [], pools["cot"], gold, 0, paths)
        totals["pot"] += _brute("pot", pools["pot"], [], gold, paths, 0)
        totals["mixed"] += _brute("mixed", pools["pot"], pools["cot"], gold, paths - paths // 2, paths // 2)
        totals["hybrid"] += _brute("hybrid", pools["pot"], pools["cot"], gold, paths, paths)
    return {key: value / len(by_problem) for key, value in totals.items()}


@pytest.mark.slow
def test_eval_of_the_real_gguf_writes_consistent_reports(tmp_path: Path, shared_data: Path) -> None:
    out = tmp_path / "qwen"
    _eval(["--model", "qwen2.5-coder-0.5b-instruct", "--prompt-style", "few-shot", "--data",
           str(shared_data / "svamp" / "tiny.jsonl"), "--limit", "3", "--paths", "2", "--max-tokens", "40",
           "--batch-paths", "8", "--output-dir", str(out)])
    assert all((out / name).stat().st_size > 0 for name in REPORT_FILES)
    assert (out / "accuracy.png").read_bytes().startswith(b"\x89PNG")
    report = json.loads((out / "report.json").read_text())
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 * (2 + 2 + 2) and len({r["id"] for r in samples}) == 3
    assert all(r["finish_reason"] in ("stop", "length") and 0 < r["tokens"] <= 40 for r in samples)
    assert all(r["program_result"] is not None for r in samples if r["style"] == "pot" and "solution" in r["text"])
    expected = _independent_report(samples, paths=2)
    assert report["greedy_accuracy"] == pytest.approx({"cot": expected["greedy cot"], "pot": expected["greedy pot"]})
    assert report["accuracy"] == pytest.approx({m: expected[m] for m in ("cot", "pot", "mixed", "hybrid")})
    assert report["greedy_accuracy"]["pot"] > 0  # few-shot PoT solves some of these (5/5 in design.md)
    tokens = sum(r["tokens"] for r in samples)
    assert report["mean_tokens_per_path"]["all"] == pytest.approx(tokens / len(samples))
    assert report["tokens_per_s"] > 0 and report["questions_per_s"] > 0
    run = json.loads((out / "run.json").read_text())
    assert run["model"]["sha256"] == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert run["config"]["paths"] == 2 and run["versions"]["llama-cpp-python"] != "missing"


@pytest.mark.slow
def test_eval_scores_a_problem_over_the_models_context_as_failed_paths(tmp_path: Path) -> None:
    """A problem whose prompt exceeds the model's context gets its rows (finish_reason error, no answer); the run
    goes on with the other problems."""
    from mdlite.data import Problem

    problems = [Problem("short", "Tom has 3 apples and buys 5 more. How many apples does he have?", 8),
                Problem("long", "Tom has 3 apples. " * 8000 + "How many apples does he have?", 3)]
    write_problems(problems, tmp_path / "problems.jsonl")
    out = tmp_path / "eval"
    _eval(["--model", "qwen2.5-coder-0.5b-instruct", "--data", str(tmp_path / "problems.jsonl"), "--paths", "0",
           "--max-tokens", "24", "--output-dir", str(out)])
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert sorted((r["id"], r["style"], r["finish_reason"]) for r in samples if r["id"] == "long") == [
        ("long", "cot", "error"), ("long", "pot", "error")]
    assert all(r["finish_reason"] in ("stop", "length") for r in samples if r["id"] == "short")
    assert json.loads((out / "report.json").read_text())["problems"] == 2


@pytest.mark.slow
def test_eval_resumes_after_kill_9(tmp_path: Path, shared_data: Path) -> None:
    out = tmp_path / "resume"
    command = [str(Path(sys.executable).parent / "mdlite"), "eval", "--model", "qwen2.5-coder-0.5b-instruct", "--data",
               str(shared_data / "svamp" / "tiny.jsonl"), "--limit", "5", "--paths", "2", "--max-tokens", "24",
               "--batch-paths", "2", "--mode", "cot,pot", "--output-dir", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    samples = out / "samples.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if samples.exists() and len(samples.read_text().splitlines()) >= 6 * 2:  # two problems done
            break
        time.sleep(0.05)
    assert process.poll() is None, "the eval finished before it could be killed; make it slower"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished = samples.read_text().splitlines()[:12]
    with samples.open("a") as handle:  # and a write torn by the kill
        handle.write('{"id": "chal-')
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    lines = samples.read_text().splitlines()
    assert lines[:12] == finished  # finished problems were kept, not decoded again (their timings would differ)
    records = [json.loads(line) for line in lines]
    keys = [(r["id"], r["style"], r["greedy"], r["path"]) for r in records]
    assert len(keys) == len(set(keys)) == 5 * (2 + 2 + 2)
    assert len({r["id"] for r in records}) == 5
    report = json.loads((out / "report.json").read_text())
    assert report["problems"] == 5 and report["paths_decoded"] == 30


# ---- a served student: two real llama.cpp servers, and `mdlite serve` -------------------------------------------


@pytest.fixture(scope="module")
def tiny_student(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny LLaMA of test_export.py with an adapter that learned to answer its PROBLEMS, exported to F16 GGUF
    (student template as chat template), and those problems as a JSONL file."""
    from test_export import PROBLEMS, train_adapter

    from mdlite.config import ExportConfig
    from mdlite.export import run as export
    from mdlite.models import make_tiny_model

    root = tmp_path_factory.mktemp("student")
    adapter = train_adapter(make_tiny_model(root / "base", seed=0), root / "adapter")
    result = export(load_config(ExportConfig, overrides={"input_dir": str(adapter), "output_dir": str(root / "export"),
                                                         "quant_types": ["F16"], "parity": False, "n_threads": 1}))
    write_problems(PROBLEMS, root / "problems.jsonl")
    return {"gguf": result.files["F16"], "problems": root / "problems.jsonl"}


@contextmanager
def _server(command: list[str], log: Path) -> Iterator[str]:
    """Run `command` (a server taking --port) on a free loopback port, its output in `log`; its /v1 base URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    with log.open("w") as sink:
        server = subprocess.Popen([*command, "--port", str(port)], stdout=sink, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.3)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.terminate()
        server.wait(30)


def _greedy(out: Path) -> dict[tuple[str, str], tuple]:
    """(id, style) -> (answer, correct) of the greedy paths in an eval's samples.jsonl."""
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    return {(r["id"], r["style"]): (r["answer"], r["correct"]) for r in samples if r["greedy"]}


@pytest.mark.slow
def test_eval_of_a_student_served_by_two_llama_cpp_servers(tiny_student: dict[str, Path], tmp_path: Path) -> None:
    """llama_cpp.server x 2 (through mdlite's door) with the student GGUF; the eval sends the raw student prompt to
    /v1/completions on both and scores what the engine scores in-process."""
    common = ["--data", str(tiny_student["problems"]), "--paths", "2", "--max-tokens", "40"]
    command = server_command("--model", str(tiny_student["gguf"]), "--host", "127.0.0.1", "--n_ctx", "512",
                             "--n_threads", "1")
    with _server(command, tmp_path / "a.log") as one, _server(command, tmp_path / "b.log") as two:
        _eval(["--model", f"openai:{one}", "--endpoints", f"{one},{two}", "--prompt-style", "student", *common,
               "--output-dir", str(tmp_path / "served")])
    _eval(["--model", str(tiny_student["gguf"]), "--n-threads", "1", *common, "--output-dir", str(tmp_path / "local")])
    served = json.loads((tmp_path / "served" / "report.json").read_text())
    local = json.loads((tmp_path / "local" / "report.json").read_text())
    assert served["prompt_style"] == local["prompt_style"] == "student"
    assert served["greedy_accuracy"] == local["greedy_accuracy"] == {"cot": 1.0, "pot": 1.0}
    assert _greedy(tmp_path / "served") == _greedy(tmp_path / "local")
    requests = [(tmp_path / name).read_text().count("POST /v1/completions") for name in ("a.log", "b.log")]
    assert sum(requests) == 3 * (2 + 2 + 2) and min(requests) > 0, requests  # both servers answered


@pytest.mark.slow
def test_eval_of_a_student_behind_mdlite_serve(tiny_student: dict[str, Path], tmp_path: Path) -> None:
    """`mdlite serve` (10 voted paths per request by default) reads the student prompt back to its question and
    style; eval sees owned_by mdlite and asks for one path per request: its greedy answers are the engine's, and
    each sampled path is one path."""
    import httpx

    common = ["--data", str(tiny_student["problems"]), "--paths", "2", "--max-tokens", "40"]
    command = [str(Path(sys.executable).parent / "mdlite"), "serve", "--model", str(tiny_student["gguf"]),
               "--max-tokens", "40", "--n-threads", "1"]
    with _server(command, tmp_path / "serve.log") as url:
        deadline = time.monotonic() + 60
        while httpx.get(url.removesuffix("/v1") + "/health").status_code != 200:  # listening, still loading
            assert time.monotonic() < deadline
            time.sleep(0.2)
        _eval(["--model", f"openai:{url}", "--prompt-style", "student", *common, "--output-dir", str(tmp_path / "s")])
    _eval(["--model", str(tiny_student["gguf"]), "--n-threads", "1", *common, "--output-dir", str(tmp_path / "l")])
    report = json.loads((tmp_path / "s" / "report.json").read_text())
    assert report["greedy_accuracy"] == {"cot": 1.0, "pot": 1.0} and report["paths_decoded"] == 3 * (2 + 2 + 2)
    assert _greedy(tmp_path / "s") == _greedy(tmp_path / "l")
    samples = [json.loads(line) for line in (tmp_path / "s" / "samples.jsonl").read_text().splitlines()]
    assert all(0 < record["tokens"] <= 40 for record in samples)  # one path's tokens, not a vote's
