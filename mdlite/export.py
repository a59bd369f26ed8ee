"""`mdlite export-gguf`: merge the LoRA adapter into its full-precision base, convert it with llama.cpp's own
converter, quantize, write an Ollama Modelfile, and check that the GGUF files behave like the trained student.

    mdlite export-gguf runs/train/adapter -q Q4_K_M -q Q8_0 --output-dir runs/export
    mdlite export-gguf path/to/hf-model-folder -q F16 --no-parity     # a full model folder is converted as is
    mdlite export-gguf runs/demo/train/adapter -c configs/demo.yaml    # knobs from its `export:` section
    mdlite export-gguf runs/train/adapter --ollama my-student          # and register it with a running Ollama

Merge: the adapter (train's `adapter/`, whose mdlite.json names the base) goes into a freshly loaded
full-precision base (never the 4-bit one, whose logits drift 0.15-0.22): on a GPU in the checkpoint's own dtype
when it fits the free GPU memory, else on the CPU in fp32; saved as safetensors with the adapter's tokenizer
files and the student template as chat template. The merged model leaves the GPU while llama.cpp runs the GGUF
files in the parity check, and torch's cached GPU memory is returned when the export ends.
Convert: `convert_hf_to_gguf.py` with its own `gguf-py`, from `$LLAMA_CPP_DIR` when set, else from the sdist of
the installed llama-cpp-python (fetched once with pip into `$MDLITE_HOME/llama.cpp-<version>/`), so the converter
matches the llama.cpp that loads the file. It writes the F16 GGUF; every other type is quantized from it with
`llama_cpp.llama_model_quantize`.
Parity (on by default): for the student prompts of N problems, in the styles the adapter was trained on
(its mdlite.json's `styles`; both for a full model folder), the GGUF's token ids equal the ones training used;
the F16 file's greedy answers equal the merged model's (else the first divergence and the merged model's logit
gap there are reported); each quantized file's answers agree with F16's; and every answer ends with EOS or a
stop string within the budget. Thresholds are config knobs; crossing one exits with 1.

Outputs in `output_dir`: merged/ (adapter input only), <name>-<TYPE>.gguf per quant type (F16 only when asked
for), Modelfile (for the first type), parity.json and run.json. Everything is built in `.export.partial/` and
renamed into place at the end, so an interrupted or failed export leaves no partial file under a final name.
`--ollama NAME` then registers the first GGUF with a running Ollama (checked before any work starts) the way
`ollama create NAME -f Modelfile` would: blob upload (skipped when the server has it) and /api/create with the
Modelfile's template, system message and parameters; not when the parity check failed.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import shutil
import string
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mdlite import MdliteError, check_output_dir, import_peft, mdlite_home, peft_quietly, release_gpu_memory
from mdlite.config import ExportConfig, to_dict
from mdlite.models import HUB_ID, registry, resolve_base_model
from mdlite.prompts import STUDENT_DIRECTIVES, STUDENT_STOP, STYLES, prompt_text, student_prompt
from mdlite.runinfo import file_sha256, package_versions, write_json

if TYPE_CHECKING:
    from llama_cpp import Llama
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from mdlite.data import Problem

log = logging.getLogger(__name__)
RECORDED_PACKAGES = ("llama-cpp-python", "torch", "transformers", "peft", "safetensors")  # versions written to run.json

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt")
STAGING = ".export.partial"
OUTPUT_FILES = ("merged", "Modelfile", "export.log", "parity.json", "run.json")  # and the GGUF files
LOG_TAIL = 8  # lines of export.log shown when llama.cpp's converter or quantizer fails
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class Source:
    """What the export starts from: an adapter and its base, or a full model folder (`adapter_dir` None)."""

    input_dir: Path
    base_dir: Path
    adapter_dir: Path | None
    add_bos: bool | None  # what training did (mdlite.json); None: as the tokenizer does
    styles: tuple[str, ...] = STYLES  # the styles it was trained on (mdlite.json), which the parity check prompts


@dataclass(frozen=True)
class ExportResult:
    """What `run` wrote."""

    output_dir: Path
    files: dict[str, Path]  # quant type -> GGUF file
    modelfile: Path
    run_json: Path
    parity: dict[str, Any] | None = field(default=None)
    ollama: dict[str, Any] | None = field(default=None)  # what register_ollama did (--ollama)

    @property
    def passed(self) -> bool:
        return self.parity is None or self.parity["passed"]


def run(cfg: ExportConfig) -> ExportResult:
    """Merge, convert, quantize, write the Modelfile, check parity; see the module docstring."""
    started = time.monotonic()
    if cfg.ollama:
        ollama_client(cfg.ollama_host)  # not running: say so now, not after minutes of work
    output_dir = Path(cfg.output_dir)
    quants = cfg.quant_types
    source = resolve_source(Path(cfg.input_dir))
    base_config = check_source(source)
    check_output_dir(output_dir, "--output-dir")
    converter = converter_dir()
    check_architecture(base_config, source.base_dir, converter)
    placement = merge_device(source) if source.adapter_dir is not None or cfg.parity else ("cpu", "float32")
    check_disk_space(output_dir, estimate_bytes(source, quants, merge_dtype=placement[1]))

    staging = output_dir / STAGING
    shutil.rmtree(staging, ignore_errors=True)  # what an interrupted export left
    staging.mkdir(parents=True)
    timings: dict[str, float] = {}
    clock = time.monotonic()
    merged = staging / "merged"
    import_peft()  # the export never loads a 4-bit model
    model, tokenizer = build_model_folder(source, merged, load=cfg.parity, placement=placement)
    add_bos = source.add_bos if source.add_bos is not None else tokenizer_adds_bos(tokenizer)
    write_chat_template(merged, add_bos=add_bos)
    timings["merge_s"] = time.monotonic() - clock

    f16 = staging / f"{cfg.name}-F16.gguf"
    clock = time.monotonic()
    log_file = staging / "export.log"
    convert(merged, f16, converter=converter, log_file=log_file)
    timings["convert_s"] = time.monotonic() - clock
    files = {"F16": f16}
    for quant in quants:
        if quant != "F16":
            clock = time.monotonic()
            files[quant] = quantize(f16, staging / f"{cfg.name}-{quant}.gguf", quant, n_threads=cfg.n_threads,
                                    log_file=log_file)
            timings[f"quantize_{quant}_s"] = time.monotonic() - clock
    (staging / "Modelfile").write_text(modelfile_text(files[quants[0]].name, num_ctx=cfg.num_ctx), "utf-8")

    report = None
    if cfg.parity:
        clock = time.monotonic()
        report = check_parity(model, tokenizer, files, cfg, add_bos=add_bos, styles=source.styles)
        timings["parity_s"] = time.monotonic() - clock
        write_json(staging / "parity.json", report)
    del model
    release_gpu_memory()  # llama.cpp (eval, solve) cannot use what torch keeps cached

    finals = {quant: output_dir / files[quant].name for quant in quants}
    record = {
        "stage": "export", "status": "done" if report is None or report["passed"] else "parity_failed",
        "config": to_dict(cfg), "seed": cfg.seed,
        "versions": package_versions(RECORDED_PACKAGES), "llama_cpp": converter_info(converter),
        "inputs": _input_record(source), "add_bos": add_bos,
        "files": {q: {"path": str(p), "bytes": files[q].stat().st_size} for q, p in finals.items()},
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "parity": {k: v for k, v in (report or {}).items() if k in ("passed", "failures", "summary")},
    }
    record["timings_s"]["total_s"] = round(time.monotonic() - started, 2)
    write_json(staging / "run.json", record)

    # Everything is complete: move it into place, run.json last, and drop what an earlier export left under a
    # name this one does not write (merged/ of an adapter, parity.json).
    if source.adapter_dir is None:
        shutil.rmtree(merged)  # links to the input model's files
    for quant, final in finals.items():
        files[quant].replace(final)
    for name in OUTPUT_FILES:
        target = output_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        if (staging / name).exists():
            (staging / name).replace(target)
        elif target.exists():
            target.unlink()
    shutil.rmtree(staging)
    log.info("exported %s to %s in %.0f s", ", ".join(quants), output_dir, time.monotonic() - started)
    registered = None
    if cfg.ollama and (report is None or report["passed"]):
        registered = register_ollama(finals[quants[0]], cfg.ollama, num_ctx=cfg.num_ctx, host=cfg.ollama_host)
    elif cfg.ollama:
        log.warning("parity check failed: %s is not registered with Ollama", finals[quants[0]].name)
    return ExportResult(output_dir, finals, output_dir / "Modelfile", output_dir / "run.json", report, registered)


# ---- inputs and up-front checks -----------------------------------------------------------------------------


def resolve_source(input_dir: Path) -> Source:
    """The adapter and its base, or the full model, behind `input_dir` (a folder, or a registry name or hub id
    whose untrained model is exported as is)."""
    if not input_dir.is_dir():
        spec = str(input_dir)
        if spec in registry() or (HUB_ID.fullmatch(spec) and not input_dir.exists()):
            base = _local_base(spec, None)
            return Source(base, base, None, None)
        raise MdliteError(f"{input_dir}: no such folder; give the adapter folder written by `mdlite train` "
                          "(OUTPUT_DIR/adapter), a Hugging Face model folder, a registry name or a hub id")
    if not (input_dir / "adapter_config.json").exists():
        if not (input_dir / "config.json").exists():
            raise MdliteError(f"{input_dir}: neither a LoRA adapter (adapter_config.json) nor a Hugging Face model "
                              "folder (config.json)")
        return Source(input_dir, input_dir, None, None)
    adapter_config = _read_json(input_dir / "adapter_config.json")
    meta = _read_json(input_dir / "mdlite.json") if (input_dir / "mdlite.json").exists() else {}
    path = meta.get("base_model_path")
    if path and (Path(path) / "config.json").exists():
        base = Path(path)
    else:
        spec = meta.get("base_model") or adapter_config.get("base_model_name_or_path")
        if not spec:
            raise MdliteError(f"{input_dir}: names no base model (mdlite.json base_model or adapter_config.json "
                              "base_model_name_or_path); add it")
        base = _local_base(str(spec), input_dir)
    styles = tuple(style for style in STYLES if style in meta.get("styles", STYLES)) or STYLES
    return Source(input_dir, base, input_dir, meta.get("add_bos"), styles)


def check_source(source: Source) -> dict[str, Any]:
    """Refuse, before any heavy work, what cannot give a correct student: missing tokenizer files, a quantized
    base, an unreadable adapter, an adapter whose shapes or vocabulary do not fit the base. Returns the base's
    config.json."""
    tokenizer_dir = source.adapter_dir or source.base_dir
    present = {name for name in TOKENIZER_FILES if (tokenizer_dir / name).exists()}
    if "tokenizer_config.json" not in present or not present & {"tokenizer.json", "tokenizer.model", "vocab.json"}:
        where = f"; `mdlite train` saves them next to the adapter, copy them from {source.base_dir}" \
            if source.adapter_dir else ""
        raise MdliteError(f"{tokenizer_dir}: missing tokenizer files (tokenizer_config.json and tokenizer.json or "
                          f"tokenizer.model){where}")
    config = _read_json(source.base_dir / "config.json")
    if "quantization_config" in config:
        method = config["quantization_config"].get("quant_method", "?")
        raise MdliteError(f"{source.base_dir}: the base is stored quantized ({method}); merging needs the "
                          "full-precision weights (the 4-bit merge drifts 0.15-0.22 in logits): point mdlite.json's "
                          "base_model at the original model")
    if source.adapter_dir is None:
        return config
    base_shapes = _safetensors_shapes(source.base_dir)
    adapter_file = source.adapter_dir / "adapter_model.safetensors"
    if not adapter_file.exists():
        raise MdliteError(f"{source.adapter_dir}: no adapter_model.safetensors; re-run `mdlite train` or copy the "
                          "whole adapter folder")
    adapter = _read_adapter(adapter_file)
    problems = []
    for key, shape in adapter.items():
        match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.\w+)?\.weight", key)
        if not match:
            continue
        target = match.group(1) + ".weight"
        if target not in base_shapes:
            problems.append(f"{match.group(1)} is not in the base")
            continue
        out_features, in_features = base_shapes[target][0], base_shapes[target][-1]
        if (match.group(2) == "A" and shape[-1] != in_features) or (match.group(2) == "B" and shape[0] != out_features):
            problems.append(f"{key} has shape {list(shape)} but the base's {target} is {list(base_shapes[target])}")
    if problems:
        raise MdliteError(f"{source.adapter_dir}: the adapter does not fit the base {source.base_dir} "
                          f"({'; '.join(problems[:3])}{'; ...' if len(problems) > 3 else ''}); export it with the "
                          "base it was trained on (mdlite.json base_model)")
    _check_vocabulary(source, base_shapes)
    return config


def converter_dir() -> Path:
    """llama.cpp's converter folder: `$LLAMA_CPP_DIR`, else the installed llama-cpp-python version's sdist,
    fetched once with pip into `$MDLITE_HOME/llama.cpp-<version>/`."""
    if os.environ.get("LLAMA_CPP_DIR"):
        folder = Path(os.environ["LLAMA_CPP_DIR"])
        if not (folder / "convert_hf_to_gguf.py").exists() or not (folder / "gguf-py").is_dir():
            raise MdliteError(f"LLAMA_CPP_DIR={folder}: no convert_hf_to_gguf.py and gguf-py/ there; point it at a "
                              "llama.cpp checkout, or unset it to use the installed llama-cpp-python's own")
        return folder
    try:
        installed = version("llama-cpp-python")
    except PackageNotFoundError:
        raise MdliteError("export-gguf needs llama-cpp-python (pip install 'mdlite[infer]')") from None
    folder = mdlite_home() / f"llama.cpp-{installed}"
    if (folder / "source.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    log.info("fetching llama.cpp's converter from the llama-cpp-python %s sdist (once, ~77 MB)", installed)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".llama.cpp-") as tmp:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             "--disable-pip-version-check", "-q", "-d", tmp, f"llama-cpp-python=={installed}"],
            capture_output=True, text=True,
        )
        archives = list(Path(tmp).glob("*.tar.gz"))
        if result.returncode != 0 or len(archives) != 1:
            tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise MdliteError(f"pip could not download the llama-cpp-python {installed} sdist ({tail}); check the "
                              "network, or set LLAMA_CPP_DIR to a llama.cpp checkout of the same version")
        partial = Path(tmp) / "llama.cpp"
        commit = _extract_converter(archives[0], partial)
        write_json(partial / "source.json", {"llama_cpp_python": installed, "llama_cpp_commit": commit,
                                              "sdist": archives[0].name})
        if not (folder / "source.json").exists():  # another process may have finished first
            shutil.rmtree(folder, ignore_errors=True)
            partial.rename(folder)
    return folder


def converter_info(converter: Path) -> dict[str, Any]:
    """Which llama.cpp converts (for run.json): the llama-cpp-python version and llama.cpp commit."""
    marker = converter / "source.json"
    if marker.exists():
        return {**_read_json(marker), "converter": str(converter)}
    head = subprocess.run(["git", "-C", str(converter), "rev-parse", "HEAD"], capture_output=True, text=True)
    return {"llama_cpp_python": version("llama-cpp-python"), "converter": str(converter),
            "llama_cpp_commit": head.stdout.strip() if head.returncode == 0 else None}


def check_architecture(config: dict[str, Any], base_dir: Path, converter: Path) -> None:
    """MdliteError unless llama.cpp's converter knows the model's architecture."""
    names = config.get("text_config", {}).get("architectures") or config.get("architectures") or []
    if not names:
        raise MdliteError(f"{base_dir}/config.json: no `architectures` entry; cannot tell which converter to use")
    sources = [converter / "convert_hf_to_gguf.py", *sorted((converter / "conversion").glob("*.py"))]
    known = set()
    for path in sources:
        for call in re.findall(r"ModelBase\.register\((.*?)\)", path.read_text("utf-8"), re.DOTALL):
            known.update(re.findall(r"[\"'](\w+)[\"']", call))
    if names[0] not in known:
        raise MdliteError(f"{base_dir}: architecture {names[0]} is not supported by llama.cpp's converter "
                          f"({converter}); supported include LlamaForCausalLM, Gemma3ForCausalLM, Qwen2ForCausalLM, "
                          "MistralForCausalLM")


def estimate_bytes(source: Source, quants: list[str], *, merge_dtype: str = "float32") -> int:
    """Disk the export needs: merged weights (adapter input, saved in `merge_dtype`), the F16 GGUF and each
    quantized file."""
    parameters = _parameters(source.base_dir)
    merged = parameters * DTYPE_BYTES[merge_dtype] if source.adapter_dir else 0
    bits = {"F32": 32, "F16": 16, "BF16": 16}
    quantized = sum(parameters * bits.get(q, int(re.search(r"\d", q).group()) + 1) // 8 for q in quants if q != "F16")
    return merged + parameters * 2 + quantized


def check_disk_space(output_dir: Path, needed: int) -> None:
    """MdliteError when `output_dir`'s file system has less than `needed` bytes (plus 5%) free."""
    folder = output_dir
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < needed * 1.05:
        raise MdliteError(f"{output_dir}: the export needs about {needed / 1e9:.2f} GB (merged weights and GGUF "
                          f"files) but only {free / 1e9:.2f} GB are free; free some space or choose another "
                          "--output-dir")


