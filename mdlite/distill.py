"""The whole Mixed Distillation pipeline from one config file.

    mdlite distill configs/demo.yaml [--output-dir runs/demo] [--dry-run]

Stages, each in its own folder under `output_dir`:

    teach/          rationales from the teacher on `train_data`            (rationales.run)
    train/          QLoRA / LoRA student on the kept rationales            (train.run)
    export/         merged, converted, quantized student GGUF + parity     (export.run)
    eval-base/      the untrained student on `test_data`                   (evaluate.run)
    eval-student/   the distilled student GGUF on `test_data`              (evaluate.run)

The config file has a `distill:` section (this module's DistillConfig) and one section per stage
(`teach:`, `train:`, `export:`, `eval:`); distill fills in the paths that link the stages. A stage is
skipped when it finished before with the same fingerprint (its resolved config plus the completion
stamps of the stages it reads); a stage that was interrupted resumes (each stage resumes on its own);
a stage whose fingerprint changed starts over and so do the stages after it. `pipeline.json` keeps
the stamps and timings; `summary.md` is the before/after report.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mdlite import MdliteError
from mdlite.config import DistillConfig, EvalConfig, ExportConfig, TeachConfig, TrainConfig, load_config, to_dict
from mdlite.runinfo import write_json

log = logging.getLogger(__name__)

STATE = "pipeline.json"
SUMMARY = "summary.md"


def plan(config_path: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """Every stage's resolved config, validated together: one MdliteError lists all problems."""
    problems: list[str] = []

    def load(cls: type, section: str, links: dict[str, Any]) -> Any:
        try:
            return load_config(cls, config_path, links, section=section)
        except MdliteError as error:
            problems.append(str(error))
            return None

    cfg = load(DistillConfig, "distill", overrides)
    if cfg is None:
        raise MdliteError("; ".join(problems))
    out = Path(cfg.output_dir)
    student = _student_gguf(cfg.student)
    train_file, test_file = out / "data" / "train.jsonl", out / "data" / "test.jsonl"
    stages = {
        "teach": load(TeachConfig, "teach", {"data": str(train_file),
                                              "teacher": cfg.teacher, "output_dir": str(out / "teach")}),
        "train": load(TrainConfig, "train", {"rationales": str(out / "teach" / "rationales.jsonl"),
                                              "model": cfg.student, "output_dir": str(out / "train")}),
        "export": load(ExportConfig, "export", {"input_dir": str(out / "train" / "adapter"),
                                                "output_dir": str(out / "export")}),
    }
    eval_links = {"data": str(test_file), "prompt_style": "student"}
    if cfg.base_eval:
        if student is None:  # an HF model (folder, registry name, hub id): export the untrained base alike
            stages["export-base"] = load(ExportConfig, "export", {
                "input_dir": cfg.student, "output_dir": str(out / "export-base"),
                "name": "base", "parity": False})
        stages["eval-base"] = load(EvalConfig, "eval", eval_links | {
            "model": str(student) if student else "(export-base)", "output_dir": str(out / "eval-base")})
    stages["eval-student"] = load(EvalConfig, "eval", eval_links | {
        "model": "(export)", "output_dir": str(out / "eval-student")})
    if problems:
        raise MdliteError("; ".join(problems))
    return {"distill": cfg, "stages": stages}


