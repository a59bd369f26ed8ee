"""Cost and fidelity of each GGUF type that `mdlite export-gguf` writes, against its F16 file (llama.cpp's
converter output) as the named baseline.

    python bench/export.py [--models tiny,gemma-3-270m] [--quant-types Q8_0,Q5_K_M,Q4_K_M,Q4_0] [--problems 4]

Each model gets a random small LoRA adapter (r 8 on q_proj/v_proj, B drawn from N(0, 0.01) so the merge
changes the model) and one `mdlite.export.run` with every type. Models: `tiny` (the tiny random LLaMA,
hidden 256) and registry names with a GGUF (dequantized once by transformers, cached). Per type it prints
the seconds to produce the file (convert for F16, quantize for the rest) and the ratio to F16's, the size
and its ratio to F16's, the max and mean |logit - HF logit| and the top-1 agreement with the merged HF model
over the prompt tokens of the parity prompts, then the parity figures (token match, greedy F16 = HF, stop rate,
answer agreement with F16).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mdlite.config import ExportConfig, load_config  # noqa: E402
from mdlite.data import synth_problems  # noqa: E402
from mdlite.export import run  # noqa: E402
from mdlite.prompts import STYLES, student_prompt  # noqa: E402


def base_folder(name: str, root: Path) -> Path:
    if name == "tiny":
        from mdlite.models import make_tiny_model

        return make_tiny_model(root / "tiny-base", seed=0)
    from mdlite.models import hf_from_gguf, model_path

    return hf_from_gguf(model_path(name))


def random_adapter(base: Path, adapter: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.01)
    model.save_pretrained(adapter)
    AutoTokenizer.from_pretrained(base).save_pretrained(adapter)
    (adapter / "mdlite.json").write_text(json.dumps({"base_model": str(base)}))
    return adapter


def logit_errors(merged: Path, files: dict[str, Path], prompts: list[str], add_bos: bool) -> dict[str, dict]:
    """Max / mean |GGUF logit - HF logit| and top-1 agreement over every prompt position."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mdlite.llamacpp import open_llama

    tokenizer = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    ids = [([tokenizer.bos_token_id] if add_bos else []) + tokenizer(p, add_special_tokens=False).input_ids
           for p in prompts]
    with torch.inference_mode():
        reference = [model(torch.tensor([x])).logits[0].numpy() for x in ids]
    out = {}
    for quant, path in files.items():
        llm = open_llama(path, n_ctx=512, logits_all=True)
        errors, agree, total = [], 0, 0
        try:
            for x, hf in zip(ids, reference, strict=True):
                llm.reset()
                llm.eval(x)
                ours = np.asarray(llm.scores[: len(x)])
                errors.append(np.abs(ours - hf))
                agree += int((ours.argmax(-1) == hf.argmax(-1)).sum())
                total += len(x)
        finally:
            llm.close()
        flat = np.concatenate([e.ravel() for e in errors])
        out[quant] = {"max": float(flat.max()), "mean": float(flat.mean()), "top1": agree / total}
    return out


def bench_model(name: str, quants: list[str], problems: int, root: Path) -> None:
    base = base_folder(name, root)
    adapter = random_adapter(base, root / f"{name}-adapter")
    cfg = load_config(ExportConfig, overrides={
        "input_dir": str(adapter), "output_dir": str(root / f"{name}-out"), "quant_types": ["F16", *quants],
        "parity_problems": problems, "parity_max_tokens": 32, "min_stop_rate": 0.0, "min_answer_agreement": 0.0,
        "min_greedy_match": 0.0,
    })
    result = run(cfg)
    record = json.loads(result.run_json.read_text())
    timings = record["timings_s"]
    seconds = {q: timings["convert_s"] if q == "F16" else timings[f"quantize_{q}_s"] for q in result.files}
    sizes = {q: path.stat().st_size for q, path in result.files.items()}
    prompts = [student_prompt(p.question, style=s) for p in synth_problems(problems, seed=0) for s in STYLES]
    errors = logit_errors(root / f"{name}-out" / "merged", result.files, prompts, record["add_bos"])
    parity = result.parity
    print(f"\n== {name}: merge {timings['merge_s']:.1f} s, convert {timings['convert_s']:.1f} s, parity "
          f"{timings['parity_s']:.1f} s, total {timings['total_s']:.1f} s (baseline: F16 = converter output)")
    print(f"{'type':<8} {'seconds':>8} {'x F16':>7} {'MB':>9} {'x F16':>7} {'max|dlogit|':>12} {'mean|dlogit|':>13} "
          f"{'top-1':>7} {'stop':>6} {'agree':>6}")
    for quant in result.files:
        numbers = parity["files"][quant]
        print(f"{quant:<8} {seconds[quant]:>8.2f} {seconds[quant] / seconds['F16']:>7.3f} {sizes[quant] / 1e6:>9.1f} "
              f"{sizes[quant] / sizes['F16']:>7.3f} {errors[quant]['max']:>12.4g} {errors[quant]['mean']:>13.4g} "
              f"{errors[quant]['top1']:>7.3f} {numbers['stop_rate']:>6.2f} {numbers['answer_agreement']:>6.2f}")
    print(f"parity: token ids equal {parity['tokens']['match_rate']:.2f}, chat template "
          f"{'ok' if parity['chat_template']['ok'] else 'WRONG'}, greedy F16 = HF on "
          f"{parity['greedy_f16']['identical']}/{parity['greedy_f16']['prompts']} prompts (32 tokens; near-ties "
          f"{parity['greedy_f16']['near_ties']})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,gemma-3-270m", help="tiny and/or registry names with a GGUF")
    parser.add_argument("--quant-types", default="Q8_0,Q5_K_M,Q4_K_M,Q4_0")
    parser.add_argument("--problems", type=int, default=4, help="parity problems (each in CoT and PoT)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mdlite-bench-export-") as tmp:
        for name in args.models.split(","):
            bench_model(name, args.quant_types.split(","), args.problems, Path(tmp))


if __name__ == "__main__":
    main()
