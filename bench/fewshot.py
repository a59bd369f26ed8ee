"""Few-shot speed: mdlite's prefix cache, continuous batching and in-process teacher against their baselines.

    flock /tmp/mdlite-cpu.lock python bench/fewshot.py [--parts eval,paths,teacher] [--problems 40]
        [--teacher-problems 48] [--data-dir ../shared/data] [--threads 0]

(a) eval: `mdlite eval` (evaluate.run) with the few-shot prompts, greedy CoT + PoT, on the first
`--problems` SVAMP test problems, three ways: prefix cache on (the default), prefix cache off
(`prefix_cache: 0`, every prompt evaluated whole), and the loop a user would write with
llama-cpp-python (`Llama.create_completion`, greedy, the same prompts and stop strings, all CoT
problems then all PoT problems, so that llama-cpp-python reuses the shared exemplar block itself).
Prints questions/s, the ratios cache-on/cache-off and cache-on/loop, and the answers that differ.
(paths) the same eval with greedy + 4 sampled paths per style (modes cot, pot, mixed), continuous
batching (evaluate.run: every path of every problem submitted to one engine, a finished path's place
taken at once) against static batching, the way eval batched before the engine could admit paths mid-
flight: a few problems and one (style, greedy) entry at a time, each call waiting for its longest path
(mdlite.solve.solve_questions per chunk of batch_paths // paths problems). Prints questions/s, the
ratio and the paths whose text differs (none should: a path's text does not depend on its batch).
(b) teacher: `mdlite teach` (rationales.run) with the in-process `llamacpp:` teacher on
`--teacher-problems` synthetic problems, 1 CoT + 2 PoT samples at T=0.6, on the engine against the
sequential `create_completion` backend mdlite used before (kept below as `SequentialTeacher`); then
the ceiling on this machine, bench/engine.py's k=16 batched / prompt-cached sequential tokens/s, and the
teacher's ratio as a share of it. Prints samples/s, the ratios and the kept share of each.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import Bench  # noqa: E402
from mdlite import evaluate, rationales, teacher  # noqa: E402
from mdlite.answers import answers_match, extract_answer  # noqa: E402
from mdlite.config import EvalConfig, TeachConfig  # noqa: E402
from mdlite.data import load_problems  # noqa: E402
from mdlite.llamacpp import llama_cpp_module, open_llama, physical_cores  # noqa: E402
from mdlite.prompts import TEACHER_STOP, extract_program, teacher_prompt  # noqa: E402
from mdlite.sandbox import run_programs  # noqa: E402

MODEL = "qwen2.5-coder-0.5b-instruct"
ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="eval,paths,teacher")
    parser.add_argument("--problems", type=int, default=40, help="SVAMP test problems for (a)")
    parser.add_argument("--teacher-problems", type=int, default=48, help="synthetic problems for (b)")
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--threads", type=int, default=0, help="0: the physical cores")
    args = parser.parse_args()
    threads = args.threads or physical_cores()
    print(f"model {MODEL}, {threads} threads, llama-cpp-python {llama_cpp_module().__version__}")
    if "eval" in args.parts:
        bench_eval(args.problems, args.data_dir, threads)
    if "paths" in args.parts:
        bench_paths(args.problems, args.data_dir, threads)
    if "teacher" in args.parts:
        bench_teacher(args.teacher_problems, threads)


def bench_eval(count: int, data_dir: str, threads: int) -> None:
    problems = load_problems("svamp:test", data_dir=data_dir, limit=count)
    answers, rates = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, cache in (("cache on", 2), ("cache off", 0)):
            cfg = EvalConfig(model=MODEL, data="svamp:test", data_dir=data_dir, limit=count, mode=["cot", "pot"],
                             paths=0, prompt_style="few-shot", max_tokens=256, n_threads=threads,
                             prefix_cache=cache, output_dir=f"{tmp}/{name.replace(' ', '-')}")
            start = time.perf_counter()
            out = evaluate.run(cfg)
            rates[name] = count / (time.perf_counter() - start)
            records = [json.loads(line) for line in out["samples.jsonl"].read_text().splitlines()]
            answers[name] = {(r["id"], r["style"]): r for r in records}
    start = time.perf_counter()
    answers["llama-cpp-python loop"] = user_loop(problems, threads)
    rates["llama-cpp-python loop"] = count / (time.perf_counter() - start)
    print(f"\n(a) few-shot greedy CoT + PoT eval, first {count} SVAMP test problems")
    for name, rate in rates.items():
        correct = {s: sum(r["correct"] for (_, st), r in answers[name].items() if st == s) / count
                   for s in ("cot", "pot")}
        print(f"{name:>22}: {rate:.3f} questions/s   accuracy CoT {correct['cot']:.1%}  PoT {correct['pot']:.1%}")
    for other in ("cache off", "llama-cpp-python loop"):
        differ = [key for key, r in answers["cache on"].items() if r["answer"] != answers[other][key]["answer"]]
        texts = sum(r["text"] != answers[other][key]["text"] for key, r in answers["cache on"].items())
        print(f"cache on / {other}: {rates['cache on'] / rates[other]:.2f}x; answers differ on {len(differ)} of "
              f"{2 * count} paths {differ[:8]}; texts differ on {texts}")


class EngineProfile(logging.Handler):
    """The engine's profile line, logged when it closes (steps, paths per step, seconds decoding)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        logging.getLogger("mdlite.engine").addHandler(self)
        logging.getLogger("mdlite.engine").setLevel(logging.INFO)

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("engine:"):
            self.lines.append(record.getMessage())


