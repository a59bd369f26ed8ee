"""Stage configurations: one dataclass per stage, loaded from YAML with command-line overrides.

Every field has a `help` (its docstring, shown by `--help` and in README's config reference).
`load_config(Cls, path, overrides)` reads the YAML file, applies the flags that were given, checks
types and values, and raises one MdliteError listing every problem at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from mdlite import MdliteError

T = TypeVar("T")
# Ollama's keep_alive: seconds, or a Go duration (300ms, 1.5h, 2h45m); negative: keep the model loaded.
OLLAMA_DURATION = re.compile(r"[-+]?((\d+\.?\d*|\.\d+)(ns|us|µs|ms|s|m|h))+|[-+]?(\d+\.?\d*|\.\d+)")
# transformers' SchedulerType and OptimizerNames values (tests/test_config.py checks them against transformers,
# whose import takes seconds).
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
              "warmup_stable_decay", "greedy")
OPTIMIZERS = (
    "adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_torch_npu_fused", "adafactor", "adamw_anyprecision",
    "adamw_torch_4bit", "adamw_torch_8bit", "ademamix", "sgd", "adagrad", "adamw_bnb_8bit", "adamw_8bit",
    "ademamix_8bit", "lion_8bit", "lion_32bit", "paged_adamw_32bit", "paged_adamw_8bit", "paged_ademamix_32bit",
    "paged_ademamix_8bit", "paged_lion_32bit", "paged_lion_8bit", "rmsprop", "rmsprop_bnb", "rmsprop_bnb_8bit",
    "rmsprop_bnb_32bit", "galore_adamw", "galore_adamw_8bit", "galore_adafactor", "galore_adamw_layerwise",
    "galore_adamw_8bit_layerwise", "galore_adafactor_layerwise", "lomo", "adalomo", "grokadamw",
    "schedule_free_radam", "schedule_free_adamw", "schedule_free_sgd", "apollo_adamw", "apollo_adamw_layerwise",
    "stable_adamw",
)


def knob(default: Any, help: str, **kwargs: Any) -> Any:
    """A config field with its docstring (`help`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


# ---- stage configs (each stage's module documents how it uses them) ------------------------------

@dataclass
class TrainConfig:
    """`mdlite train`: QLoRA / LoRA fine-tuning of the student on kept CoT + PoT rationales (train.py)."""

    rationales: str = knob("runs/teach/rationales.jsonl",
                           "Rationales JSONL written by `mdlite teach` (its kept records are used).")
    styles: list[str] = knob(["cot", "pot"], "Rationale styles to train on: cot and pot (Mixed Distillation), "
                                             "or one of them (the single-path baselines).")
    model: str = knob("gemma-3-270m", "Base model: registry name, Hugging Face id, local HF folder or .gguf file.")
    output_dir: str = knob("runs/train", "Folder for checkpoint-N/, adapter/, trainer_log.jsonl, loss.png, run.json.")
    quantization: str = knob("nf4", "nf4 (QLoRA: 4-bit NF4 base, double quant) or none (plain LoRA).")
    lora_r: int = knob(16, "LoRA rank.")
    lora_alpha: int = knob(32, "LoRA scaling numerator (scale = lora_alpha / lora_r).")
    lora_dropout: float = knob(0.05, "Dropout on the LoRA input.")
    lora_target_modules: list[str] = knob([], "Modules given LoRA; empty: the registry card's list, else all-linear.")
    max_length: int = knob(512, "Max tokens of prompt + rationale + EOS; longer examples are dropped with a warning.")
    max_per_style: int = knob(4, "Max examples per problem and style (CoT and PoT counts are balanced per problem).")
    cot_loss_weight: float = knob(1.0, "Loss weight of CoT completion tokens (the multi-task loss).")
    pot_loss_weight: float = knob(1.0, "Loss weight of PoT completion tokens (the multi-task loss).")
    val_fraction: float = knob(0.05, "Fraction of problems (by id) held out for validation loss; 0: none.")
    padding_free: bool = knob(True, "Flatten each batch into one padding-free row (position_ids); "
                                    "false: length-grouped padded batches.")
    learning_rate: float = knob(2e-4, "Peak learning rate.")
    num_train_epochs: float = knob(3.0, "Epochs over the training examples (ignored when max_steps > 0).")
    max_steps: int = knob(-1, "Optimizer steps; -1: from num_train_epochs.")
    per_device_train_batch_size: int = knob(4, "Examples per micro-batch.")
    gradient_accumulation_steps: int = knob(4, "Micro-batches per optimizer step.")
    warmup_steps: float = knob(0.03, "Linear warmup: steps (>= 1) or a fraction of all steps (< 1).")
    lr_scheduler_type: str = knob("cosine", "Learning-rate schedule (a transformers scheduler name).")
    weight_decay: float = knob(0.0, "AdamW weight decay.")
    max_grad_norm: float = knob(0.3, "Gradient clipping norm (QLoRA paper: 0.3).")
    gradient_checkpointing: bool = knob(True, "Recompute activations in backward to save memory.")
    optim: str = knob("auto", "Optimizer: auto (paged_adamw_8bit on GPU, adamw_torch on CPU) or a transformers name.")
    logging_steps: int = knob(10, "Log loss, learning rate and tokens/s every N steps.")
    save_steps: int = knob(100, "Save checkpoint-N/ every N steps (resume point).")
    eval_steps: int = knob(100, "Validation loss every N steps (and at the end).")
    save_total_limit: int = knob(2, "Checkpoints kept (older ones are deleted).")
    seed: int = knob(0, "Seed for the validation split, data order, LoRA init and dropout.")

    def problems(self) -> list[str]:
        found = []
        if self.quantization not in ("nf4", "none"):
            found.append(f"quantization must be nf4 or none, not {self.quantization!r} (flag --quantization)")
        if not self.styles or len(set(self.styles)) < len(self.styles) or not set(self.styles) <= {"cot", "pot"}:
            found.append(f"styles must be cot, pot or both, not {','.join(self.styles)!r} (flag --styles)")
        positive = ("lora_r", "lora_alpha", "max_per_style", "per_device_train_batch_size",
                    "gradient_accumulation_steps", "logging_steps", "save_steps", "eval_steps", "save_total_limit")
        found += [f"{name} must be >= 1 (flag --{name.replace('_', '-')})"
                  for name in positive if getattr(self, name) < 1]
        if self.max_length < 16:
            found.append("max_length must be >= 16 tokens (flag --max-length)")
        if not 0 <= self.lora_dropout < 1:
            found.append("lora_dropout must be in [0, 1) (flag --lora-dropout)")
        if not 0 <= self.val_fraction < 1:
            found.append("val_fraction must be in [0, 1) (flag --val-fraction)")
        if min(self.cot_loss_weight, self.pot_loss_weight) < 0 or self.cot_loss_weight + self.pot_loss_weight == 0:
            found.append("cot_loss_weight and pot_loss_weight must be >= 0 and not both 0")
        if self.learning_rate <= 0:
            found.append("learning_rate must be > 0 (flag --learning-rate)")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            found.append("set num_train_epochs > 0 or max_steps > 0")
        if self.warmup_steps < 0 or (self.warmup_steps >= 1 and not float(self.warmup_steps).is_integer()):
            found.append("warmup_steps must be a whole number of steps or a fraction in [0, 1) (flag --warmup-steps)")
        if self.lr_scheduler_type not in SCHEDULERS:
            found.append(f"unknown lr_scheduler_type {self.lr_scheduler_type!r}"
                         f"{_did_you_mean(self.lr_scheduler_type, SCHEDULERS)} (flag --lr-scheduler-type); "
                         f"valid: {', '.join(SCHEDULERS)}")
        if self.optim not in ("auto", *OPTIMIZERS):
            found.append(f"unknown optim {self.optim!r}{_did_you_mean(self.optim, OPTIMIZERS)} (flag --optim); "
                         "auto or a transformers optimizer name such as adamw_torch, paged_adamw_8bit")
        return found


@dataclass
class TeachConfig:
    """`mdlite teach`: CoT and PoT rationales from a local teacher, checked, deduplicated, resumable (rationales.py)."""

    data: str = knob("svamp:train", "Problems: a JSONL file or NAME[:SPLIT] (svamp, gsm8k, asdiv, multiarith).")
    data_dir: str = knob("", "Folder with <name>/<split>.jsonl; empty: $MDLITE_DATA, else ~/.cache/mdlite/data.")
    limit: int = knob(0, "Use only the first N problems; 0: all.")
    teacher: str = knob("llamacpp:qwen2.5-coder-0.5b-instruct",
                        "Teacher spec: ollama:MODEL, openai:BASE_URL[#MODEL], openai-chat:BASE_URL[#MODEL] "
                        "or llamacpp:PATH_OR_REGISTRY_NAME.")
    endpoints: list[str] = knob([], "Hosts / base URLs of the same teacher to spread requests over (ollama: "
                                    "http://HOST:11434, openai: http://HOST:PORT/v1); empty: the spec's own "
                                    "URL, else $OLLAMA_HOST.")
    concurrency: int = knob(1, "Requests in flight per endpoint (match the server's slots, e.g. OLLAMA_NUM_PARALLEL); "
                               "llamacpp: always 1.")
    output_dir: str = knob("runs/teach", "Folder for rationales.jsonl, teach_stats.json and run.json.")
    n_cot: int = knob(4, "CoT samples per problem.")
    n_pot: int = knob(4, "PoT samples per problem.")
    temperature: float = knob(0.7, "Sampling temperature (> 0 when n_cot or n_pot > 1, for diverse samples).")
    max_tokens: int = knob(256, "Max new tokens per sample (Ollama num_predict).")
    num_ctx: int = knob(2048, "Context window in tokens (Ollama num_ctx, llamacpp n_ctx).")
    keep_alive: str = knob("30m", "How long Ollama keeps the model loaded after a request.")
    n_threads: int = knob(0, "llamacpp backend: CPU threads; 0: the physical cores.")
    n_gpu_layers: int = knob(-1, "llamacpp backend: layers offloaded to the GPU; -1: all when llama.cpp was built "
                                 "with GPU offload, else none; 0: CPU only (batch-invariant samples, so a resumed "
                                 "run equals a fresh one; see mdlite/engine.py).")
    seed: int = knob(0, "Base seed; sample i of (problem, style) uses a seed derived from (seed, id, style, i).")
    timeout_s: float = knob(300.0, "Per-request timeout in seconds.")
    retries: int = knob(4, "Retries of a request after a timeout, connection error, 429 or 5xx.")
    backoff_s: float = knob(1.0, "First retry delay bound in seconds; doubles per retry (max 30 s), full jitter.")
    program_timeout_s: float = knob(2.0, "Wall-clock limit per PoT program in the sandbox.")
    program_memory_mb: int = knob(256, "Memory a PoT program may use in the sandbox.")

    def problems(self) -> list[str]:
        from mdlite.teacher import parse_teacher_spec

        found = []
        try:
            if parse_teacher_spec(self.teacher).backend == "llamacpp" and self.endpoints:
                found.append("an in-process llamacpp teacher takes no --endpoints")
        except MdliteError as error:
            found.append(str(error))
        positive = ("max_tokens", "num_ctx", "concurrency", "program_memory_mb")
        found += [f"{name} must be >= 1 (flag --{name.replace('_', '-')})"
                  for name in positive if getattr(self, name) < 1]
        found += [f"{name} must be >= 0 (flag --{name.replace('_', '-')})"
                  for name in ("limit", "n_cot", "n_pot", "retries", "n_threads") if getattr(self, name) < 0]
        found += [f"{name} must be > 0 (flag --{name.replace('_', '-')})"
                  for name in ("timeout_s", "backoff_s", "program_timeout_s") if getattr(self, name) <= 0]
        if self.n_cot + self.n_pot == 0:
            found.append("n_cot and n_pot are both 0: nothing to do (flags --n-cot, --n-pot)")
        if not OLLAMA_DURATION.fullmatch(self.keep_alive):
            found.append(f"keep_alive must be a duration such as 30m, 1h30m, 90s, 0 or -1 (forever), "
                         f"not {self.keep_alive!r} (flag --keep-alive)")
        if self.temperature < 0:
            found.append("temperature must be >= 0 (flag --temperature)")
        elif self.temperature == 0 and max(self.n_cot, self.n_pot) > 1:
            found.append("temperature 0 makes all samples of a problem identical; set --temperature > 0 "
                         "or --n-cot/--n-pot 1")
        return found


@dataclass
class EvalConfig:
    """`mdlite eval`: accuracy of a student GGUF or a teacher: greedy, maj@k per mode, failures, speed (evaluate.py)."""

    model: str = knob("", "GGUF file or registry name (run by the engine), or a teacher spec: ollama:MODEL, "
                          "openai:BASE_URL[#MODEL], openai-chat:BASE_URL[#MODEL], llamacpp:PATH_OR_REGISTRY_NAME.")
    data: str = knob("svamp:test", "Problems: a JSONL file or NAME[:SPLIT] (svamp, gsm8k, asdiv, multiarith).")
    data_dir: str = knob("", "Folder with <name>/<split>.jsonl; empty: $MDLITE_DATA, else ~/.cache/mdlite/data.")
    limit: int = knob(0, "Use only the first N problems; 0: all.")
    output_dir: str = knob("runs/eval", "Folder for samples.jsonl, report.json, report.md, accuracy.png, run.json.")
    mode: list[str] = knob(["cot", "pot", "mixed", "hybrid"], "Voting modes to score, as `mdlite solve` votes: cot, "
                                                              "pot, mixed (k paths: ceil(k/2) PoT + the rest CoT, "
                                                              "pooled), hybrid (PoT; CoT if every program failed).")
    paths: int = knob(16, "Sampled paths per problem and style; maj@k for k = 1, 2, 4, ... up to it; 0: greedy only.")
    greedy: bool = knob(True, "Also decode one greedy path per style (greedy single-path accuracy).")
    prompt_style: str = knob("auto", "student (the distilled template, also sent raw to a served student: openai:, "
                                     "ollama:), few-shot (teacher prompts, for base and instruct models) or auto "
                                     "(student for a GGUF, few-shot for a served model).")
    temperature: float = knob(0.7, "Sampling temperature of the sampled paths.")
    top_p: float = knob(0.95, "Nucleus sampling threshold of the sampled paths (1: off).")
    max_tokens: int = knob(256, "Max new tokens per path.")
    seed: int = knob(0, "Base seed; each path's seed is derived from (seed, problem id, style, path).")
    batch_paths: int = knob(16, "GGUF: paths decoded together (the engine's sequences; a finished path's place "
                                "is taken at once by the next); served models: requests issued together.")
    n_gpu_layers: int = knob(-1, "GGUF: layers offloaded to the GPU; -1: all when llama.cpp was built with GPU "
                                 "offload, else none; 0: CPU only (batch-invariant paths, see mdlite/engine.py).")
    n_threads: int = knob(0, "GGUF and llamacpp teachers: CPU threads; 0: the physical cores.")
    prefix_cache: int = knob(2, "GGUF: prompts whose KV cells the engine keeps, so a shared prefix (the few-shot "
                                "exemplars) is evaluated once; 0: off.")
    endpoints: list[str] = knob([], "Served models: base URLs / hosts serving the same model to spread requests "
                                    "over (repeat the flag or comma-separate); empty: the spec's own URL.")
    concurrency: int = knob(1, "Teachers: requests in flight per endpoint.")
    num_ctx: int = knob(2048, "Teachers: context window in tokens (Ollama num_ctx, llamacpp n_ctx).")
    program_timeout_s: float = knob(2.0, "Wall-clock limit per PoT program in the sandbox.")
    program_memory_mb: int = knob(256, "Memory a PoT program may use in the sandbox.")

    def __post_init__(self) -> None:
        self.mode = [m.strip() for item in self.mode for m in item.split(",") if m.strip()]  # --mode cot,pot
        self.endpoints = [e.strip() for item in self.endpoints for e in item.split(",") if e.strip()]

    def problems(self) -> list[str]:
        found = [] if self.model else ["no model given; set --model to a .gguf file, a registry name or a "
                                       "teacher spec such as ollama:MODEL"]
        unknown = [m for m in self.mode if m not in ("cot", "pot", "mixed", "hybrid")]
        if unknown or not self.mode:
            found.append(f"mode must be a list of cot, pot, mixed, hybrid, not {','.join(self.mode)!r} (flag --mode)")
        if self.prompt_style not in ("auto", "student", "few-shot"):
            found.append(f"prompt_style must be auto, student or few-shot, not {self.prompt_style!r} "
                         "(flag --prompt-style)")
        positive = ("max_tokens", "batch_paths", "concurrency", "num_ctx", "program_memory_mb")
        found += [f"{name} must be >= 1 (flag --{name.replace('_', '-')})"
                  for name in positive if getattr(self, name) < 1]
        found += [f"{name} must be >= 0 (flag --{name.replace('_', '-')})"
                  for name in ("limit", "paths", "n_threads", "prefix_cache") if getattr(self, name) < 0]
        if self.paths == 0 and not self.greedy:
            found.append("paths 0 and no greedy paths: nothing to decode (flags --paths, --greedy)")
        if self.paths > 0 and self.temperature <= 0:
            found.append("sampled paths need temperature > 0 (flag --temperature; --paths 0 for greedy only)")
        if not 0 < self.top_p <= 1:
            found.append("top_p must be in (0, 1] (flag --top-p)")
        if self.program_timeout_s <= 0:
            found.append("program_timeout_s must be > 0 (flag --program-timeout-s)")
        return found


@dataclass
class ExportConfig:
    """`mdlite export-gguf`: merge the adapter, convert and quantize to GGUF, Modelfile, parity check (export.py)."""

    input_dir: str = knob("runs/train/adapter", "LoRA adapter folder written by `mdlite train` (its mdlite.json "
                                                "names the base), or a full Hugging Face model folder (converted "
                                                "as is); the command's argument.")
    output_dir: str = knob("runs/export", "Folder for merged/, <name>-<TYPE>.gguf, Modelfile, parity.json, run.json.")
    name: str = knob("student", "File name stem of the GGUF files: <name>-<TYPE>.gguf.")
    quant_types: list[str] = knob(["Q4_K_M"], "GGUF types to write, llama.cpp spellings, any case (F16, Q8_0, Q6_K, "
                                              "Q5_K_M, Q4_K_M, Q4_0, ...); the Modelfile uses the first.",
                                  short="-q")
    num_ctx: int = knob(2048, "Context window: the Modelfile's PARAMETER num_ctx and the parity check's n_ctx.")
    n_threads: int = knob(0, "CPU threads for quantizing and the parity check; 0: the physical cores.")
    n_gpu_layers: int = knob(-1, "Parity check: layers offloaded to the GPU; -1: all when llama.cpp was built "
                                 "with GPU offload, else none; 0: CPU only.")
    parity: bool = knob(True, "Check the GGUF files against the merged model (parity.json); exit 1 when a "
                              "threshold below is crossed.")
    parity_data: str = knob("", "Parity problems: a JSONL file or NAME[:SPLIT] (read from $MDLITE_DATA); "
                                "empty: synthetic problems.")
    parity_problems: int = knob(8, "Problems in the parity check, each prompted in the styles the adapter "
                                   "was trained on (mdlite.json's styles; CoT and PoT for a full model).")
    parity_max_tokens: int = knob(128, "Token budget of each greedy answer in the parity check.")
    min_token_match: float = knob(1.0, "Share of prompts whose GGUF token ids must equal training's.")
    min_greedy_match: float = knob(1.0, "Share of prompts whose F16 greedy answer must equal the merged model's; "
                                        "a divergence at a near-tie (see tie_margin) counts as equal.")
    tie_margin: float = knob(0.05, "Logit gap of the merged model below which a greedy divergence is a near-tie "
                                   "(rounding), not a conversion error.")
    min_answer_agreement: float = knob(0.5, "Share of answers each quantized file must have equal to F16's.")
    min_stop_rate: float = knob(0.5, "Share of each GGUF's answers that must end with EOS or a stop string "
                                     "within parity_max_tokens.")
    seed: int = knob(0, "Seed of the synthetic parity problems and of llama.cpp.")
    ollama: str = knob("", "After the export, register the first GGUF with a running Ollama under this name "
                           "(NAME[:TAG]; blob upload + create, same template, stop strings, num_ctx and temperature "
                           "as the Modelfile); empty: off.")
    ollama_host: str = knob("", "Ollama server for --ollama; empty: $OLLAMA_HOST, else http://127.0.0.1:11434.")

    def __post_init__(self) -> None:
        self.quant_types = list(dict.fromkeys(q.strip().upper() for q in self.quant_types if q.strip()))

    def problems(self) -> list[str]:
        from mdlite.llamacpp import QUANT_TYPES

        found = []
        unknown = [q for q in self.quant_types if q not in QUANT_TYPES]
        if unknown or not self.quant_types:
            found.append(f"unknown quant type {', '.join(unknown) or '(none given)'} (flag -q / --quant-types); "
                         f"valid: {', '.join(QUANT_TYPES)}")
        if not self.name or not all(c.isalnum() or c in "._-" for c in self.name):
            found.append(f"name must be letters, digits, '.', '_' or '-', not {self.name!r} (flag --name)")
        found += [f"{name} must be >= 1 (flag --{name.replace('_', '-')})"
                  for name in ("parity_problems", "parity_max_tokens") if getattr(self, name) < 1]
        if self.num_ctx < 64 or self.num_ctx <= self.parity_max_tokens:
            found.append("num_ctx must be >= 64 and larger than parity_max_tokens (flag --num-ctx)")
        if self.n_threads < 0:
            found.append("n_threads must be >= 0 (flag --n-threads)")
        found += [f"{name} must be in [0, 1] (flag --{name.replace('_', '-')})"
                  for name in ("min_token_match", "min_greedy_match", "min_answer_agreement", "min_stop_rate")
                  if not 0 <= getattr(self, name) <= 1]
        if self.tie_margin < 0:
            found.append("tie_margin must be >= 0 (flag --tie-margin)")
        if self.ollama and not re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)*(:[\w][\w.-]{0,127})?", self.ollama):
            found.append(f"ollama must be an Ollama model name such as my-student or me/student:q4, not "
                         f"{self.ollama!r} (flag --ollama)")
        return found


