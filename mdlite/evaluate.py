"""`mdlite eval`: offline accuracy of a student GGUF or a teacher, with reports read at a glance.

    mdlite eval --model runs/export/student-Q4_K_M.gguf --data svamp:test --paths 16 --output-dir runs/eval
    mdlite eval --model qwen2.5-coder-0.5b-instruct --prompt-style few-shot --paths 0 --output-dir runs/base
    mdlite eval --model ollama:qwen2.5:32b --data svamp:test --paths 8 --output-dir runs/teacher
    mdlite eval --model openai:http://127.0.0.1:8080/v1 --prompt-style student --endpoints URL1,URL2 --paths 8
    mdlite eval compare runs/base runs/eval runs/teacher

The model is a GGUF (path or registry name), run by `mdlite solve`'s own code (mdlite.solve.solve_questions:
batched engine, student template or `--prompt-style few-shot`, sandboxed programs), or a served model, given
as a teacher spec (`ollama:`, `openai:`, `openai-chat:`, `llamacpp:`) and run through the teacher backends
(mdlite.teacher: one request per path, spread over `endpoints`), scored the same way: one harness measures
base model, student and teacher. Prompts (`prompt_style`): auto is student for a GGUF, few-shot for a served
model; `--prompt-style student` evaluates a served student (llama.cpp's server, vLLM, Ollama, `mdlite serve`).
A served student gets the student prompt as raw text (/v1/completions, Ollama's raw /api/generate), not as
chat messages: the server adds BOS as the GGUF says, so the tokens are the ones training saw, whatever chat
template (or none) the server applies; `openai-chat:` is refused with student prompts for that reason.

Per problem it decodes one greedy path per style (`greedy`) and samples `paths` paths of each style the
modes need; every mode is voted from these same samples (paired comparison), as mdlite.vote votes:
cot / pot (majority of that style), mixed (k paths: ceil(k/2) PoT + floor(k/2) CoT, pooled) and hybrid
(PoT; the CoT vote when every program failed).

maj@k, for k = 1, 2, 4, ..., paths, is the exact probability that the vote over uniformly random k of a
problem's sampled paths is right (`vote_at_k`: combinatorics over all subsets, not "the first k"),
averaged over problems; ties are broken as `mdlite solve` breaks them (mdlite.vote: the tied group seen
first, PoT paths before CoT paths), the sampled paths taken in random order, so that maj@k is what solve
scores with k paths: one style, a t-way tie of the gold answer counts 1/t; mixed, a tied answer with PoT
paths beats one with CoT paths only, and among tied answers with PoT paths each wins with its share of
them. A mode's accuracy is its maj@paths. Also reported: greedy accuracy per style, PoT execution
failures, paths without an answer, paths cut at max_tokens, tokens per path, questions/s and tokens/s.

Outputs in `output_dir`: samples.jsonl (every path; appended and flushed per problem, so the same command
again skips finished problems and drops a torn last line), report.json, report.md, accuracy.png, run.json.
A samples.jsonl record: id, problem_hash (mdlite.data.problem_hash of its question and gold; on resume a
problem whose hash differs, or is missing, is dropped and redone), style, greedy, path, gold, answer, correct,
text, program_result (PoT: ok, value, error), finish_reason, tokens, seconds.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import itertools
import json
import logging
import math
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mdlite import MdliteError, check_output_dir
from mdlite.answers import answers_match, extract_answer
from mdlite.config import EvalConfig, to_dict
from mdlite.data import Problem, load_problems, problem_hash
from mdlite.prompts import STOP_AFTER, extract_program, prompt_text
from mdlite.runinfo import file_sha256, package_versions, write_json

log = logging.getLogger(__name__)
RECORDED_PACKAGES = ("llama-cpp-python", "ollama", "httpx", "numpy", "matplotlib")  # versions written to run.json

MODE_STYLES = {"cot": ("cot",), "pot": ("pot",), "mixed": ("cot", "pot"), "hybrid": ("cot", "pot")}
SAMPLES, REPORT_JSON, REPORT_MD, PLOT, RUN_JSON = ("samples.jsonl", "report.json", "report.md", "accuracy.png",
                                                   "run.json")


def run(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate `cfg.model` on `cfg.data`; returns the output paths and the report."""
    problems = load_problems(cfg.data, data_dir=cfg.data_dir or None, limit=cfg.limit or None)
    output_dir = check_output_dir(cfg.output_dir, "--output-dir")
    started = time.time()
    with _exclusive(output_dir):
        info = _run_record(cfg, problems)
        _check_resumable(output_dir, info)
        write_json(output_dir / RUN_JSON, info)
        plan = sampling_plan(cfg)
        done = load_samples(output_dir / SAMPLES, per_problem=sum(plan.values()),
                            hashes={p.id: problem_hash(p) for p in problems})
        scores = {p.id: problem_scores(done[p.id], p.answer, cfg.mode, cfg.paths) for p in problems if p.id in done}
        if scores:
            log.info("%s: resuming; %d of %d problems are done", output_dir, len(scores), len(problems))
        if len(scores) < len(problems):
            _decode_all(problems, done, scores, plan, cfg, output_dir / SAMPLES, info)
        report = build_report(problems, done, scores, cfg)
        write_json(output_dir / REPORT_JSON, report)
        (output_dir / REPORT_MD).write_text(report_markdown(report), encoding="utf-8")
        plot_accuracy(report, output_dir / PLOT)
        info["wall_s"] = round(time.time() - started, 2)
        write_json(output_dir / RUN_JSON, info)
    return {name: output_dir / name for name in (SAMPLES, REPORT_JSON, REPORT_MD, PLOT, RUN_JSON)} | {
        "report": report}


