"""The `mdlite` command: parses flags, loads configs, calls one `run()` per stage.

User mistakes (MdliteError) become a one-line `mdlite: error: ...` on stderr and exit code 2.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from mdlite import MdliteError, __version__, check_output_dir
from mdlite.config import EvalConfig, ExportConfig, ServeConfig, SolveConfig, TeachConfig, TrainConfig

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100, "show_default": True}


class _Group(click.Group):
    """A click group that turns MdliteError into a one-line error and exit code 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MdliteError as error:
            click.echo(f"mdlite: error: {error}", err=True)
            ctx.exit(2)


def config_options(cls: type) -> Callable:
    """Decorator: `--config FILE` plus one `--field-name` flag per field of config class `cls` (its
    default shown); the command receives them as `config` and `overrides` (only the flags given)."""
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    deprecated = {"_" + f.name: f.name for f in fields if f.metadata.get("deprecated")}

    def decorate(command: Callable) -> Callable:
        def wrapper(config: Path | None, **kwargs: Any) -> Any:
            ctx = click.get_current_context()
            overrides = {name: kwargs.pop(name) for name in list(kwargs) if name in hints}
            overrides = {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()
                         if ctx.get_parameter_source(k) is not ParameterSource.DEFAULT}
            for alias, name in deprecated.items():
                if (value := kwargs.pop(alias)) is not None:
                    overrides.setdefault(name, value)
            return command(config=config, overrides=overrides, **kwargs)

        wrapper.__name__, wrapper.__doc__ = command.__name__, command.__doc__
        for f in reversed(fields):
            names = [f"--{f.name.replace('_', '-')}", *([f.metadata["short"]] if "short" in f.metadata else [])]
            hint = hints[f.name]
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            help_text = f.metadata.get("help", "")
            if hint is bool:
                option = click.option(f"{names[0]}/--no-{names[0][2:]}", f.name, default=default, help=help_text)
            elif typing.get_origin(hint) is list:
                option = click.option(*names, f.name, multiple=True, default=default, help=help_text + " (repeatable)")
            else:
                base = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
                kind = {int: int, float: float}.get(base[0], str)
                option = click.option(*names, f.name, type=kind, default=default, help=help_text)
                if f.metadata.get("deprecated"):  # the old spelling still works, unlisted
                    wrapper = click.option(f.metadata["deprecated"], "_" + f.name, type=kind, hidden=True)(wrapper)
            wrapper = option(wrapper)
        return click.option("--config", "-c", type=click.Path(path_type=Path), default=None,
                            help="YAML config file; flags override its values.")(wrapper)

    return decorate


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(__version__, "--version", "-V", prog_name="mdlite")
@click.option("-v", "--verbose", is_flag=True, help="Log progress details.")
def cli(verbose: bool) -> None:
    """mdlite: Mixed Distillation of CoT + PoT reasoning into small local models.

    Pipeline: teach -> train -> export-gguf -> solve / eval, or all of it with `distill`.

    \b
    Example:
      mdlite distill configs/demo.yaml
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


# ---- data ---------------------------------------------------------------------------------------


@cli.group(context_settings=CONTEXT)
def data() -> None:
    """Make, check and describe problem files (JSONL: id, question, answer, equation).

    \b
    Example:
      mdlite data check problems.jsonl
    """


@data.command("synth")
@click.option("-n", "count", type=click.IntRange(1), default=100, show_default=True,
              help="Number of problems.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Output JSONL file.")
def data_synth(count: int, seed: int, output: Path) -> None:
    """Generate checked arithmetic word problems (1-4 steps), deterministic by seed.

    \b
    Example:
      mdlite data synth -n 200 --seed 0 -o problems.jsonl
    """
    from mdlite.data import synth_problems, write_problems

    if output.is_dir():
        raise MdliteError(f"{output}: is a folder; give a file name (flag -o)")
    check_output_dir(output.parent, "-o")
    problems = synth_problems(count, seed=seed)
    write_problems(problems, output)
    click.echo(f"wrote {len(problems)} problems to {output}")


@data.command("check")
@click.argument("source")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="Folder with <name>/<split>.jsonl (default $MDLITE_DATA).")
def data_check(source: str, data_dir: Path | None) -> None:
    """Validate a problem file or dataset (SOURCE: FILE or NAME[:SPLIT], e.g. svamp:test).

    \b
    Example:
      mdlite data check svamp:test --data-dir ../shared/data
    """
    from mdlite.data import load_problems

    problems = load_problems(source, data_dir=data_dir)
    click.echo(f"{source}: ok, {len(problems)} problems")


@data.command("stats")
@click.argument("source")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="Folder with <name>/<split>.jsonl (default $MDLITE_DATA).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def data_stats(source: str, data_dir: Path | None, as_json: bool) -> None:
    """Counts, answer range and duplicates of a problem file or dataset.

    \b
    Example:
      mdlite data stats problems.jsonl --json
    """
    from mdlite.data import load_problems, problem_stats

    stats = problem_stats(load_problems(source, data_dir=data_dir))
    if as_json:
        click.echo(json.dumps(stats, indent=2))
        return
    for key, value in stats.items():
        click.echo(f"{key:>22}  {value:.4g}" if isinstance(value, float) else f"{key:>22}  {value}")


# ---- models -------------------------------------------------------------------------------------


@cli.group(context_settings=CONTEXT)
def models() -> None:
    """The model registry: list, fetch and locate known models.

    \b
    Example:
      mdlite models list
    """


@models.command("list")
def models_list() -> None:
    """List registry models and whether their GGUF is cached.

    \b
    Example:
      mdlite models list
    """
    from mdlite.models import cached_gguf, registry

    for card in registry().values():
        if card.gguf:
            state = "cached" if cached_gguf(card).exists() else f"{card.gguf['size'] / 1e6:.0f} MB"
        else:
            state = "hub only"
        click.echo(f"{card.name:<30} {state:<10} {card.description}")


@models.command("fetch")
@click.argument("name")
def models_fetch(name: str) -> None:
    """Download and assemble a registry model's GGUF into the cache.

    \b
    Example:
      mdlite models fetch qwen2.5-coder-0.5b-instruct
    """
    from mdlite.models import fetch

    click.echo(fetch(name))


@models.command("path")
@click.argument("name")
def models_path(name: str) -> None:
    """Print a registry model's local GGUF path, fetching it first if needed.

    \b
    Example:
      mdlite models path gemma-3-270m
    """
    from mdlite.models import model_path

    click.echo(model_path(name))


@models.command("make-tiny")
@click.argument("output_dir", type=click.Path(path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (weights and tokenizer).")
def models_make_tiny(output_dir: Path, seed: int) -> None:
    """Write a tiny random LLaMA (HF folder, ~7 MB) for smoke-testing train and export.

    \b
    Example:
      mdlite models make-tiny runs/tiny
    """
    from mdlite.models import make_tiny_model

    click.echo(make_tiny_model(output_dir, seed=seed))


# ---- doctor ---------------------------------------------------------------------------------------


@cli.command("doctor", context_settings=CONTEXT)
@click.option("--strict", is_flag=True, help="Exit with code 1 when a check fails (warnings pass).")
def doctor(strict: bool) -> None:
    """Check this machine: Python, torch and its GPU, bitsandbytes 4-bit, the llama.cpp build, CPU threads,
    Ollama ($OLLAMA_HOST), cached models and disk. One line per check (ok / warn / fail) with the fix;
    paste the output into a bug report.

    \b
    Example:
      mdlite doctor
    """
    from mdlite import doctor as checks

    results = checks.run()
    click.echo(checks.format_report(results))
    if strict and checks.failed(results):
        raise SystemExit(1)


# ---- train ----------------------------------------------------------------------------------------


@cli.command("train", context_settings=CONTEXT)
@click.option("--dry-run", is_flag=True,
              help="Print the resolved config, data counts and a GPU memory estimate; train nothing.")
@click.option("--overwrite", is_flag=True, help="Delete this output_dir's checkpoints and outputs and start over.")
@config_options(TrainConfig)
def train(config: Path | None, overrides: dict[str, Any], dry_run: bool, overwrite: bool) -> None:
    """Fine-tune the student (QLoRA or LoRA) on kept CoT + PoT rationales; resumes automatically.

    Reads the `train:` section of --config; flags override it.

    \b
    Example:
      mdlite train --rationales runs/teach/rationales.jsonl --model gemma-3-270m --quantization none
    """
    from mdlite.config import load_config

    cfg = load_config(TrainConfig, config, overrides, section="train" if config else None)
    if dry_run:
        from mdlite.train import dry_run as plan
        from mdlite.train import format_dry_run

        click.echo(format_dry_run(plan(cfg)))
        return
    from mdlite.train import run

    result = run(cfg, overwrite=overwrite)
    click.echo(f"adapter: {result.adapter_dir} (step {result.global_step}, train loss {result.train_loss}, "
               f"validation loss {result.eval_loss})")


# ---- teach --------------------------------------------------------------------------------------


@cli.command("teach", context_settings=CONTEXT)
@config_options(TeachConfig)
def teach(config: Path | None, overrides: dict[str, Any]) -> None:
    """Sample CoT and PoT rationales from a local teacher, check and dedupe them; resumes automatically.

    Teacher specs: ollama:MODEL, openai:BASE_URL[#MODEL], openai-chat:BASE_URL[#MODEL],
    llamacpp:PATH_OR_REGISTRY_NAME. Writes rationales.jsonl, teach_stats.json and run.json to
    --output-dir. Reads the `teach:` section of --config; flags override it.

    \b
    Example:
      mdlite teach --teacher ollama:qwen2.5:32b --data svamp:train --concurrency 4
    """
    import sys

    from mdlite.config import load_config
    from mdlite.rationales import RATIONALES, run

    cfg = load_config(TeachConfig, config, overrides, section="teach" if config else None)
    try:
        result = run(cfg)
    except KeyboardInterrupt:
        click.echo(f"mdlite: interrupted; finished samples are in {Path(cfg.output_dir) / RATIONALES}; "
                   "run the same command again to resume", err=True)
        sys.exit(130)
    stats = result["stats"]
    for style, numbers in stats["styles"].items():
        if numbers["samples"]:
            click.echo(f"{style}: kept {numbers['kept']}/{numbers['samples']} samples "
                       f"({numbers['problems_with_kept']} problems), teacher accuracy "
                       f"{numbers['teacher_accuracy']:.1%}")
    session = stats["session"]
    click.echo(f"this run: {session['requests']} requests in {session['wall_s']:.1f} s "
               f"({session['requests_per_s'] or 0:.2f}/s), {session['failed']} failed")
    for failure in stats["failures"][:10]:
        click.echo(f"  failed {failure['key']}: {failure['error']}", err=True)
    if stats["failures"]:
        click.echo("run the same command again to retry the failed problems", err=True)
    click.echo(f"wrote {result['rationales']}")


# ---- eval ---------------------------------------------------------------------------------------


@cli.group("eval", invoke_without_command=True, context_settings=CONTEXT)
@config_options(EvalConfig)
def eval_(config: Path | None, overrides: dict[str, Any]) -> None:
    """Evaluate a student GGUF or a teacher: greedy and maj@k accuracy per mode, failures, speed.

    --model is a .gguf file or registry name (the engine, with the student template or --prompt-style
    few-shot) or a served model (ollama:MODEL, openai:BASE_URL[#MODEL], llamacpp:PATH_OR_NAME; few-shot
    prompts, or --prompt-style student for a served student, spread over --endpoints). Writes
    samples.jsonl, report.json, report.md, accuracy.png and run.json to --output-dir; the same command
    again resumes. Reads the `eval:` section of --config; flags override it.
    `mdlite eval compare DIR DIR ...` prints finished evals side by side.

    \b
    Example:
      mdlite eval --model runs/export/student-Q4_K_M.gguf --data svamp:test --paths 16
      mdlite eval --model openai:http://127.0.0.1:8080/v1 --prompt-style student --endpoints URL1,URL2
    """
    import sys

    if click.get_current_context().invoked_subcommand:
        return
    from mdlite.config import load_config
    from mdlite.evaluate import SAMPLES, run

    cfg = load_config(EvalConfig, config, overrides, section="eval" if config else None)
    try:
        result = run(cfg)
    except KeyboardInterrupt:
        click.echo(f"mdlite: interrupted; finished problems are in {Path(cfg.output_dir) / SAMPLES}; "
                   "run the same command again to resume", err=True)
        sys.exit(130)
    click.echo(result["report.md"].read_text(encoding="utf-8"))
    click.echo(f"wrote {Path(cfg.output_dir)}/{{report.md,report.json,accuracy.png,samples.jsonl,run.json}}")


@eval_.command("compare")
@click.argument("folders", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--paired", "metrics", multiple=True, metavar="METRIC[:METRIC]",
              help="With two folders: compare this score of the first (greedy-cot, greedy-pot, MODE@k such as "
                   "mixed@4) with the second's (after the colon; default: the same), problem by problem "
                   "(repeatable).  [default: greedy per style and every mode at the largest k]")
def eval_compare(folders: tuple[Path, ...], metrics: tuple[str, ...]) -> None:
    """Print the reports of eval output folders side by side (e.g. base, student, teacher).

    With two folders of the same problems, a second table pairs them problem by problem: both accuracies,
    the problems where each scores higher, and a paired test's two-sided p (McNemar's exact test for
    greedy paths; a sign-flip test for maj@k), so "B beats A" can be told from noise.

    \b
    Example:
      mdlite eval compare runs/eval-base runs/eval-student
      mdlite eval compare runs/eval-mixed runs/eval-pot-only --paired mixed@4:pot@4 --paired greedy-pot
    """
    from mdlite.evaluate import SAMPLES, compare_reports, paired_comparison

    if metrics and len(folders) != 2:
        raise click.UsageError("--paired compares two folders; give exactly two")
    pairs = [tuple(m.replace("greedy-", "greedy ") for m in (a, b or a)) for a, _, b in
             (metric.partition(":") for metric in metrics)]
    click.echo(compare_reports(folders))
    if len(folders) == 2 and (metrics or all((folder / SAMPLES).exists() for folder in folders)):
        click.echo("\n" + paired_comparison(*folders, pairs))


# ---- export-gguf --------------------------------------------------------------------------------


@cli.command("export-gguf", context_settings=CONTEXT)
@click.argument("adapter_or_model_dir", required=False, type=click.Path(path_type=Path))
@config_options(ExportConfig)
def export_gguf(config: Path | None, overrides: dict[str, Any], adapter_or_model_dir: Path | None) -> None:
    """Merge a LoRA adapter into its full-precision base, convert to GGUF with llama.cpp's own converter,
    quantize, write a Modelfile, and check that the GGUF behaves like the trained student.

    ADAPTER_OR_MODEL_DIR is train's OUTPUT_DIR/adapter (or --input-dir); a full Hugging Face model folder
    is converted as is. Writes merged/, <name>-<TYPE>.gguf, Modelfile, parity.json and run.json to
    --output-dir; exits with 1 when a parity threshold is crossed. --ollama NAME also registers the
    first GGUF with a running Ollama. Reads the `export:` section of --config; flags override it.

    \b
    Example:
      mdlite export-gguf runs/train/adapter -q Q4_K_M -q Q8_0 --output-dir runs/export
      mdlite export-gguf runs/train/adapter --ollama my-student
    """
    import sys

    from mdlite.config import load_config
    from mdlite.export import run

    if adapter_or_model_dir is not None:
        if "input_dir" in overrides:
            raise MdliteError("give the adapter folder either as ADAPTER_OR_MODEL_DIR or as --input-dir, not both")
        overrides["input_dir"] = str(adapter_or_model_dir)
    cfg = load_config(ExportConfig, config, overrides, section="export" if config else None)
    result = run(cfg)
    for quant_type, path in result.files.items():
        click.echo(f"{quant_type:>8}  {path}  ({path.stat().st_size / 1e6:.1f} MB)")
    click.echo(f"wrote {result.modelfile} (ollama create NAME -f {result.modelfile}) and {result.run_json}")
    if result.ollama:
        click.echo(f"registered with Ollama at {result.ollama['host']} as {result.ollama['name']} "
                   f"({'uploaded' if result.ollama['uploaded'] else 'blob already there'}): "
                   f"ollama run {result.ollama['name']} \"QUESTION\"")
    if result.parity is not None:
        summary = ", ".join(f"{k} {v}" for k, v in result.parity["summary"].items())
        click.echo(f"parity: {summary}")
        if not result.passed:
            for failure in result.parity["failures"]:
                click.echo(f"mdlite: parity check failed: {failure}", err=True)
            click.echo(f"details in {Path(cfg.output_dir) / 'parity.json'}", err=True)
            sys.exit(1)


# ---- solve --------------------------------------------------------------------------------------


@cli.command("solve", context_settings=CONTEXT)
@click.argument("question", required=False)
@click.option("--file", "-f", "question_file", type=click.Path(path_type=Path),
              help="Questions, one per line ('-': stdin).")
@click.option("--show", is_flag=True, help="Also print every path: rationale, program, program output.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per question (JSON lines).")
@config_options(SolveConfig)
def solve(config: Path | None, overrides: dict[str, Any], question: str | None, question_file: Path | None,
          show: bool, as_json: bool) -> None:
    """Answer math word problems with many CoT and PoT paths from a GGUF and a vote over their answers.

    QUESTION is the question, or '-' to read questions from stdin, one per line. Reads the `solve:`
    section of --config; flags override it.

    \b
    Example:
      mdlite solve "Tom has 3 apples and buys 5 more. How many?" --model student.gguf --paths 10
    """
    import sys

    from mdlite.answers import format_number
    from mdlite.config import load_config
    from mdlite.solve import run

    if question is not None and question_file is not None:
        raise MdliteError("give either QUESTION or --file, not both")
    if question == "-" or str(question_file) == "-":
        lines = sys.stdin.read().splitlines()
    elif question_file is not None:
        if not question_file.is_file():
            what = "is a folder, not a file" if question_file.is_dir() else "no such file"
            raise MdliteError(f"{question_file}: {what} (flag --file)")
        lines = question_file.read_text(encoding="utf-8").splitlines()
    else:
        lines = [question or ""]
    questions = [line.strip() for line in lines if line.strip()]
    cfg = load_config(SolveConfig, config, overrides, section="solve" if config else None)
    for solution in run(cfg, questions):
        if as_json:
            click.echo(json.dumps(solution.to_dict()))
            continue
        if len(questions) > 1:
            click.echo(f"Q: {solution.question}")
        answer = "no answer" if solution.answer is None else format_number(solution.answer)
        counts = ", ".join(f"{format_number(t.answer)} x{t.weight:g} (cot {t.cot}, pot {t.pot})"
                           for t in solution.vote.tallies)
        failed = sum(p.answer is None for p in solution.paths)
        saved = f", {solution.paths_saved} saved by early stopping" if solution.paths_saved else ""
        click.echo(f"answer: {answer}")
        click.echo(f"votes: {counts or 'none'}; {failed}/{len(solution.paths)} paths without an answer{saved}")
        if show:
            for path in solution.paths:
                value = "-" if path.answer is None else format_number(path.answer)
                click.echo(f"--- {path.style} path {path.index}: answer {value} ({path.finish_reason}, "
                           f"{path.tokens} tokens)")
                click.echo(path.text.strip("\n"))
                if path.style == "pot":
                    output = path.program_stdout.strip() if path.program_stdout else ""
                    click.echo(f"[program: {path.program_error or 'ok'}{'; printed: ' + output if output else ''}]")
        if len(questions) > 1:
            click.echo("")


# ---- serve --------------------------------------------------------------------------------------


@cli.command("serve", context_settings=CONTEXT)
@config_options(ServeConfig)
def serve(config: Path | None, overrides: dict[str, Any]) -> None:
    """Serve voted CoT + PoT answers from a GGUF over an OpenAI-compatible API.

    POST /v1/chat/completions (the question: the last user message) and /v1/completions (`prompt`),
    GET /v1/models and /health. The reply's content is the voted answer with its winning rationale; its
    `mdlite` field has every path and the vote. `stream: true` sends it as Server-Sent Events (keep-alive
    comments while the vote runs), so chat UIs such as Open WebUI can use http://127.0.0.1:PORT/v1.
    Requests may set `paths`, `mode`, `temperature`, `seed` (none: a fresh random one) and `max_tokens`
    (capped at --max-tokens); requests that arrive together share engine batches.

    Security defaults: loopback only; a --host beyond it needs --api-key (or --insecure-no-key); web pages
    are refused (POST must be application/json; Origin must be in --allowed-origins; Host must be an IP
    address, localhost or in --allowed-hosts); programs' printed output only when a request asks
    (`program_stdout: true`). Ctrl-C / SIGTERM finishes the requests in flight, then stops. Reads the
    `serve:` section of --config; flags override it.

    \b
    Example:
      mdlite serve --model runs/export/student-Q4_K_M.gguf --port 8000 --paths 10
    """
    import sys

    from mdlite.config import load_config
    from mdlite.serve import run

    cfg = load_config(ServeConfig, config, overrides, section="serve" if config else None)
    try:
        run(cfg, on_ready=lambda url: click.echo(f"serving {cfg.model} at {url} (Ctrl-C to stop)", err=True))
    except KeyboardInterrupt:
        click.echo("mdlite: stopped", err=True)
        sys.exit(130)
    click.echo("mdlite: stopped", err=True)


# ---- distill ------------------------------------------------------------------------------------


@cli.command("distill", context_settings=CONTEXT)
@click.argument("config_file", required=False, type=click.Path(path_type=Path))
@click.option("--config", "-c", type=click.Path(path_type=Path), default=None,
              help="The config file (the same as CONFIG_FILE).")
@click.option("--output-dir", default=None, help="Override distill.output_dir.  [default: the config's]")
@click.option("--dry-run", is_flag=True, help="Check every stage's inputs without downloading or writing "
                                              "anything, and print what would run and why.")
@click.option("--force", multiple=True, type=click.Choice(
    ["teach", "train", "export", "export-base", "eval-base", "eval-student"]),
              help="Rerun this stage even when it is up to date (repeatable).  [default: none]")
@click.option("--pack-reusable", type=click.Path(path_type=Path), default=None,
              help="Run nothing: copy this run's finished teach/ (and eval-teacher/) with their records and "
                   "the data files' sha256 to this folder, which distill.teach_from accepts elsewhere.")
def distill(config_file: Path | None, config: Path | None, output_dir: str | None, dry_run: bool,
            force: tuple[str, ...], pack_reusable: Path | None) -> None:
    """Run teach -> train -> export-gguf -> eval from CONFIG_FILE, skipping finished stages.

    The untrained student is evaluated too, so summary.md shows accuracy before vs after. An
    interrupted run resumes where it stopped: run the same command again.

    \b
    Example:
      mdlite distill -c configs/demo.yaml --dry-run
      mdlite distill configs/svamp-strong.yaml --pack-reusable my-rationales/   # share a finished teach stage
    """
    from mdlite import distill as pipeline

    if config_file and config and config_file.resolve() != config.resolve():
        raise MdliteError(f"two config files given ({config_file} and -c {config}); give one")
    config_file = config_file or config
    if config_file is None:
        raise MdliteError("no config file given; mdlite distill CONFIG or mdlite distill -c CONFIG")
    overrides = {"output_dir": output_dir}
    if pack_reusable:
        from mdlite.config import DistillConfig, load_config

        run_folder = Path(load_config(DistillConfig, config_file, overrides, section="distill").output_dir)
        packed = pipeline.pack_reusable(run_folder, pack_reusable)
        click.echo(f"packed {', '.join(packed)} of {run_folder} into {pack_reusable} "
                   f"(distill.teach_from: {pack_reusable})")
        return
    if dry_run:
        report = pipeline.dry_run(config_file, overrides, force=force)
        click.echo(pipeline.format_dry_run(report))
        if report["waiting"]:
            raise SystemExit(1)  # the plan is fine, but the run cannot start yet
        return
    result = pipeline.run(config_file, overrides, force=force)
    click.echo(result["summary"])
    click.echo(f"wrote {result['output_dir'] / pipeline.SUMMARY}")
