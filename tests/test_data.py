"""Problem files: loading real data, dataset names, bad input, and the synthetic generator."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from mdlite import MdliteError
from mdlite.data import (
    Problem,
    _problem_from_hub_row,
    evaluate_equation,
    load_problems,
    problem_hash,
    problem_stats,
    read_jsonl_problems,
    synth_problems,
)


def test_real_svamp_and_gsm8k_load(shared_data: Path) -> None:
    assert len(load_problems("svamp:train", data_dir=shared_data)) == 800
    test = load_problems("svamp:test", data_dir=shared_data)
    assert len(test) == 200 and all(p.equation for p in test)
    gsm = load_problems("gsm8k", data_dir=shared_data, limit=5)
    assert len(gsm) == 5 and gsm[0].id == "gsm8k-test-0000" and gsm[0].equation is None


def test_svamp_equations_match_answers_except_the_known_label_error(shared_data: Path) -> None:
    problems = load_problems("svamp:train", data_dir=shared_data) + load_problems("svamp:test", data_dir=shared_data)
    wrong = [p.id for p in problems if abs(float(evaluate_equation(p.equation)) - p.answer) > 1e-6]
    assert wrong == ["chal-680"]


def test_dataset_name_uses_env_data_dir(shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MDLITE_DATA", str(shared_data))
    assert len(load_problems("svamp:tiny")) == 20


def test_missing_dataset_says_how_to_point_at_a_local_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MdliteError, match=r"svamp/test.jsonl.*--data-dir"):
        load_problems("svamp:test", data_dir=tmp_path)


def test_unknown_split_is_refused(tmp_path: Path) -> None:
    with pytest.raises(MdliteError, match="no split"):
        load_problems("asdiv:train", data_dir=tmp_path)


def test_hub_ids_name_the_split_like_the_local_copies() -> None:
    row = {"question": "Q?", "answer": "steps #### 1,234"}
    train, test = (_problem_from_hub_row("gsm8k", split, 7, row) for split in ("train", "test"))
    assert (train.id, test.id, test.answer) == ("gsm8k-train-0007", "gsm8k-test-0007", 1234.0)
    multiarith = _problem_from_hub_row("multiarith", "test", 3, {"question": "Q?", "final_ans": "2"})
    assert multiarith.id == "multiarith-test-0003"
    svamp = {"Body": "B.", "Question": "Q?", "Answer": 2.0}
    assert _problem_from_hub_row("svamp", "test", 1, svamp | {"ID": "chal-9"}).id == "chal-9"
    assert _problem_from_hub_row("svamp", "train", 1, svamp).id == "svamp-train-0001"


def test_problem_hash_follows_question_and_gold() -> None:
    problem = Problem("p", "How many?", 3.0)
    assert problem_hash(problem) == problem_hash(Problem("other-id", "How many?", 3))
    assert len({problem_hash(problem), problem_hash(replace(problem, question="How many now?")),
                problem_hash(replace(problem, answer=3.5))}) == 3


def _write(tmp_path: Path, content: bytes | str) -> Path:
    path = tmp_path / "problems.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


GOOD = '{"id": "a", "question": "1+1?", "answer": 2}\n'


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "empty"),
        ("\n  \n", "empty"),
        (b"\x00\x01\x02binary", "binary"),
        (GOOD + '{"id": "b", "question": "x"', ":2: broken JSON"),
        (GOOD + '{"id": "b", "answer": 3}\n', ":2: missing field.*question"),
        (GOOD + '{"id": "b", "question": "q", "answer": "seven"}\n', ":2: answer 'seven' is not a finite number"),
        (GOOD + '{"id": "b", "question": "q", "answer": true}\n', ":2: answer True"),
        (GOOD + '{"id": "b", "question": "q", "answer": NaN}\n', ":2: answer nan"),
        (GOOD + GOOD, ":2: duplicate id 'a' \\(first on line 1\\)"),
        (GOOD + '[1, 2]\n', ":2: expected a JSON object"),
        (GOOD + '{"id": "b", "question": "", "answer": 1}\n', ":2: question must be"),
        (GOOD + '{"id": "b", "question": "q", "answer": 1, "equation": 5}\n', ":2: equation must be"),
        (GOOD.encode() + b'{"id": "b", "question": "\xff\xfe", "answer": 1}\n', ":2: not UTF-8"),
        (GOOD + '{"id": "b", "question": "' + "x" * (10 << 20) + '", "answer": 1}\n', ":2: line is .* bytes"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path: Path, content: bytes | str, message: str) -> None:
    path = _write(tmp_path, content)
    with pytest.raises(MdliteError, match=message) as error:
        read_jsonl_problems(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_numeric_string_answers_and_blank_lines_are_accepted(tmp_path: Path) -> None:
    path = _write(tmp_path, GOOD + "\n" + '{"id": 7, "question": "q", "answer": "1,250"}\n')
    problems = read_jsonl_problems(path)
    assert [p.id for p in problems] == ["a", "7"] and problems[1].answer == 1250


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(MdliteError, match="no such file"):
        load_problems(tmp_path / "nope.jsonl")


def test_synth_is_deterministic_checked_and_varied() -> None:
    first, again, other = synth_problems(300, seed=1), synth_problems(300, seed=1), synth_problems(300, seed=2)
    assert first == again and first != other
    assert len({p.question for p in first}) == 300
    for problem in first:
        assert float(evaluate_equation(problem.equation)) == problem.answer
        assert problem.answer >= 0 and round(problem.answer, 4) == problem.answer
    operations = [sum(problem.equation.count(op) for op in "+-*/") for problem in first]
    assert min(operations) == 1 and max(operations) == 4
    assert all(any(op in p.equation for p in first) for op in "+-*/")
    assert 0 < sum(not float(p.answer).is_integer() for p in first) < 150
    assert len({p.question.split()[0] for p in first}) >= 10  # varied people


def test_stats_count_duplicates(tmp_path: Path) -> None:
    lines = [json.dumps({"id": str(i), "question": "Same  question?" if i < 3 else f"q{i}", "answer": i})
             for i in range(5)]
    stats = problem_stats(read_jsonl_problems(_write(tmp_path, "\n".join(lines))))
    assert stats["problems"] == 5 and stats["duplicate_questions"] == 2
    assert stats["answer_min"] == 0 and stats["answer_max"] == 4


def test_synth_source() -> None:
    assert load_problems("synth:12:5") == synth_problems(12, seed=5)
    assert len(load_problems("synth:30", limit=4)) == 4
    with pytest.raises(MdliteError, match="expected synth:N"):
        load_problems("synth:ten")