def sampling_plan(cfg: EvalConfig) -> dict[tuple[str, bool], int]:
    """Paths per problem, {(style, greedy): count}, for the styles the modes need: one greedy path each
    (with `greedy`) and `paths` sampled ones."""
    styles = [style for style in ("cot", "pot") if any(style in MODE_STYLES[mode] for mode in cfg.mode)]
    plan = {(style, True): 1 for style in styles} if cfg.greedy else {}
    return plan | ({(style, False): cfg.paths for style in styles} if cfg.paths else {})


# ---- the maj@k estimator ------------------------------------------------------------------------


def vote_at_k(pools: Sequence[tuple[Sequence[float | None], int]], gold: float) -> float:
    """Exact probability that mdlite.vote's (unweighted) vote over uniformly random subsets, of size k_i
    from each pool (answers_i, k_i), in random order, picks `gold`. None answers (failed paths) take a slot
    but no vote; no answer at all is wrong. Ties go as vote.py breaks them: to the tied group seen first, the
    pools read in order (PoT first); over random orders a tied group wins with its share of the tied groups'
    paths in the first pool where they have any (one pool: 1/t for a t-way tie). Answers are grouped as
    vote.py does: a path joins the first group whose first answer it matches, the pools read in order.

    How: for each gold-matching group and each way j_i of drawing its votes from each pool, count the ways
    to fill the other slots with failed paths and rival groups of at most sum(j_i) votes each, by the paths
    per pool of the rivals tied with it; divide by the number of subsets.
    """
    sizes, ks = [len(answers) for answers, _ in pools], tuple(k for _, k in pools)
    if any(not 0 <= k <= n for k, n in zip(ks, sizes, strict=True)) or not sum(ks):
        raise ValueError(f"subset sizes {ks} must be within the pool sizes {sizes}, and not all 0")
    groups = _groups([answers for answers, _ in pools])
    failed = tuple(sum(a is None for a in answers) for answers, _ in pools)
    credit = Fraction(0)  # ways the gold answer wins, ties weighted by its chance to win them
    for g, (value, counts) in enumerate(groups):
        if not answers_match(value, gold):
            continue
        rivals = [c for h, (_, c) in enumerate(groups) if h != g]
        tables: dict[int, dict[tuple[tuple[int, ...], tuple[int, ...]], int]] = {}
        for split in itertools.product(*(range(min(c, k) + 1) for c, k in zip(counts, ks, strict=True))):
            if not (votes := sum(split)):
                continue
            if votes not in tables:
                tables[votes] = _fillings(rivals, failed, ks, votes=votes)
            rest = tuple(k - j for k, j in zip(ks, split, strict=True))
            ways = math.prod(math.comb(c, j) for c, j in zip(counts, split, strict=True))
            for (filled, tied), count in tables[votes].items():
                if filled == rest:
                    own, others = next((j, t) for j, t in zip(split, tied, strict=True) if j + t)
                    credit += Fraction(ways * count * own, own + others)
    return float(credit / math.prod(math.comb(n, k) for n, k in zip(sizes, ks, strict=True)))


def majority_at_k(answers: Sequence[float | None], gold: float, k: int) -> float:
    """maj@k of one problem: the probability that the vote over a uniformly random k of its `answers` is right."""
    return vote_at_k([(answers, k)], gold)


def hybrid_at_k(pot: Sequence[float | None], cot: Sequence[float | None], gold: float, k: int) -> float:
    """maj@k of the hybrid vote: PoT vote over a random k of `pot`, else (no PoT answer among them) the
    CoT vote over a random k of `cot`; the two subsets are independent."""
    no_pot_answer = math.comb(sum(a is None for a in pot), k) / math.comb(len(pot), k)
    return majority_at_k(pot, gold, k) + no_pot_answer * majority_at_k(cot, gold, k)