@dataclass
class SolveConfig:
    """`mdlite solve`: many CoT and PoT paths per question from one GGUF, programs run, answers voted (solve.py)."""

    model: str = knob("", "GGUF file or registry name (e.g. a student from `mdlite export-gguf`).")
    mode: str = knob("mixed", "Vote: cot, pot, mixed (CoT and PoT answers pooled) or hybrid (PoT, CoT fallback "
                              "when every program fails).")
    paths: int = knob(10, "Paths per question (mixed: ceil(paths/2) PoT + the rest CoT; hybrid: PoT, then as "
                          "many CoT paths if every program failed).")
    prompt_style: str = knob("student", "student (the distilled template, STUDENT_STOP) or few-shot (teacher "
                                        "prompts, for base and instruct models).")
    temperature: float = knob(0.7, "Sampling temperature; 0: greedy (every path of a style is then the same).")
    top_p: float = knob(0.95, "Nucleus sampling threshold (1: off).")
    top_k: int = knob(0, "Top-k filter (0: off).")
    max_tokens: int = knob(256, "Max new tokens per path.")
    seed: int = knob(0, "Base seed; path j of a question's style uses a seed derived from (seed, question, style, j).")
    early_stop: bool = knob(False, "Sample two paths first (mixed: one CoT, one PoT); stop there when they agree.")
    cot_weight: float = knob(1.0, "Vote weight of a CoT path (mixed mode; weighted voting).")
    pot_weight: float = knob(1.0, "Vote weight of a PoT path (mixed mode; weighted voting).")
    batch_paths: int = knob(16, "Paths decoded together (the engine's sequences; a finished path's place is "
                                "taken at once by the next).")
    num_ctx: int = knob(0, "KV cache cells per path (its prompt + max_tokens); 0: sized automatically.",
                        deprecated="--n-ctx")
    n_gpu_layers: int = knob(-1, "Layers offloaded to the GPU; -1: all when llama.cpp was built with GPU offload, "
                                 "else none; 0: CPU only (batch-invariant paths, see mdlite/engine.py).")
    n_threads: int = knob(0, "CPU threads; 0: the physical cores (with OMP_WAIT_POLICY=PASSIVE).")
    prefix_cache: int = knob(2, "Prompts whose KV cells the engine keeps, so a shared prefix (the few-shot "
                                "exemplars) is evaluated once; 0: off.")
    program_timeout_s: float = knob(2.0, "Wall-clock limit per PoT program in the sandbox.")
    program_memory_mb: int = knob(256, "Memory a PoT program may use in the sandbox.")
    output_dir: str = knob("", "When set, write solutions.jsonl and run.json here.")

    def problems(self) -> list[str]:
        found = [] if self.model else ["no model given; set --model to a .gguf file or a registry name"]
        if self.mode not in ("cot", "pot", "mixed", "hybrid"):
            found.append(f"mode must be cot, pot, mixed or hybrid, not {self.mode!r} (flag --mode)")
        if self.prompt_style not in ("student", "few-shot"):
            found.append(f"prompt_style must be student or few-shot, not {self.prompt_style!r} (flag --prompt-style)")
        found += [f"{name} must be >= 1 (flag --{name.replace('_', '-')})"
                  for name in ("paths", "max_tokens", "batch_paths", "program_memory_mb") if getattr(self, name) < 1]
        found += [f"{name} must be >= 0 (flag --{name.replace('_', '-')})"
                  for name in ("temperature", "top_k", "num_ctx", "n_threads", "prefix_cache")
                  if getattr(self, name) < 0]
        if not 0 < self.top_p <= 1:
            found.append("top_p must be in (0, 1] (flag --top-p)")
        if min(self.cot_weight, self.pot_weight) < 0 or self.cot_weight + self.pot_weight == 0:
            found.append("cot_weight and pot_weight must be >= 0 and not both 0 (flags --cot-weight, --pot-weight)")
        if self.program_timeout_s <= 0:
            found.append("program_timeout_s must be > 0 (flag --program-timeout-s)")
        return found


