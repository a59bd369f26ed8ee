"""Prompts: teacher few-shot exemplars are correct and not from test data; one student template."""

from pathlib import Path

import pytest

from mdlite.answers import answers_match, extract_answer
from mdlite.data import load_problems
from mdlite.prompts import (
    STUDENT_DIRECTIVES,
    extract_program,
    prompt_hash,
    prompt_text,
    student_prompt,
    teacher_prompt,
)


def _exemplars(style: str) -> list[tuple[str, str]]:
    blocks = prompt_text(f"teacher_{style}").strip().split("\n\nQuestion: ")
    return [tuple(block.removeprefix("Question: ").split("\n", 1)) for block in blocks]


def test_cot_exemplars_end_with_their_answer_and_match_the_pot_ones() -> None:
    cot, pot = _exemplars("cot"), _exemplars("pot")
    assert [q for q, _ in cot] == [q for q, _ in pot] and len(cot) >= 4
    for (_, cot_text), (_, pot_text) in zip(cot, pot, strict=True):
        answer = extract_answer(cot_text, style="cot", strict=True)
        program = extract_program(pot_text)
        scope: dict = {}
        exec(program, scope)  # our own exemplar, not untrusted code
        assert answers_match(answer, scope["solution"]())


def test_exemplars_are_not_benchmark_problems(shared_data: Path) -> None:
    questions = {" ".join(p.question.lower().split()) for split in ("train", "test")
                 for p in load_problems(f"svamp:{split}", data_dir=shared_data)}
    questions |= {" ".join(p.question.lower().split()) for p in load_problems("gsm8k:test", data_dir=shared_data)}
    for question, _ in _exemplars("cot"):
        assert " ".join(question.lower().split()) not in questions


def test_teacher_prompts_end_where_the_rationale_starts() -> None:
    assert teacher_prompt(" How many? ", style="cot").endswith("Question: How many?\nAnswer:")
    assert teacher_prompt("How many?", style="pot").endswith("Program:\n```python\n")
    assert prompt_hash("cot") != prompt_hash("pot") and len(prompt_hash("cot")) == 12


def test_student_prompt_has_the_style_directive() -> None:
    for style, directive in STUDENT_DIRECTIVES.items():
        prompt = student_prompt("What is 2 + 2?", style=style)
        assert prompt == f"Question: What is 2 + 2?\n{directive}\n"
    with pytest.raises(ValueError):
        student_prompt("q", style="latex")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("```python\ndef solution():\n    return 4\n```\nThis returns 4.", "def solution():\n    return 4\n"),
        ("def solution():\n    return 4", "def solution():\n    return 4\n"),
        ("Sure!\n```py\nans = 3 * 4\n```", "ans = 3 * 4\n"),
        ("```\nprint(12)\n```", "print(12)\n"),
        ("The answer is 4.", None),
        ("```python\ndef solution():\n    return 1 +", "def solution():\n    return 1 +\n"),
    ],
)
def test_extract_program(text: str, expected: str | None) -> None:
    assert extract_program(text) == expected