def mode_at_k(mode: str, pools: dict[str, list[float | None]], gold: float, k: int) -> float:
    """maj@k of `mode` with k paths, from each style's sampled answers (`pools["cot"]`, `pools["pot"]`),
    split between the styles as `mdlite solve` does (mixed: ceil(k/2) PoT + floor(k/2) CoT)."""
    if mode in ("cot", "pot"):
        return majority_at_k(pools[mode], gold, k)
    if mode == "mixed":
        return vote_at_k([(pools["pot"], k - k // 2), (pools["cot"], k // 2)], gold)
    return hybrid_at_k(pools["pot"], pools["cot"], gold, k)


def k_values(paths: int) -> list[int]:
    """1, 2, 4, ... up to `paths` (and `paths` itself)."""
    ks = [2**i for i in range(paths.bit_length()) if 2**i <= paths]
    return ks if not ks or ks[-1] == paths else [*ks, paths]


def _groups(pools: list[Sequence[float | None]]) -> list[tuple[float, tuple[int, ...]]]:
    """(first answer, count per pool) of each group of matching answers, in order of first appearance."""
    groups: list[tuple[float, list[int]]] = []
    for p, answers in enumerate(pools):
        for answer in answers:
            if answer is not None:
                group = next((g for g in groups if answers_match(answer, g[0])), None)
                if group is None:
                    group = (answer, [0] * len(pools))
                    groups.append(group)
                group[1][p] += 1
    return [(value, tuple(counts)) for value, counts in groups]


def _fillings(rivals: list[tuple[int, ...]], failed: tuple[int, ...], ks: tuple[int, ...], *,
              votes: int) -> dict[tuple[tuple[int, ...], tuple[int, ...]], int]:
    """{(slots filled per pool, tied paths per pool): ways} to draw from the rival groups (at most `votes`
    paths from each) and the failed paths, where tied counts the paths of the rivals that drew exactly
    `votes`."""
    none = tuple(0 for _ in ks)
    table = {(none, none): 1}
    for counts, rival in [*((c, True) for c in rivals), (failed, False)]:
        grown: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = defaultdict(int)
        for (filled, tied), ways in table.items():
            for take in itertools.product(*(range(min(c, k - f) + 1) for c, k, f in zip(counts, ks, filled,
                                                                                          strict=True))):
                if rival and sum(take) > votes:
                    continue
                ties = rival and sum(take) == votes
                state = (tuple(f + t for f, t in zip(filled, take, strict=True)),
                         tuple(d + t for d, t in zip(tied, take, strict=True)) if ties else tied)
                grown[state] += ways * math.prod(math.comb(c, t) for c, t in zip(counts, take, strict=True))
        table = grown
    return table


# ---- metrics and reports ------------------------------------------------------------------------


def build_report(problems: list[Problem], done: dict[str, list[dict[str, Any]]],
                 scores: dict[str, dict[str, float]], cfg: EvalConfig) -> dict[str, Any]:
    """Every metric of the run (report.json), from the sample records and `problem_scores` of `problems`."""
    solved = [p for p in problems if p.id in done]
    records = [r for p in solved for r in done[p.id]]
    per_problem = [scores[p.id] for p in solved]
    greedy = {style: _mean(s[f"greedy {style}"] for s in per_problem) for style in ("cot", "pot")
              if (style, True) in sampling_plan(cfg)}
    maj = {mode: {str(k): _mean(s[f"{mode}@{k}"] for s in per_problem) for k in k_values(cfg.paths)}
           for mode in cfg.mode} if cfg.paths else {}
    pot = [r for r in records if r["style"] == "pot"]
    programs = [r for r in pot if r["program_result"] is not None]
    seconds = sum(r["seconds"] for r in records)
    tokens = sum(r["tokens"] for r in records)
    return {
        "model": cfg.model, "data": cfg.data, "problems": len(solved), "paths": cfg.paths,
        "prompt_style": prompt_style(cfg), "modes": list(cfg.mode),
        "greedy_accuracy": greedy,
        "accuracy": {mode: by_k[str(cfg.paths)] for mode, by_k in maj.items()},
        "maj_at_k": maj,
        "pot_exec_failure_rate": _ratio(sum(not r["program_result"]["ok"] for r in programs), len(programs)),
        "parse_failure_rate": _ratio(sum(r["answer"] is None and (r["style"] == "cot" or r["program_result"] is None)
                                         for r in records), len(records)),
        "truncated_rate": _ratio(sum(r["finish_reason"] == "length" for r in records), len(records)),
        "mean_tokens_per_path": {style: _mean(r["tokens"] for r in records if r["style"] == style)
                                 for style in ("cot", "pot") if any(r["style"] == style for r in records)}
        | {"all": _ratio(tokens, len(records))},
        "paths_decoded": len(records), "seconds": round(seconds, 2),
        "questions_per_s": _ratio(len(solved), seconds), "tokens_per_s": _ratio(tokens, seconds),
    }


def problem_scores(records: list[dict[str, Any]], gold: float, modes: Sequence[str], paths: int) -> dict[str, float]:
    """One problem's scores: "greedy cot", "greedy pot" (0 or 1) and "MODE@k" (maj@k) for every mode and
    k up to `paths`."""
    scores = {f"greedy {r['style']}": float(r["correct"]) for r in records if r["greedy"]}
    pools: dict[str, list[float | None]] = {"cot": [], "pot": []}
    for record in sorted((r for r in records if not r["greedy"]), key=lambda r: r["path"]):
        pools[record["style"]].append(record["answer"])
    for mode in modes if paths else ():
        scores |= {f"{mode}@{k}": mode_at_k(mode, pools, gold, k) for k in k_values(paths)}
    return scores


def report_markdown(report: dict[str, Any]) -> str:
    """report.md: accuracy by mode and number of paths, then failure rates and speed."""
    ks = list(next(iter(report["maj_at_k"].values()), {}))
    modes = list(dict.fromkeys([*report["greedy_accuracy"], *report["maj_at_k"]]))
    sampled = (f"{report['paths']} sampled paths per style; maj@k: the exact expected accuracy of the vote over "
               "k random paths" if ks else "greedy paths only")
    lines = [f"# {report['model']} on {report['data']}", "",
             f"{report['problems']} problems, prompts: {report['prompt_style']}, {sampled}.", "",
             "| " + " | ".join(["mode", "greedy", *(f"maj@{k}" for k in ks)]) + " |",
             "| --- | ---: |" + " ---: |" * len(ks)]
    for mode in modes:
        cells = [_percent(report["greedy_accuracy"].get(mode))]
        cells += [_percent(report["maj_at_k"].get(mode, {}).get(k)) for k in ks]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    tokens = report["mean_tokens_per_path"]
    lines += ["", "| measure | value |", "| --- | ---: |",
              f"| PoT programs that failed to run | {_percent(report['pot_exec_failure_rate'])} |",
              f"| paths with no answer (parse failure) | {_percent(report['parse_failure_rate'])} |",
              f"| paths cut at max_tokens | {_percent(report['truncated_rate'])} |",
              "| tokens per path | " + ", ".join(f"{s} {_number(v)}" for s, v in tokens.items()) + " |",
              f"| questions/s | {_number(report['questions_per_s'])} |",
              f"| tokens/s | {_number(report['tokens_per_s'])} |",
              f"| generation time (decoding and program runs) | {_duration(report['seconds'])} for "
              f"{report['paths_decoded']} paths |", ""]
    return "\n".join(lines)


def plot_accuracy(report: dict[str, Any], path: Path) -> None:
    """accuracy.png: maj@k against k per mode (log2 axis), greedy accuracy per style as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for mode, by_k in report["maj_at_k"].items():
        axes.plot([int(k) for k in by_k], [100 * v for v in by_k.values()], marker="o", label=mode)
    for style, accuracy in report["greedy_accuracy"].items():
        axes.axhline(100 * accuracy, linestyle="--" if style == "cot" else ":", linewidth=1.2, color="0.35",
                     label=f"greedy {style}")
    if report["maj_at_k"]:
        axes.set_xscale("log", base=2)
        ks = [int(k) for k in next(iter(report["maj_at_k"].values()))]
        axes.set_xticks(ks, [str(k) for k in ks])
    axes.set(xlabel="sampled paths (k)", ylabel="accuracy (%)", ylim=(0, 100),
             title=f"{Path(report['model']).name} on {Path(report['data']).name} ({report['problems']} problems)")
    axes.title.set_fontsize("medium")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def compare_reports(folders: Sequence[str | Path]) -> str:
    """The report.json of each eval folder side by side, as a Markdown table (columns: folders)."""
    reports = []
    for folder in folders:
        path = Path(folder) / REPORT_JSON
        try:
            reports.append(json.loads(path.read_text(encoding="utf-8")))
        except OSError:  # FOLDER missing, a file, or without a report
            raise MdliteError(f"{path}: no report; run `mdlite eval --output-dir {folder}` first") from None
        except ValueError as error:
            raise MdliteError(f"{path}: not a report ({error}); rerun `mdlite eval --output-dir {folder}`") from None
    modes = list(dict.fromkeys(m for r in reports for m in r["accuracy"]))
    rows: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("model", lambda r: Path(r["model"]).name), ("data", lambda r: Path(r["data"]).name),
        ("problems", lambda r: str(r["problems"])), ("prompts", lambda r: r["prompt_style"]),
        *((f"greedy {s}", lambda r, s=s: _percent(r["greedy_accuracy"].get(s))) for s in ("cot", "pot")),
        *((f"{m} (maj@paths)", lambda r, m=m: _percent(r["accuracy"].get(m))) for m in modes),
        ("paths", lambda r: str(r["paths"])),
        ("PoT run failures", lambda r: _percent(r["pot_exec_failure_rate"])),
        ("no answer", lambda r: _percent(r["parse_failure_rate"])),
        ("tokens/path", lambda r: _number(r["mean_tokens_per_path"].get("all"))),
        ("questions/s", lambda r: _number(r["questions_per_s"])),
        ("tokens/s", lambda r: _number(r["tokens_per_s"])),
    ]
    names = [Path(f).name or str(f) for f in folders]
    table = [["", *names], *([label, *(cell(r) for r in reports)] for label, cell in rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(names) + 1)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in table]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


def paired_comparison(first: str | Path, second: str | Path, metrics: Sequence[tuple[str, str]] = ()) -> str:
    """Two finished evals of the same problems, problem by problem, as a Markdown table: for each pair of
    metrics (FIRST's, SECOND's; default: every greedy style and mode at the largest k both have), both
    accuracies, the problems where each scores higher, and the paired test's p (`paired_p`: McNemar's exact
    test for greedy, right-or-wrong scores)."""
    scores = [_scores_per_problem(Path(folder)) for folder in (first, second)]
    if scores[0].keys() != scores[1].keys():
        raise MdliteError(f"{first} and {second} hold different problems ({len(scores[0])} and {len(scores[1])}, "
                          f"{len(scores[0].keys() ^ scores[1].keys())} not in both); compare evals of the same data")
    if mismatched := [pid for pid in scores[0] if scores[0][pid][1] != scores[1][pid][1]]:
        raise MdliteError(f"problem {mismatched[0]} has another question or gold answer in {first} than in "
                          f"{second}; compare evals of the same data")
    names = [{name for score, _ in folder.values() for name in score} for folder in scores]
    pairs = list(metrics) or [(name, name) for name in _default_metrics(names[0] & names[1])]
    for side, (folder, known) in enumerate(zip((first, second), names, strict=True)):
        if missing := sorted({pair[side] for pair in pairs} - known):
            raise MdliteError(f"{folder} has no score {missing[0]!r}; it has: {', '.join(_metric_order(known))}")
    lines = [f"| metric ({Path(first).name} vs {Path(second).name}, {len(scores[0])} problems) | "
             f"{Path(first).name} | {Path(second).name} | higher in {Path(first).name} | "
             f"higher in {Path(second).name} | p |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for mine, theirs in pairs:
        a = [scores[0][pid][0][mine] for pid in scores[0]]
        b = [scores[1][pid][0][theirs] for pid in scores[0]]
        wins, losses = sum(x > y for x, y in zip(a, b, strict=True)), sum(x < y for x, y in zip(a, b, strict=True))
        label = mine if mine == theirs else f"{mine} vs {theirs}"
        lines.append(f"| {label} | {_percent(_mean(a))} | {_percent(_mean(b))} | {wins} | {losses} | "
                     f"{paired_p(a, b):.3g} |")
    return "\n".join(lines)


def paired_p(first: Sequence[float], second: Sequence[float], *, draws: int = 100_000) -> float:
    """Two-sided p of the paired sign-flip (permutation) test that the two score lists, problem by problem,
    have the same mean: under that hypothesis each problem's difference is as likely negated. Right-or-wrong
    scores: exact, McNemar's exact test (`sign_test_p`); scores with fractions (maj@k): `draws` random sign
    flips from a fixed seed."""
    import numpy as np

    differences = np.array([x - y for x, y in zip(first, second, strict=True) if x != y])
    if np.all(np.abs(differences) == 1):
        wins = int(np.count_nonzero(differences > 0))
        return sign_test_p(wins, len(differences) - wins)
    observed, rng, extreme = abs(differences.sum()) - 1e-9, np.random.default_rng(0), 0
    for start in range(0, draws, 10_000):
        flips = rng.choice([-1.0, 1.0], size=(min(10_000, draws - start), len(differences)))
        extreme += int(np.count_nonzero(np.abs(flips @ differences) >= observed))
    return (extreme + 1) / (draws + 1)


def sign_test_p(wins: int, losses: int) -> float:
    """Exact two-sided sign test of `wins` against `losses` (ties left out): McNemar's exact test."""
    n = wins + losses
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1))
    return min(1.0, 2 * tail / 2**n)


