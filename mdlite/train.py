"""`mdlite train`: fine-tune the student on the teacher's kept CoT + PoT rationales, QLoRA or plain LoRA.

    mdlite train -c configs/svamp-llama2-7b.yaml --dry-run   # config, data counts, GPU memory estimate
    mdlite train -c configs/svamp-llama2-7b.yaml             # resumes from the last checkpoint
    mdlite train --rationales runs/rationales.jsonl --model gemma-3-270m --output-dir runs/train --overwrite
    accelerate launch --num_processes 2 -m mdlite train -c CONFIG  # DDP: one process per GPU, main one writes

Data: every kept record of rationales.jsonl becomes `student_prompt(question, style=style)` + `text` + EOS,
with the loss on the completion tokens only, weighted per style (`cot_loss_weight`, `pot_loss_weight`: the
multi-task loss). Per problem, CoT and PoT get the same number of examples when both exist (at most
`max_per_style` each); a `val_fraction` of the problems (by id) is held out for validation loss. `styles`
keeps one style only (the single-path baselines of Mixed Distillation's ablation).

Model: a registry name (its GGUF when it has one, else its hub id), a Hugging Face id, a local HF folder or
a .gguf file. A GGUF is dequantized once by transformers and cached as an HF folder under
`$MDLITE_HOME/hf/<stem>-<sha256[:16]>` (keyed by the file's content). QLoRA (`quantization: nf4`) loads
the base in 4-bit NF4 with double quantization; `none` trains plain LoRA on the full-precision base.
Batches are padding-free by default: each micro-batch is one flattened row with restarting position_ids,
and logits are computed only where a completion token is predicted.

Outputs in `output_dir`: checkpoint-N/ (adapter, optimizer, trainer state), adapter/ (final adapter, tokenizer
and mdlite.json naming the base model for export), trainer_log.jsonl, loss.png and run.json. A rerun resumes
from the last complete checkpoint; `--overwrite` starts over.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mdlite import MdliteError, __version__, check_output_dir, import_peft, peft_quietly
from mdlite.config import TrainConfig, to_dict
from mdlite.models import BaseModel, gguf_metadata, registry, resolve_base_model
from mdlite.prompts import STUDENT_STOP, STYLES, prompt_text, student_prompt
from mdlite.runinfo import file_sha256, package_versions, write_json

if TYPE_CHECKING:
    import torch
    from accelerate import PartialState
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer

log = logging.getLogger(__name__)
BATCH_LOG_ENV = "MDLITE_BATCH_LOG"  # a folder: each process logs its micro-batches' token hashes and, at the end,
# a hash of its LoRA weights there (DDP tests)
RECORDED_PACKAGES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes")  # versions written to run.json

OUTPUT_FILES = ("adapter", "trainer_log.jsonl", "loss.png", "run.json")
# Config keys that may change between an interrupted run and its resumption.
RESUMABLE_CHANGES = {"max_steps", "num_train_epochs", "logging_steps", "save_steps", "eval_steps",
                     "save_total_limit", "output_dir", "optim"}
# Architecture numbers of registry models, so `--dry-run` estimates memory without downloading anything.
ARCHITECTURES = {
    "llama-2-7b": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128,
                   "tie_word_embeddings": False},
    "codellama-7b": {"vocab_size": 32016, "hidden_size": 4096, "intermediate_size": 11008,
                     "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                     "head_dim": 128, "tie_word_embeddings": False},
    "gemma-3-270m": {"vocab_size": 262144, "hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 18,
                     "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
                     "tie_word_embeddings": True},
    "qwen2.5-coder-0.5b-instruct": {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
                                    "num_hidden_layers": 24, "num_attention_heads": 14,
                                    "num_key_value_heads": 2, "head_dim": 64, "tie_word_embeddings": True},
}
GPU_SIZES_GB = (8, 12, 16, 24)


@dataclass(frozen=True)
class Example:
    """One training example: the student prompt and the rationale it should produce (EOS added later)."""

    problem_id: str
    style: str
    sample: int
    prompt: str
    completion: str


@dataclass(frozen=True)
class Split:
    """The examples of the training and validation problems, with counts for logs and run.json."""

    train: list[Example]
    val: list[Example]
    counts: dict[str, int]


@dataclass(frozen=True)
class TrainResult:
    """What `run` produced."""

    adapter_dir: Path
    run_json: Path
    global_step: int
    train_loss: float | None
    eval_loss: float | None


def run(cfg: TrainConfig, *, overwrite: bool = False) -> TrainResult:
    """Train a LoRA adapter on `cfg.rationales`; resume from the last checkpoint unless `overwrite`."""
    import torch
    import transformers

    output_dir = Path(cfg.output_dir)
    records = read_rationales(Path(cfg.rationales))
    resolve_base_model(cfg.model, fetch=False)  # a bad --model fails before anything is written
    check_output_dir(output_dir, "--output-dir")
    rationales_hash = file_sha256(Path(cfg.rationales))
    ranks = _ranks()  # one process, or one per GPU under `accelerate launch`: only the main one writes files
    if overwrite and ranks.is_main_process:
        _clear_outputs(output_dir)
    ranks.wait_for_everyone()
    previous = _previous_run(output_dir, cfg, rationales_hash)
    if previous is not None:
        log.info("%s already holds a finished run with this config; --overwrite to train again", output_dir)
        return previous

    split = split_examples(records, max_per_style=cfg.max_per_style, val_fraction=cfg.val_fraction,
                           seed=cfg.seed, styles=cfg.styles)
    import_peft(four_bit=cfg.quantization == "nf4")
    with ranks.main_process_first():  # a GGUF is dequantized, a hub model downloaded, once, by the main process
        base = resolve_base_model(cfg.model)
        fetch_hub_model(base)
    cuda = torch.cuda.is_available()
    transformers.set_seed(cfg.seed)
    tokenizer = load_tokenizer(base)
    add_bos = expected_bos(tokenizer, base)
    train_data, dropped = encode_examples(split.train, tokenizer, cfg, add_bos=add_bos)
    val_data, val_dropped = encode_examples(split.val, tokenizer, cfg, add_bos=add_bos)
    if not train_data:
        raise MdliteError(f"{cfg.rationales}: every training example is longer than max_length={cfg.max_length} "
                          "tokens; raise --max-length")
    model = load_model(base, cfg, cuda=cuda)
    preflight_tokenizer(tokenizer, model, base)
    model = add_lora(model, cfg, base)

    with ranks.main_process_first():  # the main process removes incomplete checkpoints before the others look
        resume = _last_checkpoint(output_dir)
    if ranks.is_main_process:
        _truncate_log(output_dir / "trainer_log.jsonl", resume)
    counts = {**split.counts, "train_examples_kept": len(train_data), "val_examples_kept": len(val_data),
              "dropped_too_long": dropped + val_dropped}
    run_record = {
        "stage": "train", "status": "running", "config": to_dict(cfg), "seed": cfg.seed,
        "versions": package_versions(RECORDED_PACKAGES), "device": torch.cuda.get_device_name() if cuda else "cpu",
        "processes": ranks.num_processes,
        "inputs": {"rationales": {"path": str(cfg.rationales), "sha256": rationales_hash},
                   "base_model": _base_record(base)},
        "data": counts, "add_bos": add_bos, "resumed_from": resume.name if resume else None,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    if ranks.is_main_process:
        write_json(output_dir / "run.json", run_record)
    log.info("training on %d examples (%d validation), %d trainable parameters", len(train_data),
             len(val_data), run_record["trainable_parameters"])

    trainer = build_trainer(model, tokenizer, train_data, val_data, cfg, cuda=cuda, eval_on_start=resume is None)
    started = time.monotonic()
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    if val_data and (not evals or evals[-1]["step"] != trainer.state.global_step):
        evals.append({"eval_loss": trainer.evaluate()["eval_loss"]})
    eval_loss = evals[-1]["eval_loss"] if val_data else None

    adapter_dir = output_dir / "adapter"
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    result = TrainResult(adapter_dir, output_dir / "run.json", trainer.state.global_step,
                         losses[-1] if losses else None, eval_loss)
    if ranks.is_main_process:
        save_adapter(trainer.model, tokenizer, adapter_dir, base=base, cfg=cfg, add_bos=add_bos,
                     global_step=trainer.state.global_step)
        plot_losses(output_dir / "trainer_log.jsonl", output_dir / "loss.png")
        run_record.update(status="done", global_step=result.global_step, train_loss=result.train_loss,
                          eval_loss=eval_loss, runtime_s=round(time.monotonic() - started, 1),
                          adapter=str(adapter_dir))
        write_json(output_dir / "run.json", run_record)
    if os.environ.get(BATCH_LOG_ENV):  # DDP check: every process must end with the same LoRA weights
        write_json(Path(os.environ[BATCH_LOG_ENV]) / f"lora-rank{ranks.process_index}.json",
                   {"rank": ranks.process_index, "sha256": lora_sha256(trainer.model),
                    "wrapped_by": type(trainer.model_wrapped).__name__})
    ranks.wait_for_everyone()  # every process returns once the adapter is complete
    return result


def dry_run(cfg: TrainConfig) -> dict[str, Any]:
    """What `run` would do, without loading weights: data counts, token lengths when the tokenizer is
    local, and the GPU memory estimate at the configured sequence length."""
    report: dict[str, Any] = {"config": to_dict(cfg), "data": None, "tokens": None}
    path = Path(cfg.rationales)
    if path.exists():
        split = split_examples(read_rationales(path), max_per_style=cfg.max_per_style,
                               val_fraction=cfg.val_fraction, seed=cfg.seed, styles=cfg.styles)
        report["data"] = split.counts
        tokenizer_path = _local_tokenizer(cfg.model)
        if tokenizer_path is not None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
            add_bos = expected_bos(tokenizer, resolve_base_model(cfg.model, fetch=False))
            encoded = encode_examples(split.train + split.val, tokenizer, cfg, add_bos=add_bos, max_length=10**9)[0]
            lengths = [len(e["input_ids"]) for e in encoded]
            completion = sum(label != -100 for e in encoded for label in e["labels"])
            report["tokens"] = {"examples": len(lengths), "mean": round(sum(lengths) / max(len(lengths), 1), 1),
                                "max": max(lengths, default=0),
                                "longer_than_max_length": sum(n > cfg.max_length for n in lengths),
                                "total": sum(lengths),
                                "completion_fraction": round(completion / max(sum(lengths), 1), 3)}
    else:
        report["data_note"] = f"{path} not found yet (written by `mdlite teach`)"
    arch = architecture(cfg.model)
    card_targets = _card_targets(cfg.model)
    fraction = report["tokens"]["completion_fraction"] if report["tokens"] else 1.0
    report["architecture"] = arch
    report["activation_terms"] = {**activation_terms(arch, cfg), "completion_fraction": fraction}
    report["memory_gb"] = estimate_memory(arch, cfg, targets=card_targets, completion_fraction=fraction)
    report["memory_by_batch_size_gb"] = {
        batch: estimate_memory(arch, cfg, targets=card_targets, batch_size=batch,
                               completion_fraction=fraction)["total"] for batch in (1, 2, 4, 8)
    }
    return report


# ---- data ------------------------------------------------------------------------------------------------


def read_rationales(path: Path) -> list[dict[str, Any]]:
    """The kept records of a rationales.jsonl file; MdliteError (file:line) on bad input or none kept."""
    if not path.is_file():
        what = "is a folder, not a rationales file" if path.is_dir() else "rationales file not found"
        raise MdliteError(f"{path}: {what}; run `mdlite teach` first or fix --rationales")
    kept, total = [], 0
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            total += 1
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise MdliteError(f"{where}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise MdliteError(f"{where}: expected a JSON object")
            missing = [k for k in ("problem_id", "style", "question", "text", "kept") if k not in record]
            if missing:
                raise MdliteError(f"{where}: missing {', '.join(missing)} (rationales are written by `mdlite teach`)")
            if record["style"] not in STYLES:
                raise MdliteError(f"{where}: style must be one of {', '.join(STYLES)}, not {record['style']!r}")
            if record["kept"] is True and str(record["text"]).strip():
                kept.append(record)
    if not total:
        raise MdliteError(f"{path}: no rationales in the file; run `mdlite teach` again with a teacher that answers")
    if not kept:
        raise MdliteError(f"{path}: no kept rationales ({total} records, 0 kept); run `mdlite teach` "
                          "with a stronger teacher or more samples per problem")
    return kept


def split_examples(records: list[dict[str, Any]], *, max_per_style: int, val_fraction: float,
                   seed: int, styles: Sequence[str] = STYLES) -> Split:
    """Examples of `styles` balanced per problem (equal CoT and PoT counts where both exist, at most
    `max_per_style` each) and split by problem id into training and validation problems."""
    by_problem: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: {s: [] for s in styles})
    for record in records:
        if record["style"] in styles:
            by_problem[str(record["problem_id"])][record["style"]].append(record)
    ids = sorted(by_problem)
    random.Random(seed).shuffle(ids)
    n_val = round(len(ids) * val_fraction) if len(ids) > 1 else 0
    n_val = max(n_val, 1) if val_fraction > 0 and len(ids) > 1 else n_val
    val_ids = set(ids[:n_val])
    train: list[Example] = []
    val: list[Example] = []
    for problem_id in sorted(by_problem):
        present = [len(rows) for rows in by_problem[problem_id].values() if rows]
        take = min(min(present), max_per_style) if len(present) == len(styles) else max_per_style
        for style, rows in by_problem[problem_id].items():
            for record in sorted(rows, key=lambda r: r.get("sample", 0))[:take]:
                example = Example(problem_id, style, int(record.get("sample", 0)),
                                  student_prompt(record["question"], style=style), record["text"])
                (val if problem_id in val_ids else train).append(example)
    counts = {"kept_records": len(records), "problems": len(ids), "val_problems": n_val,
              "train_problems": len(ids) - n_val}
    for name, examples in (("train", train), ("val", val)):
        per_style = Counter(e.style for e in examples)
        counts.update({f"{name}_{style}": per_style[style] for style in STYLES})
    chosen = sum(record["style"] in styles for record in records)
    counts["other_styles"] = len(records) - chosen
    counts["unused_by_balance"] = chosen - len(train) - len(val)
    return Split(train, val, counts)


def encode_examples(examples: list[Example], tokenizer: PreTrainedTokenizerBase, cfg: TrainConfig, *,
                    add_bos: bool, max_length: int | None = None) -> tuple[list[dict[str, Any]], int]:
    """Token ids, labels (-100 on the prompt) and per-token loss weights of each example, and how many
    examples were dropped for being longer than `max_length` (default cfg.max_length)."""
    limit = max_length or cfg.max_length
    weights = {"cot": cfg.cot_loss_weight, "pot": cfg.pot_loss_weight}
    encoded, too_long, misaligned = [], [], 0
    for example in examples:
        prompt = tokenizer(example.prompt, add_special_tokens=False).input_ids
        full = tokenizer(example.prompt + example.completion, add_special_tokens=False).input_ids
        cut = len(prompt)
        if full[:cut] != prompt:  # a token merged across the boundary: keep the common prefix as prompt
            misaligned += 1
            cut = next(i for i, (a, b) in enumerate(zip(full, prompt, strict=False)) if a != b)
        prompt_ids = ([tokenizer.bos_token_id] if add_bos else []) + full[:cut]
        completion_ids = full[cut:] + [tokenizer.eos_token_id]
        input_ids = prompt_ids + completion_ids
        if len(input_ids) > limit:
            too_long.append(len(input_ids))
            continue
        encoded.append({
            "input_ids": input_ids,
            "labels": [-100] * len(prompt_ids) + completion_ids,
            "loss_weights": [0.0] * len(prompt_ids) + [weights[example.style]] * len(completion_ids),
            "style": example.style,
        })
    if misaligned:
        log.warning("%d examples tokenized differently across the prompt/rationale boundary", misaligned)
    if too_long:
        log.warning("dropped %d of %d examples longer than max_length=%d tokens (longest %d); "
                    "raise --max-length to keep them", len(too_long), len(examples), limit, max(too_long))
    return encoded, len(too_long)


@dataclass
class MultiTaskCollator:
    """Batches encoded examples. Padding-free: one row of concatenated examples with position_ids restarting
    at 0 for each (attention stays within an example). Otherwise: right-padded to the longest example."""

    pad_token_id: int
    padding_free: bool = True

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        import torch

        keys = ("input_ids", "labels", "loss_weights")
        if self.padding_free:
            batch = {k: [v for f in features for v in f[k]] for k in keys}
            batch["position_ids"] = [i for f in features for i in range(len(f["input_ids"]))]
            return {k: torch.tensor([v], dtype=torch.float32 if k == "loss_weights" else torch.long)
                    for k, v in batch.items()}
        longest = max(len(f["input_ids"]) for f in features)
        fill = {"input_ids": self.pad_token_id, "labels": -100, "loss_weights": 0.0}
        out = {k: [f[k] + [fill[k]] * (longest - len(f[k])) for f in features] for k in keys}
        out["attention_mask"] = [[1] * len(f["input_ids"]) + [0] * (longest - len(f["input_ids"])) for f in features]
        return {k: torch.tensor(v, dtype=torch.float32 if k == "loss_weights" else torch.long)
                for k, v in out.items()}


# ---- model ------------------------------------------------------------------------------------------------


def fetch_hub_model(base: BaseModel) -> None:
    """Download a hub model's config, safetensors weights and tokenizer files into the Hugging Face cache (nothing
    for a local folder), so that DDP processes started after the main one find them there."""
    if Path(base.path).is_dir():
        return
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(base.path, allow_patterns=["*.json", "*.safetensors", "tokenizer*"])
    except Exception as error:  # hub errors have many types; all mean "not available"
        raise MdliteError(f"{base.spec}: could not be downloaded ({str(error).splitlines()[0]}); check the "
                          "network and `hf auth login` for a gated model, or give a local model folder (flag --model)"
                          ) from None


def load_tokenizer(base: BaseModel) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(base.path)
    except (OSError, ValueError) as error:
        raise MdliteError(f"{base.spec}: cannot load its tokenizer ({str(error).splitlines()[0]}); "
                          "give a local model folder, .gguf file or registry name (flag --model)") from None


def expected_bos(tokenizer: PreTrainedTokenizerBase, base: BaseModel) -> bool:
    """Whether the model expects a BOS token first: the GGUF's own flag (what llama.cpp will do at
    inference), else what the tokenizer does, else yes for the LLaMA and Gemma families."""
    marker = Path(base.path) / "mdlite-source.json"
    gguf_flag = json.loads(marker.read_text()).get("add_bos") if marker.exists() else None
    if tokenizer.bos_token_id is None:
        return False
    if gguf_flag is not None:
        return bool(gguf_flag)
    probe = tokenizer("1").input_ids
    config = Path(base.path) / "config.json"
    model_type = json.loads(config.read_text()).get("model_type", "") if config.exists() else ""
    return probe[:1] == [tokenizer.bos_token_id] or model_type.startswith(("llama", "gemma", "mistral"))


def preflight_tokenizer(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, base: BaseModel) -> None:
    """Check the tokenizer against the model, and set a pad token from the existing vocabulary (it never grows:
    LLaMA-2's 32000 rows stay 32000, so the adapter fits the original base and its GGUF)."""
    rows = model.get_input_embeddings().weight.shape[0]
    size = len(tokenizer)
    if size > rows:
        raise MdliteError(f"{base.spec}: tokenizer has {size} tokens but the model's embedding has only {rows} "
                          "rows; use the tokenizer saved with the model (flag --model)")
    if size < rows:
        log.info("embedding has %d rows for %d tokens (padded vocabulary)", rows, size)
    if tokenizer.eos_token_id is None:
        raise MdliteError(f"{base.spec}: tokenizer has no EOS token, so the student could not learn to stop")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token_id is not None else tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def load_model(base: BaseModel, cfg: TrainConfig, *, cuda: bool) -> PreTrainedModel:
    """The base model, 4-bit NF4 (QLoRA) or full precision (plain LoRA), on this process's GPU when there is one
    (`local_device`: one GPU per process under `accelerate launch`)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = compute_dtype(cuda=cuda)
    if cuda:
        torch.cuda.set_device(local_device())
    kwargs: dict[str, Any] = {"dtype": dtype, "device_map": {"": local_device() if cuda else "cpu"}}
    if cfg.quantization == "nf4":
        require_bitsandbytes()
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(base.path, **kwargs)
    except (OSError, ValueError) as error:
        raise MdliteError(f"{base.spec}: cannot load the model ({str(error).splitlines()[0]}); give a local model "
                          "folder, .gguf file or registry name (flag --model)") from None
    model.config.use_cache = False
    if cfg.padding_free:
        use_packed_attention(model)
    return model


def compute_dtype(*, cuda: bool) -> torch.dtype:
    """Training's dtype: bf16 on a GPU that has it in hardware (Ampere and newer), fp16 on older ones (T4, V100:
    `is_bf16_supported()` alone counts their emulated bf16), fp32 on the CPU."""
    import torch

    if not cuda:
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def local_device() -> int:
    """This process's GPU: LOCAL_RANK under `accelerate launch` or torchrun (one GPU per process), else the
    current device."""
    import torch

    local_rank = os.environ.get("LOCAL_RANK")
    return int(local_rank) if local_rank is not None else torch.cuda.current_device()


def _ranks() -> PartialState:
    """accelerate's PartialState: one process, or the DDP processes of `accelerate launch` (it sets up the
    process group the Trainer then uses); `is_main_process` writes the files, `wait_for_everyone` syncs."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


