"""The whole Mixed Distillation pipeline from one config file.

    mdlite distill configs/demo.yaml [--output-dir runs/demo] [--force STAGE]
    mdlite distill -c configs/demo.yaml --dry-run    # checks every input, prints the plan; runs nothing

Stages, each in its own folder under `output_dir`, in this order:

    teach/              rationales from the teacher on `train_data`              (rationales.run)
    eval-teacher/       the teacher itself, few-shot, on `test_data` (teacher_eval)  (evaluate.run)
    export-base/        an HF student's untrained base as GGUF (when it has none)  (export.run)
    eval-base/          the untrained student, student prompt (base_eval)        (evaluate.run)
    eval-base-fewshot/  the untrained student, few-shot prompts (base_eval)      (evaluate.run)
    train/              QLoRA / LoRA student on the kept rationales              (train.run)
    export/             merged, converted, quantized student GGUF + parity       (export.run)
    eval-student/       the distilled student GGUF on `test_data`                (evaluate.run)

With `variants` (named students sharing the one teach stage, e.g. the paper's ablation: `mixed: {}`,
`cot-only: {train: {styles: [cot]}}`), each variant NAME gets train-NAME/, export-NAME/ and eval-NAME/
instead of the last three, configured by the `train:`, `export:` and `eval:` sections with the variant's
changes on top. Every eval stage reads the same data/test.jsonl.

The config file has a `distill:` section (this module's DistillConfig) and one section per stage
(`teach:`, `train:`, `export:`, `eval:`); distill fills in the paths that link the stages. A stage is
skipped when it finished before with the same fingerprint (its resolved config plus the completion
stamps of the stages it reads); a stage that was interrupted resumes (each stage resumes on its own);
a stage whose fingerprint changed starts over and so do the stages after it. `pipeline.json` keeps
the stamps and timings; `summary.md` is the report: teacher yield, losses, one accuracy table with a row
per evaluated model (greedy CoT / PoT, maj@k per voting mode, time), and accuracy.png (accuracy vs k).
A key that distill sets in a stage section (`teach.teacher`, `train.model`, `eval.data`, any `output_dir`,
...) is ignored, with a warning.

`distill.teach_from: RUN` (another distill run's folder, or its teach/) copies that run's finished teach/
(and eval-teacher/, with `teacher_eval`) instead of asking the teacher again: accepted only when its
pipeline.json has the stage's completion stamp and the fingerprint this config's own stage would have
(teacher, data file hash, teach or eval settings) and its run.json the current prompts; otherwise a one-line
error names what differs. The copy's fingerprint is the source's stamp, so a rerun source reruns what follows.

`--dry-run` checks what the run would need without downloading or writing anything (data sources load,
student and teacher resolve, test differs from train, output folder writable) and prints each stage's
fate from `pipeline.json` as the run decides it, problem and teacher-sample counts and the training
memory estimate.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from mdlite import MdliteError, release_gpu_memory
from mdlite.config import DistillConfig, EvalConfig, ExportConfig, TeachConfig, TrainConfig, load_config, to_dict
from mdlite.runinfo import write_json

log = logging.getLogger(__name__)

STATE = "pipeline.json"
PACKED_INPUTS = "inputs.json"  # a packed run's stand-in for data/: the sha256 of the split files its stages read
SUMMARY = "summary.md"
PLOT = "accuracy.png"
DATA_FILE = {"teach": "train.jsonl", "eval": "test.jsonl"}  # by stage kind: the split file a stage reads
MODES = ("cot", "pot", "mixed", "hybrid")
SHIPPED = "rationales:"  # teach_from's prefix for a teach stage shipped with mdlite (resources/rationales/NAME)
REUSABLE = ("teach", "eval-teacher")  # the stages `teach_from` copies from another run (they read no other stage)
SET_INSTEAD = {"teacher": "distill.teacher", "model": "distill.student", "data": "distill.train_data / test_data",
               "output_dir": "distill.output_dir"}


def plan(config_path: Path, overrides: dict[str, Any], *, force: tuple[str, ...] = (),
         download: bool = True) -> dict[str, Any]:
    """Every stage's resolved config, validated together with the output folder, teacher, student and
    `force`: one MdliteError lists all problems. A registry student's GGUF is fetched unless `download` is
    false. Also returns where the teacher and student come from, and warnings about stage keys distill sets."""
    problems: list[str] = []
    linked: dict[str, list[dict[str, Any]]] = {}  # section: what distill sets in each stage that reads it

    def attempt(function: Callable[[], Any], where: str = "") -> Any:
        try:
            return function()
        except MdliteError as error:
            problems.append(f"{where}{error}")
            return None

    def load(cls: type, section: str, links: dict[str, Any], changes: dict[str, Any] | None = None,
             where: str = "") -> Any:
        linked.setdefault(section, []).append(links)
        clash = sorted(set(changes or {}) & set(links))
        if clash:
            problems.append(f"{where}{section}.{clash[0]}: distill sets it")
            return None
        return attempt(lambda: load_config(cls, config_path, (changes or {}) | links, section=section), where)

    cfg = attempt(lambda: load_config(DistillConfig, config_path, overrides, section="distill"))
    if cfg is None:
        raise MdliteError("; ".join(problems))
    out = Path(cfg.output_dir)
    attempt(lambda: _check_writable(out))
    source = attempt(lambda: _teach_source(cfg.teach_from, out, must_exist=download)) if cfg.teach_from else None
    sources = {"teacher": f"not run here: its stages are copied from {source}" if source else
               attempt(lambda: _describe_teacher(cfg.teacher), "distill.teacher: "),
               "student": attempt(lambda: _describe_student(cfg.student), "distill.student: ")}
    student = attempt(lambda: _student_gguf(cfg.student, download=download))
    train_file, test_file = out / "data" / "train.jsonl", out / "data" / "test.jsonl"
    stages = {"teach": load(TeachConfig, "teach", {"data": str(train_file), "teacher": cfg.teacher,
                                                    "output_dir": str(out / "teach")})}
    upstream: dict[str, list[str]] = {"teach": []}
    if cfg.teacher_eval:
        stages["eval-teacher"] = load(EvalConfig, "eval", {"data": str(test_file), "model": cfg.teacher,
                                                           "prompt_style": "few-shot",
                                                           "output_dir": str(out / "eval-teacher")})
        upstream["eval-teacher"] = []
    if cfg.base_eval and student is None:  # an HF model (folder, registry name, hub id): export the base alike
        stages["export-base"] = load(ExportConfig, "export", {"input_dir": cfg.student, "name": "base",
                                                              "output_dir": str(out / "export-base"), "parity": False})
        upstream["export-base"] = []
    for style in dict.fromkeys(cfg.base_eval):
        name = "eval-base" + ("-fewshot" if style == "few-shot" else "")
        stages[name] = load(EvalConfig, "eval", {
            "data": str(test_file), "prompt_style": style, "output_dir": str(out / name),
            "model": str(student) if student else "(export-base)"},
            {"paths": cfg.base_paths} if cfg.base_paths >= 0 else {})
        upstream[name] = [] if student else ["export-base"]
    for variant, changes in (cfg.variants or {"": {}}).items():
        changes, where = changes or {}, f"variants.{variant}: " if variant else ""
        train, export, evaluate = (f"train-{variant}", f"export-{variant}", f"eval-{variant}") if variant else \
            ("train", "export", "eval-student")
        stages[train] = load(TrainConfig, "train", {"rationales": str(out / "teach" / "rationales.jsonl"),
                                                    "model": cfg.student, "output_dir": str(out / train)},
                             changes.get("train"), where)
        stages[export] = load(ExportConfig, "export", {"input_dir": str(out / train / "adapter"),
                                                       "output_dir": str(out / export)}, changes.get("export"), where)
        stages[evaluate] = load(EvalConfig, "eval", {"data": str(test_file), "prompt_style": "student",
                                                     "model": f"({export})", "output_dir": str(out / evaluate)},
                                changes.get("eval"), where)
        upstream |= {train: ["teach"], export: [train], evaluate: [export]}
    attempt(lambda: _check_force(force, stages))
    if problems:
        raise MdliteError("; ".join(problems))
    reused = {name: source / name for name in REUSABLE if source and name in stages and _source_has(source, name)}
    return {"distill": cfg, "stages": stages, "upstream": upstream, "sources": sources, "reused": reused,
            "warnings": _overridden(config_path, linked)}


def run(config_path: Path, overrides: dict[str, Any], *, force: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run (or skip, or resume) every stage; returns the summary."""
    resolved = plan(config_path, overrides, force=force)
    cfg: DistillConfig = resolved["distill"]
    stages: dict[str, Any] = resolved["stages"]
    upstream: dict[str, list[str]] = resolved["upstream"]
    reused: dict[str, Path] = resolved["reused"]
    for warning in resolved["warnings"]:
        log.warning(warning)
    out = Path(cfg.output_dir)
    write_splits(cfg, out / "data")  # creates out/ once the data loaded
    state = _read_state(out / STATE)
    copies = {name: _reused_fingerprint(name, stages[name], source, _data_hash(out, name), state.get(name, {}))
              for name, source in reused.items()}  # all checked first
    results: dict[str, Any] = {}
    runners: dict[str, Callable[[Any], Any]] = {"teach": _teach, "train": _train, "export": _export,
                                                "eval": _evaluate}
    for name, stage_cfg in stages.items():
        if _kind(name) == "eval" and upstream[name]:
            stage_cfg.model = str(results[upstream[name][0]]["gguf"])
        source = reused.get(name)
        fingerprint = copies[name] if source else \
            _stage_fingerprint(stage_cfg, upstream[name], state, _data_hash(out, name))
        status = _status(name, stage_cfg, state.get(name, {}), fingerprint, force)
        if status == "up to date":
            log.info("%s: up to date, skipped", name)
            results[name] = state[name]["result"]
            continue
        if status in ("forced", "inputs changed"):
            _clear(name, stage_cfg)  # start this stage over
        state[name] = {"fingerprint": fingerprint, "started": time.time()}
        write_json(out / STATE, state)
        started = time.time()
        log.info("%s: %s (%s)", name, f"copying {source}" if source else "running", status)
        results[name] = _copy_stage(source, stage_cfg) if source else runners[_kind(name)](stage_cfg)
        release_gpu_memory()  # what torch cached for train or export is free for llama.cpp in the next stage
        state[name] |= {"stamp": f"{name}@{time.time():.6f}", "seconds": round(time.time() - started, 1),
                        "result": results[name]}
        if source:
            state[name]["reused_from"] = {"folder": str(source), "seconds": _read_state(source.parent / STATE)[
                name].get("seconds")}
        write_json(out / STATE, state)
    summary = summarize(out, stages, state)
    (out / SUMMARY).write_text(summary, encoding="utf-8")
    plot_rows(out, stages, out / PLOT)
    return {"summary": summary, "state": state, "output_dir": out}


