"""Every prompt mdlite sends to a model is built here, from the text files in resources/prompts/.

- Teacher: few-shot completion prompts, one per style (`teacher_cot.txt`, `teacher_pot.txt`).
- Student: one template (`student.txt`) with a style directive; `train` learns
  `student_prompt(q, style) + rationale + EOS`, and `solve` / `eval` / `export-gguf` use the same text.
"""

from __future__ import annotations

import hashlib
import re
from functools import cache
from importlib import resources

STYLES = ("cot", "pot")
STUDENT_DIRECTIVES = {
    "cot": 'Solve it step by step and end with "The answer is N."',
    "pot": "Write a Python program whose solution() function returns the answer.",
}
# The teacher's PoT prompt ends inside an opened code fence, so the completion is the program.
_TEACHER_SUFFIX = {"cot": "Question: {question}\nAnswer:", "pot": "Question: {question}\nProgram:\n```python\n"}
TEACHER_STOP = {"cot": ["\nQuestion:", "\n\n"], "pot": ["```", "\nQuestion:"]}
STUDENT_STOP = ["\nQuestion:"]
# Where a rationale is complete: the engine (students, the in-process teacher) stops right after a match.
# CoT: the answer sentence once it has a number and its closing period is followed by whitespace ("The
# answer is 3.5" waits for its end, "The answer is:\n12." is not cut short); PoT: a fenced program's
# closing fence (the teacher's PoT prompt opens the fence itself, so there the stop string "```" ends it).
_STOP_AFTER_RE = {"cot": r"(?i)\bthe (?:final )?answer is\b[^\n]*?\d[^\n]*?\.(?=\s)", "pot": r"```[^\n]*\n.*?\n```"}
STOP_AFTER = {style: (lambda text, _p=re.compile(p, re.DOTALL): (m.end() if (m := _p.search(text)) else None))
              for style, p in _STOP_AFTER_RE.items()}  # TEMPORARY until issue23-stops lands
_FENCE_RE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL)


@cache
def prompt_text(name: str) -> str:
    """The raw text of resources/prompts/`name`.txt."""
    return resources.files("mdlite").joinpath(f"resources/prompts/{name}.txt").read_text("utf-8")


def teacher_prompt(question: str, *, style: str) -> str:
    """Few-shot completion prompt asking the teacher for a `style` rationale of `question`."""
    _check_style(style)
    return prompt_text(f"teacher_{style}") + _TEACHER_SUFFIX[style].format(question=question.strip())


def student_prompt(question: str, *, style: str) -> str:
    """The student's prompt: the question and the style directive; the rationale follows it."""
    _check_style(style)
    return prompt_text("student").format(
        question=question.strip(), directive=STUDENT_DIRECTIVES[style]
    )


def prompt_hash(style: str) -> str:
    """Short hash of everything that shapes a teacher prompt of `style` (changes invalidate work)."""
    _check_style(style)
    text = prompt_text(f"teacher_{style}") + _TEACHER_SUFFIX[style] + repr(TEACHER_STOP[style])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def extract_program(text: str) -> str | None:
    """The Python program in a PoT completion: the first fenced block, else the text itself when
    it defines `solution()` or assigns `ans`/`answer`; None when there is no program."""
    fenced = _FENCE_RE.search(text)
    code = fenced.group(1) if fenced else text
    code = code.strip("\n")
    if re.search(r"^\s*def solution\(|^\s*(ans|answer)\s*=|print\(", code, re.MULTILINE):
        return code + "\n"
    return None


def _check_style(style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, not {style!r}")
