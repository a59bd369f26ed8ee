"""Solve questions with many CoT and PoT paths from one GGUF and vote on the answer.

    mdlite solve "Tom has 3 apples and buys 5 more. How many apples?" --model student.gguf --mode mixed --paths 10
    mdlite solve --file questions.txt --model qwen2.5-coder-0.5b-instruct --prompt-style few-shot --json

For each question: prompts (`student_prompt` + STUDENT_STOP, or the teacher's few-shot prompts with
`--prompt-style few-shot`) -> `Engine.submit` (the engine batches every question's paths continuously; the
few-shot exemplars evaluated once by the prefix cache; prompts.STOP_AFTER ends a CoT path after its answer
sentence, the one `extract_answer` then reads, and a PoT path after the closing fence of a program that
parses, the one `extract_program` then returns) -> CoT answers with `extract_answer`, PoT programs with
`extract_program` and the sandbox -> `vote.vote`.

Paths per style: cot and pot modes give all `paths` to their style; mixed gives ceil(paths/2) to PoT
and the rest to CoT; hybrid samples `paths` PoT paths and, for questions where every program
failed, `paths` CoT paths. With early stopping the first round samples two paths (mixed: one CoT
and one PoT); when their answers agree the question is done and the other paths are saved.
Path j of a question's style is drawn with seed derive_seed(derive_seed(seed, id, style), j), the
scheme `mdlite eval` uses (id: the question's id, by default its text), so its text does not depend on
what else the engine decodes.

Steps: a `Question` (its text, seed, mode, paths, sampling, and its paths so far); `submit_round` (what
it lacks, as engine requests), `take_round` + `run_new_programs` (the round's answers), `finish` (the
vote). Two drivers run them: `solve_each` for many questions from one thread (solve, eval), keeping the
engine's sequences full, and `solve_one`, a coroutine per question (`mdlite serve`). `run(cfg,
questions)` writes solutions.jsonl (one `Solution` per line) and run.json to output_dir when it is set.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent import futures
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mdlite import MdliteError, check_output_dir
from mdlite.answers import extract_answer
from mdlite.config import SolveConfig, to_dict
from mdlite.engine import Engine, Generation, derive_seed
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
    finish_reason: str  # "stop", "length", or "error" (not sampled: see `error`)
    answer: float | None
    program: str | None = None  # PoT: the extracted program, None when there was none
    program_error: str | None = None  # PoT: "no program", "timeout", "NameError: ...", None when it answered
    program_stdout: str | None = None  # PoT: what the program printed
    error: str | None = None  # why the path was not sampled (its prompt does not fit the context, ...)


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
    with Engine(cfg.model, n_ctx=cfg.num_ctx, max_paths=cfg.batch_paths, n_gpu_layers=cfg.n_gpu_layers,
                n_threads=cfg.n_threads, prefix_cache=cfg.prefix_cache) as engine:
        solutions = solve_questions(
            engine, questions, mode=cfg.mode, paths=cfg.paths, prompt_style=cfg.prompt_style,
            temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, max_tokens=cfg.max_tokens, seed=cfg.seed,
            early_stop=cfg.early_stop, cot_weight=cfg.cot_weight, pot_weight=cfg.pot_weight,
            program_timeout=cfg.program_timeout_s,
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
                    pot_weight: float = 1.0, program_timeout: float = 2.0, program_memory_mb: int = 256,
                    progress: bool = False) -> list[Solution]:
    """Sample, run, extract and vote for every question (see the module docstring); in question order.
    `ids` name the questions for seeding (default: their text)."""
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
    states = [Question(question, key, seed, mode=mode, paths=paths, prompt_style=prompt_style,
                       temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens,
                       early_stop=early_stop, cot_weight=cot_weight, pot_weight=pot_weight)
              for question, key in zip(questions, ids, strict=True)]
    solutions: list[Solution | None] = [None] * len(states)
    with tqdm(total=len(questions), desc="solve", unit="question", disable=not progress) as bar:
        for i, solution in solve_each(engine, states, program_timeout=program_timeout,
                                      program_memory_mb=program_memory_mb):
            solutions[i] = solution
            bar.update()
    return solutions  # type: ignore[return-value]


@dataclass
class Question:
    """A question being solved: its text, the id and base seed its paths are seeded with, how it is solved
    (mode, paths, prompts, sampling, vote weights) and its paths so far."""

    question: str
    id: str
    seed: int = 0
    mode: str = "mixed"
    paths: int = 10
    prompt_style: str = "student"
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 256
    early_stop: bool = False
    cot_weight: float = 1.0
    pot_weight: float = 1.0
    found: list[PathResult] = field(default_factory=list)


def solve_each(engine: Engine, questions: Sequence[Question], *, program_timeout: float = 2.0,
               program_memory_mb: int = 256) -> Iterator[tuple[int, Solution]]:
    """(position, Solution) of every question, as each is solved: rounds are submitted while fewer than
    twice the engine's sequences are in flight, so a finished path's place is taken at once; the programs of
    the rounds that finish together run in the sandbox while the engine decodes the others. A round the engine
    refuses (a prompt over n_ctx) gives its question failed paths, not the run an error."""
    waiting = deque(range(len(questions)))
    rounds: dict[int, list[Call]] = {}
    try:
        while waiting or rounds:
            while waiting and sum(call.n for calls in rounds.values() for call in calls) < 2 * engine.max_paths:
                i = waiting.popleft()
                if calls := _submit_or_fail(engine, questions[i]):
                    rounds[i] = calls
                else:
                    yield i, finish(questions[i])
            if not rounds:
                continue
            futures.wait([call.future for calls in rounds.values() for call in calls],
                         return_when=futures.FIRST_COMPLETED)
            done = [i for i, calls in rounds.items() if all(call.future.done() for call in calls)]
            run_new_programs([(questions[i], take_round(questions[i], rounds.pop(i))) for i in done],
                             program_timeout=program_timeout, program_memory_mb=program_memory_mb)
            for i in done:
                if calls := _submit_or_fail(engine, questions[i]):
                    rounds[i] = calls
                else:
                    yield i, finish(questions[i])
    finally:
        for calls in rounds.values():
            for call in calls:
                call.future.cancel()


async def solve_one(engine: Engine, question: Question, *, program_timeout: float = 2.0,
                    program_memory_mb: int = 256) -> Solution:
    """`question`'s Solution, its rounds awaited on the engine (mdlite serve: one coroutine per request).
    Cancelling it drops its paths at the engine's next step."""
    while calls := submit_round(engine, question):
        try:
            await asyncio.gather(*(asyncio.wrap_future(call.future) for call in calls))
        finally:
            for call in calls:
                call.future.cancel()
        found = take_round(question, calls)
        await asyncio.to_thread(run_new_programs, [(question, found)], program_timeout=program_timeout,
                                program_memory_mb=program_memory_mb)
    return finish(question)


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