@dataclass
class ServeConfig:
    """`mdlite serve`: an OpenAI-compatible server whose replies are voted CoT + PoT answers (serve.py)."""

    model: str = knob("", "GGUF file or registry name (e.g. a student from `mdlite export-gguf`).")
    host: str = knob("127.0.0.1", "Address to listen on; 0.0.0.0 exposes the server to the network.")
    port: int = knob(8000, "TCP port; 0: any free port (logged).")
    api_key: str = knob("", "Require `Authorization: Bearer KEY` on /v1/*; empty: $MDLITE_API_KEY, else no key "
                            "(refused with a --host beyond loopback unless --insecure-no-key).")
    insecure_no_key: bool = knob(False, "Allow a --host beyond loopback without an API key: anyone who can reach the "
                                        "port may sample paths and run model-written programs.")
    allowed_origins: list[str] = knob([], "Web origins (http://host:port, comma-separated, like OLLAMA_ORIGINS) whose "
                                          "pages may call the API from a browser; `*`: any. Others get 403.")
    allowed_hosts: list[str] = knob([], "Host names the server answers to besides IP addresses, localhost and --host "
                                        "(comma-separated; `*`: any); others get 403, a guard against DNS rebinding.")
    mode: str = knob("mixed", "Default vote: cot, pot, mixed or hybrid (a request's `mode` overrides it).")
    paths: int = knob(10, "Default paths per question (a request's `paths` overrides it, up to max_paths).")
    max_paths: int = knob(32, "Most paths a request may ask for.")
    prompt_style: str = knob("student", "student (the distilled template) or few-shot (teacher prompts, for base "
                                        "and instruct models).")
    temperature: float = knob(0.7, "Default sampling temperature (a request's `temperature` overrides it, 0-2).")
    top_p: float = knob(0.95, "Default nucleus sampling threshold (1: off).")
    top_k: int = knob(0, "Default top-k filter (0: off).")
    max_tokens: int = knob(256, "Max new tokens per path; a request's `max_tokens` may lower it (a higher one is "
                                "capped to it).")
    seed: int = knob(-1, "Base seed of a request that sends none; -1: a fresh random one per request (reported in "
                         "the reply's mdlite.seed). The same seed gives the answers `mdlite solve` gives.")
    early_stop: bool = knob(False, "Sample two paths first (mixed: one CoT, one PoT); stop there when they agree.")
    cot_weight: float = knob(1.0, "Vote weight of a CoT path (mixed mode; weighted voting).")
    pot_weight: float = knob(1.0, "Vote weight of a PoT path (mixed mode; weighted voting).")
    batch_paths: int = knob(32, "Paths decoded together (the engine's sequences): every request's paths share the "
                                "engine's steps, a finished path's place taken at once by the next waiting one.")
    queue_size: int = knob(64, "Requests admitted at once (waiting or being solved); more get 503 + Retry-After.")
    max_prompt_tokens: int = knob(1024, "Longest question (the model's tokens) a request may send; longer ones get "
                                        "400. With the prompt template and max_tokens it must fit the context.")
    read_timeout_s: float = knob(10.0, "Seconds a client has to send a request's headers (else its connection is "
                                       "closed), and again its body (else 408).")
    limit_concurrency: int = knob(128, "Connections and requests in progress at once (uvicorn's limit_concurrency); "
                                       "more get 503.")
    shutdown_timeout_s: float = knob(30.0, "On Ctrl-C / SIGTERM: seconds to finish requests in flight before they "
                                           "are cancelled.")
    num_ctx: int = knob(0, "KV cache cells per path (its prompt + max_tokens); 0: sized automatically.")
    n_gpu_layers: int = knob(-1, "Layers offloaded to the GPU; -1: all when llama.cpp was built with GPU offload, "
                                 "else none; 0: CPU only (batch-invariant paths, see mdlite/engine.py).")
    n_threads: int = knob(0, "CPU threads; 0: the physical cores (with OMP_WAIT_POLICY=PASSIVE).")
    prefix_cache: int = knob(2, "Prompts whose KV cells the engine keeps, so a shared prefix (the few-shot "
                                "exemplars) is evaluated once; 0: off.")
    program_timeout_s: float = knob(2.0, "Wall-clock limit per PoT program in the sandbox.")
    program_memory_mb: int = knob(256, "Memory a PoT program may use in the sandbox.")

    def __post_init__(self) -> None:
        self.allowed_origins = [o.strip() for item in self.allowed_origins for o in item.split(",") if o.strip()]
        self.allowed_hosts = [h.strip() for item in self.allowed_hosts for h in item.split(",") if h.strip()]

    def problems(self) -> list[str]:
        found = [] if self.model else ["no model given; set --model to a .gguf file or a registry name"]
        if self.mode not in ("cot", "pot", "mixed", "hybrid"):
            found.append(f"mode must be cot, pot, mixed or hybrid, not {self.mode!r} (flag --mode)")
        if self.prompt_style not in ("student", "few-shot"):
            found.append(f"prompt_style must be student or few-shot, not {self.prompt_style!r} (flag --prompt-style)")
        if not self.host:
            found.append("host must not be empty; 127.0.0.1 serves this machine only (flag --host)")
        if not 0 <= self.port <= 65535:
            found.append("port must be in [0, 65535] (flag --port)")
        found += [f"{name} must be >= 1 (flag --{name.replace('_', '-')})"
                  for name in ("paths", "max_paths", "max_tokens", "batch_paths", "queue_size", "max_prompt_tokens",
                               "limit_concurrency", "program_memory_mb") if getattr(self, name) < 1]
        found += [f"{name} must be >= 0 (flag --{name.replace('_', '-')})"
                  for name in ("top_k", "num_ctx", "n_threads", "prefix_cache", "shutdown_timeout_s")
                  if getattr(self, name) < 0]
        if self.paths > self.max_paths:
            found.append(f"paths {self.paths} exceeds max_paths {self.max_paths} (flags --paths, --max-paths)")
        if not 0 <= self.temperature <= 2:
            found.append("temperature must be in [0, 2] (flag --temperature)")
        if not 0 < self.top_p <= 1:
            found.append("top_p must be in (0, 1] (flag --top-p)")
        if min(self.cot_weight, self.pot_weight) < 0 or self.cot_weight + self.pot_weight == 0:
            found.append("cot_weight and pot_weight must be >= 0 and not both 0 (flags --cot-weight, --pot-weight)")
        if self.program_timeout_s <= 0:
            found.append("program_timeout_s must be > 0 (flag --program-timeout-s)")
        if self.read_timeout_s <= 0:
            found.append("read_timeout_s must be > 0 (flag --read-timeout-s)")
        if self.seed < -1:
            found.append("seed must be >= 0, or -1 for a fresh random seed per request (flag --seed)")
        return found