# ---- merge, template, convert, quantize -----------------------------------------------------------------------


def merge_dtype(config: dict[str, Any], *, cuda: bool) -> str:
    """The merge's dtype: on a GPU the checkpoint's own (config.json `dtype` or `torch_dtype`; fp16 stays fp16,
    so the F16 GGUF loses no bits; bf16 where the card has it natively, else fp32); fp32 on the CPU and for a
    checkpoint that names no half-precision dtype."""
    named = config.get("dtype") or config.get("torch_dtype") or config.get("text_config", {}).get("dtype")
    name = str(named).removeprefix("torch.")
    if not cuda or name not in ("float16", "bfloat16"):
        return "float32"
    if name == "bfloat16" and not _native_bf16():
        return "float32"
    return name


def merge_device(source: Source) -> tuple[str, str]:
    """Where (a torch device) and in which dtype the merge runs: on this GPU in `merge_dtype` when the weights fit
    its free memory (torch's cache returned first; 10% + 1 GiB margin), else on the CPU in fp32, with a warning."""
    if not _cuda():
        return "cpu", "float32"
    import torch

    dtype = merge_dtype(_read_json(source.base_dir / "config.json"), cuda=True)
    need = _parameters(source.base_dir) * DTYPE_BYTES[dtype] * 1.1 + 2**30
    release_gpu_memory()
    free, total = torch.cuda.mem_get_info()
    if need > free:
        log.warning("the merge needs ~%.1f GiB of GPU memory (%s) but %.1f of %.1f GiB are free: merging on the CPU "
                    "in fp32 instead (slower, ~%.0f GB of RAM); free the GPU to merge there",
                    need / 2**30, dtype, free / 2**30, total / 2**30, _parameters(source.base_dir) * 4.4 / 1e9)
        return "cpu", "float32"
    return f"cuda:{torch.cuda.current_device()}", dtype