def _scores_per_problem(folder: Path) -> dict[str, tuple[dict[str, float], str]]:
    """{problem id: (problem_scores, problem_hash)} of the finished problems of eval folder `folder`, scored
    from its samples.jsonl with the modes and paths of its run.json."""
    try:
        run = json.loads((folder / RUN_JSON).read_text(encoding="utf-8"))
        modes, paths, plan = run["config"]["mode"], run["config"]["paths"], run["sampling"]["plan"]
        groups, _ = _read_samples(folder / SAMPLES)
    except OSError:
        raise MdliteError(f"{folder}: no run.json and samples.jsonl; run `mdlite eval --output-dir {folder}` "
                          "first") from None
    except (ValueError, KeyError, TypeError) as error:
        raise MdliteError(f"{folder / RUN_JSON}: not an eval record ({error!r})") from None
    return {pid: (problem_scores(records, records[0]["gold"], modes, paths), records[0].get("problem_hash", ""))
            for pid, records in groups.items() if len(records) == sum(plan.values())}


def _default_metrics(names: set[str]) -> list[str]:
    """Greedy styles, then every mode at the largest k of `names`."""
    ks = [int(name.rpartition("@")[2]) for name in names if "@" in name]
    return [name for name in _metric_order(names) if "@" not in name or name.endswith(f"@{max(ks)}")]