def dry_run(config_path: Path, overrides: dict[str, Any], *, force: tuple[str, ...] = ()) -> dict[str, Any]:
    """What `run` would do, with every input checked but nothing downloaded or written: the resolved
    configs, where data and models come from, each stage's fate and why, counts and the memory estimate."""
    resolved = plan(config_path, overrides, force=force, download=False)
    cfg: DistillConfig = resolved["distill"]
    stages: dict[str, Any] = resolved["stages"]
    upstream: dict[str, list[str]] = resolved["upstream"]
    reused: dict[str, Path] = resolved["reused"]
    data = split_data(cfg, download=False)
    state = _read_state(Path(cfg.output_dir) / STATE)
    hashes = {file: _problems_sha256(data[split]) if data[split] is not None else None
              for file, split in (("train.jsonl", "train"), ("test.jsonl", "test"))}
    fates: dict[str, str] = {}
    waiting = {name: source for name, source in reused.items() if not (source.parent / STATE).is_file()}
    for name, stage_cfg in stages.items():
        rerun = [u for u in upstream[name] if fates[u] != "up to date"]
        data_file = DATA_FILE.get(_kind(name))
        data_hash = hashes.get(data_file or "")
        if name in waiting:
            fates[name] = f"waits for {waiting[name].parent}: {_how_to_make(waiting[name].parent, config_path)}"
            continue
        if name in reused and data_hash:  # checked even when forced: the copy must be usable
            fingerprint = _reused_fingerprint(name, stage_cfg, reused[name], data_hash, state.get(name, {}))
        if name in force:
            fates[name] = "forced"
        elif data_file and data_hash is None:
            fates[name] = "data not local yet"
        elif rerun:
            fates[name] = f"{rerun[0]} reruns" if name in state else "never ran"
        else:
            if _kind(name) == "eval" and upstream[name]:
                stage_cfg.model = str(state[upstream[name][0]]["result"]["gguf"])
            if name not in reused:
                fingerprint = _stage_fingerprint(stage_cfg, upstream[name], state, data_hash)
            status = _status(name, stage_cfg, state.get(name, {}), fingerprint, force)
            fates[name] = f"reused from {reused[name]}" if name in reused and status != "up to date" else status
    return resolved | {"config": str(config_path), "data": data, "fates": fates, "waiting": list(waiting)}


