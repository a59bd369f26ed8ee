"""Throughput of mdlite's PoT sandbox against a naive safe baseline (one fresh interpreter per program).

    python bench/sandbox.py [--n 500] [--workers N] [--seed 0]

Runs the same generated programs (correct and failing, mixed, deterministic by seed) three ways:
(a) in-process `exec` (unsafe reference), (b) `subprocess.run([sys.executable, "-c", code])` per program on
`workers` threads, (c) `mdlite.sandbox.run_programs` on `workers` warm workers. Prints programs/s for each
and the ratio c/b, with the pool already up (warm) and with its one-off start-up added. The three run
chunk by chunk, interleaved, so that other jobs on the machine slow them alike.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mdlite import sandbox  # noqa: E402

TIMEOUT = 10.0
GOOD = [
    "def solution():\n    apples = {a}\n    eaten = {b}\n    return apples - eaten\n",
    "a = {a}\nb = {b}\nans = a * b + {c}\n",
    "x = {a}\ny = {b}\nprint(x / y)\n",
    "from fractions import Fraction\n\ndef solution():\n    return Fraction({a}, {b}) * {c}\n",
    "import math\nans = math.comb({a}, {c})\n",
    "total = 0\nfor i in range({a}):\n    total += i * {c}\nanswer = total\n",
]
BAD = [
    "def solution():\n    return apples * {a}\n",  # NameError
    "ans = {a} / ({b} - {b})\n",  # ZeroDivisionError
    "def solution(:\n    return {a}\n",  # SyntaxError
    "ans = '{a} apples'\n",  # no answer
    "ans = [{a}, {b}]\n",  # no answer
]
# (b) has no answer protocol of its own: print what the sandbox would take as the answer.
FOOTER = (
    "\nif callable(globals().get('solution')):\n    print(solution())\n"
    "elif 'ans' in globals() or 'answer' in globals():\n    print(globals().get('ans', globals().get('answer')))\n"
)


def programs(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        template = rng.choice(BAD) if rng.random() < 0.3 else rng.choice(GOOD)
        out.append(template.format(a=rng.randint(5, 60), b=rng.randint(1, 9), c=rng.randint(1, 4)))
    return out


def run_inprocess(code: str) -> float | None:
    out = sandbox._CappedWriter()
    with contextlib.redirect_stdout(out):
        return sandbox._execute(code, out)["value"]


def run_subprocess(code: str) -> float | None:
    try:
        proc = subprocess.run([sys.executable, "-c", code + FOOTER], capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        return None
    lines = proc.stdout.strip().splitlines()
    try:
        return sandbox.extract_number(Fraction(lines[-1].strip())) if proc.returncode == 0 and lines else None
    except (ValueError, ZeroDivisionError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    codes = programs(args.n, args.seed)
    print(f"{args.n} programs, {args.workers} workers, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")

    def naive(cs: list[str]) -> list[float | None]:
        with ThreadPoolExecutor(args.workers) as pool:
            return list(pool.map(run_subprocess, cs))

    def mdlite(cs: list[str]) -> list[float | None]:
        return [r.value for r in sandbox.run_programs(cs, timeout=TIMEOUT, workers=args.workers)]

    # Other jobs share this machine's CPUs: run (a), (b), (c) chunk by chunk so that all see the same load.
    start = time.perf_counter()
    sandbox.run_programs(["ans = 0"], workers=args.workers)
    pool_start = time.perf_counter() - start
    seconds, values = [0.0, 0.0, 0.0], [[], [], []]
    for i in range(0, args.n, 50):
        chunk = codes[i : i + 50]
        for j, fn in enumerate((lambda cs: [run_inprocess(c) for c in cs], naive, mdlite)):
            start = time.perf_counter()
            values[j] += fn(chunk)
            seconds[j] += time.perf_counter() - start
    labels = ["(a) in-process exec (unsafe reference)", "(b) subprocess.run per program",
              "(c) mdlite run_programs, warm pool"]
    for label, s in zip(labels, seconds, strict=True):
        print(f"{label:<44} {args.n / s:9.1f} programs/s  ({s:.2f} s)")
    print(f"{'    pool start-up (once per process)':<44} {pool_start:9.2f} s")
    agree = sum(x == y == z for x, y, z in zip(*values, strict=True))
    print(f"answers agree in (a), (b), (c): {agree}/{args.n} (answered: {sum(v is not None for v in values[2])})")
    b_rate, c_rate = args.n / seconds[1], args.n / seconds[2]
    with_start = args.n / (seconds[2] + pool_start) / b_rate
    print(f"c/b = {c_rate / b_rate:.1f} (warm), {with_start:.1f} (incl. pool start-up)")


if __name__ == "__main__":
    main()