def _metric_order(names: set[str]) -> list[str]:
    """`names` as reports order them: greedy styles, then modes, then k."""
    order = [*(f"greedy {s}" for s in ("cot", "pot")), *MODE_STYLES]
    return sorted(names, key=lambda n: (order.index(n.partition("@")[0]), int(n.partition("@")[2] or 0)))


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def _ratio(part: float, whole: float) -> float:
    return part / whole if whole else 0.0


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


# ---- decoding -----------------------------------------------------------------------------------

# solve(problems, plan) -> (problem, its sample records), in the order of `problems`, each as soon as it is done
Solver = Callable[[list[Problem], dict[tuple[str, bool], int]], Iterator[tuple[Problem, list[dict[str, Any]]]]]


def is_teacher_spec(model: str) -> bool:
    """True for `ollama:...`, `openai:...`, `openai-chat:...`, `llamacpp:...` (and no such file exists)."""
    from mdlite.teacher import BACKENDS

    return model.partition(":")[0] in BACKENDS and not Path(model).exists()


def prompt_style(cfg: EvalConfig) -> str:
    """The prompts `cfg.model` gets: `cfg.prompt_style`, where auto is student for a GGUF and few-shot for a
    served model. MdliteError for student prompts through a chat endpoint (openai-chat:)."""
    served = is_teacher_spec(cfg.model)
    style = cfg.prompt_style if cfg.prompt_style != "auto" else "few-shot" if served else "student"
    if served and style == "student" and cfg.model.startswith("openai-chat:"):
        raise MdliteError(f"{cfg.model}: student prompts go to /v1/completions as raw text, so that the tokens are "
                          "the ones training saw; use openai:" + cfg.model.removeprefix("openai-chat:") +
                          " (flag --model)")
    return style