def format_dry_run(report: dict[str, Any]) -> str:
    """The dry-run report as text: sources, warnings, then one line per stage in run order."""
    cfg: DistillConfig = report["distill"]
    data, stages = report["data"], report["stages"]
    counts = {split: f"{len(data[split])} problems" if data[split] is not None else "no local copy, "
              "downloaded from the Hugging Face hub by the run" for split in ("train", "test")}
    if data["train"] is not None and data["test"] is not None:
        counts["test"] += " (questions also in train dropped)"
    lines = [f"distill plan for {report['config']} (dry run: nothing was run, written or downloaded)",
             f"  output_dir  {cfg.output_dir}",
             f"  train data  {cfg.train_data}: {counts['train']}",
             f"  test data   {cfg.test_data}: {counts['test']}",
             f"  teacher     {cfg.teacher}: {report['sources']['teacher']}",
             f"  student     {cfg.student}: {report['sources']['student']}"]
    lines += [f"warning: {warning}" for warning in report["warnings"]]
    lines.append("stages, in order:")
    for number, (name, stage_cfg) in enumerate(stages.items(), 1):
        fate = report["fates"][name]
        copied = name in report["reused"]
        action = {"up to date": "skip", "interrupted": "resume"}.get(fate, "copy" if copied else "run")
        detail = _stage_detail(name, stage_cfg, data) + (", copied: no teacher calls" if copied else "")
        lines.append(f"  {number:>2}. {name:<17} {f'{action} ({fate})':<25} {detail}")
    to_run = sum(fate != "up to date" for fate in report["fates"].values())
    lines.append(f"{to_run} of {len(stages)} stages would run")
    if report["waiting"]:
        name = report["waiting"][0]
        lines.append(f"the run would stop before {name}: {report['fates'][name]}")
    return "\n".join(lines)