@dataclass
class DistillConfig:
    """`mdlite distill`: teach -> train -> export-gguf -> eval from one file (its `distill:` section; the
    `teach:`, `train:`, `export:` and `eval:` sections configure the stages) (distill.py)."""

    output_dir: str = knob("runs/distill", "Folder with one subfolder per stage, pipeline.json and summary.md.")
    train_data: str = knob("svamp:train", "Problems the teacher explains: JSONL file, NAME[:SPLIT] or synth:N:SEED.")
    test_data: str = knob("svamp:test", "Held-out problems for the before/after evaluation (same forms).")
    data_dir: str = knob("", "Folder with <name>/<split>.jsonl; empty: $MDLITE_DATA, else ~/.cache/mdlite/data.")
    teacher: str = knob("llamacpp:qwen2.5-coder-0.5b-instruct", "Teacher spec (see `mdlite teach --help`).")
    student: str = knob("qwen2.5-coder-0.5b-instruct", "Student base: registry name, HF id, HF folder or .gguf.")
    base_eval: list[str] = knob(["student"], "Evaluate the untrained student with these prompt styles (student, "
                                             "few-shot), the rows before training; []: none.")
    teacher_eval: bool = knob(False, "Evaluate the teacher itself (few-shot) on the test split, a row of the table.")
    base_paths: int = knob(-1, "Sampled paths per style for the untrained student's rows; -1: eval.paths.")
    variants: dict = knob({}, "Named students that share the teach stage, each a mapping of section changes, e.g. "
                              "{mixed: {}, cot-only: {train: {styles: [cot]}}}; {}: one student.")
    teach_from: str = knob("", "Another distill run's folder (or its teach/), or rationales:NAME (a finished teach "
                               "stage shipped with mdlite, e.g. rationales:svamp-strong): copy its finished teach "
                               "stage (and eval-teacher, with teacher_eval) instead of asking the teacher; it must "
                               "have been made with this config's teacher, data, prompts and teach settings. Empty: "
                               "teach here.")

    def __post_init__(self) -> None:
        self.output_dir = str(Path(self.output_dir).expanduser())
        if self.teach_from and not self.teach_from.startswith("rationales:"):
            self.teach_from = str(Path(self.teach_from).expanduser())

    def problems(self) -> list[str]:
        found = [f"base_eval: {style!r} is not a prompt style; use student, few-shot"
                 for style in self.base_eval if style not in ("student", "few-shot")]
        if self.base_paths < -1:
            found.append("base_paths must be >= 0, or -1 for eval.paths")
        if not isinstance(self.variants, dict):
            return [*found, f"variants must be a mapping of name: changes, not {self.variants!r}"]
        for name, changes in self.variants.items():
            if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", str(name)) or name in ("teacher", "student") or \
                    name.startswith("base"):
                found.append(f"variants: {name!r} is not a usable name (lowercase letters, digits, - _ .; "
                              "not teacher, student or base...)")
            elif not isinstance(changes or {}, dict) or any(
                    section not in VARIANT_SECTIONS or not isinstance(keys or {}, dict)
                    for section, keys in (changes or {}).items()):
                found.append(f"variants.{name}: expected a mapping of {', '.join(VARIANT_SECTIONS)} to config keys, "
                             f"got {changes!r}")
        return found