def build_model_folder(source: Source, folder: Path, *, load: bool,
                       placement: tuple[str, str] | None = None) -> tuple[PreTrainedModel | None,
                                                                          PreTrainedTokenizerBase]:
    """The folder the converter reads: the adapter merged into its full-precision base (safetensors and the
    adapter's tokenizer files), or links to a full model's files. Returns the merged model (loaded only when
    an adapter is merged or `load`, on the device and in the dtype of `placement`, default `merge_device`) and
    the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer_dir = source.adapter_dir or source.base_dir
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    except (OSError, ValueError) as error:
        raise MdliteError(f"{tokenizer_dir}: cannot load the tokenizer ({str(error).splitlines()[0]})") from None
    model = None
    if source.adapter_dir is not None or load:
        device, dtype = placement or merge_device(source)
        log.info("loading %s for the merge on %s in %s", source.base_dir, device, dtype)
        model = AutoModelForCausalLM.from_pretrained(source.base_dir, dtype=getattr(torch, dtype),
                                                     device_map={"": device})
    folder.mkdir(parents=True)
    if source.adapter_dir is None:
        for path in source.base_dir.iterdir():
            if path.is_file() and path.name not in ("tokenizer_config.json", "chat_template.jinja"):
                (folder / path.name).symlink_to(path.resolve())
        shutil.copy(source.base_dir / "tokenizer_config.json", folder / "tokenizer_config.json")
        return model, tokenizer
    from peft import PeftModel

    try:
        with peft_quietly():
            model = PeftModel.from_pretrained(model, source.adapter_dir).merge_and_unload()
    except (RuntimeError, ValueError, KeyError) as error:
        raise MdliteError(f"{source.adapter_dir}: cannot load the adapter onto {source.base_dir} "
                          f"({str(error).splitlines()[0]})") from None
    model.eval()
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (source.adapter_dir / name).exists():
            shutil.copy(source.adapter_dir / name, folder / name)
    if not (folder / "tokenizer.model").exists() and (source.base_dir / "tokenizer.model").exists():
        shutil.copy(source.base_dir / "tokenizer.model", folder / "tokenizer.model")  # the converter prefers it
    return model, tokenizer


def chat_template(*, add_bos: bool) -> str:
    """A Jinja chat template equal to `student_prompt`: a user message is the question, a system message the
    style directive (default CoT), an assistant message the rationale followed by EOS."""
    parts = []
    for literal, name, _, _ in string.Formatter().parse(prompt_text("student")):
        if literal:
            parts.append(json.dumps(literal, ensure_ascii=False))
        if name:
            parts.append({"question": "(message['content'] | trim)", "directive": "ns.directive"}[name])
    return (
        f"{{%- set ns = namespace(directive={json.dumps(STUDENT_DIRECTIVES['cot'], ensure_ascii=False)}) -%}}"
        + ("{{- bos_token -}}" if add_bos else "")
        + "{%- for message in messages -%}"
        "{%- if message['role'] == 'system' -%}{%- set ns.directive = message['content'] | trim -%}"
        f"{{%- elif message['role'] == 'user' -%}}{{{{- {' + '.join(parts)} -}}}}"
        "{%- elif message['role'] == 'assistant' -%}{{- message['content'] + eos_token -}}"
        "{%- endif -%}{%- endfor -%}"
    )


def write_chat_template(folder: Path, *, add_bos: bool) -> None:
    """Put the student's chat template into `folder`'s tokenizer files (the converter copies it into the GGUF's
    `tokenizer.chat_template`)."""
    template = chat_template(add_bos=add_bos)
    config_path = folder / "tokenizer_config.json"
    config = _read_json(config_path)
    config["chat_template"] = template
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", "utf-8")
    (folder / "chat_template.jinja").write_text(template, "utf-8")


def convert(model_dir: Path, output: Path, *, converter: Path, log_file: Path) -> None:
    """F16 GGUF of the HF folder `model_dir`, by llama.cpp's converter in a subprocess: its output goes to
    `log_file` (and to the log at INFO, `mdlite -v`), a progress bar counts the tensors written."""
    from tqdm import tqdm

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(converter / "gguf-py"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("NO_LOCAL_GGUF", None)
    command = [sys.executable, str(converter / "convert_hf_to_gguf.py"), str(model_dir), "--outfile", str(output),
               "--outtype", "f16"]
    log.info("converting %s with %s", model_dir, converter)
    tensors = len(_safetensors_shapes(model_dir)) or None
    with log_file.open("a", encoding="utf-8") as out, tqdm(total=tensors, desc=f"convert {output.name}",
                                                           unit="tensor", leave=False) as bar:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                                   errors="replace")
        assert process.stdout is not None
        for line in process.stdout:
            out.write(line)
            log.info("convert: %s", line.rstrip())
            if " --> " in line:  # one line per tensor written
                bar.update()
        code = process.wait()
    if code != 0 or not output.exists():
        raise MdliteError(f"{model_dir}: llama.cpp's converter failed (exit {code}){_log_tail(log_file)}")


def quantize(source: Path, output: Path, quant: str, *, n_threads: int = 0, log_file: Path) -> Path:
    """`source` (F16 GGUF) quantized to `quant` with llama.cpp's quantizer; its log goes to `log_file` (and to
    the log at INFO), a progress bar counts the tensors."""
    from tqdm import tqdm

    from mdlite.llamacpp import QUANT_TYPES, llama_cpp_module, log_to, physical_cores

    llama_cpp = llama_cpp_module()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_TYPES[quant])
    params.nthread = n_threads or physical_cores()
    log.info("quantizing %s to %s", source.name, quant)
    with log_file.open("a", encoding="utf-8") as out, tqdm(desc=f"quantize {output.name}", unit="tensor",
                                                           leave=False) as bar:
        pending = [""]  # llama.cpp logs a tensor's line in pieces

        def write(text: str) -> None:
            out.write(text)
            *lines, pending[0] = (pending[0] + text).split("\n")
            for line in lines:
                log.info("quantize: %s", line)
                tensor = re.match(r"\[\s*(\d+)/\s*(\d+)\]", line)  # "[ 279/ 291] blk.22.ffn_up.weight ..."
                if tensor:
                    bar.total = int(tensor[2])
                    bar.update(int(tensor[1]) - bar.n)

        with log_to(write):
            code = llama_cpp.llama_model_quantize(str(source).encode(), str(output).encode(), ctypes.byref(params))
    if code != 0 or not output.exists():
        raise MdliteError(f"{source}: llama.cpp could not quantize to {quant} (code {code}; try another type)"
                          f"{_log_tail(log_file)}")
    return output


def _log_tail(log_file: Path) -> str:
    """The last lines of `log_file` and its path, for an error message."""
    lines = [line for line in log_file.read_text("utf-8", errors="replace").splitlines() if line.strip()]
    return "; the log ends:\n  " + "\n  ".join(lines[-LOG_TAIL:] or ["(empty)"]) + f"\nfull log: {log_file}"


def modelfile_text(gguf_name: str, *, num_ctx: int) -> str:
    """An Ollama Modelfile for `gguf_name` that prompts exactly like training and stops where the student stops."""
    settings = ollama_settings(num_ctx=num_ctx)
    lines = [
        "# mdlite student. Create it with: ollama create NAME -f Modelfile (or: mdlite export-gguf ... --ollama NAME)",
        "# The system message is the answer style; the default asks for CoT. For a program (PoT), set it to:",
        f"#   {STUDENT_DIRECTIVES['pot']}",
        "# temperature 0: greedy, as mdlite's single-path figures; voting needs `mdlite solve` or `mdlite serve`.",
        f"FROM ./{gguf_name}",
        f"TEMPLATE {_ollama_quote(settings['template'])}",
        f"SYSTEM {_ollama_quote(settings['system'])}",
        *[f"PARAMETER stop {_ollama_quote(stop)}" for stop in settings["parameters"]["stop"]],
        *[f"PARAMETER {name} {value}" for name, value in settings["parameters"].items() if name != "stop"],
    ]
    return "\n".join(lines) + "\n"


def ollama_settings(*, num_ctx: int) -> dict[str, Any]:
    """The Modelfile's TEMPLATE, SYSTEM and PARAMETERs (also sent by `--ollama`): the student template in Go
    template syntax (the system message is the style directive), its stop strings, num_ctx, temperature 0."""
    fields = {"question": "{{ .Prompt }}", "directive": "{{ .System }}"}
    template = "".join(literal + (fields[name] if name else "")
                       for literal, name, _, _ in string.Formatter().parse(prompt_text("student")))
    return {"template": template + "{{ .Response }}", "system": STUDENT_DIRECTIVES["cot"],
            "parameters": {"stop": list(STUDENT_STOP), "num_ctx": num_ctx, "temperature": 0}}


# ---- Ollama ---------------------------------------------------------------------------------------------------


def ollama_client(host: str = "") -> Any:
    """An `ollama.Client` for `host` (empty: $OLLAMA_HOST, else 127.0.0.1:11434), after checking that the server
    answers; MdliteError naming the flags when it does not."""
    try:
        import httpx
        import ollama
    except ImportError as error:
        raise MdliteError(f"--ollama needs the {error.name} package: pip install 'mdlite[teacher]' (or drop --ollama "
                          "and run `ollama create NAME -f Modelfile` later)") from None

    where = host or os.environ.get("OLLAMA_HOST") or "http://127.0.0.1:11434"
    client = ollama.Client(host=where, timeout=httpx.Timeout(None, connect=10.0))
    try:
        client.list()
    except Exception as error:  # noqa: BLE001 - any failure here means the server is not usable
        reason = "nothing answers there" if isinstance(error, ConnectionError) else \
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}".rstrip(": ")
        raise MdliteError(f"cannot reach Ollama at {where} ({reason}); start it with `ollama serve`, or point "
                          "--ollama-host / $OLLAMA_HOST at it, or drop --ollama and run `ollama create NAME -f "
                          "Modelfile` later") from None
    return client


def register_ollama(gguf: Path, name: str, *, num_ctx: int, host: str = "") -> dict[str, Any]:
    """Register `gguf` with a running Ollama as model `name`, as `ollama create name -f Modelfile` does: upload
    the file as a blob (POST /api/blobs/sha256:..., skipped when HEAD finds it there), then POST /api/create
    with `files`, the Modelfile's template, system and parameters. Returns {name, digest, uploaded, host}."""
    import httpx
    import ollama

    client = ollama_client(host)
    digest = "sha256:" + file_sha256(gguf)
    try:
        # The client has no public HEAD (create_blob always uploads); its httpx client asks whether the blob is
        # there. Ollama answers a POST of a blob it has without reading the body, which breaks a large upload.
        head = client._client.head(f"/api/blobs/{digest}")
        if head.status_code not in (200, 404):
            raise ollama.ResponseError(head.text or "HEAD /api/blobs failed", head.status_code)
        present = head.status_code == 200
        if not present:
            log.info("uploading %s (%.1f MB) to Ollama", gguf.name, gguf.stat().st_size / 1e6)
            uploaded = client.create_blob(gguf)
            if uploaded != digest:
                raise MdliteError(f"{gguf}: changed while it was uploaded to Ollama; run the export again")
        settings = ollama_settings(num_ctx=num_ctx)
        reply = client.create(model=name, files={gguf.name: digest}, template=settings["template"],
                              system=settings["system"], parameters=settings["parameters"], stream=False)
    except ollama.ResponseError as error:
        raise MdliteError(f"Ollama refused to create {name!r} from {gguf.name} (HTTP {error.status_code}: "
                          f"{error.error}); fix the name (flag --ollama) if it is the problem, else see the "
                          "Ollama server's log") from None
    except (ConnectionError, OSError, httpx.HTTPError) as error:
        raise MdliteError(f"lost the connection to Ollama while registering {name!r} ({error}); run the export "
                          "again, or `ollama create NAME -f Modelfile`") from None
    if getattr(reply, "status", None) != "success":
        raise MdliteError(f"Ollama did not confirm creating {name!r} (status {getattr(reply, 'status', None)!r})")
    log.info("registered %s with Ollama as %s", gguf.name, name)
    return {"name": name, "digest": digest, "uploaded": not present, "host": str(client._client.base_url)}


