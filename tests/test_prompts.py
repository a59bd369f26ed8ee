"""Prompts: teacher few-shot exemplars are correct and not from test data; one student template."""

import pickle
from pathlib import Path

import pytest

from mdlite.answers import answers_match, extract_answer
from mdlite.data import load_problems
from mdlite.prompts import (
    STOP_AFTER,
    STUDENT_DIRECTIVES,
    STYLES,
    TEACHER_STOP,
    Prompt,
    extract_program,
    program_end,
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


def test_prompts_keep_the_question_apart_as_user_text() -> None:
    """The engine tokenizes a Prompt's user parts as plain text (tests/test_engine.py)."""
    for make in (student_prompt, teacher_prompt):
        for style in STYLES:
            prompt = make(" Is <|im_end|> text? ", style=style)
            assert isinstance(prompt, Prompt) and prompt.parts[1] == "Is <|im_end|> text?"
            assert "".join(prompt.parts) == prompt and len(prompt.parts) == 3
    assert pickle.loads(pickle.dumps(prompt)).parts == prompt.parts


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


@pytest.mark.parametrize("line", ["x = " + "-" * 5000 + "1", "x = " + "not " * 5000 + "1"])
def test_code_too_deep_for_the_parser_is_no_complete_program(line: str) -> None:
    """Small models write lines of thousands of `-`; ast.parse raises RecursionError on them, not SyntaxError."""
    text = f"```python\nprint(1)\n{line}\n```\nMore text."
    assert program_end(text) is None
    assert extract_program(text) == f"print(1)\n{line}\n"  # the fenced block, as for any code that does not parse


# Where STOP_AFTER ends a generated text, and what is read from the cut text: (style, generated text, cut
# text, the answer extract_answer reads (CoT) or the program extract_program returns (PoT)). The "real"
# texts are outputs (some shortened) of the Qwen2.5-Coder-0.5B teacher in the svamp-small teach and eval runs,
# with the text that followed them; the rest are the reproduced bugs of issue 23 and student-style outputs.
NEXT = "\n\nQuestion: A baker makes 24 muffins."
FENCE_PROGRAM = "def solution():\n    fence = '```'\n    return len(fence)\n"
QUOTED_PROGRAM = 'def solution():\n    doc = """\n```\nnot the end\n"""\n    return 3\n'
STOP_CASES = [
    # real teacher outputs
    ("cot", "Luke scored 84 points after 2 rounds. Each round he gained 84 / 2 = 42 points. The answer is 42." + NEXT,
     "Luke scored 84 points after 2 rounds. Each round he gained 84 / 2 = 42 points. The answer is 42.", 42),
    ("cot", " Paige planted 10 seeds * 45 flowerbeds = 450 seeds. The answer is 450." + NEXT,
     " Paige planted 10 seeds * 45 flowerbeds = 450 seeds. The answer is 450.", 450),
    ("cot", "3 - 19 = -16 roses. So, Jessica cut -16 roses. The answer is -16." + NEXT,
     "3 - 19 = -16 roses. So, Jessica cut -16 roses. The answer is -16.", -16),
    ("cot", "By 266 of the pickers, they fill 90 / 266 = 0.34 drums of grapes. The answer is 0.34 drums." + NEXT,
     "By 266 of the pickers, they fill 90 / 266 = 0.34 drums of grapes. The answer is 0.34 drums.", 0.34),
    ("cot", "\\[ x = 41 - 2 \\]\nSo, the number of children is \\(\\boxed{40}\\)." + NEXT,
     "\\[ x = 41 - 2 \\]\nSo, the number of children is \\(\\boxed{40}\\).", 40),
    ("cot", "The waiter had 12 - 15 = -3 customers. The correct answer is 12. The waiter is not allowed to have",
     "The waiter had 12 - 15 = -3 customers. The correct answer is 12.", 12),  # looped to max_tokens before
    ("cot", 'Each row would need 7 rows\' worth. Since the answer is "Not enough pencils", the answer is not 140.',
     'Each row would need 7 rows\' worth. Since the answer is "Not enough pencils", the answer is not 140.',
     140),  # no answer sentence: no stop; the last number is read as before
    # the reproduced bugs: reasoning is not cut, and the answer sentence ends its rationale
    ("cot", "The answer is the number of apples Tom has after he buys 5 more. He has 3 + 5 = 8 apples. The answer is "
     "8." + NEXT, "The answer is the number of apples Tom has after he buys 5 more. He has 3 + 5 = 8 apples. The "
     "answer is 8.", 8),
    ("cot", "First, the answer is not 5. Tom has 3 + 4 = 7 apples. The answer is 7.\nQuestion:",
     "First, the answer is not 5. Tom has 3 + 4 = 7 apples. The answer is 7.", 7),
    ("cot", "The answer is 12 ft. 6 in." + NEXT, "The answer is 12 ft. 6 in.", 12),
    ("cot", "3 + 5 = 8.\n**The answer is 8.**\nExplanation: he buys 5 more apples.", "3 + 5 = 8.\n**The answer is 8.**",
     8),
    ("cot", 'He says: "The answer is 8."\n\nQuestion:', 'He says: "The answer is 8."', 8),
    # student-style outputs (the first: the teacher exemplar's, the decimal point is no sentence end)
    ("cot", "The scarves cost 3 * 8.50 = 25.50 dollars. Jo has 50 - 25.50 = 24.50 dollars left. The answer is 24.5"
     ". She spent the rest.", "The scarves cost 3 * 8.50 = 25.50 dollars. Jo has 50 - 25.50 = 24.50 dollars left. "
     "The answer is 24.5.", 24.5),
    ("cot", "The answer is 3.5 hours. It takes 7 / 2 = 3.5 hours.", "The answer is 3.5 hours.", 3.5),
    ("cot", "She has 24 - 9 = 15 left.\n#### 15\nQuestion:", "She has 24 - 9 = 15 left.\n#### 15", 15),
    ("cot", "So the answer is 20 - 5 = 15. Explanation: 20 - 5 = 15.", "So the answer is 20 - 5 = 15.", 15),
    ("cot", "The answer is 5. Actually the answer is 8.", "The answer is 5.", 5),  # the first answer sentence ends it
    ("cot", "The answer is:\n12.\n", "The answer is:\n12.\n", 12),  # no number in the marker's sentence: no stop
    ("cot", "The answer is 8.", "The answer is 8.", 8),  # a period with nothing after it yet is no end
    # PoT: the teacher's completion (its prompt opened the fence) and the student's fenced program
    ("pot", FENCE_PROGRAM + "```" + NEXT, FENCE_PROGRAM + "```", FENCE_PROGRAM),
    ("pot", "```python\n" + QUOTED_PROGRAM + "```\nThis program returns 3.", "```python\n" + QUOTED_PROGRAM + "```",
     QUOTED_PROGRAM),
    ("pot", "Here:\n```python\ndef solution():\n    return 12 * 4\n```\n```python\nprint(1)\n```",
     "Here:\n```python\ndef solution():\n    return 12 * 4\n```", "def solution():\n    return 12 * 4\n"),
    ("pot", "def solution():\n    t shirts = 130\n    return t shirts\n```" + NEXT,  # real: does not parse, no stop
     "def solution():\n    t shirts = 130\n    return t shirts\n```" + NEXT, None),
]


@pytest.mark.parametrize(("style", "text", "cut", "read"), STOP_CASES)
def test_stop_after_ends_where_the_answer_is_read(style: str, text: str, cut: str, read: float | str | None) -> None:
    stop = STOP_AFTER[style]
    at = stop(text)
    assert (text if at is None else text[:at]) == cut
    streamed = next((text[:end] for i in range(1, len(text) + 1) if (end := stop(text[:i])) is not None), text)
    assert streamed == cut  # what the engine keeps, given the text a character at a time
    assert (extract_answer(cut, style="cot") if style == "cot" else extract_program(cut)) == read
    if style == "cot" and at is not None:  # stated by an answer marker, not guessed from the last number
        assert extract_answer(cut, style="cot", strict=True) == read


def test_teacher_pot_stops_cut_no_program_with_fences_in_strings() -> None:
    for program in (FENCE_PROGRAM, QUOTED_PROGRAM.replace('"""\n```', '"""```')):
        completion = program + "```" + NEXT
        first = min(completion.find(stop) for stop in TEACHER_STOP["pot"] if stop in completion)
        assert completion[:first] == program.rstrip("\n") and extract_program(completion[:first]) == program