def bench_paths(count: int, data_dir: str, threads: int, paths: int = 4) -> None:
    cfg = EvalConfig(model=MODEL, data="svamp:test", data_dir=data_dir, limit=count, mode=["cot", "pot", "mixed"],
                     paths=paths, prompt_style="few-shot", max_tokens=200, n_threads=threads)
    problems = load_problems("svamp:test", data_dir=data_dir, limit=count)
    profile = EngineProfile()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        out = evaluate.run(dataclasses.replace(cfg, output_dir=tmp))
        continuous = count / (time.perf_counter() - start)
        records = [json.loads(line) for line in out["samples.jsonl"].read_text().splitlines()]
    texts = {(r["id"], r["style"], r["greedy"], r["path"]): r["text"] for r in records}
    start = time.perf_counter()
    static = static_eval(problems, cfg, threads)
    static_rate = count / (time.perf_counter() - start)
    differ = [key for key, text in static.items() if texts.get(key) != text]
    continuous_profile, static_profile = profile.lines[-2:]
    print(f"\n(paths) few-shot eval, greedy + {paths} sampled paths per style, first {count} SVAMP test problems")
    print(f"{'continuous batching':>22}: {continuous:.3f} questions/s\n{'static batching':>22}: {static_rate:.3f} "
          f"questions/s\ncontinuous / static: {continuous / static_rate:.2f}x; texts differ on {len(differ)} of "
          f"{len(static)} paths {differ[:4]}")
    print(f"profile, continuous: {continuous_profile}\nprofile, static: {static_profile}")