# ---- parity ---------------------------------------------------------------------------------------------------


def check_parity(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, files: dict[str, Path],
                 cfg: ExportConfig, *, add_bos: bool, styles: tuple[str, ...] = STYLES) -> dict[str, Any]:
    """Compare the GGUF files with the merged model on the student prompts of `cfg.parity_problems` problems in
    `styles` (a student answers only in the styles it learned)."""
    from tqdm import tqdm

    from mdlite.llamacpp import open_llama

    problems = _parity_problems(cfg)
    prompts = [(p, style, student_prompt(p.question, style=style)) for p in problems for style in styles]
    bos = [tokenizer.bos_token_id] if add_bos else []
    hf_ids = [bos + tokenizer(text, add_special_tokens=False).input_ids for _, _, text in prompts]
    eos = tokenizer.eos_token_id

    def stopped_at_string(tokens: list[int]) -> bool:
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        return any(stop in text for stop in STUDENT_STOP)

    outputs: dict[str, list[list[int]]] = {}
    report: dict[str, Any] = {"problems": len(problems), "source": cfg.parity_data or f"synthetic (seed {cfg.seed})",
                              "styles": list(styles), "max_tokens": cfg.parity_max_tokens}
    device = next(model.parameters()).device
    model.to("cpu")  # the GPU is llama.cpp's while it runs the GGUF files (a 7B F16 needs ~13 GiB of it)
    release_gpu_memory()
    for quant, path in files.items():
        llm = open_llama(path, n_ctx=cfg.num_ctx, n_threads=cfg.n_threads, n_gpu_layers=cfg.n_gpu_layers,
                         seed=cfg.seed)
        try:
            if quant == "F16":
                report["chat_template"] = _check_chat_template(llm, tokenizer, problems, add_bos=add_bos)
                gguf_ids = [llm.tokenize(text.encode(), add_bos=True, special=False) for _, _, text in prompts]
                report["tokens"] = _token_report(prompts, hf_ids, gguf_ids)
            outputs[quant] = [_gguf_greedy(llm, ids, eos=eos, budget=cfg.parity_max_tokens, stop=stopped_at_string)
                              for ids in tqdm(hf_ids, desc=f"parity {quant}", leave=False)]
        finally:
            llm.close()
    model.to(device)
    reference = [_hf_greedy(model, ids, follow, eos=eos, budget=cfg.parity_max_tokens, stop=stopped_at_string)
                 for ids, follow in tqdm(list(zip(hf_ids, outputs["F16"], strict=True)), desc="parity HF",
                                         leave=False)]
    report["greedy_f16"] = _greedy_report(prompts, reference, outputs["F16"], tokenizer, tie_margin=cfg.tie_margin)
    report["files"] = _answer_report(prompts, outputs, tokenizer, eos=eos)
    report["thresholds"] = {k: getattr(cfg, k) for k in ("min_token_match", "min_greedy_match", "tie_margin",
                                                          "min_answer_agreement", "min_stop_rate")}
    report["failures"] = _failures(report, cfg)
    report["passed"] = not report["failures"]
    report["summary"] = {
        "token_match": report["tokens"]["match_rate"], "chat_template_ok": report["chat_template"]["ok"],
        "greedy_identical": report["greedy_f16"]["identical_rate"],
        "greedy_match_or_tie": report["greedy_f16"]["match_rate"],
        **{f"{q}_stop_rate": f["stop_rate"] for q, f in report["files"].items()},
        **{f"{q}_answer_agreement": f["answer_agreement"] for q, f in report["files"].items() if q != "F16"},
    }
    return report


