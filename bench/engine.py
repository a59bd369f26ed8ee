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
    bench = Bench(args.model, max_tokens=args.max_tokens, threads=args.threads)
    print(f"model {bench.engine.path.name}, prompt {bench.prompt_tokens} tokens, {args.max_tokens} new tokens per "
          f"path, {args.threads} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
          f"llama-cpp-python {llama_cpp_module().__version__}")
    names = list(bench.ways)
    print(f"{'k':>3}  " + "  ".join(f"{name:>28}" for name in names) + "  batched/cache  batched/re-eval")
    for k in [int(k) for k in args.ks.split(",")]:
        rate = bench.rates(k, repeats=args.repeats)
        print(f"{k:>3}  " + "  ".join(f"{rate[n]:>21.1f} tok/s" for n in names)
              + f"  {rate[names[0]] / rate[names[1]]:>12.2f}x  {rate[names[0]] / rate[names[2]]:>14.2f}x")
    bench.close()


class Bench:
    """The engine and llama-cpp-python's `Llama` on one model, and the three ways of sampling k paths."""

    def __init__(self, model: str, *, max_tokens: int = 128, threads: int = 2) -> None:
        llama_cpp_module()  # sets OMP_WAIT_POLICY before llama_cpp loads
        self.engine = Engine(model, n_threads=threads)
        self.max_tokens = max_tokens
        self.prompt = teacher_prompt(QUESTION, style="cot")
        self.prompt_tokens = len(self.engine.tokenize(self.prompt))
        # llama-cpp-python's `Llama`, as a user's loop would use it, opened through mdlite's door with the same safe
        # parameters (no repacked / AMX weights: llama.cpp's defaults segfault on some Xeons, llama.cpp #20824)
        self.llm = open_llama(self.engine.path, n_ctx=self.prompt_tokens + max_tokens + 8, n_threads=threads,
                              n_gpu_layers=self.engine.n_gpu_layers)
        self.engine.sample([self.prompt], n=1, max_tokens=4)  # warm-up: context creation, page-in
        self.no_eog = {t: float("-inf") for t in range(self.llm.n_vocab())
                       if llama_cpp_module().llama_vocab_is_eog(self.llm._model.vocab, t)}
        self.ways = {"batched": self.batched, "sequential (prompt cache)": lambda k, s: self.sequential(k, s, True),
                     "sequential (re-eval prompt)": lambda k, s: self.sequential(k, s, False)}

    def rates(self, k: int, *, repeats: int = 1) -> dict[str, float]:
        """Generated tokens/s of each way for k paths; the ways run in turn, `repeats` times."""
        tokens = dict.fromkeys(self.ways, 0)
        seconds = dict.fromkeys(self.ways, 0.0)
        for repeat in range(repeats):
            for name, way in self.ways.items():
                self.llm.reset()  # each way starts without the prompt in llm's cache
                start = time.perf_counter()
                tokens[name] += way(k, 1000 * repeat)
                seconds[name] += time.perf_counter() - start
        return {name: tokens[name] / seconds[name] for name in self.ways}

    def batched(self, k: int, seed: int) -> int:
        [paths] = self.engine.sample([self.prompt], n=k, temperature=TEMPERATURE, max_tokens=self.max_tokens,
                                     seed=seed, ignore_eos=True)
        return sum(p.tokens for p in paths)

    def sequential(self, k: int, seed: int, reuse: bool) -> int:
        total = 0
        for j in range(k):
            if not reuse:
                self.llm.reset()
            reply = self.llm.create_completion(self.prompt, max_tokens=self.max_tokens, temperature=TEMPERATURE,
                                               top_k=0, top_p=1.0, min_p=0.0, seed=seed + j, logit_bias=self.no_eog)
            total += reply["usage"]["completion_tokens"]
        return total

    def close(self) -> None:
        self.engine.close()
        self.llm.close()


if __name__ == "__main__":
    main()
