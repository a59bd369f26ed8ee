"""Answer extraction on real-looking model outputs, and numeric comparison."""

import math

import pytest

from mdlite.answers import answer_sentence_end, answers_match, extract_answer, format_number, parse_number

COT_CASES = [
    ("There are 3 + 4 = 7 apples. The answer is 7.", 7),
    ("The answer is 7", 7),
    ("the answer is: 12.", 12),
    ("So the final answer is $1,234.50.", 1234.5),
    ("Answer: 42", 42),
    ("Final answer: -5", -5),
    ("The temperature dropped to −3 degrees. The answer is −3.", -3),
    ("She has 24 - 9 = 15 left.\n#### 15", 15),
    ("#### 1,000", 1000),
    ("Thus \\boxed{18} is the result.", 18),
    ("\\boxed{\\$27}", 27),
    ("The answer is 3/4.", 0.75),
    ("The answer is 1 1/2 cups.", 1.5),
    ("The answer is 50%.", 50),
    ("The answer is 0.5.", 0.5),
    ("The answer is .25", 0.25),
    ("The answer is 12 apples.", 12),
    ("The answer is 7 meters per second.", 7),
    ("The answer is $8.", 8),
    ("The answer is € 3.20", 3.2),
    ("We get 5 * 6 = 30 cookies in total. So 30 cookies.", 30),
    ("Tom had 10 and gave 4, so he has 6", 6),
    ("The answer is 6. Wait, recheck: 2 + 4 = 6.", 6),
    ("The answer is 5. Actually the answer is 8.", 8),
    ("First 12 / 4 = 3 boxes.\nThe answer is 3 boxes.", 3),
    ("The answer is 2,500,000", 2500000),
    ("The answer is 1,5", 1),  # a decimal comma is not a thousands separator: read as 1
    ("Total = 45.0\nAnswer = 45.0", 45),
    ("The answer is 007.", 7),
    ("The answer is 3.14159", 3.14159),
    ("Each friend gets 17 / 2 = 8.5 candies. The answer is 8.5", 8.5),
    ("I think the answer would be 64", 64),
    ("The answer will be 100 dollars.", 100),
    ("No numbers here at all.", None),
    ("", None),
    ("The answer is unknown.", None),
    ("The answer is x. There were 9 birds.", 9),
    ("There are 20 students; 3/5 of them are girls, so 12 girls. The answer is 12.", 12),
    ("He pays $4.75 + $2.25 = $7.00. The answer is $7.00.", 7),
    ("The answer is -0.5", -0.5),
    ("The answer is 10%", 10),
    ("1. Add the numbers: 2 + 3 = 5\n2. Multiply: 5 * 2 = 10\nThe answer is 10.", 10),
    # the word "answer" after the stated answer is no marker
    ("The answer is 30. She answered 18 of them.", 30),
    ("Final answer: 12 (answer rounded to 2 decimal places)", 12),
    ("The answer is 4 (the answer to part 2 was 9).", 4),
    # an expression after the marker: its result
    ("The answer is 20 - 5 = 15.", 15),
    ("The answer is 2 * (3 + 4) = 2 * 7 = 14 apples.", 14),
    ("The answer is 12 / 4 = 3", 3),
    # the last explicit marker wins, whatever its kind
    ("\\boxed{5} was wrong. The answer is 8.", 8),
    ("#### 5\nOn reflection, the answer is 6.", 6),
    ("The answer is \\boxed{9}.", 9),
    # scientific notation and LaTeX
    ("The answer is 1.5e3", 1500),
    ("The answer is 2E-2.", 0.02),
    ("\\boxed{\\frac{3}{4}}", 0.75),
    ("So \\boxed{\\dfrac{15}{2}} cups.", 7.5),
    ("\\boxed{-\\frac{1}{4}}", -0.25),
    ("\\boxed{1{,}000}", 1000),
    ("\\boxed{15 \\text{ apples}}", 15),
    # markup and filler between the marker and its number
    ("The answer is **15**.", 15),
    ("So the answer is therefore 15.", 15),
    ("The answer is approximately 3.5 hours.", 3.5),
    # a number no float holds is no answer (the vote, and JSON replies, would get inf)
    ("The answer is 1e999.", None),
    ("The answer is " + "9" * 400 + ".", None),
    ("The answer is 8. Tom then counts to 1e999.", 8),
]


@pytest.mark.parametrize(("text", "expected"), COT_CASES)
def test_extract_answer_cot(text: str, expected: float | None) -> None:
    got = extract_answer(text, style="cot")
    if expected is None:
        assert got is None
    else:
        assert got is not None and math.isclose(got, expected), (text, got)


def test_cases_are_many() -> None:
    assert len(COT_CASES) >= 40


@pytest.mark.parametrize(
    ("text", "strict", "expected"),
    [
        ("So Tom has 6 apples", True, None),
        ("So Tom has 6 apples", False, 6),
        ("The answer is 6", True, 6),
        ("#### 6", True, 6),
        ("The answer is x. There were 9 birds.", True, None),
        ("The answer: it was 6", True, None),
    ],
)
def test_strict_mode_needs_a_marker(text: str, strict: bool, expected: float | None) -> None:
    assert extract_answer(text, style="cot", strict=strict) == expected


@pytest.mark.parametrize(
    ("stdout", "expected"),
    [("12\n", 12), ("step 1\n3.5\n", 3.5), ("", None), ("done\n", None), ("1e-05\n", 1e-5), ("2.5e+16\n", 2.5e16)],
)
def test_extract_answer_pot_reads_last_number(stdout: str, expected: float | None) -> None:
    assert extract_answer(stdout, style="pot") == expected


def test_bad_style_is_refused() -> None:
    with pytest.raises(ValueError):
        extract_answer("1", style="prose")


@pytest.mark.parametrize(
    ("pred", "gold", "same"),
    [
        (7.0, 7, True),
        (11.999999999, 12, True),  # float noise
        (7.00001, 7, False),  # whole-number golds are exact
        (10001.0, 10000, False),
        (22090613.0, 22090603, False),
        (7.01, 7, False),
        (2.5, 2.5, True),
        (2.5000001, 2.5, True),  # other golds: relative 1e-6
        (2.5001, 2.5, False),
        (0.0, 0, True),
        (1e-9, 0, True),
        (None, 3, False),
        (float("nan"), 3, False),
        (float("inf"), 3, False),
        (-2.0, 2, False),
        (33.333333, 100 / 3, True),
    ],
)
def test_answers_match(pred: float | None, gold: float, same: bool) -> None:
    assert answers_match(pred, gold) is same


def test_number_helpers() -> None:
    assert parse_number("costs $1,234.50 total") == 1234.5
    assert parse_number("nothing") is None
    assert parse_number("3/0") is None
    assert parse_number("1e999") is None and parse_number("-" + "9" * 400) is None
    assert extract_answer("1e999\n", style="pot") is None
    assert format_number(7.0) == "7"
    assert format_number(2.5) == "2.5"
    assert format_number(-0.125) == "-0.125"


@pytest.mark.parametrize("bold", ["**", "__", "_"])
def test_an_answer_sentence_in_markdown_emphasis_ends_the_rationale(bold: str) -> None:
    text = f"3 + 11 = 14.\n{bold}The answer is 14.{bold}\nExplanation: he buys 11 more."
    assert text[:answer_sentence_end(text)] == f"3 + 11 = 14.\n{bold}The answer is 14.{bold}"
    assert answer_sentence_end("Bathe answer is 14.\nMore") is None  # "the" must be a word of its own
