"""Solve questions with many CoT and PoT paths from one GGUF and vote on the answer.

    mdlite solve "Tom has 3 apples and buys 5 more. How many apples?" --model student.gguf --mode mixed --paths 10
    mdlite solve --file questions.txt --model qwen2.5-coder-0.5b-instruct --prompt-style few-shot --json

For each question: prompts (`student_prompt` + STUDENT_STOP, or the teacher's few-shot prompts with
`--prompt-style few-shot`) -> `Engine.sample` (several questions' paths in one batch; the few-shot
exemplars evaluated once by the prefix cache; prompts.STOP_AFTER ends a CoT path after its answer
sentence, the one `extract_answer` then reads, and a PoT path after the closing fence of a program that
parses, the one `extract_program` then returns) -> CoT answers with `extract_answer`, PoT programs with
`extract_program` and the sandbox -> `vote.vote`.

Paths per style: cot and pot modes give all `paths` to their style; mixed gives ceil(paths/2) to PoT
and the rest to CoT; hybrid samples `paths` PoT paths and, for questions where every program
failed, `paths` CoT paths. With early stopping the first round samples two paths (mixed: one CoT
and one PoT); when their answers agree the question is done and the other paths are saved.
Path j of a question's style is drawn with seed derive_seed(derive_seed(seed, id, style), j), the
scheme `mdlite eval` uses (id: the question's id, by default its text).

`solve_questions` runs its steps, which `mdlite serve` shares: `Question` (a question's paths so far),
`next_round` (what it lacks), `sample_round` (one engine call for many questions' rounds) and
`finish` (the vote). `run(cfg, questions)` writes solutions.jsonl (one `Solution` per line) and
run.json to output_dir when it is set.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mdlite import MdliteError, check_output_dir
from mdlite.answers import extract_answer
from mdlite.config import SolveConfig, to_dict
from mdlite.engine import Engine, derive_seed
from mdlite.prompts import STOP_AFTER, STUDENT_STOP, TEACHER_STOP, extract_program, student_prompt, teacher_prompt
from mdlite.runinfo import package_versions
from mdlite.vote import Vote, agree, vote

log = logging.getLogger(__name__)
RECORDED_PACKAGES = ("llama-cpp-python", "numpy", "sympy")  # versions written to run.json

PROMPT_STYLES = ("student", "few-shot")


@dataclass(frozen=True)
class PathResult:
    """One sampled path: its text, how it ended, its answer and (PoT) its program and how it ran."""

    style: str  # "cot" or "pot"
    index: int  # path number within the question's style (seeded by it)
    text: str
    tokens: int
    finish_reason: str  # "stop" or "length"
    answer: float | None
    program: str | None = None  # PoT: the extracted program, None when there was none
    program_error: str | None = None  # PoT: "no program", "timeout", "NameError: ...", None when it answered
    program_stdout: str | None = None  # PoT: what the program printed


@dataclass(frozen=True)
class Solution:
    """A question's voted answer, the vote, every path, and the paths early stopping saved."""

    id: str
    question: str
    answer: float | None
    vote: Vote
    paths: tuple[PathResult, ...]
    paths_saved: int
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def run(cfg: SolveConfig, questions: Sequence[str]) -> list[Solution]:
    """Load cfg.model once, solve `questions`, and write solutions.jsonl + run.json if cfg.output_dir."""
    if not questions:
        raise MdliteError("no questions given; pass QUESTION, '-' for stdin, or --file FILE (one per line)")
    if cfg.output_dir:
        check_output_dir(cfg.output_dir, "--output-dir")
    started = time.time()
    with Engine(cfg.model, n_ctx=cfg.num_ctx, n_gpu_layers=cfg.n_gpu_layers, n_threads=cfg.n_threads,
                prefix_cache=cfg.prefix_cache) as engine:
        solutions = solve_questions(
            engine, questions, mode=cfg.mode, paths=cfg.paths, prompt_style=cfg.prompt_style,
            temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, max_tokens=cfg.max_tokens, seed=cfg.seed,
            early_stop=cfg.early_stop, cot_weight=cfg.cot_weight, pot_weight=cfg.pot_weight,
            batch_paths=cfg.batch_paths, program_timeout=cfg.program_timeout_s,
            program_memory_mb=cfg.program_memory_mb, progress=len(questions) > 1)
        model_file = engine.path
    if cfg.output_dir:
        output_dir = Path(cfg.output_dir)
        with (output_dir / "solutions.jsonl").open("w", encoding="utf-8") as out:
            for solution in solutions:
                out.write(json.dumps(solution.to_dict()) + "\n")
        record = {"command": "solve", "config": to_dict(cfg), "seed": cfg.seed,
                  "versions": package_versions(RECORDED_PACKAGES),
                  "inputs": {"model": {"path": str(model_file), "size": model_file.stat().st_size},
                             "questions_sha256": hashlib.sha256("\n".join(questions).encode()).hexdigest(),
                             "questions": len(questions)},
                  "wall_s": round(time.time() - started, 3)}
        (output_dir / "run.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return solutions


def solve_questions(engine: Engine, questions: Sequence[str], *, mode: str, paths: int,
                    ids: Sequence[str] | None = None,
                    prompt_style: str = "student", temperature: float = 0.7, top_p: float = 1.0, top_k: int = 0,
                    max_tokens: int = 256, seed: int = 0, early_stop: bool = False, cot_weight: float = 1.0,
                    pot_weight: float = 1.0, batch_paths: int = 16,
                    program_timeout: float = 2.0, program_memory_mb: int = 256,
                    progress: bool = False) -> list[Solution]:
    """Sample, run, extract and vote for every question (see the module docstring); in question order.

    `ids` name the questions for seeding (default: their text). `batch_paths` bounds the paths decoded
    together: questions are grouped so that one engine call holds at most that many (at least one
    question per call).
    """
    if mode not in ("cot", "pot", "mixed", "hybrid"):
        raise MdliteError(f"mode must be cot, pot, mixed or hybrid, not {mode!r} (flag --mode)")
    if prompt_style not in PROMPT_STYLES:
        raise MdliteError(f"prompt_style must be student or few-shot, not {prompt_style!r} (flag --prompt-style)")
    if paths < 1:
        raise MdliteError("paths must be >= 1 (flag --paths)")
    ids = [str(i) for i in ids] if ids is not None else list(questions)
    plan = _plan(mode, paths)
    if temperature <= 0 and max(plan.values()) > 1:
        log.warning("temperature 0: the %d paths of a style are one greedy path repeated; sample with "
                    "--temperature > 0, or use --paths 2 (mixed) for one greedy path per style", max(plan.values()))
    states = [Question(question, key, seed) for question, key in zip(questions, ids, strict=True)]
    options = {"prompt_style": prompt_style, "temperature": temperature, "top_p": top_p, "top_k": top_k,
               "max_tokens": max_tokens, "program_timeout": program_timeout, "program_memory_mb": program_memory_mb}
    per_call = max(1, batch_paths // paths)
    solutions = []
    with tqdm(total=len(questions), desc="solve", unit="question", disable=not progress) as bar:
        for start in range(0, len(states), per_call):
            group = states[start:start + per_call]
            while todo := [(state, targets) for state in group
                           if (targets := next_round(state.found, mode=mode, paths=paths, early_stop=early_stop))]:
                sample_round(engine, todo, **options)
            solutions += [finish(state, mode=mode, paths=paths, cot_weight=cot_weight, pot_weight=pot_weight)
                          for state in group]
            bar.update(len(group))
    return solutions


@dataclass
class Question:
    """A question being solved: its text, the id and base seed its paths are seeded with, its paths so far."""

    question: str
    id: str
    seed: int = 0
    found: list[PathResult] = field(default_factory=list)


def next_round(found: Sequence[PathResult], *, mode: str, paths: int,
               early_stop: bool = False) -> dict[str, int] | None:
    """The paths per style a question should have after its next round, given the paths `found` so far;
    None when it is done (the rounds of the module docstring: early stop, then all paths, then hybrid's
    CoT fallback)."""
    have = {style: sum(p.style == style for p in found) for style in ("cot", "pot")}
    if early_stop and paths > 2:
        first = _plan(mode, 2)
        if any(have[style] < count for style, count in first.items()):
            return first
        if len(found) == sum(first.values()) and agree([p.answer for p in found]):
            return None
    plan = _plan(mode, paths)
    if any(have[style] < count for style, count in plan.items()):
        return plan
    if mode == "hybrid" and have["cot"] < paths and all(p.answer is None for p in found if p.style == "pot"):
        return {"cot": paths}
    return None


def sample_round(engine: Engine, rounds: Sequence[tuple[Question, dict[str, int]]], *, prompt_style: str,
                 temperature: float, top_p: float, top_k: int, max_tokens: int, program_timeout: float,
                 program_memory_mb: int) -> None:
    """Sample, in one engine call, what each question lacks of its target paths per style (path j of a
    style seeded as the module docstring says, whatever else shares the call); then extract the new CoT
    answers and run the new PoT programs, appending the new paths to each question's `found`."""
    from mdlite.sandbox import run_programs

    calls = []  # (question, style, new paths, index of the first new path)
    for state, targets in rounds:
        for style, target in targets.items():
            done = sum(p.style == style for p in state.found)
            if target > done:
                calls.append((state, style, target - done, done))
    if not calls:
        return
    prompts = [prompt_for(state.question, style, prompt_style=prompt_style) for state, style, _, _ in calls]
    generations = engine.sample(
        [prompt for prompt, _ in prompts], n=[count for _, _, count, _ in calls],
        temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens,
        stop=[stop for _, stop in prompts], stop_after=[STOP_AFTER[style] for _, style, _, _ in calls],
        first_path=[first for *_, first in calls],
        seed=[derive_seed(state.seed, state.id, style) for state, style, _, _ in calls])
    programs = []  # (question, position in its found)
    for (state, style, _, first), paths in zip(calls, generations, strict=True):
        for j, generation in enumerate(paths):
            path = PathResult(style=style, index=first + j, text=generation.text, tokens=generation.tokens,
                              finish_reason=generation.finish_reason, answer=None)
            if style == "cot":
                answer = extract_answer(generation.text, style="cot", strict=generation.finish_reason == "length")
                path = dataclasses.replace(path, answer=answer)
            else:
                program = extract_program(generation.text)
                path = dataclasses.replace(path, program=program, program_error=None if program else "no program")
                if program:
                    programs.append((state, len(state.found)))
            state.found.append(path)
    codes = [state.found[at].program or "" for state, at in programs]
    results = run_programs(codes, timeout=program_timeout, memory_mb=program_memory_mb) if codes else []
    for (state, at), result in zip(programs, results, strict=True):
        state.found[at] = dataclasses.replace(state.found[at], answer=result.value if result.ok else None,
                                              program_error=result.error, program_stdout=result.stdout)


def finish(state: Question, *, mode: str, paths: int, cot_weight: float = 1.0, pot_weight: float = 1.0) -> Solution:
    """The question's Solution: the vote of `mode` over its paths' answers."""
    cot = [p.answer for p in state.found if p.style == "cot"]
    pot = [p.answer for p in state.found if p.style == "pot"]
    result = vote(mode, cot=cot, pot=pot, cot_weight=cot_weight, pot_weight=pot_weight)
    saved = paths - len(pot) if mode == "hybrid" else paths - len(state.found)
    return Solution(id=state.id, question=state.question, answer=result.answer, vote=result,
                    paths=tuple(state.found), paths_saved=saved, tokens=sum(p.tokens for p in state.found))


def prompt_for(question: str, style: str, *, prompt_style: str) -> tuple[str, list[str]]:
    """The prompt and stop strings of one `style` path: the student template or the few-shot prompts."""
    if prompt_style == "student":
        return student_prompt(question, style=style), list(STUDENT_STOP)
    return teacher_prompt(question, style=style), list(TEACHER_STOP[style])


def _plan(mode: str, paths: int) -> dict[str, int]:
    """Paths per style for `mode` (hybrid: its PoT round; the CoT fallback is planned separately)."""
    if mode == "mixed":
        return {"cot": paths // 2, "pot": paths - paths // 2}
    return {"cot": paths} if mode == "cot" else {"pot": paths}