PACKED_ATTENTION = "mdlite_packed"


def use_packed_attention(model: PreTrainedModel) -> bool:
    """Switch an sdpa model to PACKED_ATTENTION: sdpa that, on a padding-free row, attends within each example
    separately instead of masking the whole row (cost: sum of squared lengths, not square of the sum)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    if model.config._attn_implementation != "sdpa":
        return False
    AttentionInterface.register(PACKED_ATTENTION, _packed_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)  # padded batches keep sdpa's own path
    model.set_attn_implementation(PACKED_ATTENTION)
    return True


def _packed_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      sliding_window: int | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    import torch
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    positions = kwargs.get("position_ids")
    packed = (positions is not None and query.shape[0] == 1 and positions.shape[-1] == query.shape[2]
              == key.shape[2] and not kwargs.get("softcap") and int(positions[0, 0]) == 0)
    if not packed:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    key, value = (repeat_kv(t, query.shape[1] // key.shape[1]) for t in (key, value))
    starts = (positions[0] == 0).nonzero().flatten().tolist() + [query.shape[2]]
    parts = []
    for start, end in zip(starts, starts[1:], strict=False):
        mask = None
        if sliding_window and end - start > sliding_window:  # causal band: i - sliding_window < j <= i
            index = torch.arange(end - start, device=query.device)
            offset = index[:, None] - index[None, :]
            mask = (offset >= 0) & (offset < sliding_window)
        parts.append(F.scaled_dot_product_attention(
            query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], attn_mask=mask,
            is_causal=mask is None, dropout_p=dropout, scale=scaling))
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


def _has_bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def require_bitsandbytes() -> None:
    if not _has_bitsandbytes():
        raise MdliteError("quantization: nf4 needs bitsandbytes (pip install 'mdlite[train]'); or set "
                          "quantization: none (flag --quantization none) to train plain LoRA") from None


def add_lora(model: PreTrainedModel, cfg: TrainConfig, base: BaseModel) -> PreTrainedModel:
    """LoRA adapters on the target modules (QLoRA: after prepare_model_for_kbit_training)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.quantization == "nf4":
        # Checkpointing is switched on by the Trainer (non-reentrant, so inputs need no requires_grad hook).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    targets = cfg.lora_target_modules or _card_targets(base.card or "")
    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
                        task_type="CAUSAL_LM", target_modules=targets if targets != ["all-linear"] else "all-linear")
    try:
        with peft_quietly():
            return get_peft_model(model, config)
    except ValueError as error:
        raise MdliteError(f"lora_target_modules {targets}: {error} (flag --lora-target-modules)") from None