def write_splits(cfg: DistillConfig, folder: Path) -> None:
    """data/train.jsonl and data/test.jsonl from `split_data` (rewritten only when they changed)."""
    from mdlite.data import write_problems

    for split, problems in split_data(cfg).items():
        path = folder / f"{split}.jsonl"
        if not path.exists() or path.read_text(encoding="utf-8") != _jsonl(problems):
            write_problems(problems, path)


def split_data(cfg: DistillConfig, *, download: bool = True) -> dict[str, Any]:
    """{"train": problems, "test": problems} with test problems whose question is in train removed; a
    dataset without a local copy is None unless `download` (from the Hugging Face hub)."""
    from mdlite.data import load_problems, resolve_source

    if cfg.train_data == cfg.test_data:
        raise MdliteError(f"distill.test_data is train_data ({cfg.train_data}); evaluate on held-out problems, "
                          "e.g. svamp:test")
    data_dir = cfg.data_dir or None
    data = {split: load_problems(source, data_dir=data_dir)
            if download or source.startswith("synth:") or resolve_source(source, data_dir=data_dir) else None
            for split, source in (("train", cfg.train_data), ("test", cfg.test_data))}
    if data["train"] is not None and data["test"] is not None:
        seen = {" ".join(p.question.lower().split()) for p in data["train"]}
        held_out = [p for p in data["test"] if " ".join(p.question.lower().split()) not in seen]
        if len(held_out) < len(data["test"]):
            log.warning("dropped %d test problems that also appear in train_data", len(data["test"]) - len(held_out))
        if not held_out:
            raise MdliteError("distill.test_data: every test problem also appears in train_data; use a disjoint split")
        data["test"] = held_out
    return data


def summarize(out: Path, stages: dict[str, Any], state: dict[str, Any]) -> str:
    """summary.md: teacher yield, training losses, GGUF sizes and parity, one accuracy table (a row per
    evaluated model, the paper's shape) and the time of every stage."""
    lines = [f"# mdlite distill: {out}", ""]
    stats = _read_json(out / "teach" / "teach_stats.json")
    lines += ["## Teacher", "", "| style | samples | kept | teacher accuracy | problems with a kept rationale |",
              "| --- | --- | --- | --- | --- |"]
    for style, numbers in stats.get("styles", {}).items():
        lines.append(f"| {style} | {numbers['samples']} | {numbers['kept']} | "
                     f"{_percent(numbers['teacher_accuracy'])} | {numbers['problems_with_kept']} |")
    lines += ["", "## Training", ""]
    for name in (n for n in stages if _kind(n) == "train"):
        log_lines = [json.loads(line) for line in _lines(out / name / "trainer_log.jsonl")]
        losses = [(r["step"], r["loss"]) for r in log_lines if r.get("loss") is not None]
        if losses:
            lines.append(f"- {name} ({', '.join(stages[name].styles)}): loss {losses[0][1]:.3f} (step "
                         f"{losses[0][0]}) -> {losses[-1][1]:.3f} (step {losses[-1][0]}); curve: {name}/loss.png")
    lines += ["", "## Export", "", "| file | size | parity check |", "| --- | --- | --- |"]
    for name in (n for n in stages if _kind(n) == "export"):
        parity = _read_json(out / name / "parity.json")
        verdict = ("passed" if parity.get("passed") else "FAILED") if parity else "-"
        lines += [f"| {name}/{path.name} | {path.stat().st_size / 1e6:.1f} MB | {verdict} |"
                  for path in sorted((out / name).glob("*.gguf"))]
    rows = _rows(out, stages)
    problems = {report["problems"] for report in rows.values()}
    lines += ["", f"## Accuracy on the test split ({', '.join(map(str, sorted(problems))) or 0} problems)", "",
              "k: sampled paths per style; maj@k is the exact expected accuracy of `mdlite solve`'s vote over k "
              "paths (mixed: ceil(k/2) PoT + the rest CoT). Curves: accuracy.png.", "",
              "| model | greedy CoT | greedy PoT | k | maj@k CoT | maj@k PoT | maj@k mixed | maj@k hybrid "
              "| eval time |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, report in rows.items():
        greedy, voted = report.get("greedy_accuracy", {}), report.get("accuracy", {})
        cells = [_percent(greedy.get("cot")), _percent(greedy.get("pot")), str(report.get("paths") or "-")]
        cells += [_percent(voted.get(mode)) for mode in MODES]
        lines.append(f"| {_label(name, stages)} | " + " | ".join(cells) +
                     f" | {state.get(name, {}).get('seconds', '-')} s |")
    lines += ["", "## Time", "", "| stage | seconds |", "| --- | --- |"]
    lines += [f"| {name} | {state.get(name, {}).get('seconds', '-')}{_copied(state.get(name, {}))} |"
              for name in stages]
    return "\n".join(lines) + "\n"


def plot_rows(out: Path, stages: dict[str, Any], path: Path) -> None:
    """accuracy.png: maj@k against k, one panel per voting mode and one line per evaluated model."""
    rows = {name: report for name, report in _rows(out, stages).items() if report.get("maj_at_k")}
    modes = [mode for mode in MODES if any(mode in report["maj_at_k"] for report in rows.values())]
    if not modes:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(modes), figsize=(3.6 * len(modes), 3.6), dpi=120, squeeze=False)
    for axis, mode in zip(axes[0], modes, strict=True):
        for name, report in rows.items():
            by_k = report["maj_at_k"].get(mode)
            if by_k:
                axis.plot([int(k) for k in by_k], [100 * v for v in by_k.values()], marker="o",
                          label=_label(name, stages))
        axis.set_xscale("log", base=2)
        axis.set(title=mode, xlabel="k", ylim=(0, 100))
    axes[0][0].set_ylabel("accuracy (%)")
    axes[0][-1].legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


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