def _parity_problems(cfg: ExportConfig) -> list[Problem]:
    from mdlite.data import load_problems, synth_problems

    if cfg.parity_data:
        return load_problems(cfg.parity_data, limit=cfg.parity_problems)
    return synth_problems(cfg.parity_problems, seed=cfg.seed)


def _check_chat_template(llm: Llama, tokenizer: PreTrainedTokenizerBase, problems: list[Problem], *,
                         add_bos: bool) -> dict[str, Any]:
    """Render the GGUF's own chat template (as llama-cpp-python does, with Jinja) against `student_prompt`."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    source = llm.metadata.get("tokenizer.chat_template")
    if not source:
        return {"ok": False, "error": "the GGUF has no tokenizer.chat_template"}
    template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(source)
    bos = tokenizer.bos_token if add_bos else ""
    for problem in problems[:2]:
        for style in STYLES:
            messages = [{"role": "user", "content": problem.question}]
            if style != "cot":
                messages.insert(0, {"role": "system", "content": STUDENT_DIRECTIVES[style]})
            rendered = template.render(messages=messages, bos_token=tokenizer.bos_token,
                                       eos_token=tokenizer.eos_token, add_generation_prompt=True)
            expected = bos + student_prompt(problem.question, style=style)
            if rendered != expected:
                return {"ok": False, "error": f"{style}: rendered {rendered!r}, expected {expected!r}"}
    return {"ok": True}


def _gguf_greedy(llm: Llama, ids: list[int], *, eos: int, budget: int,
                 stop: Callable[[list[int]], bool]) -> list[int]:
    out: list[int] = []
    for token in llm.generate(ids, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(token)
        if token == eos or len(out) >= budget or stop(out):
            break
    return out


def _hf_greedy(model: PreTrainedModel, ids: list[int], follow: list[int], *, eos: int, budget: int,
               stop: Callable[[list[int]], bool]) -> dict[str, Any]:
    """The merged model's greedy continuation, and at the first step where it leaves `follow` (the GGUF's), the
    gap between the logits of its token and the GGUF's token."""
    import torch

    device = next(model.parameters()).device
    out: list[int] = []
    gap = None
    past = None
    step = torch.tensor([ids], device=device)
    with torch.inference_mode():
        while len(out) < budget:
            result = model(input_ids=step, past_key_values=past, use_cache=True)
            past, logits = result.past_key_values, result.logits[0, -1].float()
            token = int(logits.argmax())
            if gap is None and len(out) < len(follow) and token != follow[len(out)]:
                gap = float(logits[token] - logits[follow[len(out)]])
            out.append(token)
            if token == eos or stop(out):
                break
            step = torch.tensor([[token]], device=device)
    return {"tokens": out, "gap": gap}