def static_eval(problems: list[Any], cfg: EvalConfig, threads: int) -> dict[tuple[str, str, bool, int], str]:
    """Eval's paths as it batched before continuous batching: `batch_paths // paths` problems and one (style,
    greedy) entry at a time, every call waiting for its longest path; the text of each path."""
    from mdlite.engine import Engine
    from mdlite.solve import solve_questions

    plan = evaluate.sampling_plan(cfg)
    per_chunk = max(1, cfg.batch_paths // max(plan.values()))
    texts = {}
    with Engine(MODEL, max_paths=cfg.batch_paths, n_threads=threads) as engine:
        for start in range(0, len(problems), per_chunk):
            chunk = problems[start:start + per_chunk]
            for (style, greedy), n in plan.items():
                solutions = solve_questions(engine, [p.question for p in chunk], ids=[p.id for p in chunk],
                                            mode=style, paths=n, prompt_style="few-shot",
                                            temperature=0.0 if greedy else cfg.temperature, top_p=cfg.top_p,
                                            max_tokens=cfg.max_tokens, seed=cfg.seed)
                for problem, solution in zip(chunk, solutions, strict=True):
                    texts.update({(problem.id, style, greedy, path.index): path.text for path in solution.paths})
    return texts


def user_loop(problems: list[Any], threads: int) -> dict[tuple[str, str], dict[str, Any]]:
    """What a user would write: greedy create_completion over all CoT prompts, then all PoT prompts."""
    from mdlite.models import model_path

    # llama-cpp-python's `Llama`, as a user's loop would use it, opened through mdlite's door with the same safe
    # parameters (no repacked / AMX weights: llama.cpp's defaults segfault on some Xeons, llama.cpp #20824)
    llm = open_llama(model_path(MODEL), n_ctx=1024, n_threads=threads)
    found = {}
    try:
        for style in ("cot", "pot"):
            for p in problems:
                reply = llm.create_completion(teacher_prompt(p.question, style=style), max_tokens=256,
                                              temperature=0.0, stop=TEACHER_STOP[style])
                text = reply["choices"][0]["text"]
                if style == "cot":
                    answer = extract_answer(text, style="cot")
                else:
                    program = extract_program(text)
                    [result] = run_programs([program]) if program else [None]
                    answer = result.value if result and result.ok else None
                found[(p.id, style)] = {"answer": answer, "text": text, "correct": answers_match(answer, p.answer)}
    finally:
        llm.close()
    return found


class SequentialTeacher:
    """The in-process teacher as it was before the engine: one `create_completion` at a time (one slot in
    the pool: llama-cpp-python's `Llama` takes one call at a time)."""

    max_concurrency = 1
    profile = ""  # llama.cpp's own timings of the last run, set on close

    def __init__(self, name: str, model: str, *, num_ctx: int, n_threads: int) -> None:
        self.name, self.model, self.num_ctx, self.n_threads = name, model, num_ctx, n_threads
        self.endpoint = f"in-process {model}"
        self._llm: Any = None

    async def check(self) -> str | None:
        from mdlite.models import model_path

        # the same Llama as user_loop: through mdlite's door, with its safe parameters
        self._llm = open_llama(model_path(self.model), n_ctx=self.num_ctx, n_threads=self.n_threads)
        return None

    async def complete(self, prompt: str, *, n: int = 1, temperature: float, max_tokens: int, stop: list[str],
                       seed: int | None = None,
                       stop_after: teacher.StopAfter | None = None) -> list[teacher.Completion]:
        return await asyncio.to_thread(self._one, prompt, temperature, max_tokens, stop, seed)

    def _one(self, prompt: str, temperature: float, max_tokens: int, stop: list[str],
             seed: int | None) -> list[teacher.Completion]:
        start = time.perf_counter()
        reply = self._llm.create_completion(prompt, max_tokens=max_tokens, temperature=temperature, stop=stop,
                                            seed=seed)
        choice = reply["choices"][0]
        return [teacher.Completion(text=choice["text"], tokens=reply["usage"]["completion_tokens"],
                                   latency_s=time.perf_counter() - start, finish_reason=choice["finish_reason"])]

    async def aclose(self) -> None:
        if self._llm is not None:
            perf = llama_cpp_module().llama_perf_context(self._llm._ctx.ctx)
            SequentialTeacher.profile = (f"{perf.n_eval} tokens decoded in {perf.t_eval_ms / 1000:.1f} s, "
                                         f"{perf.n_p_eval} prompt tokens in {perf.t_p_eval_ms / 1000:.1f} s")
            self._llm.close()


def bench_teacher(count: int, threads: int) -> None:
    rows = {}
    real_make_teacher = teacher.make_teacher
    profile = EngineProfile()
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("engine (batched)", "sequential create_completion"):
            if name.startswith("sequential"):
                teacher.make_teacher = lambda spec, **o: SequentialTeacher(spec, MODEL, num_ctx=o["num_ctx"],
                                                                           n_threads=threads)
            cfg = TeachConfig(teacher=f"llamacpp:{MODEL}", data=f"synth:{count}:7", n_cot=1, n_pot=2,
                              temperature=0.6, max_tokens=160, n_threads=threads,
                              output_dir=f"{tmp}/{name.split()[0]}")
            try:
                start = time.perf_counter()
                out = rationales.run(cfg)
                seconds = time.perf_counter() - start
            finally:
                teacher.make_teacher = real_make_teacher
            records = rationales.read_rationales(out["rationales"])
            kept = {s: [r["kept"] for r in records if r["style"] == s] for s in ("cot", "pot")}
            rows[name] = (len(records) / seconds, kept)
    print(f"\n(b) in-process teacher, {count} synthetic problems, 1 CoT + 2 PoT samples, T=0.6")
    for name, (rate, kept) in rows.items():
        shares = "  ".join(f"{s} kept {sum(v)}/{len(v)} ({sum(v) / max(len(v), 1):.0%})" for s, v in kept.items())
        print(f"{name:>30}: {rate:.3f} samples/s   {shares}")
    [(_, (new, _)), (_, (old, _))] = rows.items()
    ceiling = Bench(MODEL, threads=threads)
    try:
        rates = ceiling.rates(16)
    finally:
        ceiling.close()
    most = rates["batched"] / rates["sequential (prompt cache)"]
    print(f"engine / sequential: {new / old:.2f}x samples/s; this machine's ceiling (bench/engine.py, k=16 batched "
          f"{rates['batched']:.1f} / prompt-cached sequential {rates['sequential (prompt cache)']:.1f} tok/s): "
          f"{most:.2f}x; the teacher reaches {new / old / most:.0%} of it")
    print(f"profile, engine: {profile.lines[0]}\nprofile, sequential: {SequentialTeacher.profile}")


if __name__ == "__main__":
    main()
