"""Answer extraction from rationales, numeric normalisation and comparison.

    >>> extract_answer("3 + 4 = 7 apples. The answer is 7.")
    7.0
    >>> answers_match(7.0, 7)
    True
    >>> text = "3 + 4 = 7. The answer is 7. So Tom has 7 apples."
    >>> text[:answer_sentence_end(text)]
    '3 + 4 = 7. The answer is 7.'

Pure functions; no model or I/O here.
"""

from __future__ import annotations

import math
import re

# One number as people write it: optional sign and currency, thousands separators, decimals, an
# exponent ("1.5e3"), an optional simple fraction ("3/4", "1 1/2"), and an optional percent sign.
_NUMBER = (
    r"(?P<sign>[-−])?\s*[$€£]?\s*"
    r"(?:(?P<whole>\d+)\s+(?=\d+\s*/\s*\d))?"
    r"(?P<num>(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?)"
    r"(?:\s*/\s*(?P<den>\d+(?:\.\d+)?))?"
    r"(?P<pct>\s*%)?"
)
_NUMBER_RE = re.compile(_NUMBER)
# Explicit answer markers; each captures the text after it, where the answer must come first. The
# "answer" body is a lookahead so that a later marker on the same line is still found.
_MARKERS = [
    re.compile(r"\\boxed\{(?P<body>(?:[^{}]|\{[^{}]*\})*)\}"),
    re.compile(r"####\s*(?P<body>[^\n]*)"),
    re.compile(r"\banswer\b\s*(?:is|was|:|=|would be|will be|should be)?\s*[:=]?\s*(?=(?P<body>[^\n]*))",
               re.IGNORECASE),
]
# What may stand between a marker and its number: markup ("**", "\\(", "$") and a few filler words.
_LEAD = re.compile(r"(?:[\s*_:(\[\\~≈]|(?:therefore|thus|so|then|just|exactly|approximately|about|around|roughly)\b)*",
                   re.IGNORECASE)
# An arithmetic expression before its result: "20 - 5 = " in "20 - 5 = 15" (up to the last "=").
_EXPRESSION = re.compile(r"(?:\d\.\d|[\d \t,$€£%()+\-−*/×x÷^=])*=[ \t]*")
_FRAC = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")  # LaTeX \frac{3}{4} -> 3/4
# Where a sentence ends: after ".", "!" or "?" and any closing markup ("**", quotes, ")") once a line break
# follows, or a space and then anything but a digit (in "12 ft. 6 in." the quantity goes on); or at a line
# break. A period with nothing after it yet is no end: "The answer is 3." may become "3.5".
_SENTENCE_END = re.compile(r"[.!?][*_\"'”’)\]}$`]*(?=[ \t]*\n|[ \t]+[^\s\d])|\n")
# The phrases that close a rationale; "Answer: 3 apples and 5 more..." opens one. An underscore may come right
# before "the": markdown bold or italics ("__The answer is 14.__").
_CLOSING = re.compile(r"(?<![^\W_])the (?:final |correct )?answer is\b|####|\\boxed\{", re.IGNORECASE)


def parse_number(text: str) -> float | None:
    """The first number in `text` as a float ("$1,234.50" -> 1234.5, "3/4" -> 0.75, "50%" -> 50); None when it
    is none or not finite as a float ("1e999", "3/0")."""
    match = _NUMBER_RE.search(text)
    return _match_value(match) if match else None


def extract_answer(text: str, *, style: str = "cot", strict: bool = False) -> float | None:
    """The final numeric answer stated in a rationale, or None.

    style "cot": the last explicit marker ("The answer is N", "#### N", "\\boxed{N}"), whatever its kind,
    that a number follows (after markup or a word like "approximately"; "the answer is 20 - 5 = 15" gives
    the result, 15; "She answered 18" is no marker), else (unless `strict`) the last number in the text.
    style "pot": `text` is a program's printed output; its last number is the answer.
    A number no float holds ("1e999", 400 digits) is none: non-finite values are no answer.
    """
    if style not in ("cot", "pot"):
        raise ValueError(f"style must be 'cot' or 'pot', not {style!r}")
    if style == "cot":
        text = _plain(text)
        value = _stated_answer(text)
        if value is not None or strict:
            return value
    numbers = list(_NUMBER_RE.finditer(text))
    for match in reversed(numbers):
        value = _match_value(match)
        if value is not None:
            return value
    return None


def answer_sentence_end(text: str) -> int | None:
    """The index just past the first complete answer sentence of a CoT rationale, or None while it has none.

    An answer sentence closes the rationale ("the answer is", "the final / correct answer is", "####",
    "\\boxed{") and `extract_answer` reads a number from it, from the sentence alone: "The answer is the
    number of apples he has after he buys 5 more." and "The answer is not 5." are none. It ends at its first
    sentence end (_SENTENCE_END): "The answer is 12 ft. 6 in." is one sentence, "**The answer is 8.**" (or
    "__The answer is 8.__") ends after the "**" once a line break follows, "The answer is 8." waits for what
    comes next. So the answer `extract_answer` reads from `text[:end]` is the one that sentence states.
    """
    start = 0
    for end in _SENTENCE_END.finditer(text):
        sentence = text[start:end.end()]
        if _CLOSING.search(sentence) and _stated_answer(_plain(sentence)) is not None:
            return start + len(sentence.rstrip())
        start = end.end()
    return None


def answers_match(pred: float | None, gold: float) -> bool:
    """True when `pred` is `gold`: exactly for a whole-number gold (but for float noise, 11.999999999 is
    12), within a relative 1e-6 for any other. Eval, teach and voting all compare answers with this."""
    if pred is None or not math.isfinite(pred):
        return False
    if float(gold).is_integer():
        return math.isclose(pred, gold, rel_tol=1e-12, abs_tol=1e-6)
    return math.isclose(pred, gold, rel_tol=1e-6)


def format_number(value: float) -> str:
    """Shortest plain form of a number: 7.0 -> "7", 2.50 -> "2.5"."""
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.6f}".rstrip("0").rstrip(".")


def _plain(text: str) -> str:
    """LaTeX fractions and "{,}" separators as plain text: "\\frac{3}{4}" -> "3/4", "1{,}000" -> "1,000"."""
    return _FRAC.sub(r"\1/\2", text).replace("{,}", ",")


def _stated_answer(text: str) -> float | None:
    """The number of the last explicit marker in `text` that a number follows, or None."""
    found = sorted((m.start(), m.group("body")) for marker in _MARKERS for m in marker.finditer(text))
    for _, body in reversed(found):
        value = _marked_value(body)
        if value is not None:
            return value
    return None


def _marked_value(body: str) -> float | None:
    """The number that opens the text after a marker (an expression's result: "20 - 5 = 15" -> 15), or None."""
    body = body[_LEAD.match(body).end():]  # type: ignore[union-attr]  # _LEAD matches the empty string
    body = body[m.end():] if (m := _EXPRESSION.match(body)) else body
    match = _NUMBER_RE.match(body)
    return _match_value(match) if match else None


def _match_value(match: re.Match[str]) -> float | None:
    value = float(match.group("num").replace(",", ""))
    if match.group("den") is not None:
        denominator = float(match.group("den"))
        if denominator == 0:
            return None
        value /= denominator
    if match.group("whole") is not None:
        value += float(match.group("whole"))
    if match.group("sign"):
        value = -value
    return value if math.isfinite(value) else None  # "1e999", a 400-digit number: no answer