def _token_report(prompts: list[tuple[Problem, str, str]], hf_ids: list[list[int]],
                  gguf_ids: list[list[int]]) -> dict[str, Any]:
    mismatches = []
    for (problem, style, _), hf, gguf in zip(prompts, hf_ids, gguf_ids, strict=True):
        if hf != gguf:
            at = next((i for i, (a, b) in enumerate(zip(hf, gguf, strict=False)) if a != b), min(len(hf), len(gguf)))
            mismatches.append({"id": problem.id, "style": style, "position": at, "hf": hf[at:at + 5],
                               "gguf": gguf[at:at + 5]})
    return {"prompts": len(prompts), "identical": len(prompts) - len(mismatches),
            "match_rate": _rate(len(prompts) - len(mismatches), len(prompts)), "mismatches": mismatches}


def _greedy_report(prompts: list[tuple[Problem, str, str]], reference: list[dict[str, Any]],
                   gguf: list[list[int]], tokenizer: PreTrainedTokenizerBase, *, tie_margin: float) -> dict[str, Any]:
    divergences, ties = [], 0
    for (problem, style, _), hf, ours in zip(prompts, reference, gguf, strict=True):
        if hf["tokens"] == ours:
            continue
        at = next((i for i, (a, b) in enumerate(zip(hf["tokens"], ours, strict=False)) if a != b),
                  min(len(hf["tokens"]), len(ours)))
        tie = hf["gap"] is not None and hf["gap"] < tie_margin
        ties += tie
        divergences.append({
            "id": problem.id, "style": style, "position": at, "near_tie": tie,
            "hf_logit_gap": None if hf["gap"] is None else round(hf["gap"], 6),
            "common_text": tokenizer.decode(ours[:at]), "hf_next": tokenizer.decode(hf["tokens"][at:at + 8]),
            "gguf_next": tokenizer.decode(ours[at:at + 8]),
        })
    identical = len(prompts) - len(divergences)
    return {"prompts": len(prompts), "identical": identical, "identical_rate": _rate(identical, len(prompts)),
            "near_ties": ties, "match_rate": _rate(identical + ties, len(prompts)), "divergences": divergences}