@dataclass(frozen=True)
class Call:
    """One engine request of a round: `n` new paths of `style`, numbered from `first`."""

    style: str
    first: int
    n: int
    future: Future[list[Generation]]


def submit_round(engine: Engine, question: Question) -> list[Call]:
    """Submit what `question` lacks of its next round (one engine request per style; path j of a style
    seeded as the module docstring says, whatever else shares the engine); [] when it is done."""
    targets = next_round(question.found, mode=question.mode, paths=question.paths, early_stop=question.early_stop)
    calls: list[Call] = []
    try:
        for style, target in (targets or {}).items():
            prompt, stop = prompt_for(question.question, style, prompt_style=question.prompt_style)
            done = sum(p.style == style for p in question.found)
            for first in range(done, target, engine.max_paths):  # requests of at most max_paths paths
                n = min(engine.max_paths, target - first)
                future = engine.submit(prompt, n=n, temperature=question.temperature, top_p=question.top_p,
                                       top_k=question.top_k, max_tokens=question.max_tokens, stop=stop,
                                       stop_after=STOP_AFTER[style],
                                       seed=derive_seed(question.seed, question.id, style), first_path=first)
                calls.append(Call(style, first, n, future))
    except BaseException:  # a request refused (a prompt over n_ctx): the round's others do not decode on
        for call in calls:
            call.future.cancel()
        raise
    return calls


def _submit_or_fail(engine: Engine, question: Question) -> list[Call]:
    """`submit_round`; while the engine refuses a round (MdliteError: its prompt does not fit the context, ...),
    that round's paths are recorded as failed, with the reason, and the next round is tried."""
    while True:
        try:
            return submit_round(engine, question)
        except MdliteError as error:
            if not engine.alive:  # the engine's failure, not the question's
                raise
            log.warning("question %s: %s", question.id[:60], error)
            targets = next_round(question.found, mode=question.mode, paths=question.paths,
                                 early_stop=question.early_stop) or {}
            for style, target in targets.items():
                question.found += [PathResult(style=style, index=j, text="", tokens=0, finish_reason="error",
                                              answer=None, error=str(error))
                                   for j in range(sum(p.style == style for p in question.found), target)]


def take_round(question: Question, calls: Sequence[Call]) -> list[int]:
    """Append a finished round's paths to `question.found` (CoT answers extracted, PoT programs extracted);
    the positions in `found` of the programs still to run."""
    programs = []
    for call in calls:
        for j, generation in enumerate(call.future.result()):
            path = PathResult(style=call.style, index=call.first + j, text=generation.text, tokens=generation.tokens,
                              finish_reason=generation.finish_reason, answer=None)
            if call.style == "cot":
                answer = extract_answer(generation.text, style="cot", strict=generation.finish_reason == "length")
                path = dataclasses.replace(path, answer=answer)
            else:
                program = extract_program(generation.text)
                path = dataclasses.replace(path, program=program, program_error=None if program else "no program")
                if program:
                    programs.append(len(question.found))
            question.found.append(path)
    return programs


def run_new_programs(items: Sequence[tuple[Question, list[int]]], *, program_timeout: float,
                     program_memory_mb: int) -> None:
    """Run the programs at the given positions of each question's `found` in the sandbox (one call for all)
    and record their answers, errors and output."""
    from mdlite.sandbox import run_programs

    where = [(question, at) for question, positions in items for at in positions]
    if not where:
        return
    results = run_programs([question.found[at].program or "" for question, at in where], timeout=program_timeout,
                           memory_mb=program_memory_mb)
    for (question, at), result in zip(where, results, strict=True):
        question.found[at] = dataclasses.replace(question.found[at], answer=result.value if result.ok else None,
                                                 program_error=result.error, program_stdout=result.stdout)


def finish(state: Question) -> Solution:
    """The question's Solution: the vote of its mode over its paths' answers."""
    cot = [p.answer for p in state.found if p.style == "cot"]
    pot = [p.answer for p in state.found if p.style == "pot"]
    result = vote(state.mode, cot=cot, pot=pot, cot_weight=state.cot_weight, pot_weight=state.pot_weight)
    saved = state.paths - len(pot) if state.mode == "hybrid" else state.paths - len(state.found)
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