def run(config_path: Path, overrides: dict[str, Any], *, force: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run (or skip, or resume) every stage; returns the summary."""
    resolved = plan(config_path, overrides)
    cfg: DistillConfig = resolved["distill"]
    stages: dict[str, Any] = resolved["stages"]
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_splits(cfg, out / "data")
    state = _read_state(out / STATE)
    results: dict[str, Any] = {}
    runners: dict[str, Callable[[Any], Any]] = {
        "teach": _teach, "train": _train, "export": _export, "export-base": _export,
        "eval-base": _evaluate, "eval-student": _evaluate,
    }
    upstream = {"train": ["teach"], "export": ["train"], "eval-base": ["export-base"],
                "eval-student": ["export"]}
    for name, stage_cfg in stages.items():
        if name in ("eval-base", "eval-student"):
            source = {"eval-base": "export-base", "eval-student": "export"}[name]
            if source in results:
                stage_cfg.model = str(results[source]["gguf"])
        stamps = [state.get(u, {}).get("stamp") for u in upstream.get(name, []) if u in stages]
        data = {"teach": "train.jsonl", "eval-base": "test.jsonl", "eval-student": "test.jsonl"}.get(name)
        data_hash = hashlib.sha256((out / "data" / data).read_bytes()).hexdigest() if data else None
        fingerprint = _fingerprint({"config": to_dict(stage_cfg), "upstream": stamps, "data": data_hash})
        record = state.get(name, {})
        if record.get("fingerprint") == fingerprint and record.get("stamp") and name not in force \
                and _outputs_exist(name, stage_cfg):
            log.info("%s: up to date, skipped", name)
            results[name] = record["result"]
            continue
        if record.get("fingerprint") not in (None, fingerprint) or name in force:
            _clear(name, stage_cfg)  # changed inputs: start this stage over
        state[name] = {"fingerprint": fingerprint, "started": time.time()}
        write_json(out / STATE, state)
        started = time.time()
        log.info("%s: running", name)
        results[name] = runners[name](stage_cfg)
        state[name] |= {"stamp": f"{name}@{time.time():.6f}", "seconds": round(time.time() - started, 1),
                        "result": results[name]}
        write_json(out / STATE, state)
    summary = summarize(out, stages, state)
    (out / SUMMARY).write_text(summary, encoding="utf-8")
    return {"summary": summary, "state": state, "output_dir": out}


def write_splits(cfg: DistillConfig, folder: Path) -> None:
    """data/train.jsonl and data/test.jsonl, with test problems whose question is in train removed."""
    from mdlite.data import load_problems, write_problems

    train = load_problems(cfg.train_data, data_dir=cfg.data_dir or None)
    seen = {" ".join(p.question.lower().split()) for p in train}
    test = load_problems(cfg.test_data, data_dir=cfg.data_dir or None)
    held_out = [p for p in test if " ".join(p.question.lower().split()) not in seen]
    if len(held_out) < len(test):
        log.warning("dropped %d test problems that also appear in train_data", len(test) - len(held_out))
    if not held_out:
        raise MdliteError("distill.test_data: every test problem also appears in train_data; use a disjoint split")
    for name, problems in (("train.jsonl", train), ("test.jsonl", held_out)):
        if not (folder / name).exists() or (folder / name).read_text(encoding="utf-8") != "".join(
                p.to_json() + "\n" for p in problems):
            write_problems(problems, folder / name)


def summarize(out: Path, stages: dict[str, Any], state: dict[str, Any]) -> str:
    """summary.md: teacher yield, training loss, GGUF sizes and parity, accuracy before vs after, time."""
    lines = [f"# mdlite distill: {out}", ""]
    stats = _read_json(out / "teach" / "teach_stats.json")
    lines += ["## Teacher", "", "| style | samples | kept | teacher accuracy | problems with a kept rationale |",
              "| --- | --- | --- | --- | --- |"]
    for style, numbers in stats.get("styles", {}).items():
        lines.append(f"| {style} | {numbers['samples']} | {numbers['kept']} | "
                     f"{_percent(numbers['teacher_accuracy'])} | {numbers['problems_with_kept']} |")
    log_lines = [json.loads(line) for line in _lines(out / "train" / "trainer_log.jsonl")]
    losses = [(r["step"], r["loss"]) for r in log_lines if r.get("loss") is not None]
    lines += ["", "## Training", ""]
    if losses:
        lines.append(f"loss {losses[0][1]:.3f} (step {losses[0][0]}) -> {losses[-1][1]:.3f} "
                     f"(step {losses[-1][0]}); curve: train/loss.png")
    parity = _read_json(out / "export" / "parity.json")
    lines += ["", "## Export", "", "| file | size |", "| --- | --- |"]
    for path in sorted((out / "export").glob("*.gguf")):
        lines.append(f"| {path.name} | {path.stat().st_size / 1e6:.1f} MB |")
    if parity:
        lines.append(f"\nparity check: {'passed' if parity.get('passed') else 'FAILED'} (export/parity.json)")
    before, after = _read_json(out / "eval-base" / "report.json"), _read_json(out / "eval-student" / "report.json")
    lines += ["", "## Student accuracy on the test split", "", "| mode | before | after |", "| --- | --- | --- |"]
    for style in ("cot", "pot"):
        lines.append(f"| greedy {style} | {_percent(before.get('greedy_accuracy', {}).get(style))} | "
                     f"{_percent(after.get('greedy_accuracy', {}).get(style))} |")
    for mode in after.get("accuracy", {}):
        lines.append(f"| {mode} ({after.get('paths')} paths) | {_percent(before.get('accuracy', {}).get(mode))} | "
                     f"{_percent(after['accuracy'][mode])} |")
    lines += ["", "## Time", "", "| stage | seconds |", "| --- | --- |"]
    lines += [f"| {name} | {state.get(name, {}).get('seconds', '-')} |" for name in stages]
    return "\n".join(lines) + "\n"


# ---- stage runners (each returns JSON-able facts that later stages and the summary read) --------


def _teach(cfg: TeachConfig) -> dict[str, Any]:
    from mdlite.rationales import run

    result = run(cfg)
    return {"rationales": str(result["rationales"])}


def _train(cfg: TrainConfig) -> dict[str, Any]:
    from mdlite.train import run

    result = run(cfg)
    return {"adapter": str(result.adapter_dir), "global_step": result.global_step,
            "train_loss": result.train_loss, "eval_loss": result.eval_loss}


def _export(cfg: ExportConfig) -> dict[str, Any]:
    from mdlite.export import run

    result = run(cfg)
    if not result.passed:
        raise MdliteError(f"{result.output_dir / 'parity.json'}: the parity check failed; see the file, "
                          "or relax the export thresholds in the config")
    return {"gguf": str(next(iter(result.files.values()))), "files": {k: str(v) for k, v in result.files.items()}}


def _evaluate(cfg: EvalConfig) -> dict[str, Any]:
    from mdlite.evaluate import run

    report = run(cfg)["report"]
    return {"accuracy": report["accuracy"], "greedy_accuracy": report["greedy_accuracy"]}


# ---- helpers ------------------------------------------------------------------------------------


def _student_gguf(student: str) -> Path | None:
    """The student's own GGUF when it has one (a .gguf file or a registry model with a GGUF)."""
    from mdlite.models import model_path, registry

    if student.endswith(".gguf"):
        return Path(student)
    card = registry().get(student)
    return model_path(student) if card and card.gguf else None


def _outputs_exist(name: str, cfg: Any) -> bool:
    folder = Path(cfg.output_dir)
    needed = {"teach": ["rationales.jsonl", "teach_stats.json"], "train": ["adapter/adapter_config.json"],
              "export": ["run.json"], "export-base": ["run.json"], "eval-base": ["report.json"],
              "eval-student": ["report.json"]}[name]
    return all((folder / item).exists() for item in needed) and (
        not name.startswith("export") or any(folder.glob("*.gguf")))


def _clear(name: str, cfg: Any) -> None:
    folder = Path(cfg.output_dir)
    if name != "teach" and folder.exists():  # teach invalidates only what changed, on its own
        log.info("%s: inputs changed, starting over in %s", name, folder)
        shutil.rmtree(folder)


def _fingerprint(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError:
        raise MdliteError(f"{path}: not valid JSON; delete it to rerun every stage") from None


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] if path.exists() else []


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"
