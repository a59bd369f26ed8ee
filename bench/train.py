"""Training throughput of mdlite's batching against a naive pad-to-longest baseline, same data and model.

    flock /tmp/mdlite-cpu.lock .venv/bin/python bench/train.py [--model gemma-3-270m] [--examples 96] [--batch-size 8]
    .venv/bin/python bench/train.py --model tiny --examples 384 --rounds 2    # seconds, not minutes

Data: SVAMP train questions (`--data-dir`, default ../shared/data or $MDLITE_DATA) with one CoT rationale
(one sentence per operation of the gold equation, then "The answer is N.") and one PoT program each, or the
kept records of a real `--rationales` file. Every variant trains the same LoRA (same init, seed, steps,
gradient checkpointing) on the same examples for one epoch:

- baseline: the plain transformers Trainer, random batches padded to their longest example
  (DataCollatorForSeq2Seq), the model's own loss over full-vocabulary logits;
- mdlite padding-free (the default): `mdlite.train.build_trainer`, each batch flattened into one row;
- mdlite length-grouped (`padding_free: false`): padded batches of similar lengths.

Each run is a fresh subprocess (its own peak memory: GPU max allocated, else process max RSS); the rounds
alternate the variants and the best round counts, so that other jobs on the machine hurt them alike.
Prints effective (non-padding) tokens/s, the padding share, peak memory and the ratio to the baseline.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mdlite.answers import format_number  # noqa: E402
from mdlite.config import TrainConfig  # noqa: E402

VARIANTS = ("baseline", "padding-free", "length-grouped")
SHARED_DATA = Path(os.environ.get("MDLITE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gemma-3-270m", help="a registry name, a path, or tiny (make_tiny_model)")
    parser.add_argument("--rationales", type=Path, help="a real rationales.jsonl instead of the SVAMP fixture")
    parser.add_argument("--data-dir", type=Path, default=SHARED_DATA)
    parser.add_argument("--examples", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--quantization", default="none", choices=["none", "nf4"])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one run, in a subprocess
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(_run_variant(args)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.model == "tiny":
            from mdlite.models import make_tiny_model

            args.model = str(make_tiny_model(work / "tiny"))
        rationales = args.rationales or _svamp_rationales(args.data_dir, work / "rationales.jsonl", args.examples)
        best: dict[str, dict] = {}
        for round_ in range(args.rounds):
            order = VARIANTS if round_ % 2 == 0 else VARIANTS[::-1]
            for variant in order:
                command = [sys.executable, __file__, "--variant", variant, "--work", str(work), "--model",
                           args.model, "--rationales", str(rationales), "--examples", str(args.examples),
                           "--batch-size", str(args.batch_size), "--quantization", args.quantization]
                result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True)
                                    .stdout.strip().splitlines()[-1])
                print(f"round {round_ + 1} {variant:<15} {result['tokens_per_s']:8.1f} tokens/s", flush=True)
                if variant not in best or result["tokens_per_s"] > best[variant]["tokens_per_s"]:
                    best[variant] = result
    base = best["baseline"]
    print(f"\nmodel {args.model}, {base['examples']} examples, {base['steps']} steps of {args.batch_size}, "
          f"{args.quantization}, {base['device']}")
    print(f"{'variant':<15} {'tokens/s':>10} {'padding':>8} {'peak mem':>10} {'vs baseline':>12}")
    for variant in VARIANTS:
        r = best[variant]
        print(f"{variant:<15} {r['tokens_per_s']:10.1f} {r['padding_share']:8.1%} {r['peak_memory_gb']:8.2f} GB "
              f"{r['tokens_per_s'] / base['tokens_per_s']:11.2f}x")


def _svamp_rationales(data_dir: Path, path: Path, limit: int) -> Path:
    """One CoT and one PoT record per SVAMP train problem, in the rationales.jsonl format."""
    from mdlite.data import load_problems

    records = []
    for problem in load_problems("svamp:train", data_dir=data_dir)[: limit // 2]:
        answer = format_number(problem.answer)
        steps = _steps(ast.parse(problem.equation, mode="eval").body, [])[1]
        cot = " ".join(steps) + f" The answer is {answer}."
        pot = f"def solution():\n    return {problem.equation.replace('.0 ', ' ').replace('.0)', ')')}\n"
        for style, text in (("cot", cot), ("pot", pot)):
            records.append({"key": f"{problem.id}/{style}/0", "problem_id": problem.id, "style": style, "sample": 0,
                            "question": problem.question, "gold": problem.answer, "text": text,
                            "answer": problem.answer, "kept": True, "reason": None})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _steps(node: ast.expr, sentences: list[str]) -> tuple[float, list[str]]:
    """The value of an arithmetic expression, with one sentence per operation ("84 - 20 = 64.")."""
    if isinstance(node, ast.Constant):
        return float(node.value), sentences
    left, _ = _steps(node.left, sentences)
    right, _ = _steps(node.right, sentences)
    symbol, value = {ast.Add: ("+", left + right), ast.Sub: ("-", left - right), ast.Mult: ("*", left * right),
                     ast.Div: ("/", left / right if right else 0.0)}[type(node.op)]
    sentences.append(f"{format_number(left)} {symbol} {format_number(right)} = {format_number(value)}.")
    return value, sentences


def _run_variant(args: argparse.Namespace) -> dict:
    import torch
    import transformers

    from mdlite import models, train

    cuda = torch.cuda.is_available()
    cfg = TrainConfig(rationales=str(args.rationales), model=args.model, output_dir=str(args.work / args.variant),
                      quantization=args.quantization, per_device_train_batch_size=args.batch_size,
                      gradient_accumulation_steps=1, num_train_epochs=1, val_fraction=0.0,
                      padding_free=args.variant != "length-grouped", logging_steps=10**6, save_steps=10**6,
                      eval_steps=10**6, warmup_steps=0, seed=0)
    split = train.split_examples(train.read_rationales(Path(cfg.rationales)), max_per_style=4, val_fraction=0.0,
                                 seed=0)
    base = models.resolve_base_model(cfg.model)
    tokenizer = train.load_tokenizer(base)
    items, _ = train.encode_examples(split.train, tokenizer, cfg, add_bos=train.expected_bos(tokenizer, base))
    transformers.set_seed(0)
    model = train.load_model(base, cfg, cuda=cuda)
    train.preflight_tokenizer(tokenizer, model, base)
    model = train.add_lora(model, cfg, base)
    if args.variant == "baseline":
        trainer = _plain_trainer(model, tokenizer, items, cfg, cuda=cuda)
    else:
        trainer = train.build_trainer(model, tokenizer, items, [], cfg, cuda=cuda)
    real_tokens = sum(len(i["input_ids"]) for i in items)
    padded_tokens = sum(batch["input_ids"].numel() for batch in trainer.get_train_dataloader())  # same seed
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trainer.train()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"variant": args.variant, "examples": len(items), "steps": trainer.state.global_step,
            "tokens_per_s": real_tokens / seconds, "seconds": seconds, "padding_share": 1 - real_tokens / padded_tokens,
            "peak_memory_gb": peak / 2**30, "device": torch.cuda.get_device_name(0) if cuda else "cpu"}


def _plain_trainer(model: object, tokenizer: object, items: list[dict], cfg: TrainConfig, *, cuda: bool) -> object:
    """The naive baseline: transformers' Trainer and DataCollatorForSeq2Seq (pad to longest), default loss."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    rows = [{"input_ids": i["input_ids"], "attention_mask": [1] * len(i["input_ids"]), "labels": i["labels"]}
            for i in items]
    args = TrainingArguments(
        output_dir=cfg.output_dir, seed=cfg.seed, data_seed=cfg.seed, learning_rate=cfg.learning_rate,
        num_train_epochs=1, per_device_train_batch_size=cfg.per_device_train_batch_size,
        activation_checkpointing=cfg.gradient_checkpointing, activation_checkpointing_kwargs={"use_reentrant": False},
        optim="paged_adamw_8bit" if cuda else "adamw_torch", bf16=cuda, use_cpu=not cuda, save_strategy="no",
        report_to="none", logging_steps=10**6, disable_tqdm=True, max_grad_norm=cfg.max_grad_norm,
        lr_scheduler_type=cfg.lr_scheduler_type,
    )
    tokenizer.padding_side = "right"
    collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    return Trainer(model=model, args=args, train_dataset=rows, data_collator=collator)


if __name__ == "__main__":
    main()