def _chunked(solve_chunk: Callable[..., list[list[Any]]], per_chunk: int) -> Solver:
    """A Solver from a served model's `solve_chunk(problems, style, greedy=, n=)`: `per_chunk` problems at a
    time, each plan entry's requests in flight together."""
    def solve(problems: list[Problem], plan: dict[tuple[str, bool], int]) -> Iterator[tuple[Problem, list[Any]]]:
        for start in range(0, len(problems), per_chunk):
            chunk = problems[start:start + per_chunk]
            records: dict[str, list[dict[str, Any]]] = {p.id: [] for p in chunk}
            for (style, greedy), n in plan.items():
                for problem, paths in zip(chunk, solve_chunk(chunk, style, greedy=greedy, n=n), strict=True):
                    records[problem.id] += [_record(problem, greedy, path) for path in paths]
            yield from ((problem, records[problem.id]) for problem in chunk)

    return solve


def _record(problem: Problem, greedy: bool, path: Any) -> dict[str, Any]:
    """One samples.jsonl line from a scored path (mdlite.solve.PathResult)."""
    program = None if path.program is None else {"ok": path.answer is not None, "value": path.answer,
                                                 "error": path.program_error}
    return {"id": problem.id, "problem_hash": problem_hash(problem), "style": path.style, "greedy": greedy,
            "path": path.index, "gold": problem.answer, "answer": path.answer,
            "correct": answers_match(path.answer, problem.answer), "text": path.text, "program_result": program,
            "finish_reason": path.finish_reason, "tokens": path.tokens}


def _engine_solver(cfg: EvalConfig) -> tuple[Solver, Callable[[], None], str | None]:
    """(solve, close, model digest) for a GGUF: mdlite solve's own sampling, program runs and answers, every
    planned path of every problem submitted to one continuously batching engine."""
    from mdlite.engine import Engine
    from mdlite.solve import Question, solve_each

    engine = Engine(cfg.model, max_paths=cfg.batch_paths, n_gpu_layers=cfg.n_gpu_layers, n_threads=cfg.n_threads,
                    prefix_cache=cfg.prefix_cache)

    def solve(problems: list[Problem], plan: dict[tuple[str, bool], int]) -> Iterator[tuple[Problem, list[Any]]]:
        entries = list(plan.items())
        questions = [Question(p.question, p.id, cfg.seed, mode=style, paths=n, prompt_style=prompt_style(cfg),
                              temperature=0.0 if greedy else cfg.temperature, top_p=cfg.top_p,
                              max_tokens=cfg.max_tokens)
                     for p in problems for (style, greedy), n in entries]
        solved: dict[int, Any] = {}
        following = 0  # the next problem to hand out: in order, as soon as all its entries are solved
        for i, solution in solve_each(engine, questions, program_timeout=cfg.program_timeout_s,
                                      program_memory_mb=cfg.program_memory_mb):
            solved[i] = solution
            while following < len(problems) and all(following * len(entries) + k in solved
                                                   for k in range(len(entries))):
                problem, base = problems[following], following * len(entries)
                yield problem, [_record(problem, greedy, path) for k, ((_, greedy), _) in enumerate(entries)
                                for path in solved.pop(base + k).paths]
                following += 1

    return solve, engine.close, None