def _answer_report(prompts: list[tuple[Problem, str, str]], outputs: dict[str, list[list[int]]],
                   tokenizer: PreTrainedTokenizerBase, *, eos: int) -> dict[str, Any]:
    """Per file: how many answers stopped (EOS or a stop string within the budget), their answers, and the
    share of answers equal to F16's (PoT programs are run in the sandbox)."""
    from mdlite.answers import answers_match, extract_answer
    from mdlite.prompts import extract_program
    from mdlite.sandbox import run_programs

    texts: dict[str, list[str]] = {}
    stopped: dict[str, list[bool]] = {}
    for quant, runs in outputs.items():
        texts[quant], stopped[quant] = [], []
        for tokens in runs:
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            cut = min([text.index(s) for s in STUDENT_STOP if s in text], default=None)
            stopped[quant].append((bool(tokens) and tokens[-1] == eos) or cut is not None)
            texts[quant].append(text if cut is None else text[:cut])
    programs = [(q, i, extract_program(text)) for q in texts for i, text in enumerate(texts[q])
                if prompts[i][1] == "pot"]
    results = run_programs([code or "" for _, _, code in programs]) if programs else []
    values = {(q, i): result.value if code else None for (q, i, code), result in zip(programs, results, strict=True)}
    report = {}
    for quant in outputs:
        answers = [values[(quant, i)] if style == "pot" else extract_answer(texts[quant][i], style="cot")
                   for i, (_, style, _) in enumerate(prompts)]
        report[quant] = {"stop_rate": _rate(sum(stopped[quant]), len(prompts)), "answers": answers,
                         "stopped": stopped[quant], "texts": texts[quant]}
    for quant in outputs:
        same = [a == b or (a is not None and b is not None and answers_match(a, b))
                for a, b in zip(report[quant]["answers"], report["F16"]["answers"], strict=True)]
        report[quant]["answer_agreement"] = _rate(sum(same), len(prompts))
    return report


def _failures(report: dict[str, Any], cfg: ExportConfig) -> list[str]:
    found = []
    if report["tokens"]["match_rate"] < cfg.min_token_match:
        found.append(f"token ids differ from training's on {len(report['tokens']['mismatches'])} prompts "
                     f"(match {report['tokens']['match_rate']:.2f} < min_token_match {cfg.min_token_match})")
    if not report["chat_template"]["ok"]:
        found.append(f"chat template: {report['chat_template']['error']}")
    if report["greedy_f16"]["match_rate"] < cfg.min_greedy_match:
        found.append(f"F16 greedy answers differ from the merged model's (match "
                     f"{report['greedy_f16']['match_rate']:.2f} < min_greedy_match {cfg.min_greedy_match})")
    for quant, numbers in report["files"].items():
        if numbers["stop_rate"] < cfg.min_stop_rate:
            found.append(f"{quant}: only {numbers['stop_rate']:.2f} of answers end with EOS or a stop string within "
                         f"{cfg.parity_max_tokens} tokens (min_stop_rate {cfg.min_stop_rate})")
        if quant != "F16" and numbers["answer_agreement"] < cfg.min_answer_agreement:
            found.append(f"{quant}: answers agree with F16's on {numbers['answer_agreement']:.2f} "
                         f"(min_answer_agreement {cfg.min_answer_agreement})")
    return found


