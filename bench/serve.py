"""`mdlite serve` under load: requests/s with concurrent clients vs the same server answering one at a time.

    flock /tmp/mdlite-cpu.lock python bench/serve.py [--clients 8] [--requests 32] [--paths 2]
        [--max-tokens 64] [--prompt-style few-shot] [--data svamp:test] [--data-dir ../shared/data] [--threads 0]

Starts `mdlite serve` once (a subprocess on 127.0.0.1, the Qwen2.5-Coder 0.5B GGUF, `--paths` paths per
request, mixed voting, T=0.7, seed 0) and sends it the first `--requests` questions of `--data` twice:
one client, one request at a time (the baseline: what the server does for a lone user), then `--clients`
clients at once, each sending its share of the questions one after the other (closed loop). Prints
requests/s and latency p50/p90/p99 of each, the ratio of requests/s (target >= 1.5x), the server's CPU
seconds per request (from /proc: steadier than wall time on a shared machine), and whether every answer
and path text is the same in both runs (batch invariance: the same seed gives the same paths whatever
else shares the batch).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mdlite.data import load_problems  # noqa: E402
from mdlite.llamacpp import physical_cores  # noqa: E402

MODEL = "qwen2.5-coder-0.5b-instruct"
ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32, help="questions sent in each run")
    parser.add_argument("--paths", type=int, default=2, help="paths per request (mixed: half CoT, half PoT)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-style", default="few-shot")
    parser.add_argument("--data", default="svamp:test")
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--threads", type=int, default=0, help="0: the physical cores")
    args = parser.parse_args()
    threads = args.threads or physical_cores()
    questions = [p.question for p in load_problems(args.data, data_dir=args.data_dir, limit=args.requests)]
    print(f"model {MODEL}, {threads} threads, {len(questions)} questions of {args.data}, {args.paths} paths per "
          f"request, max_tokens {args.max_tokens}, prompt style {args.prompt_style}")
    command = [sys.executable, "-m", "mdlite", "serve", "--model", MODEL, "--port", "0", "--paths", str(args.paths),
               "--max-tokens", str(args.max_tokens), "--prompt-style", args.prompt_style, "--n-threads", str(threads)]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = wait_ready(server)
        ask(url, questions[0])  # warm-up: the prefix cache holds the few-shot exemplars
        runs = {"1 client": run(url, questions, 1, server.pid),
                f"{args.clients} clients": run(url, questions, args.clients, server.pid)}
    finally:
        server.terminate()
        server.wait(timeout=120)
    print(f"\n{'run':>12} {'requests/s':>10} {'tok/s':>7} {'p50 s':>7} {'p90 s':>7} {'p99 s':>7} {'CPU s/req':>9}")
    for name, result in runs.items():
        p50, p90, p99 = percentiles(result["latencies"])
        print(f"{name:>12} {result['rate']:>10.3f} {result['tokens_per_s']:>7.1f} {p50:>7.2f} {p90:>7.2f} {p99:>7.2f} "
              f"{result['cpu_per_request']:>9.2f}")
    one, many = runs.values()
    print(f"\nratio {args.clients} clients / 1 client: {many['rate'] / one['rate']:.2f}x requests/s (target >= 1.5x); "
          f"{one['cpu_per_request'] / many['cpu_per_request']:.2f}x fewer server CPU seconds per request")
    differ = sum(a != b for a, b in zip(one["replies"], many["replies"], strict=True))
    print(f"answers and path texts differing between the runs: {differ} of {len(questions)}")


def wait_ready(server: subprocess.Popen) -> str:
    """The base URL `mdlite serve` prints once it accepts requests."""
    assert server.stderr is not None
    deadline = time.time() + 300
    while time.time() < deadline:
        line = server.stderr.readline()
        if not line:
            raise SystemExit(f"mdlite serve exited with {server.wait()}")
        if found := re.search(r"at (http://\S+)", line):
            return found.group(1)
    raise SystemExit("mdlite serve did not become ready in 300 s")


def ask(url: str, question: str, client: Any = None) -> tuple[float, dict[str, Any]]:
    import httpx

    body = {"messages": [{"role": "user", "content": question}], "seed": 0}
    start = time.perf_counter()
    reply = (client or httpx).post(f"{url}/chat/completions", json=body, timeout=900)
    reply.raise_for_status()
    return time.perf_counter() - start, reply.json()["mdlite"]


def run(url: str, questions: list[str], clients: int, pid: int) -> dict[str, Any]:
    """Every question once, from `clients` closed-loop clients (client i sends questions i, i + clients, ...)."""
    import httpx

    def client(first: int) -> list[tuple[int, float, dict[str, Any]]]:
        with httpx.Client() as http:
            return [(i, *ask(url, questions[i], http)) for i in range(first, len(questions), clients)]

    start, cpu = time.perf_counter(), cpu_seconds(pid)
    with ThreadPoolExecutor(clients) as pool:
        done = sorted(item for items in pool.map(client, range(clients)) for item in items)
    wall, cpu = time.perf_counter() - start, cpu_seconds(pid) - cpu
    tokens = sum(record["tokens"] for _, _, record in done)
    return {"rate": len(questions) / wall, "tokens_per_s": tokens / wall, "latencies": [s for _, s, _ in done],
            "cpu_per_request": cpu / len(questions),
            "replies": [(r["answer"], [p["text"] for p in r["paths"]]) for _, _, r in done]}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentiles(values: list[float]) -> tuple[float, float, float]:
    """p50, p90, p99 (linear interpolation between the closest ranks)."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return cuts[49], cuts[89], cuts[98]


if __name__ == "__main__":
    main()
