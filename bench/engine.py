"""Multi-path sampling throughput: mdlite's batched engine against sequential llama-cpp-python calls.

    flock /tmp/mdlite-cpu.lock python bench/engine.py [--model qwen2.5-coder-0.5b-instruct] [--ks 1,4,8,16]
        [--max-tokens 128] [--threads 2] [--repeats 1]

For each k, samples k paths of exactly `max_tokens` tokens (temperature 0.8, no stop strings,
end-of-generation tokens banned in both engines) for one few-shot prompt three ways: (a)
`Engine.sample(prompt, n=k)`: the prompt evaluated once, all k paths decoded in one batch per step;
(b) k sequential `Llama.create_completion` calls, which reuse the prompt's KV cache between calls;
(c) the same with `Llama.reset()` before each call, re-evaluating the prompt.
Prints generated tokens/s (prompt time included) and the ratios a/b and a/c. The three run in turn
for each k and repeat, so that other jobs on the machine slow them alike. Set OMP_WAIT_POLICY in
the environment to override mdlite's PASSIVE default.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mdlite.engine import Engine  # noqa: E402
from mdlite.llamacpp import llama_cpp_module, open_llama  # noqa: E402
from mdlite.prompts import teacher_prompt  # noqa: E402

QUESTION = "A shop sells 14 pens a day for 6 days and then 9 pens a day for 3 days. How many pens did it sell?"
TEMPERATURE = 0.8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="GGUF path or registry name")
    parser.add_argument("--ks", default="1,4,8,16", help="comma-separated path counts")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    llama_cpp_module()  # sets OMP_WAIT_POLICY before llama_cpp loads
    engine = Engine(args.model, n_threads=args.threads)
    prompt = teacher_prompt(QUESTION, style="cot")
    prompt_tokens = len(engine.tokenize(prompt))
    # llama-cpp-python's `Llama`, as a user's loop would use it, opened through mdlite's door with the same safe
    # parameters (no repacked / AMX weights: llama.cpp's defaults segfault on some Xeons, llama.cpp #20824)
    llm = open_llama(engine.path, n_ctx=prompt_tokens + args.max_tokens + 8, n_threads=args.threads,
                     n_gpu_layers=engine.n_gpu_layers)
    print(f"model {engine.path.name}, prompt {prompt_tokens} tokens, {args.max_tokens} new tokens per path, "
          f"{args.threads} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
          f"llama-cpp-python {llama_cpp_module().__version__}")
    engine.sample([prompt], n=1, max_tokens=4)  # warm-up: context creation, page-in
    no_eog = {t: float("-inf") for t in range(llm.n_vocab()) if llama_cpp_module().llama_vocab_is_eog(
        llm._model.vocab, t)}

    def batched(k: int, seed: int) -> int:
        [paths] = engine.sample([prompt], n=k, temperature=TEMPERATURE, max_tokens=args.max_tokens, seed=seed,
                                ignore_eos=True)
        return sum(p.tokens for p in paths)

    def sequential(k: int, seed: int, *, reuse: bool) -> int:
        total = 0
        for j in range(k):
            if not reuse:
                llm.reset()
            reply = llm.create_completion(prompt, max_tokens=args.max_tokens, temperature=TEMPERATURE,
                                          top_k=0, top_p=1.0, min_p=0.0, seed=seed + j, logit_bias=no_eog)
            total += reply["usage"]["completion_tokens"]
        return total

    ways = {"batched": batched, "sequential (prompt cache)": lambda k, s: sequential(k, s, reuse=True),
            "sequential (re-eval prompt)": lambda k, s: sequential(k, s, reuse=False)}
    print(f"{'k':>3}  " + "  ".join(f"{name:>28}" for name in ways) + "  batched/cache  batched/re-eval")
    for k in ks:
        tokens = dict.fromkeys(ways, 0)
        seconds = dict.fromkeys(ways, 0.0)
        for repeat in range(args.repeats):
            for name, way in ways.items():
                llm.reset()  # each way starts without the prompt in llm's cache
                start = time.perf_counter()
                tokens[name] += way(k, 1000 * repeat)
                seconds[name] += time.perf_counter() - start
        rate = {name: tokens[name] / seconds[name] for name in ways}
        names = list(ways)
        print(f"{k:>3}  " + "  ".join(f"{rate[n]:>21.1f} tok/s" for n in names)
              + f"  {rate[names[0]] / rate[names[1]]:>12.2f}x  {rate[names[0]] / rate[names[2]]:>14.2f}x")
    engine.close()
    llm.close()


if __name__ == "__main__":
    main()
