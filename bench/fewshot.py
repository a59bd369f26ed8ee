"""Few-shot speed: mdlite's prefix cache and batched in-process teacher against their baselines.

    flock /tmp/mdlite-cpu.lock python bench/fewshot.py [--parts eval,teacher] [--problems 40]
        [--teacher-problems 24] [--data-dir ../shared/data] [--threads 0]

(a) eval: `mdlite eval` (evaluate.run) with the few-shot prompts, greedy CoT + PoT, on the first
`--problems` SVAMP test problems, three ways: prefix cache on (the default), prefix cache off
(`prefix_cache: 0`, every prompt evaluated whole), and the loop a user would write with
llama-cpp-python (`Llama.create_completion`, greedy, the same prompts and stop strings, all CoT
problems then all PoT problems, so that llama-cpp-python reuses the shared exemplar block itself).
Prints questions/s, the ratios cache-on/cache-off and cache-on/loop, and the answers that differ.
(b) teacher: `mdlite teach` (rationales.run) with the in-process `llamacpp:` teacher on
`--teacher-problems` synthetic problems, 1 CoT + 2 PoT samples at T=0.6, on the batched engine
against the sequential `create_completion` backend mdlite used before (kept below as
`SequentialTeacher`). Prints samples/s, the ratio and the kept share of each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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
    parser.add_argument("--parts", default="eval,teacher")
    parser.add_argument("--problems", type=int, default=40, help="SVAMP test problems for (a)")
    parser.add_argument("--teacher-problems", type=int, default=24, help="synthetic problems for (b)")
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--threads", type=int, default=0, help="0: the physical cores")
    args = parser.parse_args()
    threads = args.threads or physical_cores()
    print(f"model {MODEL}, {threads} threads, llama-cpp-python {llama_cpp_module().__version__}")
    if "eval" in args.parts:
        bench_eval(args.problems, args.data_dir, threads)
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


class SequentialTeacher(teacher.LlamaCppTeacher):
    """The in-process teacher as it was before the engine: one `create_completion` at a time."""

    def __init__(self, name: str, model: str, *, num_ctx: int, n_threads: int, **_: Any) -> None:
        super().__init__(name, model, num_ctx=num_ctx, n_threads=n_threads, batch_paths=1)
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
            self._llm.close()


def bench_teacher(count: int, threads: int) -> None:
    rows = {}
    real_make_teacher = teacher.make_teacher
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
    print(f"engine / sequential: {new / old:.2f}x samples/s")


if __name__ == "__main__":
    main()
