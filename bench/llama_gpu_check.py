"""Device check of llama.cpp through mdlite's one door (`mdlite/llamacpp.py`): GGUF files with every layer
offloaded, the engine's multi-path sampling, its batch invariance on the GPU, `mdlite doctor`'s llama.cpp line,
and the export's parity report.

    python bench/llama_gpu_check.py --gguf runs/export/student-Q4_K_M.gguf --gguf runs/export/student-Q8_0.gguf \
        --export-dir runs/export --json llama.json        # a CUDA build of llama-cpp-python, on a GPU
    python bench/llama_gpu_check.py --gguf tiny.gguf --prompts 4 --paths 4   # the CPU rehearsal (a CPU build)

For each GGUF, the engine (`mdlite.engine.Engine`, n_gpu_layers -1: every layer on the GPU when the build has GPU
offload) samples `--prompts` student prompts (synthetic problems, CoT and PoT) with `--paths` paths each,
greedy and at temperature 0.7, `--max-tokens` tokens per path (end-of-generation banned, so every path is
compared over the same length), the prefix cache off, in three batch compositions:

    alone    every path in a request of its own (n=1, first_path=j: the same seed as path j of a request of n)
    request  one request of n=paths per prompt: a prompt's paths decoded together
    mixed    every prompt's request at once: up to 16 paths of different prompts in one batch

and counts the paths whose text differs from `alone` (README: with layers on a GPU, kernels pick their tiling
and reduction order by the batch's shape, so texts may differ; on x86-64 CPU builds they must not). With GPU
offload it does the same with n_gpu_layers 0 on the same build (README's advice for the CPU guarantee; llama.cpp
may still run a large batch's matrix products on the GPU there: its op offload) and counts the texts that differ
between n_gpu_layers 0 and -1. llama.cpp's load log shows where the layers and the KV cache went.

`mdlite doctor`'s llama.cpp line needs a cached registry model, which a machine without network lacks: the
check runs doctor's own function with that model replaced by the first GGUF (the line's offload probe then
offloads one of its layers in a child process, as doctor does). `--export-dir` adds the export's parity report
(parity.json: token ids, F16 greedy vs the merged model, stop rates, answers of each quantized file vs F16;
run.json: the parity check's n_gpu_layers). Lines starting RESULT (or FAIL) are the figures;
bench/device_check.sh collects them.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TEMPERATURES = (0.0, 0.7)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gguf", type=Path, action="append", required=True, help="a GGUF file (repeatable)")
    parser.add_argument("--export-dir", type=Path, help="an export folder whose parity.json to summarize")
    parser.add_argument("--prompts", type=int, default=8, help="student prompts (half CoT, half PoT)")
    parser.add_argument("--paths", type=int, default=8, help="paths per prompt (the batch of a request)")
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens per path")
    parser.add_argument("--ngl0", action="store_true",
                        help="also sample with n_gpu_layers 0 without GPU offload (the CPU rehearsal of that path)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    from mdlite import llamacpp

    log_lines = _capture_llama_log()
    llama = llamacpp.llama_cpp_module()
    offload = bool(llama.llama_supports_gpu_offload())
    from importlib.metadata import version

    report: dict[str, Any] = {"llama_cpp_python": version("llama-cpp-python"), "gpu_offload": offload,
                              "llama_cpp_module": str(Path(llama.__file__).parent),
                              "system_info": llamacpp.system_info(), "files": {}}
    print(f"RESULT llama-cpp-python {report['llama_cpp_python']} from {report['llama_cpp_module']}: GPU offload "
          f"{'yes' if offload else 'no'}; {report['system_info']}", flush=True)
    prompts = _prompts(args.prompts)
    for gguf in args.gguf:
        report["files"][gguf.name] = check_file(gguf, prompts, args, offload=offload, log_lines=log_lines)
        _save(report, args.json)
    report["doctor"] = doctor_line(args.gguf[0])
    if args.export_dir:
        report["parity"] = parity_summary(args.export_dir)
    _save(report, args.json)


def check_file(gguf: Path, prompts: list[str], args: argparse.Namespace, *, offload: bool,
               log_lines: list[str]) -> dict[str, Any]:
    """Sampling and batch invariance of one GGUF: with GPU offload on the GPU (n_gpu_layers -1) and, as README
    advises for the CPU guarantee, with n_gpu_layers 0 on the same build; else on the CPU."""
    found: dict[str, Any] = {"bytes": gguf.stat().st_size, "placements": {}}
    texts: dict[str, dict[float, dict[str, list[list[str]]]]] = {}
    for name, layers in (("ngl-1", -1), ("ngl0", 0))[:2 if offload or args.ngl0 else 1]:
        first, clock = len(log_lines), time.perf_counter()
        texts[name] = _sample_all(gguf, prompts, args, n_gpu_layers=layers)
        rows: dict[str, Any] = {"n_gpu_layers": layers, "seconds": round(time.perf_counter() - clock, 1),
                                "placement": _placement(log_lines[first:])}
        for temperature, runs in texts[name].items():
            alone = runs["alone"]
            row: dict[str, Any] = {"paths": sum(len(p) for p in alone),
                                   "request_vs_alone": _differ(alone, runs["request"]),
                                   "mixed_vs_alone": _differ(alone, runs["mixed"]),
                                   "example": alone[0][0][:80]}
            if temperature == 0:
                row["requests_with_unequal_greedy_paths"] = sum(len(set(p)) > 1 for p in runs["request"])
            if name == "ngl0":
                row["ngl0_vs_ngl-1"] = _differ(texts["ngl-1"][temperature]["alone"], alone)
            rows[str(temperature)] = row
            print(f"RESULT {gguf.name}, n_gpu_layers {layers}, temperature {temperature}: of {row['paths']} paths, "
                  f"{row['request_vs_alone']['differ']} differ between alone and in their request of {args.paths}, "
                  f"{row['mixed_vs_alone']['differ']} between alone and in a mixed batch"
                  + (f", {row['ngl0_vs_ngl-1']['differ']} between n_gpu_layers 0 and -1" if name == "ngl0" else "")
                  + (f"; requests whose greedy paths are not all equal: {row['requests_with_unequal_greedy_paths']} "
                     f"of {len(prompts)}" if temperature == 0 else ""), flush=True)
        print(f"RESULT {gguf.name}, n_gpu_layers {layers}: {rows['placement']}", flush=True)
        found["placements"][name] = rows
    return found


def _sample_all(gguf: Path, prompts: list[str], args: argparse.Namespace, *, n_gpu_layers: int,
                modes: tuple[str, ...] = ("alone", "request", "mixed")) -> dict[float, dict[str, list[list[str]]]]:
    """texts[temperature][mode][prompt][path] for one engine (prefix cache off: every prompt evaluated whole)."""
    from mdlite.engine import Engine, derive_seed

    out: dict[float, dict[str, list[list[str]]]] = {}
    knobs = {"max_tokens": args.max_tokens, "ignore_eos": True}
    with Engine(gguf, n_gpu_layers=n_gpu_layers, max_paths=16, prefix_cache=0) as engine:
        for temperature in TEMPERATURES:
            seeds = [derive_seed(7, p) for p in range(len(prompts))]
            runs: dict[str, list[list[str]]] = {}
            if "alone" in modes:
                runs["alone"] = [[engine.submit(prompt, n=1, first_path=j, seed=seeds[p], temperature=temperature,
                                                **knobs).result()[0].text for j in range(args.paths)]
                                 for p, prompt in enumerate(prompts)]
            if "request" in modes:
                runs["request"] = [[g.text for g in engine.submit(prompt, n=args.paths, seed=seeds[p],
                                                                  temperature=temperature, **knobs).result()]
                                   for p, prompt in enumerate(prompts)]
            if "mixed" in modes:
                runs["mixed"] = [[g.text for g in paths] for paths in engine.sample(
                    prompts, n=args.paths, seed=seeds, temperature=temperature, **knobs)]
            out[temperature] = runs
    return out


def _placement(lines: list[str]) -> str:
    """Where llama.cpp put the model's layers and KV cache, from its load log (the first model loaded in `lines`)."""
    import re
    from collections import Counter

    layers = Counter(m.group(1) for line in lines if (m := re.search(r"layer +\d+ assigned to device (\S+),", line)))
    cache = Counter(m.group(1) for line in lines if (m := re.search(r"llama_kv_cache: layer +\d+: dev = (\S+)", line)))
    offloaded = [m.group(0) for line in lines if (m := re.search(r"offloaded \d+/\d+ layers to GPU", line))]
    return (f"layers by device {dict(layers) or 'not logged'}, KV cache by device {dict(cache) or 'not logged'}; "
            + (offloaded[0] if offloaded else "no 'offloaded N/M layers to GPU' line"))


