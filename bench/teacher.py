"""Benchmark of `mdlite teach`'s request pipeline, in one run:

    flock /tmp/mdlite-cpu.lock .venv/bin/python bench/teacher.py [--problems 40] [--llama-problems 10]

1. Concurrency. `mdlite teach` (rationales.run, the whole pipeline: requests, answer checks, PoT
   sandbox, appends) against tests/fake_ollama.py with 100 ms latency per request and 8 parallel slots,
   at --concurrency 1 (the baseline) and 8; prints requests/s and the ratio (target >= 6).
2. Client overhead. `mdlite teach` at concurrency 1 against a real llama.cpp server
   (`python -m llama_cpp.server --verbose True`) serving the Qwen2.5-Coder 0.5B demo GGUF; prints
   1 - (sum of the server's generation time / wall time of the teach run) (target <= 5%). The server
   time per request is llama.cpp's own "total time" that llama-cpp-python's server logs with
   --verbose (it puts no timings in its responses; llama.cpp's C++ llama-server does, as `timings`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mdlite.answers import format_number
from mdlite.config import TeachConfig
from mdlite.data import load_problems
from mdlite.llamacpp import server_command
from mdlite.models import model_path
from mdlite.rationales import run

TESTS = Path(__file__).resolve().parents[1] / "tests"

DATA = Path(os.environ.get("MDLITE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
_TOTAL_TIME = re.compile(r"llama_perf_context_print:\s+total time =\s+([\d.]+) ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=40, help="problems for the concurrency part (4 samples each)")
    parser.add_argument("--llama-problems", type=int, default=10, help="problems for the llama.cpp part (0: skip)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    dataset = str(DATA / "svamp" / "train.jsonl")
    with tempfile.TemporaryDirectory() as tmp:
        rates = concurrency_part(dataset, args.problems, Path(tmp))
        print(f"fake Ollama, 100 ms/request, 8 slots, {args.problems * 4} requests: "
              f"concurrency 1 {rates[1]:.2f} req/s, concurrency 8 {rates[8]:.2f} req/s, "
              f"ratio {rates[8] / rates[1]:.2f} (target >= 6)")
        if args.llama_problems:
            overhead, server_s, wall_s, requests = llama_part(dataset, args.llama_problems, Path(tmp))
            print(f"llama.cpp server, concurrency 1, {requests} requests: server generation {server_s:.1f} s of "
                  f"{wall_s:.1f} s wall; client overhead {overhead:.1%} (target <= 5%)")


def concurrency_part(dataset: str, count: int, tmp: Path) -> dict[int, float]:
    """requests/s of a full teach run at concurrency 1 and 8 (after a warm-up run that starts the sandbox)."""
    problems = load_problems(dataset, limit=count)
    script: dict[str, dict[str, list[str]]] = {"cot": {}, "pot": {}}
    for p in problems:
        right, wrong = format_number(p.answer), format_number(p.answer + 1)
        script["cot"][p.question] = [f" So {right}. The answer is {right}.", f" It is {wrong}. The answer is {wrong}."]
        script["pot"][p.question] = [f"def solution():\n    return {right}\n", f"def solution():\n    return {wrong}\n"]
    (tmp / "script.json").write_text(json.dumps(script))
    port = _free_port()
    # The server runs in its own process, as Ollama does (in a thread it would share the client's GIL).
    server = subprocess.Popen([sys.executable, str(TESTS / "fake_ollama.py"), "--port", str(port), "--model", "bench",
                               "--parallel", "8", "--latency", "0.1", "--script", str(tmp / "script.json")],
                              stdout=subprocess.DEVNULL)
    rates = {}
    try:
        _wait_for(port)
        for concurrency in (8, 1, 8):  # the first run warms up the sandbox pool and the client
            cfg = TeachConfig(data=dataset, limit=count, teacher="ollama:bench",
                              endpoints=[f"http://127.0.0.1:{port}"], concurrency=concurrency, n_cot=2, n_pot=2,
                              output_dir=str(tmp / f"fake-{time.time()}"))
            stats = run(cfg)["stats"]["session"]
            assert stats["failed"] == 0 and stats["requests"] == count * 4, stats
            rates[concurrency] = stats["requests_per_s"]
    finally:
        server.terminate()
        server.wait(30)
    return rates


def llama_part(dataset: str, count: int, tmp: Path) -> tuple[float, float, float, int]:
    """(overhead, server seconds, wall seconds, requests) of a teach run against llama_cpp.server."""
    gguf = model_path("qwen2.5-coder-0.5b-instruct")
    port = _free_port()
    log_path = tmp / "server.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(server_command("--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
                                                 "--n_ctx", "2048", "--verbose", "True"),
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for(port)
        before = len(_TOTAL_TIME.findall(log_path.read_text()))
        cfg = TeachConfig(data=dataset, limit=count, teacher=f"openai:http://127.0.0.1:{port}/v1",
                          concurrency=1, n_cot=1, n_pot=1, max_tokens=96, output_dir=str(tmp / "llama"))
        start = time.perf_counter()
        stats = run(cfg)["stats"]["session"]
        wall = time.perf_counter() - start
    finally:
        server.terminate()
        server.wait(30)
    totals = [float(ms) / 1000 for ms in _TOTAL_TIME.findall(log_path.read_text())[before:]]
    assert len(totals) == stats["requests"], (len(totals), stats)
    return 1 - sum(totals) / wall, sum(totals), wall, stats["requests"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for(port: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"no server listening on port {port} within {timeout} s")


if __name__ == "__main__":
    main()
