"""Every benchmark in one run, summarised as one markdown table (`make bench`).

    .venv/bin/python bench/run_all.py [--quick] [--only sandbox,engine] [--logs bench/logs]

Runs each script under bench/ one after the other (never two at once: they share the CPU), keeps each
full output in `--logs/<name>.txt`, and prints a table with the headline figure of each: the ratio to
its named baseline and the target. `--quick` runs smaller sizes (minutes instead of about an hour on
2 cores); its figures are noisier.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Bench:
    name: str
    what: str  # the comparison, baseline named
    args: list[str]
    quick_args: list[str]
    headline: str  # regex over the output; its groups fill `shown`
    shown: str
    target: str


BENCHES = [
    Bench("sandbox", "PoT sandbox vs one `subprocess.run` per program", ["--n", "500"], ["--n", "120"],
          r"c/b = ([\d.]+) \(warm\)", "{0}x", ">= 5x"),
    Bench("teacher", "teach at concurrency 8 vs 1 (Ollama-protocol server, 100 ms, 8 slots)",
          ["--problems", "40", "--llama-problems", "10"], ["--problems", "12", "--llama-problems", "3"],
          r"ratio ([\d.]+) \(target[\s\S]*?client overhead ([\d.]+%)", "{0}x; client overhead {1}", ">= 6x; <= 5%"),
    Bench("engine", "k=8 batched paths vs 8 sequential calls (prompt cached / re-evaluated)",
          ["--ks", "1,4,8,16", "--max-tokens", "128"], ["--ks", "8", "--max-tokens", "48"],
          r"^\s*8 .*?([\d.]+)x\s+([\d.]+)x", "{0}x / {1}x", ">= 2x"),
    Bench("fewshot", "few-shot eval: prefix cache vs off / vs a llama-cpp-python loop; in-process teacher: engine "
          "vs sequential create_completion", ["--problems", "40", "--teacher-problems", "24"],
          ["--problems", "8", "--teacher-problems", "6"],
          r"cache on / cache off: ([\d.]+)x[\s\S]*?loop: ([\d.]+)x[\s\S]*?engine / sequential: ([\d.]+)x",
          "{0}x / {1}x; teacher {2}x", ">= 2.5x / >= 1.5x; >= 3x"),
    Bench("serve", "`mdlite serve`: 8 concurrent clients vs one client at a time (requests/s)",
          ["--requests", "48"], ["--requests", "16"],
          r"ratio \d+ clients / 1 client: ([\d.]+)x[\s\S]*?differing between the runs: (\d+)",
          "{0}x; {1} answers differ", ">= 1.5x; 0 differ"),
    Bench("train", "padding-free training vs pad-to-longest (tokens/s)", ["--model", "gemma-3-270m"],
          ["--model", "tiny", "--examples", "384"], r"^padding-free .*?([\d.]+)x", "{0}x", ">= 1.5x"),
    Bench("export", "Q4_K_M GGUF vs F16 (size; answers agreeing)", ["--models", "tiny,gemma-3-270m"],
          ["--models", "tiny", "--quant-types", "Q8_0,Q4_K_M"],
          r"Q4_K_M(?:\s+\S+){3}\s+([\d.]+)(?:\s+\S+){4}\s+([\d.]+)\s*$", "{0}x size; {1} agree", "smaller, agrees"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes: minutes, noisier figures")
    parser.add_argument("--only", default="", help="comma-separated subset: " + ",".join(b.name for b in BENCHES))
    parser.add_argument("--logs", type=Path, default=ROOT / "bench" / "logs", help="folder for the full outputs")
    args = parser.parse_args()
    chosen = [b for b in BENCHES if not args.only or b.name in args.only.split(",")]
    args.logs.mkdir(parents=True, exist_ok=True)
    rows = []
    for bench in chosen:
        command = [sys.executable, f"bench/{bench.name}.py", *(bench.quick_args if args.quick else bench.args)]
        print(f"running {' '.join(command[1:])} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        (args.logs / f"{bench.name}.txt").write_text(done.stdout + done.stderr, encoding="utf-8")
        matches = list(re.finditer(bench.headline, done.stdout, re.M))  # the last: the biggest model
        found = matches[-1] if matches else None
        if done.returncode != 0:
            result = f"failed (exit {done.returncode}; see {args.logs.name}/{bench.name}.txt)"
        else:
            result = bench.shown.format(*found.groups()) if found else f"see {args.logs.name}/{bench.name}.txt"
        rows.append(f"| {bench.name} | {bench.what} | {result} | {bench.target} | {seconds:.0f} s |")
    print("| bench | comparison (baseline) | result | target | time |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