def _differ(reference: list[list[str]], other: list[list[str]]) -> dict[str, Any]:
    """How many paths' texts differ, and where the first differences start (characters)."""
    starts = []
    for ref_paths, other_paths in zip(reference, other, strict=True):
        for a, b in zip(ref_paths, other_paths, strict=True):
            if a != b:
                at = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
                starts.append(at)
    return {"differ": len(starts), "of": sum(len(p) for p in reference), "first_difference_at": sorted(starts)[:10]}


def doctor_line(gguf: Path) -> dict[str, Any]:
    """`mdlite doctor`'s llama.cpp lines, its cached registry model replaced by `gguf`."""
    from mdlite import doctor

    with mock.patch.object(doctor, "_cached_model", return_value=gguf):
        checks = doctor.run(only=("llama.cpp",))
    print(doctor.format_report(checks))
    line = next(c for c in checks if c.name == "llama.cpp")
    print(f"{'RESULT' if line.verdict == 'ok' else 'FAIL'} doctor llama.cpp ({gguf.name} as the cached model): "
          f"{line.verdict}: {line.detail}", flush=True)
    return {"verdict": line.verdict, "detail": line.detail, "fix": line.fix,
            "lines": [{"name": c.name, "verdict": c.verdict, "detail": c.detail} for c in checks]}