def _student_gguf(student: str, *, download: bool = True) -> Path | None:
    """The student's own GGUF when it has one (a .gguf file or a registry model with a GGUF)."""
    from mdlite.models import model_path, registry

    if student.endswith(".gguf"):
        return Path(student)
    card = registry().get(student)
    return model_path(student, download=download) if card and card.gguf else None


def _describe_student(student: str) -> str:
    """Where the student loads from, checked without downloading; MdliteError when nowhere."""
    from mdlite.models import registry, resolve_base_model

    card = registry().get(student)
    if student.endswith(".gguf") or (card and card.gguf):
        return _describe_gguf(student)
    base = resolve_base_model(student, fetch=False)
    return f"Hugging Face folder {base.path}" if Path(base.path).is_dir() else \
        f"Hugging Face hub {base.path} (downloaded by the run)"


def _describe_teacher(teacher: str) -> str:
    """Where the teacher runs, checked without downloading or contacting it; MdliteError when it cannot."""
    from mdlite.teacher import parse_teacher_spec

    spec = parse_teacher_spec(teacher)
    if spec.backend == "llamacpp":
        return "llama.cpp, " + _describe_gguf(spec.model)
    return f"{spec.backend} server {spec.url or '(OLLAMA_HOST or localhost)'} (not contacted by the dry run)"


def _describe_gguf(name: str) -> str:
    from mdlite.models import get_card, model_path

    path = model_path(name, download=False)
    if path.exists():
        return f"GGUF {path}"
    return f"registry GGUF, not cached: the run fetches {get_card(name).gguf['size'] / 1e6:.0f} MB to {path}"


def _stage_detail(name: str, cfg: Any, data: dict[str, Any]) -> str:
    """One line of what a stage would do: problems and samples, steps and memory, GGUF types."""
    if name == "teach":
        count = _count(data["train"], cfg.limit)
        total = "?" if count == "?" else count * (cfg.n_cot + cfg.n_pot)
        return f"{count} problems x ({cfg.n_cot} CoT + {cfg.n_pot} PoT) = {total} teacher samples"
    if _kind(name) == "train":
        return f"styles {','.join(cfg.styles)}; " + _train_estimate(cfg)
    if _kind(name) == "export":
        return ", ".join(cfg.quant_types) + (" + parity check" if cfg.parity else "")
    paths = "greedy only" if not cfg.paths else ("greedy + " if cfg.greedy else "") + f"{cfg.paths} sampled " \
        "paths per style"
    return f"{_count(data['test'], cfg.limit)} problems, modes {','.join(cfg.mode)}, {paths}"


def _count(problems: list | None, limit: int) -> int | str:
    if problems is None:
        return "?"
    return min(len(problems), limit) if limit else len(problems)