def _teacher_solver(cfg: EvalConfig) -> tuple[Solver, Callable[[], None], str | None]:
    """(solve, close, model digest) for a served model (teacher spec): its prompts (`prompt_style`), one request
    per path (the pool keeps up to its slots in flight on each endpoint), seeds and scoring as `mdlite solve`
    has them."""
    import asyncio

    from mdlite.engine import derive_seed
    from mdlite.solve import prompt_for
    from mdlite.teacher import Completion, TeacherError, make_pool

    prompts = prompt_style(cfg)
    pool = make_pool(cfg.model, endpoints=cfg.endpoints, concurrency=cfg.concurrency, num_ctx=cfg.num_ctx,
                     n_threads=cfg.n_threads)
    loop = asyncio.new_event_loop()

    def close() -> None:
        loop.run_until_complete(pool.aclose())
        loop.close()

    try:
        digest = loop.run_until_complete(pool.check())
    except BaseException:
        close()
        raise

    async def one(problem: Problem, style: str, greedy: bool, path: int) -> Completion:
        prompt, stop = prompt_for(problem.question, style, prompt_style=prompts)
        seed = derive_seed(derive_seed(cfg.seed, problem.id, style), path)
        try:
            [completion] = await pool.complete(prompt, n=1, temperature=0.0 if greedy else cfg.temperature,
                                               max_tokens=cfg.max_tokens, stop=stop, seed=seed,
                                               stop_after=STOP_AFTER[style])
        except TeacherError as error:
            raise MdliteError(f"{cfg.model}: {error}; finished problems are saved, run the same command "
                              "again to resume") from None
        return completion

    async def every(chunk: list[Problem], style: str, greedy: bool, n: int) -> list[Completion]:
        return await asyncio.gather(*(one(problem, style, greedy, j) for problem in chunk for j in range(n)))

    def solve(chunk: list[Problem], style: str, *, greedy: bool, n: int) -> list[list[Any]]:
        completions = loop.run_until_complete(every(chunk, style, greedy, n))
        paths = _score_completions(style, completions, n=n, cfg=cfg)
        return [paths[i * n:(i + 1) * n] for i in range(len(chunk))]

    return solve, close, digest


def _score_completions(style: str, completions: Sequence[Any], *, n: int, cfg: EvalConfig) -> list[Any]:
    """Teacher completions (n per problem, in order) as scored paths, the way mdlite.solve scores the
    engine's: CoT answers by extract_answer (strict when cut at max_tokens), PoT programs by
    extract_program and the sandbox."""
    from mdlite.sandbox import run_programs
    from mdlite.solve import PathResult

    paths = []
    for i, completion in enumerate(completions):
        finish = "length" if completion.finish_reason == "length" else "stop"
        answer = extract_answer(completion.text, style="cot", strict=finish == "length") if style == "cot" else None
        program = extract_program(completion.text) if style == "pot" else None
        paths.append(PathResult(style=style, index=i % n, text=completion.text, tokens=completion.tokens,
                                finish_reason=finish, answer=answer, program=program,
                                program_error="no program" if style == "pot" and program is None else None))
    ran = [i for i, path in enumerate(paths) if path.program is not None]
    results = run_programs([paths[i].program for i in ran], timeout=cfg.program_timeout_s,
                           memory_mb=cfg.program_memory_mb) if ran else []
    for i, result in zip(ran, results, strict=True):
        paths[i] = dataclasses.replace(paths[i], answer=result.value if result.ok else None, program_error=result.error,
                                       program_stdout=result.stdout)
    return paths


def _decode_all(problems: list[Problem], done: dict[str, list[dict[str, Any]]], scores: dict[str, dict[str, float]],
                plan: dict[tuple[str, bool], int], cfg: EvalConfig, samples: Path, info: dict[str, Any]) -> None:
    """Decode the problems not `done` (a GGUF: all of them through one continuously batching engine; a served
    model: a few at a time, up to `batch_paths` requests of a style together), appending and flushing each
    problem's records to `samples` as soon as it is finished."""
    todo = [p for p in problems if p.id not in done]
    if is_teacher_spec(cfg.model):
        solve_chunk, close, info["model"]["digest"] = _teacher_solver(cfg)
        solve = _chunked(solve_chunk, max(1, cfg.batch_paths // max(plan.values())))
    else:
        solve, close, info["model"]["digest"] = _engine_solver(cfg)
    try:
        with samples.open("a", encoding="utf-8") as sink, tqdm(total=len(problems), initial=len(scores),
                                                               desc="eval", unit="problem") as bar:
            began = time.perf_counter()
            for problem, records in solve(todo, plan):
                now = time.perf_counter()
                for record in records:  # the wall time since the last problem, per path
                    record["seconds"] = round((now - began) / len(records), 6)
                began = now
                sink.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
                sink.flush()
                done[problem.id] = records
                scores[problem.id] = problem_scores(records, problem.answer, cfg.mode, cfg.paths)
                bar.update()
                bar.set_postfix_str(_running_accuracy(scores, cfg))
    finally:
        close()


def _running_accuracy(scores: dict[str, dict[str, float]], cfg: EvalConfig) -> str:
    """The progress bar's running accuracy: greedy per style and each mode's maj@paths."""
    labels = [f"greedy {s}" for s in ("cot", "pot")] + [f"{m}@{cfg.paths}" for m in cfg.mode]
    found = [label for label in labels if all(label in s for s in scores.values())]
    return " ".join(f"{label}={_mean(s[label] for s in scores.values()):.0%}" for label in found)


# ---- files --------------------------------------------------------------------------------------


def load_samples(path: Path, *, per_problem: int, hashes: dict[str, str]) -> dict[str, list[dict[str, Any]]]:
    """The records of every finished problem in samples.jsonl, by problem id. A torn last line (a killed
    run), the records of an unfinished problem (fewer than `per_problem`) and those of a problem in `hashes`
    (id -> problem_hash) whose problem_hash differs or is missing (its question or gold changed) are removed
    from the file."""
    if not path.exists():
        return {}
    groups, torn = _read_samples(path)
    if torn:
        log.warning("%s: dropping a torn last line (a run was killed mid-write)", path)
    finished = {pid: records for pid, records in groups.items() if len(records) == per_problem}
    if len(finished) < len(groups):
        log.warning("%s: dropping the records of %d unfinished problems", path, len(groups) - len(finished))
    done = {pid: records for pid, records in finished.items()
            if pid not in hashes or all(r.get("problem_hash") == hashes[pid] for r in records)}
    if len(done) < len(finished):
        log.warning("%s: dropping the records of %d problems whose question or gold answer changed (or that "
                    "have no problem_hash); they are redone", path, len(finished) - len(done))
    if torn or len(done) < len(groups):
        partial = path.with_name(path.name + ".partial")
        partial.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for rs in done.values() for r in rs),
                           encoding="utf-8")
        os.replace(partial, path)
    return done


