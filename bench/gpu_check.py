"""Device check: QLoRA on LLaMA-2-7B's exact shapes through `mdlite.train.run`; measured peak GPU memory and
tokens/s next to `mdlite train --dry-run`'s estimate; then the export's merge on the GPU.

    .venv/bin/python bench/gpu_check.py                        # one CUDA GPU: 7B shapes, random weights, minutes
    .venv/bin/python bench/gpu_check.py --shape tiny           # CPU or GPU, seconds (tests/test_gpu_check.py)
    .venv/bin/python bench/gpu_check.py --probe                # saved activations per token per layer vs estimate
    .venv/bin/python bench/gpu_check.py --memory-cap-gib 16 --steps 20 --no-merge   # a 16 GB card, emulated
    .venv/bin/python bench/gpu_check.py --memory-cap-gib 16 --batch-search 8,12,16 --steps 2   # largest micro-batch

The model is a random-weight LlamaForCausalLM with LLaMA-2-7B's shapes (hidden 4096, intermediate 11008,
32 layers, 32 heads, vocab 32000; nothing is downloaded), built directly on the GPU in bf16 and saved; its
tokenizer is the tiny SentencePiece one of `mdlite models make-tiny`. Training takes the `train:` settings of
`configs/svamp-llama2-7b.yaml` (NF4 + double quant, LoRA r 64 on all linear layers, 512 tokens, micro-batch 8,
gradient accumulation 2, gradient checkpointing, paged 8-bit AdamW) for `--steps` optimizer steps on synthetic
rationales about 500 tokens long, so that each micro-batch holds about 8 x 512 tokens: the case the estimate is
for. The merge is `mdlite.export.build_model_folder`: the adapter merged into a freshly loaded base in its own
dtype (bf16 here) on the GPU, written as safetensors. Prints each measured peak (PyTorch's max allocated and
reserved, and the whole GPU's use from NVML) with the estimate's total and their ratio, the estimate by part,
tokens/s (median per step) and the merge's time and peak memory; `--json` keeps them.

`--memory-cap-gib CAP` emulates a consumer card: `torch.cuda.set_per_process_memory_fraction(CAP / total)` is
called before anything is allocated, so PyTorch's allocator may reserve at most CAP GiB and raises
`torch.OutOfMemoryError` beyond it, as on a card of that size (what a cap leaves out: the CUDA context and the
paged optimizer's managed memory, which NVML's `nvml_used` counts; a real card also holds those, so the report
also says whether NVML's peak stayed under the cap). An OOM is a result, not a failure: the JSON says
`fits: false` with the peaks reached, and the exit code is 0. `--model DIR` reuses a model folder (built there
first when it has none), so several capped runs share one 7B build. `--batch-search 8,12,16` loads the model
once (mdlite's `load_model` and `add_lora`, the config's QLoRA settings) and trains `--steps` optimizer steps
(gradient accumulation 1) with mdlite's own Trainer at each micro-batch size, upward from the first and
stopping at the first OOM (downward when the first does not fit), freeing memory between tries; it reports
each try (fits, peaks, tokens/s, the `--dry-run` estimate) and the largest that fits. `--fake-oom-above N`
raises the OOM for micro-batches above N instead of training them: the CPU rehearsal of those paths.

`--probe` measures what `--dry-run`'s activation terms predict: a 2-layer model of the shape, loaded and given
LoRA by mdlite's own `load_model` and `add_lora` (the config's QLoRA settings), run forward in train mode under
bf16 autocast; saved-tensor hooks count the bytes the last decoder layer keeps for backward per token, by dtype
(the difference of two sequence lengths, so weight copies drop out), next to `layer_activation_bytes`; the
residual stream's dtype; on a GPU also the memory still allocated after a forward with and without gradient
checkpointing. On the CPU the GPU's dtypes are used (bf16 compute and autocast); peft then keeps fp32 dropout
masks where CUDA keeps bool ones, so the CPU figure matches the formula with 4-byte masks (tests/test_train.py).

On a machine with no network, `bench/device_check.sh` runs this script with the rest of the device check.
It needs ~14 GiB of GPU memory for training (the estimate), ~14 GiB for the merge and ~30 GB of disk (the bf16
base and merged folders, deleted at the end unless `--keep`). Put the figures in README (the `mdlite train`
section's memory table).
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mdlite.config import TrainConfig, load_config, to_dict  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "llama-2-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000},
    "tiny": {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 1000},
}
GIB = 2**30
TOLERANCE = 0.15  # the estimate should be within 15% of the measured peak
BUILT = ".gpu_check-built.json"  # written into a model folder once its build finished (--model reuses it)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-2-7b")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "svamp-llama2-7b.yaml",
                        help="its train: section gives the training settings")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps (tokens/s: the median from step 2)")
    parser.add_argument("--max-length", type=int, help="override the config's max_length (tokens)")
    parser.add_argument("--batch-size", type=int, help="override the config's per_device_train_batch_size")
    parser.add_argument("--no-merge", action="store_true", help="skip the merge")
    parser.add_argument("--work", type=Path, help="folder for the model, rationales and outputs (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep --work's contents")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--probe", action="store_true", help="only the saved-activation probe (see above)")
    parser.add_argument("--probe-tokens", type=int, default=2048, help="the probe's longer sequence (tokens)")
    parser.add_argument("--memory-cap-gib", type=float,
                        help="emulate a card of this size: set_per_process_memory_fraction(cap / total) first")
    parser.add_argument("--model", type=Path, help="reuse this model folder (built there first if it has none)")
    parser.add_argument("--batch-search", type=_sizes,
                        help="micro-batch sizes to try, e.g. 8,12,16 (see above); implies --no-merge")
    parser.add_argument("--fake-oom-above", type=int,
                        help="rehearsal: raise torch.OutOfMemoryError for micro-batches above this instead of training")
    args = parser.parse_args()

    import torch

    cuda = torch.cuda.is_available()
    args.cap = memory_cap(args.memory_cap_gib, cuda=cuda)  # before anything touches the GPU
    if args.probe:
        work = args.work or Path(tempfile.mkdtemp(prefix="mdlite-probe-"))
        try:
            report = probe(SHAPES[args.shape], load_config(TrainConfig, args.config, section="train"), work,
                           cuda=cuda, tokens=args.probe_tokens)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        _save(report, args.json)
        return
    if args.batch_search:
        args.no_merge = True
    if args.shape != "tiny" and not cuda:
        parser.error(f"--shape {args.shape} needs a CUDA GPU; use --shape tiny on the CPU")
    work = args.work or Path(tempfile.mkdtemp(prefix="mdlite-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if args.batch_search:
            batch_search(args, work, cuda=cuda)
        else:
            check(args, work, cuda=cuda)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def check(args: argparse.Namespace, work: Path, *, cuda: bool) -> dict[str, Any]:
    """Build, train, merge; print and return the figures, and write them to `--json` after training and again
    after the merge (a run stopped during the merge keeps the training figures)."""
    import torch

    from mdlite import train

    device = torch.cuda.get_device_name() if cuda else "cpu"
    model_dir, parameters = model_folder(args, work, cuda=cuda)
    overrides = {"model": str(model_dir), "output_dir": str(work / "train"), "max_steps": args.steps,
                 "val_fraction": 0.0, "logging_steps": 1, "save_steps": 10**6, "eval_steps": 10**6,
                 "warmup_steps": 0, "max_length": args.max_length,
                 "per_device_train_batch_size": args.batch_size, "rationales": str(work / "rationales.jsonl")}
    cfg = load_config(TrainConfig, args.config, overrides, section="train")
    examples = cfg.max_steps * cfg.gradient_accumulation_steps * cfg.per_device_train_batch_size
    write_rationales(Path(cfg.rationales), model_dir, cfg, examples=examples)
    estimate = train.dry_run(cfg)["memory_gb"]

    _reset_peak(cuda)
    clock = time.perf_counter()
    result, oom = None, None
    with device_peak(cuda) as nvml:
        try:
            if args.fake_oom_above is not None and cfg.per_device_train_batch_size > args.fake_oom_above:
                raise torch.OutOfMemoryError(f"fake OOM: micro-batch {cfg.per_device_train_batch_size} > "
                                             f"--fake-oom-above {args.fake_oom_above}")
            result = train.run(cfg, overwrite=True)
        except torch.OutOfMemoryError as error:
            oom = str(error).splitlines()[0][:300]
    train_s = time.perf_counter() - clock
    measured = {**_peak(cuda), **nvml}
    tokens_per_s, steps_logged = _train_log(work / "train" / "trainer_log.jsonl")
    optim = train._optimizer(cfg, cuda=cuda)
    settings = (f"{cfg.quantization}, LoRA r {cfg.lora_r}, micro-batch {cfg.per_device_train_batch_size} x "
                f"{cfg.max_length} tokens, gradient accumulation {cfg.gradient_accumulation_steps}, gradient "
                f"checkpointing {'on' if cfg.gradient_checkpointing else 'off'}, optimizer {optim}")
    if result is not None:
        run_record = json.loads(result.run_json.read_text())
        print(f"\n{settings} ({run_record['trainable_parameters'] / 1e6:.1f}M trainable); {result.global_step} steps "
              f"in {train_s:.0f} s (model loading included), final loss {result.train_loss:.3f}")
    else:
        print(f"\n{settings}: OUT OF MEMORY after {steps_logged} logged steps, {train_s:.0f} s: {oom}")
    report: dict[str, Any] = {
        "shape": args.shape, "parameters": parameters, "device": device, "config": str(args.config),
        "steps": result.global_step if result else steps_logged, "train_s": round(train_s, 1),
        "tokens_per_s": tokens_per_s, "estimate_gb": estimate, "train_peak_gb": measured, "optimizer": optim,
        "train_config": to_dict(cfg), "fits": result is not None, "oom": oom,
    }
    if args.cap:
        report["memory_cap"] = args.cap
    print(f"{'training':<10} {'measured':<26} {'GiB':>7}   {'estimate GiB':>12}   estimate/measured")
    for name, value in measured.items():
        ratio = estimate["total"] / value if value else float("nan")
        print(f"{'training':<10} {name:<26} {value:7.2f}   {estimate['total']:12.2f}   {ratio:.2f}")
    # the estimate's own quantity: the whole GPU's memory (NVML) where known, else what PyTorch reserved
    key = ("nvml_used" if "nvml_used" in measured else "max_memory_reserved") if cuda else "max_rss"
    off = estimate["total"] / measured[key] - 1 if measured[key] else float("nan")
    verdict = "within" if abs(off) <= TOLERANCE else "outside"
    print(f"estimate vs measured peak ({key}): {off:+.0%} ({verdict} {TOLERANCE:.0%})"
          + ("" if cuda else "; on the CPU the measured figure is the process's max RSS, not GPU memory"))
    print("estimate by part (GiB): " + ", ".join(f"{k} {v}" for k, v in estimate.items()
                                                 if k not in ("total", "lora_parameters_millions"))
          + "; x 1.1 fragmentation (torch's max_memory_* exclude the CUDA context and the paged optimizer "
            "states; nvml_used, the whole GPU as nvidia-smi shows it, includes them)")
    print(f"tokens/s (training, median over steps 2..{report['steps']}): "
          f"{tokens_per_s:,.0f}" if tokens_per_s else "tokens/s: not enough steps logged")
    report["estimate_vs_measured"] = round(off, 3)
    if args.cap:
        report["memory_cap"]["card_fits"] = _card_verdict(args.cap, measured, fits=result is not None)
        print(f"RESULT cap {args.cap['gib']:g} GiB: {'fits' if result else 'OOM'}, {report['steps']} steps; peak "
              + ", ".join(f"{k} {v:.2f}" for k, v in measured.items())
              + f" GiB; tokens/s {tokens_per_s or 'n/a'}; estimate {estimate['total']} GiB ({off:+.0%} vs {key}); "
              f"a real {args.cap['gib']:g} GiB card: {report['memory_cap']['card_fits']}")
    _save(report, args.json)

    if not args.no_merge and result is not None:
        gc.collect()
        _reset_peak(cuda)
        left = round(torch.cuda.memory_allocated() / GIB, 2) if cuda else None  # training's leftovers, if any
        report["merge"] = {**merge(result.adapter_dir, work / "merged", cuda=cuda), "allocated_before_gb": left}
        merge_report = report["merge"]
        print(f"\nmerge ({merge_report['dtype']} base on {merge_report['device']}, saved): "
              f"{merge_report['seconds']:.0f} s; "
              + ", ".join(f"{k} {v:.2f} GiB" for k, v in merge_report["peak_gb"].items())
              + (f" ({left:.2f} GiB still allocated before it)" if cuda else ""))
        _save(report, args.json)
    return report


def _save(report: dict[str, Any], path: Path | None) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")


def memory_cap(cap_gib: float | None, *, cuda: bool) -> dict[str, Any] | None:
    """`--memory-cap-gib`: PyTorch's allocator limited to `cap_gib` GiB of this GPU, set before anything is
    allocated (a consumer card, emulated); on the CPU only recorded."""
    if cap_gib is None:
        return None
    if not cuda:
        print(f"memory cap {cap_gib:g} GiB: not enforced on the CPU (a rehearsal of the GPU run)")
        return {"gib": cap_gib, "total_gib": None, "fraction": None, "enforced": False}
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    if cap_gib * GIB > total:
        raise SystemExit(f"--memory-cap-gib {cap_gib:g}: more than this GPU's {total / GIB:.1f} GiB")
    fraction = cap_gib * GIB / total
    torch.cuda.set_per_process_memory_fraction(fraction)
    print(f"memory cap: {cap_gib:g} GiB of {total / GIB:.1f} GiB (set_per_process_memory_fraction({fraction:.4f}))")
    return {"gib": cap_gib, "total_gib": round(total / GIB, 2), "fraction": round(fraction, 5), "enforced": True}


def _card_verdict(cap: dict[str, Any], measured: dict[str, float], *, fits: bool) -> str:
    """Would a real card of the cap's size have held the run? PyTorch's part is enforced by the cap; the CUDA
    context and the paged optimizer states (managed memory, which a full card pages out to the host) are not."""
    if not fits:
        return "no (PyTorch's allocator ran out under the cap)"
    used = measured.get("nvml_used")
    if used is None:
        return "yes by PyTorch's allocator (no whole-GPU figure)"
    return (f"yes, whole GPU {used:.2f} GiB <= {cap['gib']:g}" if used <= cap["gib"] else
            f"tight: PyTorch fits, but the whole GPU peaked at {used:.2f} GiB > {cap['gib']:g} (CUDA context and "
            "paged optimizer states; a full card pages the latter out)")


def model_folder(args: argparse.Namespace, work: Path, *, cuda: bool) -> tuple[Path, int]:
    """The random model: `--model` when it holds a finished build, else built (into `--model` or work/model)."""
    folder = args.model or work / "model"
    if (folder / BUILT).exists():
        parameters = json.loads((folder / BUILT).read_text())["parameters"]
        print(f"reusing the random {args.shape} in {folder} ({parameters / 1e6:,.1f}M parameters)", flush=True)
        return folder, parameters
    if folder.exists() and any(folder.iterdir()):
        raise SystemExit(f"--model {folder}: holds no finished gpu_check build ({BUILT}); give a new or empty folder")
    clock = time.perf_counter()
    folder, parameters = build_model(folder, SHAPES[args.shape], cuda=cuda)
    (folder / BUILT).write_text(json.dumps({"shape": args.shape, "parameters": parameters}) + "\n")
    print(f"built a random {args.shape} ({parameters / 1e6:,.1f}M parameters) in {time.perf_counter() - clock:.0f} s "
          f"on {torch_device(cuda)}", flush=True)
    return folder, parameters


def torch_device(cuda: bool) -> str:
    import torch

    return torch.cuda.get_device_name() if cuda else "cpu"


def _train_log(path: Path) -> tuple[float | None, int]:
    """(median tokens/s from step 2 on, the last logged step) of a trainer_log.jsonl; (None, 0) without one."""
    if not path.exists():
        return None, 0
    logs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rates = [r["tokens_per_s"] for r in logs if r.get("tokens_per_s") and r["step"] > 1]
    return (statistics.median(rates) if rates else None), max((r["step"] for r in logs), default=0)


def _sizes(text: str) -> list[int]:
    sizes = [int(part) for part in text.split(",") if part.strip()]
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError("give micro-batch sizes >= 1, e.g. 8,12,16")
    return sizes


def batch_search(args: argparse.Namespace, work: Path, *, cuda: bool) -> dict[str, Any]:
    """The largest micro-batch that trains under the cap: the model loaded once with mdlite's `load_model` and
    `add_lora`, then per size mdlite's own Trainer (`build_trainer`) for `--steps` optimizer steps (gradient
    accumulation 1: the peak is one micro-batch's), upward from the first size until one runs out of memory
    (downward when the first does not fit); memory is freed between tries."""
    import dataclasses

    import transformers

    from mdlite import train

    model_dir, parameters = model_folder(args, work, cuda=cuda)
    first, sizes = args.batch_search[0], sorted(set(args.batch_search))
    overrides = {"model": str(model_dir), "output_dir": str(work / "search"), "max_steps": args.steps,
                 "val_fraction": 0.0, "logging_steps": 1, "save_steps": 10**6, "eval_steps": 10**6,
                 "warmup_steps": 0, "max_length": args.max_length, "gradient_accumulation_steps": 1,
                 "per_device_train_batch_size": max(sizes), "rationales": str(work / "rationales.jsonl")}
    cfg = load_config(TrainConfig, args.config, overrides, section="train")
    write_rationales(Path(cfg.rationales), model_dir, cfg, examples=max(sizes) * args.steps)
    base = train.resolve_base_model(cfg.model)
    tokenizer = train.load_tokenizer(base)
    split = train.split_examples(train.read_rationales(Path(cfg.rationales)), max_per_style=cfg.max_per_style,
                                 val_fraction=0.0, seed=cfg.seed, styles=cfg.styles)
    data, _ = train.encode_examples(split.train, tokenizer, cfg, add_bos=train.expected_bos(tokenizer, base))
    clock = time.perf_counter()
    train.import_peft(four_bit=cfg.quantization == "nf4")  # as train.run does
    transformers.set_seed(cfg.seed)
    model = train.add_lora(train.load_model(base, cfg, cuda=cuda), cfg, base)
    print(f"loaded {args.shape} ({parameters / 1e6:,.1f}M parameters) with LoRA in "
          f"{time.perf_counter() - clock:.0f} s; {len(data)} examples of ~{cfg.max_length} tokens", flush=True)
    up = [size for size in sizes if size >= first]
    down = [size for size in reversed(sizes) if size < first]
    tries: list[dict[str, Any]] = []
    for order in (up, down):
        for size in order:
            tries.append(_try_size(model, tokenizer, data, dataclasses.replace(
                cfg, per_device_train_batch_size=size, output_dir=str(work / f"search-{size}")), args, cuda=cuda))
            if order is up and not tries[-1]["fits"]:
                break
            if order is down and tries[-1]["fits"]:
                break
        if any(t["fits"] for t in tries):
            break
    fitting = [t["micro_batch"] for t in tries if t["fits"]]
    report: dict[str, Any] = {
        "shape": args.shape, "parameters": parameters, "device": torch_device(cuda), "config": str(args.config),
        "memory_cap": args.cap, "steps_per_try": args.steps, "max_length": cfg.max_length, "tries": tries,
        "largest_fitting": max(fitting) if fitting else None,
        "largest_tried": max(t["micro_batch"] for t in tries),
        "train_config": to_dict(cfg),
    }
    cap = f"{args.cap['gib']:g} GiB" if args.cap else "no cap"
    bound = ("" if not fitting or any(not t["fits"] and t["micro_batch"] > max(fitting) for t in tries)
             else " (the largest tried: the limit may be higher)")
    print(f"RESULT micro-batch search at {cap} ({cfg.max_length} tokens, {args.steps} steps each): largest that fits "
          f"{report['largest_fitting']}{bound}; " + ", ".join(
              f"{t['micro_batch']} {'ok' if t['fits'] else 'OOM'}" for t in tries))
    _save(report, args.json)
    del model
    return report


def _try_size(model: Any, tokenizer: Any, data: list[dict[str, Any]], cfg: TrainConfig, args: argparse.Namespace,
              *, cuda: bool) -> dict[str, Any]:
    """One micro-batch size of the search: fits or OOM, peaks, tokens/s, the estimate."""
    import torch

    from mdlite import train

    size = cfg.per_device_train_batch_size
    estimate = train.dry_run(cfg)["memory_gb"]["total"]
    gc.collect()
    _reset_peak(cuda)
    clock, oom, trainer = time.perf_counter(), None, None
    with device_peak(cuda) as nvml:
        try:
            if args.fake_oom_above is not None and size > args.fake_oom_above:
                raise torch.OutOfMemoryError(f"fake OOM: micro-batch {size} > --fake-oom-above {args.fake_oom_above}")
            trainer = train.build_trainer(model, tokenizer, data[:size * cfg.max_steps], [], cfg, cuda=cuda)
            trainer.train()
        except torch.OutOfMemoryError as error:
            oom = str(error).splitlines()[0][:300]
    seconds = time.perf_counter() - clock
    measured = {**_peak(cuda), **nvml}
    del trainer
    model.zero_grad(set_to_none=True)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    tokens_per_s, _ = _train_log(Path(cfg.output_dir) / "trainer_log.jsonl")
    key = ("nvml_used" if "nvml_used" in measured else "max_memory_reserved") if cuda else "max_rss"
    result = {"micro_batch": size, "fits": oom is None, "oom": oom, "seconds": round(seconds, 1),
              "tokens_per_s": tokens_per_s, "peak_gb": measured, "estimate_gb": estimate,
              "estimate_vs_measured": round(estimate / measured[key] - 1, 3) if measured.get(key) else None}
    if args.cap and oom is None:
        result["card_fits"] = _card_verdict(args.cap, measured, fits=True)
    print(f"  micro-batch {size:>3}: {'fits' if oom is None else 'OOM '} in {seconds:5.1f} s; peak "
          + ", ".join(f"{k} {v:.2f}" for k, v in measured.items())
          + f" GiB; estimate {estimate} GiB; tokens/s {tokens_per_s or 'n/a'}" + (f"; {oom}" if oom else ""),
          flush=True)
    return result


def build_model(folder: Path, shape: dict[str, int], *, cuda: bool) -> tuple[Path, int]:
    """A random LlamaForCausalLM of `shape`, created directly on the GPU in bf16 (fp32 on CPU: no 28 GB of fp32
    in RAM for 7B), saved with the tiny SentencePiece tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mdlite.models import make_tiny_model

    tokenizer_dir = make_tiny_model(folder.parent / "tokenizer")
    config = LlamaConfig(**shape, max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=False)
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    model.save_pretrained(folder)
    parameters = model.num_parameters()
    del model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    for path in tokenizer_dir.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(path, folder / path.name)
    shutil.rmtree(tokenizer_dir)
    return folder, parameters