def _train_estimate(cfg: TrainConfig) -> str:
    """Steps and the GPU memory estimate of `mdlite train --dry-run`, when it needs no download."""
    from mdlite.models import HUB_ID
    from mdlite.train import dry_run, fits

    epochs = f"{cfg.num_train_epochs:g} epoch{'' if cfg.num_train_epochs == 1 else 's'}"
    steps = f"{cfg.max_steps} steps" if cfg.max_steps > 0 else epochs
    if HUB_ID.fullmatch(cfg.model) and not Path(cfg.model).exists():
        return f"{steps}; memory estimate: `mdlite train --dry-run` (reads the hub config)"
    try:
        total = dry_run(cfg)["memory_gb"]["total"]
    except (MdliteError, ValueError) as error:  # ValueError: a file that is not a GGUF
        return f"{steps}; no memory estimate ({error})"
    return f"{steps}, GPU memory ~{total} GiB ({fits(total)})"


def _overridden(config_path: Path, linked: dict[str, list[dict[str, Any]]]) -> list[str]:
    """A warning per stage key in the file that distill sets to another value in every stage reading it."""
    raw = yaml.safe_load(Path(config_path).read_text(encoding="utf-8")) or {}
    warnings = []
    for section, all_links in linked.items():
        values = raw.get(section)
        if not isinstance(values, dict):
            continue
        for key in sorted(set(values).intersection(*all_links)):
            if any(str(values[key]) != str(links[key]) for links in all_links):
                warnings.append(f"{section}.{key} in {config_path} is ignored: distill sets it"
                                + (f"; set {SET_INSTEAD[key]} instead" if key in SET_INSTEAD else ""))
    return warnings


def _teach_source(teach_from: str, out: Path, *, must_exist: bool = True) -> Path:
    """The distill run folder that `teach_from` names (the folder itself, or its teach/), or the dataset
    shipped with mdlite that `rationales:NAME` names. A folder that does not exist yet is accepted unless
    `must_exist` (a dry run reports it as a stage that waits)."""
    if teach_from.startswith(SHIPPED):
        return shipped_rationales(teach_from.removeprefix(SHIPPED))
    folder = Path(teach_from)
    if folder.name == "teach" and not (folder / STATE).exists():
        folder = folder.parent
    if not folder.exists() and not must_exist:
        return folder
    if not (folder / STATE).is_file():
        raise MdliteError(f"distill.teach_from: {teach_from} is not a distill run folder (it has no {STATE}); point "
                          "it at one, e.g. ~/mdlite-runs/svamp-small, or at rationales shipped with mdlite: "
                          f"{', '.join(SHIPPED + name for name in shipped_names())}")
    if folder.resolve() == out.resolve():
        raise MdliteError(f"distill.teach_from: {teach_from} is this run's own output_dir; point it at another run "
                          "or remove it")
    return folder


def shipped_folder() -> Path:
    """Where the finished teach stages that ship with mdlite live: resources/rationales/NAME, each a packed run."""
    return Path(str(resources.files("mdlite").joinpath("resources/rationales")))


def shipped_names() -> list[str]:
    """The names of the shipped teach stages (`teach_from: rationales:NAME`)."""
    folder = shipped_folder()
    return sorted(p.name for p in folder.iterdir() if (p / STATE).is_file()) if folder.is_dir() else []


def shipped_rationales(name: str) -> Path:
    """The folder of shipped teach stage `name`: a packed distill run (`pack_reusable`) that `teach_from` accepts."""
    if name not in shipped_names():
        raise MdliteError(f"distill.teach_from: no rationales {name!r} ship with mdlite; known: "
                          f"{', '.join(SHIPPED + n for n in shipped_names()) or 'none'}")
    return shipped_folder() / name


def pack_reusable(run_folder: Path, dest: Path) -> list[str]:
    """Copy a run's finished reusable stages (teach/, and eval-teacher/ when it finished) into `dest` with
    their pipeline.json records and the sha256 of the data files they read (not the data itself): a folder
    that `teach_from` accepts on another machine. Returns the stages packed."""
    state = _read_state(run_folder / STATE)
    names = [name for name in REUSABLE if state.get(name, {}).get("stamp")]
    if "teach" not in names:
        raise MdliteError(f"{run_folder}: its teach stage has not finished (no completion stamp in {STATE}); "
                          "let the run finish it first")
    if dest.resolve() == run_folder.resolve():
        raise MdliteError(f"--pack-reusable: {dest} is the run folder itself; give a new folder")
    records = {name: _made_record(state[name], name) for name in names}  # before dest (maybe a source) is emptied
    for name in REUSABLE:  # a stage packed there before and not finished here would not match its record
        if (dest / name).exists():
            shutil.rmtree(dest / name)
    for name in names:
        shutil.copytree(run_folder / name, dest / name, ignore=shutil.ignore_patterns(".*.lock", "*.partial"))
    write_json(dest / PACKED_INPUTS, {DATA_FILE[_kind(name)]: _data_hash(run_folder, name) for name in names})
    write_json(dest / STATE, records)
    return names