def save_adapter(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, adapter_dir: Path, *,
                 base: BaseModel, cfg: TrainConfig, add_bos: bool, global_step: int) -> None:
    """The final adapter, the tokenizer files and mdlite.json (what export needs to rebuild the student)."""
    model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    if (Path(base.path) / "tokenizer.model").exists():
        shutil.copy(Path(base.path) / "tokenizer.model", adapter_dir / "tokenizer.model")
    write_json(adapter_dir / "mdlite.json", {
        "base_model": base.spec, "base_model_path": base.path, "base_gguf": base.gguf, "registry_name": base.card,
        "quantization": cfg.quantization, "add_bos": add_bos, "eos_token": tokenizer.eos_token,
        "student_template": prompt_text("student"), "styles": list(cfg.styles), "stop": STUDENT_STOP,
        "global_step": global_step, "mdlite_version": __version__,
    })


# ---- trainer ----------------------------------------------------------------------------------------------


def build_trainer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, train_data: list[dict[str, Any]],
                  val_data: list[dict[str, Any]], cfg: TrainConfig, *, cuda: bool,
                  eval_on_start: bool = False) -> Trainer:
    """A transformers Trainer with the multi-task loss, mdlite's batching and its progress log
    (`eval_on_start`: validation loss before the first step, the baseline in loss.png)."""
    import torch
    from transformers import ProgressCallback, TrainingArguments

    bf16 = compute_dtype(cuda=cuda) == torch.bfloat16
    warmup = int(cfg.warmup_steps) if cfg.warmup_steps >= 1 else cfg.warmup_steps
    args = TrainingArguments(
        output_dir=cfg.output_dir, seed=cfg.seed, data_seed=cfg.seed,
        learning_rate=cfg.learning_rate, num_train_epochs=cfg.num_train_epochs, max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, warmup_steps=warmup,
        lr_scheduler_type=cfg.lr_scheduler_type, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
        optim=_optimizer(cfg, cuda=cuda),
        activation_checkpointing=cfg.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        bf16=bf16, fp16=cuda and not bf16, use_cpu=not cuda,
        logging_steps=cfg.logging_steps, logging_first_step=True,
        save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit,
        eval_strategy="steps" if val_data else "no", eval_steps=cfg.eval_steps,
        eval_on_start=eval_on_start and bool(val_data),
        train_sampling_strategy="random" if cfg.padding_free else "group_by_length",
        remove_unused_columns=False, prediction_loss_only=True, report_to="none", dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # DDP: every LoRA weight gets a gradient each step
    )
    trainer = _trainer_class()(
        model=model, args=args, train_dataset=train_data, eval_dataset=val_data or None,
        data_collator=MultiTaskCollator(tokenizer.pad_token_id, cfg.padding_free),
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(_progress_callback(trainer, Path(cfg.output_dir) / "trainer_log.jsonl"))
    return trainer


def _optimizer(cfg: TrainConfig, *, cuda: bool) -> str:
    if cfg.optim != "auto":
        return cfg.optim
    return "paged_adamw_8bit" if cuda and _has_bitsandbytes() else "adamw_torch"


@cache
def _trainer_class() -> type[Trainer]:
    from transformers import Trainer

    class _MultiTaskTrainer(Trainer):
        """Trainer whose loss is the style-weighted cross-entropy of the completion tokens: logits are computed
        only at positions that predict a completion token, and the sum is divided by the number of completion
        tokens in the whole accumulated batch."""

        loss_is_scaled_for_ga = True
        effective_tokens = 0

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            import torch.nn.functional as F

            labels, weights = inputs.pop("labels"), inputs.pop("loss_weights")
            keep = labels[:, 1:] != -100  # position t predicts token t + 1
            keep = F.pad(keep, (0, 1), value=False)
            outputs = model(**inputs, logits_to_keep=keep, use_cache=False)
            logits = outputs.logits.float().reshape(-1, outputs.logits.shape[-1])
            targets = labels[:, 1:][keep[:, :-1]]
            token_loss = F.cross_entropy(logits, targets, reduction="none")
            total = (token_loss * weights[:, 1:][keep[:, :-1]]).sum()
            if num_items_in_batch is None:
                scale = self.current_gradient_accumulation_steps if model.training else 1
                num_items_in_batch = targets.numel() * scale
            elif self.args.average_tokens_across_devices and self.args.world_size > 1:
                # DDP: the count is summed over all processes and DDP averages their gradients (as Trainer does)
                num_items_in_batch = num_items_in_batch / self.args.world_size
            loss = total / num_items_in_batch
            if model.training:
                mask = inputs.get("attention_mask")
                self.effective_tokens += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
                if os.environ.get(BATCH_LOG_ENV):
                    _log_batch(Path(os.environ[BATCH_LOG_ENV]), self.args.process_index, self.state.global_step,
                               inputs["input_ids"])
            return (loss, outputs) if return_outputs else loss

    return _MultiTaskTrainer


def lora_sha256(model: PreTrainedModel) -> str:
    """sha256 of the trainable (LoRA) weights, by name and value: equal on every DDP process after training."""
    import hashlib

    digest = hashlib.sha256()
    for name, parameter in sorted(model.named_parameters()):
        if parameter.requires_grad:
            digest.update(name.encode())
            digest.update(parameter.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def _log_batch(folder: Path, rank: int, step: int, input_ids: torch.Tensor) -> None:
    """Debugging DDP ($MDLITE_BATCH_LOG=DIR): one line per micro-batch in DIR/batches-rank<N>.jsonl with the
    step and a hash of the token ids, so that tests can check that the processes saw different batches."""
    import hashlib

    folder.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(input_ids.cpu().numpy().tobytes()).hexdigest()[:16]
    with (folder / f"batches-rank{rank}.jsonl").open("a", encoding="utf-8") as out:
        out.write(json.dumps({"rank": rank, "step": step, "sha256": digest, "tokens": input_ids.numel()}) + "\n")


def _progress_callback(trainer: Any, log_path: Path) -> Any:
    from tqdm import tqdm
    from transformers import TrainerCallback

    class _Progress(TrainerCallback):
        """A progress bar with loss and ETA, and trainer_log.jsonl (step, loss, lr, tokens/s, elapsed, remaining)."""

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", unit="step",
                            disable=not state.is_world_process_zero)
            if state.is_world_process_zero:
                log_path.parent.mkdir(parents=True, exist_ok=True)
            self.start, self.start_step = time.monotonic(), state.global_step
            self.last_time, self.last_tokens, self.postfix = self.start, 0, {}

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
            logs = logs or {}
            if not state.is_world_process_zero:  # under DDP every process logs; the main one writes
                return
            now = time.monotonic()
            elapsed = now - self.start
            done = state.global_step - self.start_step
            record: dict[str, Any] = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
            if "loss" in logs:
                tokens = trainer.effective_tokens - self.last_tokens
                record.update(loss=logs["loss"], learning_rate=logs.get("learning_rate"),
                              grad_norm=logs.get("grad_norm"),
                              tokens_per_s=round(tokens / max(now - self.last_time, 1e-9), 1),
                              elapsed_s=round(elapsed, 1),
                              remaining_s=round(elapsed / done * (state.max_steps - state.global_step), 1)
                              if done else None)
                self.last_time, self.last_tokens = now, trainer.effective_tokens
                self.postfix["loss"] = f"{logs['loss']:.4f}"
            elif "eval_loss" in logs:
                record["eval_loss"] = logs["eval_loss"]
                self.postfix["val_loss"] = f"{logs['eval_loss']:.4f}"
            else:
                return
            self.bar.set_postfix(self.postfix)
            with log_path.open("a", encoding="utf-8") as out:
                out.write(json.dumps(record) + "\n")

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.bar.close()

    return _Progress()


def plot_losses(log_path: Path, image: Path) -> None:
    """loss.png: training loss per logged step, and validation loss where measured (skipped, with a warning,
    where matplotlib is missing: the adapter matters more than its plot)."""
    try:
        import matplotlib
    except ImportError:
        log.warning("%s not written: matplotlib is not installed (pip install 'mdlite[train]')", image)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "train"), ("eval_loss", "validation")):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o" if key == "eval_loss" else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (completion tokens)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(image, dpi=100)
    plt.close(fig)