def write_rationales(path: Path, model_dir: Path, cfg: TrainConfig, *, examples: int) -> None:
    """`examples` kept records (half CoT, half PoT) whose prompt + rationale + BOS/EOS fill max_length to within a
    few tokens, so a micro-batch is about per_device_train_batch_size x max_length tokens."""
    from transformers import AutoTokenizer

    from mdlite.answers import format_number
    from mdlite.data import synth_problems
    from mdlite.prompts import student_prompt

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(0)
    records = []
    for problem in synth_problems((examples + 1) // 2, seed=0):
        answer = format_number(problem.answer)
        for style in ("cot", "pot"):
            prompt = student_prompt(problem.question, style=style)
            lines: list[str] = []
            while True:
                a, b = rng.randint(2, 99), rng.randint(2, 99)
                line = (f"Then {a} + {b} = {a + b}, which we keep. " if style == "cot"
                        else f"    step_{len(lines)} = {a} + {b}\n")
                ending = f"The answer is {answer}." if style == "cot" else f"    return {problem.equation}\n"
                text = ("" if style == "cot" else "def solution():\n") + "".join(lines + [line]) + ending
                if len(tokenizer(prompt + text, add_special_tokens=False).input_ids) + 2 > cfg.max_length - 2:
                    break
                lines.append(line)
            text = ("" if style == "cot" else "def solution():\n") + "".join(lines) + ending
            records.append({"key": f"{problem.id}/{style}/0", "problem_id": problem.id, "style": style, "sample": 0,
                            "question": problem.question, "gold": problem.answer, "text": text,
                            "answer": problem.answer, "kept": True, "reason": None})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def merge(adapter_dir: Path, folder: Path, *, cuda: bool) -> dict[str, Any]:
    """`mdlite export-gguf`'s merge step: the adapter into a freshly loaded full-precision base, saved."""
    from mdlite import export

    source = export.resolve_source(adapter_dir)
    export.check_source(source)
    clock = time.perf_counter()
    with device_peak(cuda) as nvml:
        model, _ = export.build_model_folder(source, folder, load=False)
    if cuda:
        import torch

        torch.cuda.synchronize()
    seconds = time.perf_counter() - clock
    placed = {"dtype": str(model.dtype).removeprefix("torch."), "device": str(model.device)}
    del model
    return {"seconds": round(seconds, 1), "peak_gb": {**_peak(cuda), **nvml}, **placed}


def probe(shape: dict[str, int], cfg: TrainConfig, work: Path, *, cuda: bool, tokens: int) -> dict[str, Any]:
    """Saved activations of mdlite's QLoRA model per token per layer, measured, next to the estimate's terms."""
    from unittest import mock

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mdlite import train

    arch = {**shape, "num_hidden_layers": 2, "head_dim": shape["hidden_size"] // shape["num_attention_heads"],
            "tie_word_embeddings": False}
    device = "cuda" if cuda else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM._from_config(LlamaConfig(**{k: v for k, v in arch.items() if k != "head_dim"}),
                                              dtype=torch.bfloat16)
    model.save_pretrained(work / "model")
    del model
    cfg = TrainConfig(**{**to_dict(cfg), "model": str(work / "model"), "rationales": "unused"})
    base = train.BaseModel(str(work / "model"), str(work / "model"))
    with mock.patch.object(train, "compute_dtype", lambda cuda: torch.bfloat16):  # the GPU's dtypes, also on the CPU
        model = train.add_lora(train.load_model(base, cfg, cuda=cuda), cfg, base)
    model.train()
    inner = model.get_base_model().model
    residual: set[str] = set()
    for layer in inner.layers:
        layer.register_forward_pre_hook(lambda m, a, k: residual.add(str((a or [k.get("hidden_states")])[0].dtype)),
                                        with_kwargs=True)
    short = tokens // 2
    kept = {n: _saved_by_last_layer(inner, n, device) for n in (short, tokens)}
    per_token = {dtype: (kept[tokens].get(dtype, 0) - kept[short].get(dtype, 0)) / (tokens - short)
                 for dtype in kept[tokens]}
    terms = train.activation_terms(arch, cfg)
    report: dict[str, Any] = {
        "shape": {k: arch[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")},
        "device": torch.cuda.get_device_name() if cuda else "cpu (bf16 autocast)", "residual_dtype": sorted(residual),
        "layer_bytes_per_token": {k: round(v, 1) for k, v in per_token.items()},
        "layer_bytes_per_token_total": round(sum(per_token.values()), 1), "estimate_terms": terms,
        "formula_with_4_byte_masks": train.layer_activation_bytes(arch, lora_r=cfg.lora_r, residual_bytes=4,
                                                                  mask_bytes=4),
    }
    print(f"probe ({report['device']}): residual stream into the decoder layers {sorted(residual)}; the last layer "
          f"keeps {report['layer_bytes_per_token_total']:,.0f} B/token "
          f"({', '.join(f'{k} {v:,.0f}' for k, v in per_token.items())}); "
          f"estimate's layer term {terms['layer']:,} B (CUDA's bool dropout masks), with 4-byte masks "
          f"{report['formula_with_4_byte_masks']:,} B; checkpoint term {terms['checkpoint']:,} B")
    if cuda:
        report["allocated_after_forward"] = {}
        for checkpointing in (False, True):
            if checkpointing:  # as the Trainer does (transformers 5 renamed it; the old name is deprecated)
                hf_model = model.get_base_model()
                if hasattr(hf_model, "activation_checkpointing_enable"):
                    hf_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
                else:
                    hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            per_layer = _allocated_after_forward(inner, tokens) / tokens / arch["num_hidden_layers"]
            report["allocated_after_forward"]["checkpointing" if checkpointing else "plain"] = round(per_layer, 1)
            print(f"  allocated after a forward of {tokens} tokens, checkpointing {'on' if checkpointing else 'off'}: "
                  f"{per_layer:,.0f} B/token/layer (estimate: {terms['checkpoint' if checkpointing else 'layer']:,})")
    return report


def _saved_by_last_layer(inner: Any, tokens: int, device: str) -> dict[str, int]:
    """Bytes of the tensors the last decoder layer saves for backward in one forward of `tokens` tokens, by dtype
    (each storage once; weights, and what earlier layers saved too, such as RoPE's cos and sin, excluded)."""
    import torch

    earlier = {p.untyped_storage().data_ptr() for p in inner.parameters()}
    last = inner.layers[-1]
    inside, seen = [False], {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if not inside[0]:
            earlier.add(storage.data_ptr())
        elif storage.data_ptr() not in earlier:
            seen[storage.data_ptr()] = (str(tensor.dtype).removeprefix("torch."), storage.nbytes())
        return tensor

    hooks = [last.register_forward_pre_hook(lambda m, a: inside.__setitem__(0, True)),
             last.register_forward_hook(lambda m, a, o: inside.__setitem__(0, False))]
    ids = torch.randint(3, inner.config.vocab_size, (1, tokens), device=device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast(device, dtype=torch.bfloat16):
        out = inner(input_ids=ids, position_ids=torch.arange(tokens, device=device)[None]).last_hidden_state
    del out
    for hook in hooks:
        hook.remove()
    by_dtype: dict[str, int] = {}
    for dtype, size in seen.values():
        by_dtype[dtype] = by_dtype.get(dtype, 0) + size
    return by_dtype


def _allocated_after_forward(inner: Any, tokens: int) -> int:
    """GPU memory a train-mode forward of `tokens` tokens leaves allocated (what backward will need)."""
    import torch

    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    ids = torch.randint(3, inner.config.vocab_size, (1, tokens), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = inner(input_ids=ids, position_ids=torch.arange(tokens, device="cuda")[None]).last_hidden_state
    kept = torch.cuda.memory_allocated() - before - out.untyped_storage().nbytes()
    del out
    return kept


@contextmanager
def device_peak(cuda: bool) -> Iterator[dict[str, float]]:
    """Peak memory used on the whole GPU while the block runs, as nvidia-smi shows it (NVML: the CUDA context,
    bitsandbytes' paged optimizer states and other non-PyTorch memory included), sampled every 20 ms; the dict
    gets `nvml_used` (GiB) after the block, and stays empty on the CPU or without NVML (pynvml)."""
    found: dict[str, float] = {}
    if not cuda:
        yield found
        return
    import torch

    try:
        torch.cuda.device_memory_used()
    except Exception as error:  # no pynvml, or NVML unusable here
        print(f"(no whole-GPU memory figure: {error})")
        yield found
        return
    stop, peak = threading.Event(), [0]

    def sample() -> None:
        while not stop.wait(0.02):
            peak[0] = max(peak[0], torch.cuda.device_memory_used())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield found
    finally:
        stop.set()
        thread.join()
        found["nvml_used"] = round(peak[0] / GIB, 2)


def _reset_peak(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak(cuda: bool) -> dict[str, float]:
    """Peak GPU memory since the last reset (allocated by tensors, reserved by PyTorch's allocator), or on the
    CPU the process's max RSS (never reset: an upper bound)."""
    if cuda:
        import torch

        return {"max_memory_allocated": round(torch.cuda.max_memory_allocated() / GIB, 2),
                "max_memory_reserved": round(torch.cuda.max_memory_reserved() / GIB, 2)}
    return {"max_rss": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 2)}


if __name__ == "__main__":
    main()