# ---- helpers --------------------------------------------------------------------------------------------------


def tokenizer_adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer starts an encoding with BOS (used when no mdlite.json says what training did)."""
    return tokenizer.bos_token_id is not None and tokenizer("1").input_ids[:1] == [tokenizer.bos_token_id]


def _local_base(spec: str, adapter_dir: Path | None) -> Path:
    """A local folder with the base's full-precision weights: a folder as is; a registry name, .gguf or hub id
    resolved like `mdlite train` does (a GGUF is dequantized once into the cache)."""
    folder = Path(resolve_base_model(spec).path)
    if folder.is_dir():
        return folder
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(folder), allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
    except Exception as error:  # hub errors have many types; all mean "not available"
        reason = str(error).splitlines()[0]
        if adapter_dir is None:
            raise MdliteError(f"{spec}: could not be downloaded ({reason}); give a local model folder") from None
        raise MdliteError(f"{adapter_dir}: its base {spec} is not a local folder and could not be downloaded "
                          f"({reason}); set mdlite.json's base_model to a local folder") from None


def _read_adapter(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of an adapter file, after checking that it reads and holds only finite numbers."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise MdliteError(f"{path}: cannot read the adapter ({error}); the file is damaged, re-run `mdlite train` "
                          "or copy it again") from None
    broken = [name for name, tensor in tensors.items() if not torch.isfinite(tensor).all()]
    if broken or not tensors:
        raise MdliteError(f"{path}: the adapter has {'no tensors' if not tensors else 'NaN/inf in ' + broken[0]}; "
                          "the file is damaged or training diverged, re-run `mdlite train`")
    return {name: tuple(tensor.shape) for name, tensor in tensors.items()}


def _safetensors_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import SafetensorError, safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise MdliteError(f"{folder}: no .safetensors weights; save the base with save_pretrained "
                          "(safe_serialization) first")
    shapes = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as weights:
                shapes.update({key: tuple(weights.get_slice(key).get_shape()) for key in weights.keys()})  # noqa: SIM118
        except (SafetensorError, OSError) as error:
            raise MdliteError(f"{path}: cannot read the weights ({error})") from None
    return shapes


def _check_vocabulary(source: Source, base_shapes: dict[str, tuple[int, ...]]) -> None:
    """The adapter's tokenizer must be the base's (same token ids) and fit its embedding."""
    from transformers import AutoTokenizer

    assert source.adapter_dir is not None
    try:
        adapter_tokenizer = AutoTokenizer.from_pretrained(source.adapter_dir)
    except (OSError, ValueError) as error:
        raise MdliteError(f"{source.adapter_dir}: cannot load the tokenizer ({str(error).splitlines()[0]})") from None
    rows = next((shape[0] for key, shape in base_shapes.items() if key.endswith("embed_tokens.weight")), None)
    if rows is not None and len(adapter_tokenizer) > rows:
        raise MdliteError(f"{source.adapter_dir}: its tokenizer has {len(adapter_tokenizer)} tokens but the base "
                          f"{source.base_dir} embeds only {rows}; the adapter was trained on another base")
    if (source.base_dir / "tokenizer_config.json").exists():
        base_vocab = AutoTokenizer.from_pretrained(source.base_dir).get_vocab()
        if base_vocab != adapter_tokenizer.get_vocab():
            differ = len(set(base_vocab.items()) ^ set(adapter_tokenizer.get_vocab().items()))
            raise MdliteError(f"{source.adapter_dir}: its tokenizer differs from the base's {source.base_dir} "
                              f"({differ} token ids differ); the adapter was trained on another base, export it "
                              "with that one (mdlite.json base_model)")


def _extract_converter(archive: Path, folder: Path) -> str | None:
    """Extract the converter parts of a llama-cpp-python sdist into `folder`; the vendored llama.cpp commit."""
    commit = None
    with tarfile.open(archive) as sdist:
        for member in sdist:
            root, _, rest = member.name.partition("/")
            if rest == ".git/modules/vendor/llama.cpp/HEAD":
                commit = sdist.extractfile(member).read().decode().strip()  # type: ignore[union-attr]
            name = rest.removeprefix("vendor/llama.cpp/")
            if name == rest or not member.isfile() or ".." in Path(name).parts or \
                    not any(name == part or name.startswith(part) for part in CONVERTER_PARTS):
                continue
            target = folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(sdist.extractfile(member).read())  # type: ignore[union-attr]
    if not (folder / "convert_hf_to_gguf.py").exists():
        raise MdliteError(f"{archive.name}: no vendor/llama.cpp/convert_hf_to_gguf.py in the sdist; set "
                          "LLAMA_CPP_DIR to a llama.cpp checkout of the installed version")
    return commit


def _ollama_quote(value: str) -> str:
    """A Modelfile argument that Ollama's parser reads back as `value` (it has no escapes: a value spans lines
    only inside quotes, and ends at the first line end where its quotes are complete)."""
    if '"""' in value:
        raise MdliteError(f'cannot write {value!r} into a Modelfile: it contains """')
    if "\n" in value or '"' in value or value != value.strip():
        return f'"""{value}"""'
    return value


def _input_record(source: Source) -> dict[str, Any]:
    record: dict[str, Any] = {"input_dir": str(source.input_dir), "kind": "adapter" if source.adapter_dir else "model",
                              "base_dir": str(source.base_dir),
                              "base_config_sha256": file_sha256(source.base_dir / "config.json")}
    if source.adapter_dir:
        record["adapter_sha256"] = file_sha256(source.adapter_dir / "adapter_model.safetensors")
    return record



def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _native_bf16() -> bool:
    """bf16 in hardware (Ampere and newer); is_bf16_supported() alone also says yes where it is emulated (T4, V100)."""
    import torch

    return torch.cuda.is_bf16_supported(including_emulation=False)


def _parameters(folder: Path) -> int:
    return sum(_numel(shape) for shape in _safetensors_shapes(folder).values())


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _rate(count: int, total: int) -> float:
    return round(count / total, 4) if total else 1.0


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MdliteError(f"{path}: not readable JSON ({error}); the file is damaged, write it again") from None
    if not isinstance(value, dict):
        raise MdliteError(f"{path}: expected a JSON object")
    return value