def parity_summary(export_dir: Path) -> dict[str, Any]:
    """The export's parity report, and the layers its llama.cpp side offloaded."""
    parity_path = export_dir / "parity.json"
    if not parity_path.exists():
        print(f"FAIL parity: no {parity_path}")
        return {"missing": str(parity_path)}
    parity = json.loads(parity_path.read_text())
    record = json.loads((export_dir / "run.json").read_text()) if (export_dir / "run.json").exists() else {}
    n_gpu_layers = record.get("config", {}).get("n_gpu_layers")
    found = {"passed": parity.get("passed"), "summary": parity.get("summary"), "failures": parity.get("failures"),
             "n_gpu_layers": n_gpu_layers, "timings_s": record.get("timings_s")}
    print(f"{'RESULT' if parity.get('passed') else 'FAIL'} export parity (n_gpu_layers {n_gpu_layers}): passed "
          f"{parity.get('passed')}; {parity.get('summary')}; timings {found['timings_s']}"
          + (f"; failures {parity['failures']}" if parity.get("failures") else ""), flush=True)
    return found


def _prompts(count: int) -> list[str]:
    from mdlite.data import synth_problems
    from mdlite.prompts import student_prompt

    problems = synth_problems(count, seed=3)
    return [student_prompt(p.question, style="cot" if i % 2 == 0 else "pot") for i, p in enumerate(problems)]


def _capture_llama_log() -> list[str]:
    """llama.cpp's log lines (mdlite.llamacpp forwards them to its logger at DEBUG)."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger("mdlite.llamacpp")
    logger.setLevel(logging.DEBUG)
    logger.addHandler(Keep(level=logging.DEBUG))
    logger.propagate = False
    return lines


def _save(report: dict[str, Any], path: Path | None) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