# ---- loading and validation ---------------------------------------------------------------------

SECTIONS = ("distill", "teach", "train", "export", "eval", "solve", "serve")  # a config file's top-level keys
VARIANT_SECTIONS = ("train", "export", "eval")  # the sections a distill variant may change


def load_config(cls: type[T], path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                *, section: str | None = None) -> T:
    """`cls` from the YAML file at `path` (its `section` key when given), with `overrides` applied."""
    values: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        values = _read_yaml(Path(path))
        source = str(path)
        if section is not None:
            unknown = [str(key) for key in values if key not in SECTIONS]
            if unknown:
                raise MdliteError(f"{path}: unknown section {unknown[0]!r}{_did_you_mean(unknown[0], SECTIONS)}; "
                                  f"sections: {', '.join(SECTIONS)}")
            values = values.get(section) or {}
            source = f"{path} [{section}]"
            if not isinstance(values, dict):
                raise MdliteError(f"{source}: expected a mapping of config keys, got {values!r}")
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    problems = []
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            close = [name for name in known if name.split("_")[0] == key.split("_")[0]]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            problems.append(f"unknown key {key!r}{hint}")
    hints = typing.get_type_hints(cls)
    clean = {}
    for key, value in values.items():
        if key in known:
            try:
                clean[key] = coerce(value, hints[key])
            except (TypeError, ValueError) as error:
                problems.append(f"{key}: {error} (flag --{key.replace('_', '-')})")
    if not problems:
        config = cls(**clean)
        validate = getattr(config, "problems", None)
        problems = validate() if validate else []
    if problems:
        raise MdliteError(f"{source}: " + "; ".join(problems))
    return config


