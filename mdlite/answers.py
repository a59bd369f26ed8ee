"""Answer extraction from rationales, numeric normalisation and comparison.

    >>> extract_answer("3 + 4 = 7 apples. The answer is 7.")
    7.0
    >>> answers_match(7.0, 7)
    True

Pure functions; no model or I/O here.
"""

from __future__ import annotations

import math
import re

# One number as people write it: optional sign and currency, thousands separators, decimals,
# an optional simple fraction ("3/4", "1 1/2"), and an optional percent sign.
_NUMBER = (
    r"(?P<sign>[-−])?\s*[$€£]?\s*"
    r"(?:(?P<whole>\d+)\s+(?=\d+\s*/\s*\d))?"
    r"(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"(?:\s*/\s*(?P<den>\d+(?:\.\d+)?))?"
    r"(?P<pct>\s*%)?"
)
_NUMBER_RE = re.compile(_NUMBER)
# Explicit answer markers, strongest first. Each captures the text right after the marker (the
# "answer is" body is a lookahead so that a later marker on the same line is still found).
_MARKERS = [
    re.compile(r"\\boxed\{(?P<body>[^{}]*)\}"),
    re.compile(r"####\s*(?P<body>[^\n]*)"),
    re.compile(
        r"(?:final answer|the answer|answer)\s*(?:is|:|=|would be|will be)?\s*[:=]?\s*"
        r"(?=(?P<body>[^\n]*))",
        re.IGNORECASE,
    ),
]


def parse_number(text: str) -> float | None:
    """The first number in `text` as a float ("$1,234.50" -> 1234.5, "3/4" -> 0.75, "50%" -> 50)."""
    match = _NUMBER_RE.search(text)
    return _match_value(match) if match else None


def extract_answer(text: str, *, style: str = "cot", strict: bool = False) -> float | None:
    """The final numeric answer stated in a rationale, or None.

    style "cot": the last explicit marker ("The answer is N", "#### N", "\\boxed{N}"), else (unless
    `strict`) the last number in the text. style "pot": `text` is a program's printed output; its
    last number is the answer.
    """
    if style not in ("cot", "pot"):
        raise ValueError(f"style must be 'cot' or 'pot', not {style!r}")
    if style == "cot":
        for marker in _MARKERS:
            bodies = [m.group("body") for m in marker.finditer(text)]
            for body in reversed(bodies):
                value = parse_number(body)
                if value is not None:
                    return value
        if strict:
            return None
    numbers = list(_NUMBER_RE.finditer(text))
    for match in reversed(numbers):
        value = _match_value(match)
        if value is not None:
            return value
    return None


def answers_match(pred: float | None, gold: float, *, rel_tol: float = 1e-4) -> bool:
    """True when `pred` equals `gold` within `rel_tol` (absolute 1e-6 near zero)."""
    if pred is None or not math.isfinite(pred):
        return False
    return math.isclose(pred, gold, rel_tol=rel_tol, abs_tol=1e-6)


def format_number(value: float) -> str:
    """Shortest plain form of a number: 7.0 -> "7", 2.50 -> "2.5"."""
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.6f}".rstrip("0").rstrip(".")


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
    return value
