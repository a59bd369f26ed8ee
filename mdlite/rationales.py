"""`mdlite teach`: CoT and PoT rationales from a local teacher, checked, deduplicated, resumable.

    mdlite teach --teacher ollama:qwen2.5:32b --data svamp:train --output-dir runs/teach
    mdlite teach --teacher openai:http://127.0.0.1:8080/v1 --data problems.jsonl --concurrency 4
    mdlite teach --teacher llamacpp:qwen2.5-coder-0.5b-instruct --data svamp:tiny --n-cot 2 --n-pot 2

For each problem the teacher (mdlite.teacher) writes `n_cot` CoT and `n_pot` PoT samples from the
few-shot prompts of mdlite.prompts. A CoT sample is kept when its stated answer matches the gold
answer and some reasoning comes before the answer is first stated (its text then ends with "The answer
is N."); a PoT sample when its program, run in the
sandbox, returns the gold answer (its text is the program). A kept sample whose normalised text equals
an earlier kept sample of the same problem and style is rejected as "duplicate".

Outputs in `output_dir`:
- rationales.jsonl: one JSON record per completed sample, kept or not, appended and flushed as samples
  complete: key ("<problem_id>/<style>/<sample>"), problem_id, problem_hash (mdlite.data.problem_hash of
  question and gold), style ("cot" | "pot"), sample, question,
  gold, text (CoT: the rationale ending "The answer is N."; PoT: the program, defining solution(),
  no fences), answer (float | null), kept, reason (null | "wrong answer" | "no answer" |
  "no reasoning" (CoT: the answer stated before any reasoning) | "no program" | "program error: ..." |
  "duplicate"), teacher (the spec), model_digest, prompt_hash, options
  (temperature, max_tokens, seed), tokens, latency_s. `mdlite train` uses the kept records. The same
  command again skips the keys it finds; a torn last line from a killed run is dropped; records from
  another teacher, other prompts (prompt_hash per style), other sampling options or of a problem whose
  question or gold changed (problem_hash differs or is missing) move to rationales.replaced.jsonl and
  are redone.
- teach_stats.json: per style samples, kept, teacher accuracy, reasons, tokens/s per request (requests
  sampled together each count their whole latency; the session's tokens/s is the throughput); this session's
  requests/s and its failures (requests that failed after all retries: that problem's remaining
  samples of the style are skipped, and the next run tries them again).
- run.json: resolved config, package versions, input hashes, the teacher's model digest.

Samples of one (problem, style) are drawn in order, so "duplicate" never depends on timing, and sample
i uses the seed `sample_seed(seed, problem id, style, i)`: an interrupted and resumed run writes the
same records as an uninterrupted one wherever the teacher gives a seed the same text whatever else it
decodes: the in-process teacher on an x86-64 CPU (`n_gpu_layers 0` on a GPU build; see mdlite/engine.py
for where batch invariance holds), a server that is deterministic per seed. Ctrl-C stops at once; every
finished sample is already saved.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from mdlite import MdliteError, check_output_dir
from mdlite.answers import answers_match, extract_answer, format_number
from mdlite.config import TeachConfig, to_dict
from mdlite.data import Problem, load_problems, problem_hash
from mdlite.prompts import STOP_AFTER, STYLES, TEACHER_STOP, extract_program, prompt_hash, teacher_prompt
from mdlite.runinfo import package_versions, write_json
from mdlite.teacher import Completion, TeacherError, TeacherPool, make_pool

log = logging.getLogger(__name__)
RECORDED_PACKAGES = ("ollama", "httpx", "llama-cpp-python")  # versions written to run.json

RATIONALES = "rationales.jsonl"
REPLACED = "rationales.replaced.jsonl"
_ANSWER_SENTENCE = re.compile(r"(?:\b(?:so|thus|therefore|hence),?\s+)?\bthe (?:final )?answer is\b", re.IGNORECASE)
_ANSWER_TAIL = re.compile(r"[\s:*$€£−-]*\d[\d,./%]*[^\d\n.!?]*[.!?]?[\s*]*")  # " $7.00 in all." after the above
# Where a rationale first states an answer: everything before it is its reasoning.
_FIRST_ANSWER = re.compile(
    r"####|\\boxed\{|(?:\b(?:so|thus|therefore|hence),?\s+)?(?:\bthe\s+)?(?:\bfinal\s+)?\banswer\b", re.IGNORECASE)


@dataclass
class Session:
    """What this run did (teach_stats.json "session")."""

    requests: int = 0
    kept: int = 0
    tokens: int = 0
    wall_s: float = 0.0
    interrupted: bool = False
    model_digest: str | None = None
    failures: list[dict[str, str]] = field(default_factory=list)


def run(cfg: TeachConfig) -> dict[str, Any]:
    """Sample, check, dedupe and append rationales for `cfg.data`; returns the output paths and stats."""
    problems = load_problems(cfg.data, data_dir=cfg.data_dir or None, limit=cfg.limit or None)
    output_dir = check_output_dir(cfg.output_dir, "--output-dir")
    path = output_dir / RATIONALES
    session = Session()
    started = time.time()
    with _exclusive(output_dir):
        done = _load_current(path, cfg, {p.id: problem_hash(p) for p in problems})
        try:
            with path.open("a", encoding="utf-8") as sink:
                asyncio.run(_teach(problems, done, cfg, sink, session))
        except KeyboardInterrupt:
            session.interrupted = True
            raise
        finally:
            session.wall_s = time.time() - started
            stats = teach_stats(done.values(), session)
            write_json(output_dir / "teach_stats.json", stats)
            write_json(output_dir / "run.json", _run_record(cfg, problems, session, started))
    if session.failures and not session.requests:
        raise MdliteError(f"the teacher {cfg.teacher} answered none of {len(session.failures)} requests "
                          f"({session.failures[0]['error']}); check that it is running and serves the model "
                          "(flags --teacher, --endpoints), then run the same command again")
    return {"rationales": path, "teach_stats": output_dir / "teach_stats.json", "run": output_dir / "run.json",
            "stats": stats}


def sample_seed(seed: int, problem_id: str, style: str, sample: int) -> int:
    """The sampling seed of sample `sample` of (`problem_id`, `style`): 31 bits from a hash, so it does not
    depend on the order samples are drawn in."""
    digest = hashlib.sha256(f"{seed}/{problem_id}/{style}/{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def sample_options(cfg: TeachConfig, problem_id: str, style: str, sample: int) -> dict[str, Any]:
    """The sampling options recorded with (and checked against, on resume) one sample."""
    return {"temperature": cfg.temperature, "max_tokens": cfg.max_tokens,
            "seed": sample_seed(cfg.seed, problem_id, style, sample)}


def record_key(problem_id: str, style: str, sample: int) -> str:
    return f"{problem_id}/{style}/{sample}"


def normalize_rationale(text: str, *, style: str) -> str:
    """The text duplicates are compared by: lower case, words and symbols only (PoT: comments dropped)."""
    if style == "pot":
        text = re.sub(r"#[^\n]*", "", text)
    return " ".join(re.findall(r"\w+|[^\w\s]", text.lower()))


def with_answer_sentence(text: str, answer: float) -> str | None:
    """`text` ending with "The answer is N.", or None when it states an answer before any reasoning ("The
    answer is 7. Explanation: 3 + 4 = 7.", "#### 7"). A last sentence "the answer is N <words>." is
    replaced; otherwise nothing is cut and the sentence is appended."""
    first = _FIRST_ANSWER.search(text)
    if not re.search(r"\w", text[: first.start()] if first else text):
        return None
    matches = list(_ANSWER_SENTENCE.finditer(text))
    if matches and _ANSWER_TAIL.fullmatch(text, matches[-1].end()):
        text = text[: matches[-1].start()].rstrip()
    return f"{text} The answer is {format_number(answer)}."


def read_rationales(path: Path) -> list[dict[str, Any]]:
    """The records of a rationales.jsonl; a torn last line is left out, a bad line elsewhere is an error."""
    return _read_records(path)[0]


def teach_stats(records: Iterable[dict[str, Any]], session: Session) -> dict[str, Any]:
    """Per style: samples, kept, teacher accuracy (answer right, duplicates included), reasons, tokens/s;
    plus this session's throughput and failures."""
    by_style: dict[str, list[dict[str, Any]]] = {style: [] for style in STYLES}
    for record in records:
        by_style[record["style"]].append(record)
    styles = {}
    for style, group in by_style.items():
        right = sum(r["kept"] or r["reason"] == "duplicate" for r in group)
        latency = sum(r["latency_s"] for r in group)
        tokens = sum(r["tokens"] for r in group)
        styles[style] = {
            "samples": len(group), "kept": sum(r["kept"] for r in group),
            "teacher_accuracy": right / len(group) if group else None,
            "problems_with_kept": len({r["problem_id"] for r in group if r["kept"]}),
            "reasons": dict(Counter((r["reason"] or "kept").split(":")[0] for r in group)),
            "tokens": tokens, "tokens_per_s": tokens / latency if latency else None,
        }
    wall = session.wall_s
    return {"styles": styles, "session": {
        "requests": session.requests, "kept": session.kept, "tokens": session.tokens, "wall_s": round(wall, 3),
        "requests_per_s": session.requests / wall if wall else None,
        "tokens_per_s": session.tokens / wall if wall else None,
        "interrupted": session.interrupted, "failed": len(session.failures)}, "failures": session.failures}


# ---- the asynchronous part ----------------------------------------------------------------------


async def _teach(problems: list[Problem], done: dict[str, dict[str, Any]], cfg: TeachConfig, sink: IO[str],
                 session: Session) -> None:
    pool = make_pool(cfg.teacher, endpoints=cfg.endpoints, concurrency=cfg.concurrency, retries=cfg.retries,
                     backoff_s=cfg.backoff_s, num_ctx=cfg.num_ctx, keep_alive=cfg.keep_alive,
                     timeout_s=cfg.timeout_s, n_threads=cfg.n_threads, n_gpu_layers=cfg.n_gpu_layers)
    try:
        session.model_digest = await pool.check()
        counts = {"cot": cfg.n_cot, "pot": cfg.n_pot}
        # Style-major order: a one-slot server reuses the cached few-shot prefix from one request to the next.
        groups = [(p, style) for style in STYLES for p in problems
                  if any(record_key(p.id, style, i) not in done for i in range(counts[style]))]
        todo = sum(record_key(p.id, s, i) not in done for p, s in groups for i in range(counts[s]))
        log.info("teach: %d samples to draw (%d already done) with %d request slots", todo, len(done), pool.slots)
        with tqdm(total=todo, desc="teach", unit="sample", disable=None) as bar:
            jobs = iter(groups)

            async def worker() -> None:
                for problem, style in jobs:
                    await _teach_group(problem, style, counts[style], pool, done, cfg, sink, session, bar)

            # Two workers per slot: one checks (the PoT sandbox) while the other's request is in flight.
            tasks = [asyncio.create_task(worker()) for _ in range(2 * pool.slots)]
            try:
                await asyncio.gather(*tasks)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await pool.aclose()
    for failure in session.failures:
        log.warning("failed: %s: %s", failure["key"], failure["error"])


async def _teach_group(problem: Problem, style: str, count: int, pool: TeacherPool, done: dict[str, dict[str, Any]],
                       cfg: TeachConfig, sink: IO[str], session: Session, bar: tqdm) -> None:
    """Draw the missing samples of (problem, style) in order; on a failed request record it and stop. (An
    in-process teacher still batches: the requests of all groups in flight share its engine.)"""
    prompt = teacher_prompt(problem.question, style=style)
    keys = [record_key(problem.id, style, i) for i in range(count)]
    for i, key in enumerate(keys):
        if key in done:
            continue
        options = sample_options(cfg, problem.id, style, i)
        try:
            [completion] = await pool.complete(prompt, temperature=cfg.temperature, max_tokens=cfg.max_tokens,
                                               stop=TEACHER_STOP[style], seed=options["seed"],
                                               stop_after=STOP_AFTER[style])
        except TeacherError as error:
            session.failures.append({"key": key, "error": str(error)})
            bar.update(sum(k not in done for k in keys[i:]))
            bar.set_postfix(kept=session.kept, failed=len(session.failures))
            return
        text, answer, reason = await _check(problem, style, completion, cfg)
        earlier = {normalize_rationale(done[k]["text"], style=style) for k in keys[:i] if done.get(k, {}).get("kept")}
        if reason is None and normalize_rationale(text, style=style) in earlier:
            reason = "duplicate"
        record = {
            "key": key, "problem_id": problem.id, "problem_hash": problem_hash(problem), "style": style, "sample": i,
            "question": problem.question, "gold": problem.answer, "text": text, "answer": answer,
            "kept": reason is None, "reason": reason,
            "teacher": cfg.teacher, "model_digest": session.model_digest, "prompt_hash": prompt_hash(style),
            "options": options, "tokens": completion.tokens, "latency_s": round(completion.latency_s, 4),
        }
        sink.write(json.dumps(record, ensure_ascii=False) + "\n")
        sink.flush()
        done[key] = record
        session.requests += 1
        session.tokens += completion.tokens
        session.kept += record["kept"]
        bar.update(1)
        bar.set_postfix(kept=session.kept, failed=len(session.failures))


async def _check(problem: Problem, style: str, completion: Completion,
                 cfg: TeachConfig) -> tuple[str, float | None, str | None]:
    """(text, answer, reason) of one sample; reason None when the sample is kept."""
    if style == "cot":
        text = completion.text.strip()
        # A rationale cut off by max_tokens counts only with an explicit answer statement.
        answer = extract_answer(text, style="cot", strict=completion.finish_reason == "length")
        if answer is None:
            return text, None, "no answer"
        if not answers_match(answer, problem.answer):
            return text, answer, "wrong answer"
        rewritten = with_answer_sentence(text, answer)
        return (text, answer, "no reasoning") if rewritten is None else (rewritten, answer, None)
    from mdlite.sandbox import run_programs

    program = extract_program(completion.text)
    if program is None:
        return completion.text.strip(), None, "no program"
    [result] = await asyncio.to_thread(run_programs, [program], timeout=cfg.program_timeout_s,
                                       memory_mb=cfg.program_memory_mb)
    if not result.ok:
        return program, None, f"program error: {(result.error or 'failed').splitlines()[0][:80]}"
    if not answers_match(result.value, problem.answer):
        return program, result.value, "wrong answer"
    return program, result.value, None


# ---- the records file ---------------------------------------------------------------------------


def _load_current(path: Path, cfg: TeachConfig, hashes: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The records of `path` made with `cfg`'s teacher, prompts and options, for the problems as `hashes`
    (id -> problem_hash) has them, by key. A torn last line is cut off; other records move to
    rationales.replaced.jsonl (those of problems not in `hashes` stay)."""
    records, good_bytes = _read_records(path)
    if path.exists() and path.stat().st_size > good_bytes:
        log.warning("%s: dropping a torn last line (a run was killed mid-write)", path)
        with path.open("r+b") as handle:
            handle.truncate(good_bytes)
    current: dict[str, dict[str, Any]] = {}
    stale = []
    for record in records:
        if not _is_current(record, cfg, hashes):
            stale.append(record)
            continue
        if record["key"] in current:  # only a hand-edited file repeats a key: the last one counts
            stale.append(current.pop(record["key"]))
        current[record["key"]] = record
    if stale:
        log.warning("%s: %d records from another teacher, other prompts, other options or a changed question or "
                    "gold answer move to %s and are redone", path, len(stale), REPLACED)
        with (path.parent / REPLACED).open("a", encoding="utf-8") as replaced:
            replaced.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in stale)
        partial = path.with_name(path.name + ".partial")
        partial.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in current.values()), "utf-8")
        os.replace(partial, path)
    if current:
        log.info("%s: resuming with %d finished samples", path, len(current))
    return current


def _is_current(record: dict[str, Any], cfg: TeachConfig, hashes: dict[str, str]) -> bool:
    style, pid = record.get("style"), record["problem_id"]
    return (style in STYLES and record.get("teacher") == cfg.teacher
            and (pid not in hashes or record.get("problem_hash") == hashes[pid])
            and record.get("prompt_hash") == prompt_hash(style)
            and record.get("options") == sample_options(cfg, pid, style, record["sample"]))


def _read_records(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The records of `path` and the length in bytes of its complete lines (a torn last line excluded)."""
    if not path.exists():
        return [], 0
    data = path.read_bytes()
    lines = data.split(b"\n")
    records, good = [], 0
    for number, line in enumerate(lines[:-1], 1):  # lines[-1]: after the last newline, empty unless torn
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not {"key", "problem_id", "style", "sample"} <= record.keys():
                raise ValueError("not a rationale record")
        except ValueError as error:
            if number == len(lines) - 1 and not lines[-1]:
                break  # the last line is complete but unreadable: treat as torn
            raise MdliteError(f"{path}:{number}: {error}; delete that line (or the file) and rerun") from None
        records.append(record)
        good += len(line) + 1
    return records, good


@contextmanager
def _exclusive(output_dir: Path) -> Iterator[None]:
    """Hold a lock on `output_dir` so that two `mdlite teach` runs never append to the same file."""
    with (output_dir / ".teach.lock").open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MdliteError(f"{output_dir}: another `mdlite teach` is writing there; wait for it to finish "
                              "or pick another --output-dir") from None
        yield


def _run_record(cfg: TeachConfig, problems: list[Problem], session: Session, started: float) -> dict[str, Any]:
    problems_text = "\n".join(p.to_json() for p in problems)
    return {
        "stage": "teach", "config": to_dict(cfg), "seed": cfg.seed, "versions": package_versions(RECORDED_PACKAGES),
        "inputs": {"data": cfg.data, "problems": len(problems),
                   "problems_sha256": hashlib.sha256(problems_text.encode()).hexdigest(),
                   "prompt_hash": {style: prompt_hash(style) for style in STYLES}},
        "teacher": {"spec": cfg.teacher, "model_digest": session.model_digest, "endpoints": cfg.endpoints},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "wall_s": round(session.wall_s, 3), "interrupted": session.interrupted,
    }