def _read_samples(path: Path) -> tuple[dict[str, list[dict[str, Any]]], bool]:
    """samples.jsonl's records by problem id, and whether its last line is torn (read only; a line that is
    not a record is an MdliteError naming it)."""
    complete, _, torn = path.read_bytes().rpartition(b"\n")
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for number, line in enumerate(complete.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            groups[record["id"]].append(record)
        except (ValueError, KeyError, TypeError):
            raise MdliteError(f"{path}:{number}: not a sample record; delete that line (or the file) and "
                              "rerun") from None
    return groups, bool(torn.strip())


def _check_resumable(output_dir: Path, info: dict[str, Any]) -> None:
    """MdliteError when `output_dir` holds samples made with other sampling settings or another model."""
    samples, previous = output_dir / SAMPLES, output_dir / RUN_JSON
    if not samples.exists() or not samples.stat().st_size:
        return
    if not previous.exists():
        raise MdliteError(f"{samples} has no run.json next to it, so it cannot be resumed safely; delete it or "
                          "pick another --output-dir")
    old = json.loads(previous.read_text(encoding="utf-8")).get("sampling") or {}
    changed = [f"{key} {old.get(key)!r} -> {value!r}" for key, value in info["sampling"].items()
               if old.get(key) != value]
    if changed:
        raise MdliteError(f"{output_dir} holds samples made with other settings ({'; '.join(changed)}); pick "
                          f"another --output-dir, or delete {samples} to start over")


def _run_record(cfg: EvalConfig, problems: list[Problem]) -> dict[str, Any]:
    """run.json: resolved config, versions, the model's identity and the data hash."""
    if is_teacher_spec(cfg.model):
        from mdlite.teacher import parse_teacher_spec

        parse_teacher_spec(cfg.model)
        model = {"spec": cfg.model, "kind": "served", "prompts": prompt_style(cfg), "endpoints": cfg.endpoints}
    else:
        model = {"spec": cfg.model, "kind": "gguf", "prompts": prompt_style(cfg)} | _gguf_identity(cfg.model)
    prompt_sha = prompts_sha256(model["prompts"])
    plan = {f"{style} {'greedy' if greedy else 'sampled'}": n for (style, greedy), n in sampling_plan(cfg).items()}
    return {
        "stage": "eval", "config": to_dict(cfg), "seed": cfg.seed,
        "versions": package_versions(RECORDED_PACKAGES), "model": model,
        "inputs": {"data": cfg.data, "problems": len(problems),
                   "problems_sha256": hashlib.sha256("\n".join(p.to_json() for p in problems).encode()).hexdigest()},
        "sampling": {"model": model.get("sha256", cfg.model), "prompts": model["prompts"], "prompt_sha256": prompt_sha,
                     "plan": plan, "temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens,
                     "seed": cfg.seed},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def prompts_sha256(style: str) -> str:
    """Short hash of the prompt texts a `style` (few-shot or student) eval sends (run.json "sampling")."""
    prompts = ("teacher_cot", "teacher_pot") if style == "few-shot" else ("student",)
    return hashlib.sha256("".join(prompt_text(name) for name in prompts).encode()).hexdigest()[:12]


def _gguf_identity(model: str) -> dict[str, Any]:
    """Path, size and sha256 of a GGUF (a registry model's sha256 comes from its card)."""
    from mdlite.models import cached_gguf, model_path, registry

    path = model_path(model)
    if path.is_dir() or path.suffix != ".gguf":
        raise MdliteError(f"{model}: not a .gguf file; give a GGUF file, a registry name or a teacher spec "
                          "(flag --model)")
    size = path.stat().st_size
    card = registry().get(model)
    if card and card.gguf and path == cached_gguf(card) and size == card.gguf["size"]:
        return {"path": str(path), "size": size, "sha256": card.gguf["sha256"]}
    return {"path": str(path), "size": size, "sha256": file_sha256(path)}


@contextmanager
def _exclusive(output_dir: Path) -> Iterator[None]:
    """Hold a lock on `output_dir` so that two evals never append to the same samples.jsonl."""
    with (output_dir / ".eval.lock").open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MdliteError(f"{output_dir}: another `mdlite eval` is writing there; wait for it or pick another "
                              "--output-dir") from None
        yield