def _made_record(record: dict[str, Any], name: str) -> dict[str, Any]:
    """Stage `name`'s pipeline.json record as the run that made it wrote it: a stage this run copied from
    another (`teach_from`) packs its source's record, whose fingerprint and stamp teach_from checks and
    every copy of it keeps."""
    if not (copied := record.get("reused_from")):
        return record
    source = Path(copied["folder"])
    made = _read_state(source.parent / STATE).get(name, {})
    if _fingerprint({"reused": str(source), "stamp": made.get("stamp")}) != record.get("fingerprint"):
        raise MdliteError(f"--pack-reusable: this run copied {name}/ from {source}, which is gone or has changed "
                          "since; rerun this run first, or pack that one")
    return made


def _source_has(source: Path, name: str) -> bool:
    """Whether the `teach_from` run `source` gives stage `name`: teach always (checked when copied), another
    stage when that run has a record of it (unfinished: refused until it finishes) or is not there yet; one
    it never had (a packed teach stage without its teacher row) runs here."""
    return name == "teach" or not (source / STATE).exists() or name in _read_state(source / STATE)


def _how_to_make(run_folder: Path, config_path: Path) -> str:
    """What makes the distill run folder `run_folder`: the config beside `config_path` whose output_dir it is."""
    for other in sorted(Path(config_path).parent.glob("*.y*ml")):
        try:
            output_dir = (yaml.safe_load(other.read_text(encoding="utf-8")) or {}).get("distill", {}).get("output_dir")
        except (yaml.YAMLError, AttributeError, OSError):
            continue
        if output_dir and Path(output_dir).expanduser().resolve() == run_folder.resolve():
            return f"run `mdlite distill {other}` first"
    return "no config beside this one makes it; run the distill config whose output_dir it is first"


def _reused_fingerprint(name: str, cfg: Any, source: Path, data_hash: str | None, own: dict[str, Any]) -> str:
    """The fingerprint of stage `name` copied from `source` (that stage's folder in another run): its stamp
    there, or this run's own record's fingerprint when this run made the stage packed there (`own`, the
    same stamp). MdliteError naming what differs, and the fix, unless it finished with the inputs that this
    config's own stage would have."""
    record = _read_state(source.parent / STATE).get(name, {})
    fix = "make this config's teach: section, distill.teacher and train_data equal to that run's, or remove " \
        "distill.teach_from to teach here" if name == "teach" else \
        "make this config's eval: section and distill.teacher equal to that run's, or set distill.teacher_eval: false"
    if not record.get("stamp") or not _outputs_exist(name, dataclasses.replace(cfg, output_dir=str(source))):
        raise MdliteError(f"distill.teach_from: {source} is not finished (no completion stamp in "
                          f"{source.parent / STATE}); let that run finish it first"
                          + (", or set distill.teacher_eval: false" if name != "teach" else ""))
    ran = _read_json(source / "run.json")
    theirs = ran.get("config", {})
    as_there = dataclasses.replace(cfg, **{key: theirs[key] for key in ("data", "output_dir") if key in theirs})
    differences = _differences(name, cfg, ran, source.parent / "data" / DATA_FILE[_kind(name)], data_hash)
    if differences or _stage_fingerprint(as_there, [], {}, data_hash) != record.get("fingerprint"):
        raise MdliteError(f"distill.teach_from: {source} differs from this config's {name} stage "
                          f"({'; '.join(differences[:3]) or 'another fingerprint'}); {fix}")
    return own["fingerprint"] if own.get("stamp") == record["stamp"] else \
        _fingerprint({"reused": str(source), "stamp": record["stamp"]})


def _differences(name: str, cfg: Any, ran: dict[str, Any], data_file: Path, data_hash: str | None) -> list[str]:
    """What differs between stage `name` as this config has it and as another run's run.json records it:
    settings, the data file, the prompts."""
    from mdlite.evaluate import prompts_sha256
    from mdlite.prompts import STYLES, prompt_hash

    section = "teach" if name == "teach" else "eval"
    theirs, mine = ran.get("config", {}), to_dict(cfg)
    found = [f"{'distill.teacher' if key in ('teacher', 'model') else f'{section}.{key}'} {theirs[key]!r} there, "
             f"{mine[key]!r} here" for key in mine
             if key in theirs and key not in ("data", "output_dir") and theirs[key] != mine[key]]
    theirs_hash = hashlib.sha256(data_file.read_bytes()).hexdigest() if data_file.exists() else \
        _read_json(data_file.parent.parent / PACKED_INPUTS).get(data_file.name)  # a packed run keeps the hash only
    if data_hash and theirs_hash != data_hash:
        found.append(f"its {data_file} holds other problems")
    prompts = ran.get("inputs", {}).get("prompt_hash") if name == "teach" else ran.get("sampling", {}).get(
        "prompt_sha256")
    now = {style: prompt_hash(style) for style in STYLES} if name == "teach" else prompts_sha256("few-shot")
    if prompts != now:
        found.append("mdlite's teacher prompts changed since")
    return found


