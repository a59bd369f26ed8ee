"""`mdlite distill` of a tiny config, end to end, on whatever this machine has (on a GPU: CUDA training, the merge on
the GPU, the export's parity check and the eval with every layer offloaded, given a CUDA llama-cpp-python).

    python bench/device_distill.py --work /tmp/distill --summary-to results/distill_summary.md --json d.json

Student: a tiny random LLaMA (`mdlite.models.make_tiny_model`, what `mdlite models make-tiny` writes). Teacher:
tests/fake_ollama.py's server in this process, scripted with one right CoT and one right PoT rationale per
training problem, so `teach` runs for real (Ollama's HTTP API, mdlite's own client code) with nothing to download.
The config (written to --work/distill.yaml) takes the 7B configs' QLoRA settings where they matter on a GPU
(nf4, LoRA on all linear layers, gradient checkpointing, the optimizer's `auto`: paged 8-bit AdamW on CUDA) at
tiny sizes; export writes F16, Q8_0 and Q4_K_M with the parity check (token ids and the chat template must match;
a random student's answers are not required to, so the answer thresholds are 0); eval samples CoT, PoT, mixed
and hybrid with n_gpu_layers -1. `python -m mdlite distill CONFIG` runs as a child process with OLLAMA_HOST
pointing at the fake teacher. Prints RESULT lines (each stage's seconds and where it ran, parity, accuracy) and
copies summary.md to --summary-to.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # fake_ollama


def config(work: Path, student: Path, *, train_steps: int) -> dict[str, Any]:
    loose = {"min_greedy_match": 0.0, "min_answer_agreement": 0.0, "min_stop_rate": 0.0}
    return {
        "distill": {"output_dir": str(work / "run"), "train_data": "synth:16:11", "test_data": "synth:6:12",
                    "teacher": "ollama:devcheck-teacher", "student": str(student), "teacher_eval": False,
                    "base_eval": []},
        "teach": {"n_cot": 1, "n_pot": 1, "temperature": 0.7, "max_tokens": 96, "concurrency": 2},
        "train": {"quantization": "nf4", "max_steps": train_steps, "save_steps": 5, "logging_steps": 1,
                  "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "val_fraction": 0.0,
                  "gradient_checkpointing": True, "max_length": 256},
        "export": {"quant_types": ["F16", "Q8_0", "Q4_K_M"], "parity_problems": 2, "parity_max_tokens": 16} | loose,
        "eval": {"mode": ["cot", "pot", "mixed", "hybrid"], "paths": 4, "max_tokens": 24, "n_gpu_layers": -1},
    }


def teacher_script(source: str) -> dict[str, dict[str, list[str]]]:
    """One right rationale per style for every problem of `source` (what a good teacher would answer)."""
    from mdlite.answers import format_number
    from mdlite.data import load_problems

    script: dict[str, dict[str, list[str]]] = {"cot": {}, "pot": {}}
    for p in load_problems(source):
        right = format_number(p.answer)
        script["cot"][p.question] = [f" We work it out: {p.equation} = {right}. The answer is {right}."]
        script["pot"][p.question] = [f"def solution():\n    total = {p.equation}\n    return total\n"]
    return script


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the student, config and run")
    parser.add_argument("--train-steps", type=int, default=10, help="optimizer steps of the train stage")
    parser.add_argument("--summary-to", type=Path, help="copy the run's summary.md here")
    parser.add_argument("--json", type=Path, help="write the stage timings and results here")
    args = parser.parse_args()

    import yaml
    from fake_ollama import FakeOllama

    from mdlite.models import make_tiny_model

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    student = make_tiny_model(args.work / "student")
    cfg = config(args.work, student, train_steps=args.train_steps)
    path = args.work / "distill.yaml"
    path.write_text(yaml.safe_dump(cfg))
    clock = time.perf_counter()
    with FakeOllama(model="devcheck-teacher", parallel=2, script=teacher_script(cfg["distill"]["train_data"])) as fake:
        env = {**os.environ, "OLLAMA_HOST": fake.url}
        done = subprocess.run([sys.executable, "-m", "mdlite", "distill", str(path)], env=env)
    seconds = time.perf_counter() - clock
    report = summarize(Path(cfg["distill"]["output_dir"]), done.returncode, seconds)
    if args.summary_to and (Path(cfg["distill"]["output_dir"]) / "summary.md").exists():
        args.summary_to.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(cfg["distill"]["output_dir"]) / "summary.md", args.summary_to)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    raise SystemExit(done.returncode)


def summarize(out: Path, returncode: int, seconds: float) -> dict[str, Any]:
    """RESULT lines from the run's pipeline.json and its stages' run.json files."""
    state = json.loads((out / "pipeline.json").read_text()) if (out / "pipeline.json").exists() else {}
    report: dict[str, Any] = {"returncode": returncode, "seconds": round(seconds, 1),
                              "stages": {name: {"seconds": s.get("seconds"), "done": bool(s.get("stamp"))}
                                         for name, s in state.items()}}
    print(f"{'RESULT' if returncode == 0 else 'FAIL'} distill: exit {returncode} in {seconds:.0f} s; stages "
          + ", ".join(f"{name} {s['seconds']} s" if s["done"] else f"{name} unfinished"
                      for name, s in report["stages"].items()))
    train_run = _json(out / "train" / "run.json")
    if train_run:
        report["train"] = {k: train_run.get(k) for k in ("device", "global_step", "train_loss", "runtime_s")}
        optim = train_run.get("config", {}).get("optim")
        print(f"RESULT distill train: on {train_run.get('device')}, {train_run.get('global_step')} steps, loss "
              f"{train_run.get('train_loss')}, optim {optim} (auto: paged_adamw_8bit on CUDA)")
    export_run = _json(out / "export" / "run.json")
    if export_run:
        report["export"] = {"parity": export_run.get("parity"), "timings_s": export_run.get("timings_s"),
                            "n_gpu_layers": export_run.get("config", {}).get("n_gpu_layers")}
        print(f"RESULT distill export: parity {export_run.get('parity')}; timings {export_run.get('timings_s')}")
    eval_run = _json(out / "eval-student" / "run.json")
    if eval_run:
        report["eval"] = {k: eval_run.get(k) for k in ("model", "engine", "timings_s", "device") if k in eval_run}
    eval_report = _json(out / "eval-student" / "report.json")
    if eval_report:
        report["eval_report"] = {k: v for k, v in eval_report.items() if not isinstance(v, list)}
        print(f"RESULT distill eval: {json.dumps(report['eval_report'])[:600]}")
    return report


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


if __name__ == "__main__":
    main()