def coerce(value: Any, hint: Any) -> Any:
    """`value` converted to the annotated type, or TypeError/ValueError saying why not."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0])
    if typing.get_origin(hint) is list:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise TypeError(f"expected a list, got {value!r}")
        return [coerce(item, args[0]) for item in items]
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        if not isinstance(value, bool):
            raise TypeError(f"expected true or false, got {value!r}")
        return value
    if hint in (int, float):
        if isinstance(value, bool):
            raise TypeError(f"expected a number, got {value!r}")
        try:
            number = hint(value)
        except (TypeError, ValueError, OverflowError):
            raise TypeError(f"expected {hint.__name__}, got {value!r}") from None
        if not math.isfinite(number):
            raise ValueError(f"expected a finite number, got {value!r}")
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise TypeError(f"expected an integer, got {value!r}")
        return number
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise TypeError(f"expected a string, got {value!r}")
        return str(value)
    return value


def to_dict(config: Any) -> dict[str, Any]:
    """A config as plain data (for run.json and --dry-run)."""
    return dataclasses.asdict(config)


def reference_markdown(classes: list[type]) -> str:
    """The config reference for README: one table per stage from the field docstrings."""
    out = []
    for cls in classes:
        out.append(f"### `{cls.__name__}`\n\n{(cls.__doc__ or '').strip()}\n")
        out.append("| key | default | meaning |\n| --- | --- | --- |")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out.append(f"| `{f.name}` | `{default!r}` | {f.metadata.get('help', '')} |")
        out.append("")
    return "\n".join(out)


def _did_you_mean(word: str, choices: typing.Sequence[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise MdliteError(f"{path}: is a folder, not a config file (flag -c)" if path.is_dir()
                          else f"{path}: config file not found")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise MdliteError(f"{where}: not valid YAML ({getattr(error, 'problem', error)})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise MdliteError(f"{path}: expected a mapping of config keys, got {type(values).__name__}")
    return values