def _copy_stage(source: Path, cfg: Any) -> dict[str, Any]:
    """Copy a finished stage folder of another run into `cfg.output_dir` (no teacher calls); its result there."""
    folder = Path(cfg.output_dir)
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns(".*.lock"))
    result = dict(_read_state(source.parent / STATE)[source.name].get("result", {}))
    if "rationales" in result:
        result["rationales"] = str(folder / "rationales.jsonl")
    return result


def _copied(record: dict[str, Any]) -> str:
    """The Time table's note on a copied stage: where from, and how long it took there."""
    source = record.get("reused_from")
    return f" (copied from {source['folder']}, where it took {source['seconds']} s)" if source else ""


def _check_force(force: tuple[str, ...], stages: dict[str, Any]) -> None:
    unknown = [name for name in force if name not in stages]
    if unknown:
        raise MdliteError(f"--force {unknown[0]}: this config has no such stage (it has {', '.join(stages)})")


def _check_writable(folder: Path) -> None:
    """MdliteError unless `folder` is, or can be made, a writable folder."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise MdliteError(f"{folder}: {existing} is not a folder; pick another distill.output_dir (flag --output-dir)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise MdliteError(f"{folder}: {existing} is not writable; pick another distill.output_dir (flag --output-dir)")


def _stage_fingerprint(cfg: Any, upstream: list[str], state: dict[str, Any], data_hash: str | None) -> str:
    """The stage's resolved config (the keys off their default: a new knob reruns nothing), the stamps of
    the stages it reads, and its data file's hash."""
    defaults = to_dict(type(cfg)())
    config = {key: value for key, value in to_dict(cfg).items() if value != defaults[key]}
    stamps = [state.get(u, {}).get("stamp") for u in upstream]
    return _fingerprint({"config": config, "upstream": stamps, "data": data_hash})


def _status(name: str, cfg: Any, record: dict[str, Any], fingerprint: str, force: tuple[str, ...]) -> str:
    """'up to date' (skipped), else why the stage runs: forced, never ran, inputs changed (starts over),
    interrupted (resumes), outputs missing."""
    if name in force:
        return "forced"
    if not record:
        return "never ran"
    if record.get("fingerprint") != fingerprint:
        return "inputs changed"
    if not record.get("stamp"):
        return "interrupted"
    return "up to date" if _outputs_exist(name, cfg) else "outputs missing"


def _outputs_exist(name: str, cfg: Any) -> bool:
    folder = Path(cfg.output_dir)
    needed = {"teach": ["rationales.jsonl", "teach_stats.json"], "train": ["adapter/adapter_config.json"],
              "export": ["run.json"], "eval": ["report.json"]}[_kind(name)]
    return all((folder / item).exists() for item in needed) and (
        _kind(name) != "export" or any(folder.glob("*.gguf")))


def _clear(name: str, cfg: Any) -> None:
    folder = Path(cfg.output_dir)
    if name != "teach" and folder.exists():  # teach invalidates only what changed, on its own
        log.info("%s: inputs changed, starting over in %s", name, folder)
        shutil.rmtree(folder)


def _data_hash(out: Path, name: str) -> str | None:
    """The sha256 of the data file that stage `name` reads (None: it reads none)."""
    data_file = DATA_FILE.get(_kind(name))
    return hashlib.sha256((out / "data" / data_file).read_bytes()).hexdigest() if data_file else None


def _kind(name: str) -> str:
    """A stage's kind from its name: teach, train, export or eval (train-cot-only is a train stage)."""
    return name.split("-")[0]


def _rows(out: Path, stages: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The report.json of every eval stage that finished, by stage name, in run order."""
    reports = {name: _read_json(out / name / "report.json") for name in stages if _kind(name) == "eval"}
    return {name: report for name, report in reports.items() if report}


def _label(name: str, stages: dict[str, Any]) -> str:
    """A table row's name: the teacher, the untrained student (with its prompt style), or a student."""
    if name == "eval-teacher":
        return f"teacher {stages[name].model} (few-shot)"
    if name.startswith("eval-base"):
        return f"base student ({stages[name].prompt_style} prompt)"
    return "student" if name == "eval-student" else f"student {name.removeprefix('eval-')}"


def _fingerprint(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError:
        raise MdliteError(f"{path}: not valid JSON; delete it to rerun every stage") from None


def _jsonl(problems: list[Any]) -> str:
    return "".join(p.to_json() + "\n" for p in problems)


def _problems_sha256(problems: list[Any]) -> str:
    """The sha256 of the data file `write_splits` writes for `problems`."""
    return hashlib.sha256(_jsonl(problems).encode("utf-8")).hexdigest()


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] if path.exists() else []


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"
