"""Every prompt mdlite sends to a model is built here, from the text files in resources/prompts/.

- Teacher: few-shot completion prompts, one per style (`teacher_cot.txt`, `teacher_pot.txt`).
- Student: one template (`student.txt`) with a style directive; `train` learns
  `student_prompt(q, style) + rationale + EOS`, and `solve` / `eval` / `export-gguf` use the same text.
"""

from __future__ import annotations

import ast
import hashlib
import re
from functools import cache
from importlib import resources

from mdlite.answers import answer_sentence_end

STYLES = ("cot", "pot")
STUDENT_DIRECTIVES = {
    "cot": 'Solve it step by step and end with "The answer is N."',
    "pot": "Write a Python program whose solution() function returns the answer.",
}
# The teacher's PoT prompt ends inside an opened code fence, so the completion is the program.
_TEACHER_SUFFIX = {"cot": "Question: {question}\nAnswer:", "pot": "Question: {question}\nProgram:\n```python\n"}
# Plain stop strings (what a server gets; prompt_hash covers them). PoT's "\n```" is a fence at a line start,
# which a valid program has only inside a triple-quoted string (`fence = '```'` is not cut; a program cut in
# such a string fails to parse and is rejected, never mis-scored).
TEACHER_STOP = {"cot": ["\nQuestion:", "\n\n"], "pot": ["\n```", "\nQuestion:"]}
STUDENT_STOP = ["\nQuestion:"]
_FENCE_RE = re.compile(r"^```(?:python|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.MULTILINE)
_FENCE_LINE = re.compile(r"^```", re.MULTILINE)
_PROGRAM_RE = re.compile(r"^\s*def solution\(|^\s*(ans|answer)\s*=|print\(", re.MULTILINE)


@cache
def prompt_text(name: str) -> str:
    """The raw text of resources/prompts/`name`.txt."""
    return resources.files("mdlite").joinpath(f"resources/prompts/{name}.txt").read_text("utf-8")


class Prompt(str):
    """A prompt's text that knows its user text: `Prompt(template, user, template, ...)` (template text and user
    text alternating, template first) is their concatenation, and `parts` keeps them apart. The engine reads
    special-token markers (a chat template's `<|im_start|>`) as special tokens in the template parts only: a
    question that types `<|im_end|>` is text, not the end of its turn."""

    parts: tuple[str, ...]

    def __new__(cls, *parts: str) -> Prompt:
        prompt = super().__new__(cls, "".join(parts))
        prompt.parts = parts
        return prompt


def teacher_prompt(question: str, *, style: str) -> Prompt:
    """Few-shot completion prompt asking the teacher for a `style` rationale of `question` (its user text)."""
    _check_style(style)
    head, _, tail = _TEACHER_SUFFIX[style].partition("{question}")
    return Prompt(prompt_text(f"teacher_{style}") + head, question.strip(), tail)


def student_prompt(question: str, *, style: str) -> Prompt:
    """The student's prompt: the question (its user text) and the style directive; the rationale follows it."""
    _check_style(style)
    head, _, tail = prompt_text("student").partition("{question}")
    directive = STUDENT_DIRECTIVES[style]
    return Prompt(head.format(directive=directive), question.strip(), tail.format(directive=directive))


def prompt_hash(style: str) -> str:
    """Short hash of everything that shapes a teacher prompt of `style` (changes invalidate work)."""
    _check_style(style)
    text = prompt_text(f"teacher_{style}") + _TEACHER_SUFFIX[style] + repr(TEACHER_STOP[style])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def extract_program(text: str) -> str | None:
    """The Python program in a PoT completion: the first complete program (`program_end`), else the first
    fenced block, else the text itself, when it defines `solution()`, assigns `ans`/`answer` or prints;
    None when there is no program."""
    complete = _complete_program(text)
    fenced = _FENCE_RE.search(text)
    code = complete[0] if complete else fenced.group(1) if fenced else text
    code = code.strip("\n")
    return code + "\n" if _PROGRAM_RE.search(code) else None


def program_end(text: str) -> int | None:
    """The index just past the closing fence of the first complete program in a PoT completion, or None.

    A closing fence is "```" at a line start after a program that parses (`ast.parse`): the code from the
    text's start (the teacher's prompt opened the fence) or from the end of an earlier fence line. So a
    "```" inside a string (`fence = '```'`, or a line of a triple-quoted string) closes nothing.
    """
    complete = _complete_program(text)
    return complete[1] if complete else None


# Where a rationale is complete, as an index into the text so far (None: not yet): the engine (students, the
# in-process teacher) ends a path there and HTTP teachers' replies are cut there. CoT: the end of the
# first answer sentence, the one `extract_answer` reads its number from (answers.answer_sentence_end).
# PoT: the closing fence of the first complete program, the one `extract_program` returns (program_end).
STOP_AFTER = {"cot": answer_sentence_end, "pot": program_end}


def _complete_program(text: str) -> tuple[str, int] | None:
    """(code, end of its closing fence) of the first complete program in `text` (see `program_end`)."""
    starts = [0]
    for fence in _FENCE_LINE.finditer(text):
        for start in starts:
            code = text[start:fence.start()]
            if _PROGRAM_RE.search(code) and _parses(code):
                return code, fence.end()
        starts.append(text.find("\n", fence.end()) + 1 or len(text))
    return None


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # the last two: code nested too deep to parse
        return False
    return True


def _check_style(style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, not {style!r}")