# ---- memory estimate --------------------------------------------------------------------------------------


def architecture(spec: str) -> dict[str, Any]:
    """Architecture numbers of `spec` without loading weights: a local config.json or GGUF header, the
    registry table, or the hub config."""
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "tie_word_embeddings")
    path = Path(spec).expanduser()
    if spec in ARCHITECTURES and not path.exists():
        return dict(ARCHITECTURES[spec])
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_architecture(path)
    config_path = path / "config.json"
    if config_path.exists():
        config = json.loads(config_path.read_text())
    else:
        try:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(spec).to_dict()
        except (OSError, ValueError) as error:
            raise MdliteError(f"{spec}: no architecture numbers for the memory estimate "
                              f"({str(error).splitlines()[0]}); give a local model folder (flag --model)") from None
    config = config.get("text_config") or config
    arch = {k: config.get(k) for k in keys}
    arch["num_key_value_heads"] = arch["num_key_value_heads"] or arch["num_attention_heads"]
    arch["head_dim"] = arch["head_dim"] or arch["hidden_size"] // arch["num_attention_heads"]
    arch["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", False))
    return arch


def estimate_memory(arch: dict[str, Any], cfg: TrainConfig, *, targets: list[str] | None = None,
                    batch_size: int | None = None, completion_fraction: float = 1.0) -> dict[str, float]:
    """Peak GPU memory (GiB) of a training step, by part, following what the code keeps: base weights (NF4
    linear layers, embeddings and lm_head in fp32 after prepare_model_for_kbit_training; bf16 without
    quantization), autocast's bf16 copy of an fp32 lm_head, LoRA weights, gradients and optimizer states (paged
    8-bit AdamW), the activations of batch_size x max_length tokens (`layer_activation_bytes` per layer, or with
    gradient checkpointing each layer's input plus one recomputed layer), the logits of the completion tokens
    only (`completion_fraction` of the tokens; 1.0 when unknown) and ~1 GiB of CUDA context and workspace, plus
    10% fragmentation. The per-token terms are in `activation_terms`."""
    h, inter, layers, vocab = (arch[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                 "vocab_size"))
    q_out, kv_out = arch["num_attention_heads"] * arch["head_dim"], arch["num_key_value_heads"] * arch["head_dim"]
    shapes = {"q_proj": (h, q_out), "k_proj": (h, kv_out), "v_proj": (h, kv_out), "o_proj": (q_out, h),
              "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    linear = layers * sum(a * b for a, b in shapes.values())
    embeddings = vocab * h * (1 if arch["tie_word_embeddings"] else 2)
    targets = cfg.lora_target_modules or targets or ["all-linear"]
    lora_shapes = shapes.values() if "all-linear" in targets else [shapes[t] for t in targets if t in shapes]
    lora = layers * sum(cfg.lora_r * (a + b) for a, b in lora_shapes)
    gib = 2**30
    terms = activation_terms(arch, cfg)
    if cfg.quantization == "nf4":
        weights = linear * 4.127 / 8 + embeddings * 4  # NF4 + double-quantized absmax; fp32 embeddings
        lm_head_copy = vocab * h * 2  # autocast's bf16 copy of the fp32 lm_head, kept for backward
    else:
        weights = (linear + embeddings) * 2
        lm_head_copy = 0
    tokens = (batch_size or cfg.per_device_train_batch_size) * cfg.max_length
    one_layer = tokens * terms["layer"]
    if cfg.gradient_checkpointing:
        activations = layers * tokens * terms["checkpoint"] + 2 * one_layer  # layer inputs + one recomputed layer
    else:
        activations = layers * one_layer
    logits = tokens * completion_fraction * terms["logits"]
    optimizer_bytes = 2 if cfg.optim in ("auto", "paged_adamw_8bit", "adamw_8bit", "adamw_bnb_8bit") else 8
    parts = {"weights": weights, "lm_head_copy": lm_head_copy, "lora": lora * 4, "gradients": lora * 4,
             "optimizer": lora * optimizer_bytes, "activations": activations, "logits": logits, "cuda_overhead": gib}
    parts["total"] = sum(parts.values()) * 1.1
    result = {k: round(v / gib, 2) for k, v in parts.items()}
    result["lora_parameters_millions"] = round(lora / 1e6, 1)
    return result


def activation_terms(arch: dict[str, Any], cfg: TrainConfig) -> dict[str, int]:
    """Bytes per token that training on a GPU keeps for backward: `layer` (one decoder layer, see
    `layer_activation_bytes`), `checkpoint` (a layer's input under gradient checkpointing: the residual stream,
    fp32 after k-bit preparation, bf16 without) and `logits` (per completion token: bf16 logits, their fp32 copy
    and log-softmax, and the gradient, 12 bytes per vocabulary entry, plus the gathered hidden state)."""
    residual = 4 if cfg.quantization == "nf4" else 2
    return {"layer": layer_activation_bytes(arch, lora_r=cfg.lora_r, residual_bytes=residual,
                                            mask_bytes=1 if cfg.lora_dropout else 0),
            "checkpoint": residual * arch["hidden_size"],
            "logits": 12 * arch["vocab_size"] + (residual + 2) * arch["hidden_size"]}


def layer_activation_bytes(arch: dict[str, Any], *, lora_r: int, residual_bytes: int, mask_bytes: int) -> int:
    """Bytes one LLaMA-style decoder layer with LoRA on every linear layer saves for backward per token, under
    bf16 autocast, as measured with saved-tensor hooks (tests/test_train.py on the CPU, bench/gpu_check.py --probe
    on a GPU): each RMSNorm its fp32 input and rsqrt; each LoRA input its bf16 copy and dropout mask (bool on
    CUDA: `mask_bytes` 1; 0 without dropout) and its bf16 rank-`lora_r` activation; attention bf16 q, k, v (k
    and v repeated to every head) and output plus an fp32 log-sum-exp per head; the MLP's gate and up outputs
    and SiLU output in the residual stream's dtype (`residual_bytes`: 4 for fp32)."""
    h, inter, heads = arch["hidden_size"], arch["intermediate_size"], arch["num_attention_heads"]
    q_out = heads * arch["head_dim"]
    norms = 2 * (4 * h + 4)
    lora_inputs = (2 + mask_bytes) * (5 * h + q_out + inter)  # q, k, v, gate, up; o; down
    attention = 4 * 2 * q_out + 4 * heads
    mlp = 3 * residual_bytes * inter
    return norms + lora_inputs + 7 * 2 * lora_r + attention + mlp


def format_dry_run(report: dict[str, Any]) -> str:
    """The dry-run report as text: resolved config (YAML), data counts, token lengths, memory estimate."""
    import yaml

    cfg, arch, memory = report["config"], report["architecture"], report["memory_gb"]
    lines = [yaml.safe_dump({"train": cfg}, sort_keys=False).rstrip(), "", "data:"]
    lines += [f"  {key:<24} {value}" for key, value in (report["data"] or {"note": report["data_note"]}).items()]
    if report["tokens"]:
        lines.append("tokens per example: " + ", ".join(f"{k} {v}" for k, v in report["tokens"].items()))
    lines += ["", f"GPU memory estimate (GiB) for {cfg['model']}: {arch['num_hidden_layers']} layers, hidden "
              f"{arch['hidden_size']}, vocab {arch['vocab_size']}; {cfg['quantization']}, micro-batch "
              f"{cfg['per_device_train_batch_size']} x {cfg['max_length']} tokens, gradient checkpointing "
              f"{'on' if cfg['gradient_checkpointing'] else 'off'}"]
    lines += [f"  {key:<24} {value}" for key, value in memory.items()]
    lines.append(f"  -> {fits(memory['total'])}")
    terms = report["activation_terms"]
    lines.append(f"per token: one layer keeps {terms['layer']:,} B, a checkpointed layer input "
                 f"{terms['checkpoint']:,} B, "
                 f"logits {terms['logits']:,} B per completion token ({terms['completion_fraction']:.0%} of the tokens"
                 f"{'' if report['tokens'] else ': no tokenizer or data here, all counted'})")
    lines.append("by micro-batch size:")
    lines += [f"  {batch:<24} {total} GiB: {fits(total)}" for batch, total in report["memory_by_batch_size_gb"].items()]
    return "\n".join(lines)


def fits(total_gb: float) -> str:
    """Which common GPU sizes a total fits, e.g. 'fits 12, 16, 24 GB; not 8 GB'."""
    yes = [size for size in GPU_SIZES_GB if total_gb <= size * 0.95]
    no = [size for size in GPU_SIZES_GB if size not in yes]
    parts = ([f"fits {', '.join(map(str, yes))} GB"] if yes else []) + ([f"not {', '.join(map(str, no))} GB"]
                                                                         if no else [])
    return "; ".join(parts)


# ---- private helpers --------------------------------------------------------------------------------------


def _card_targets(name: str) -> list[str]:
    cards = registry()
    if name in cards:
        targets = cards[name].lora_target_modules
        return [targets] if isinstance(targets, str) else list(targets)
    return ["all-linear"]


def _local_tokenizer(spec: str) -> str | None:
    """A tokenizer that loads without network: an HF folder, or the dequantized cache of a GGUF."""
    try:
        base = resolve_base_model(spec, fetch=False)
    except MdliteError:
        return None
    folder = Path(base.path)
    return str(folder) if (folder / "tokenizer_config.json").exists() else None


def _gguf_architecture(gguf: Path) -> dict[str, Any]:
    meta = gguf_metadata(gguf)
    arch = meta["general.architecture"]
    heads = meta[f"{arch}.attention.head_count"]
    return {
        "vocab_size": meta["vocab_size"], "hidden_size": meta[f"{arch}.embedding_length"],
        "intermediate_size": meta[f"{arch}.feed_forward_length"], "num_hidden_layers": meta[f"{arch}.block_count"],
        "num_attention_heads": heads, "num_key_value_heads": meta.get(f"{arch}.attention.head_count_kv", heads),
        "head_dim": meta.get(f"{arch}.attention.key_length", meta[f"{arch}.embedding_length"] // heads),
        "tie_word_embeddings": not meta["has_output"],
    }


def _last_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint (trainer_state.json is written last); incomplete newer ones are removed."""
    found = sorted((p for p in output_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for checkpoint in found:
        try:
            json.loads((checkpoint / "trainer_state.json").read_text())
            return checkpoint
        except (OSError, json.JSONDecodeError):
            log.warning("removing incomplete %s (interrupted while saving)", checkpoint)
            shutil.rmtree(checkpoint)
    return None


def _truncate_log(log_path: Path, resume: Path | None) -> None:
    """Keep the log records up to the checkpoint we resume from (all of them are redone otherwise)."""
    if not log_path.exists():
        return
    step = int(resume.name.split("-")[-1]) if resume else -1
    kept = [line for line in log_path.read_text().splitlines() if json.loads(line)["step"] <= step]
    log_path.write_text("".join(line + "\n" for line in kept))


def _previous_run(output_dir: Path, cfg: TrainConfig, rationales_hash: str) -> TrainResult | None:
    """The finished run in `output_dir` when it used this exact config; MdliteError when its checkpoints
    come from different settings (resuming them would mix two runs)."""
    path = output_dir / "run.json"
    if not path.exists():
        if any(output_dir.glob("checkpoint-*")):
            raise MdliteError(f"{output_dir}: has checkpoints but no run.json; pass --overwrite to start over")
        return None
    record = json.loads(path.read_text())
    now, before = to_dict(cfg), record.get("config", {})
    differs = sorted(k for k in now if now[k] != before.get(k) and k not in RESUMABLE_CHANGES)
    if record.get("inputs", {}).get("rationales", {}).get("sha256") != rationales_hash:
        differs.append("rationales content")
    if differs:
        raise MdliteError(f"{output_dir}: holds a run with different settings ({', '.join(differs)}); pass "
                          "--overwrite to start over, or choose another --output-dir")
    if record.get("status") == "done" and now == before and (output_dir / "adapter" / "mdlite.json").exists():
        return TrainResult(output_dir / "adapter", path, record["global_step"], record.get("train_loss"),
                           record.get("eval_loss"))
    return None


def _clear_outputs(output_dir: Path) -> None:
    for checkpoint in output_dir.glob("checkpoint-*"):
        shutil.rmtree(checkpoint)
    for name in OUTPUT_FILES:
        target = output_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def _base_record(base: BaseModel) -> dict[str, Any]:
    record: dict[str, Any] = {"spec": base.spec, "path": base.path, "gguf": base.gguf, "registry_name": base.card}
    if base.gguf:
        record["gguf_size"] = Path(base.gguf).stat().st_size
    config = Path(base.path) / "config.json"
    if config.exists():
        record["config_sha256"] = file_sha256(config)
    return record

