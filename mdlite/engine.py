"""Batched multi-path sampling on llama.cpp: each prompt is evaluated once and shared by its paths.

    from mdlite.engine import Engine
    with Engine("qwen2.5-coder-0.5b-instruct") as engine:
        [cot, pot] = engine.sample([cot_prompt, pot_prompt], n=5, temperature=0.7, max_tokens=256,
                                   stop=[["\\nQuestion:"], ["```"]], seed=0)
        cot[0].text, cot[0].tokens, cot[0].finish_reason

`Engine.sample` evaluates each prompt once, copies its KV cells to its n sequences
(`llama_memory_seq_cp`), then decodes every live sequence in one batch per step, each with its own
sampler chain. A sequence ends on an end-of-generation token, a stop string (the text is cut before
it), a `stop_after` callable (given the text so far, the index where it is complete or None; the text
is kept up to that index: prompts.STOP_AFTER ends CoT after its answer sentence and PoT after its
program's closing fence) or the `max_tokens` budget.

Prefix cache: the engine keeps the KV cells of its last `prefix_cache` prompts, one KV stream each
(default 2: one per style). A new prompt that shares at least MIN_PREFIX leading tokens with a cached
one (the few-shot exemplar block, a chat template's head) gets those cells copied and only its new
suffix is evaluated; the prompt then replaces the cached prompt of its family (one sharing at least
half of it), else the least recently used one. Memory: each slot is one more KV stream of the
context's cells per sequence (Q8_0 K and V, about 2 x 1.06 bytes x n_layers x n_kv_heads x head_dim
per cell: ~6.5 KB per cell for the 0.5B demo model, ~0.27 MB for a 7B LLaMA; at 1024 cells 6.5 MB
and 280 MB per slot). A call that needs more cells or sequences than the context has gets a new
context, whose cache starts empty. `prefix_cache=0` turns it off (every prompt is evaluated whole;
the baseline in bench/fewshot.py).

Batch invariance: a path's tokens must not depend on what else shares its batch, yet llama.cpp's CPU
kernels change with the batch's shape; with llama.cpp's defaults one prompt's logits differed by up
to 0.8 between batch compositions, enough to flip greedy choices. So on CPU the engine keeps every
computation a path sees the same whatever else is batched: each prompt is decoded in a batch of its
own; each sequence has its own KV stream (`kv_unified` off: its cells never interleave with other
sequences'); flash attention runs over a Q8_0 KV cache (over F16 cells llama.cpp takes a tiled kernel
for many query rows and a split-KV kernel for one); weight repacking is off and GGML_CPU_TILED_MM=0
(both switch matrix kernels with the row count). tests/test_engine.py checks that paths come out the
same alone and in batches of other shapes. The same holds for the prefix cache: a prompt evaluated in
two parts (cached prefix + suffix) gives the same cells and logits as in one part, because every
row's computation is independent of the other rows of its batch and flash attention skips masked
cells, so what was cached before never changes a path's text (tested). Guaranteed on CPU: the same
model file, prompt, seed and settings give the same text on the same machine and llama.cpp build,
whatever else shares the call or was cached. Not guaranteed: equality across llama.cpp versions, CPU
instruction sets or thread counts.

GPU: `n_gpu_layers` -1 (the default everywhere in mdlite) offloads every layer when llama.cpp was built
with GPU offload (CUDA, Metal, Vulkan, ...; `llama_supports_gpu_offload()`) and keeps all on the CPU
otherwise (`gpu_layers()` resolves it; 0 forces the CPU). With layers on a GPU the batch invariance
above is not guaranteed: GPU kernels pick their tiling and reduction order by the batch's shape, so a
path's text may change with what else shares its batch or was cached (sampled answers stay draws of the
same model; greedy paths can flip at near-ties). Runs stay repeatable only as far as the backend is
deterministic for the same batches. Set n_gpu_layers 0 for the CPU guarantee.

Seeds: path j of prompt p is drawn with the sampler seed `derive_seed(seed_p, first_path + j)`, where
seed_p is `derive_seed(seed, p)` (or the caller's own per-prompt seed). A path's text therefore does
not depend on how many other paths share its batch, and a later call with `first_path=k` continues
a run of k paths. Temperature 0 is greedy.

Threads: `n_threads` 0 uses the machine's physical cores. The model is opened through mdlite's one door
to llama.cpp (`mdlite/llamacpp.py`: threads, GPU layers, environment, no repacked weights).
"""

from __future__ import annotations

import codecs
import ctypes
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from mdlite import MdliteError
from mdlite.llamacpp import gpu_layers, llama_cpp_module, load_model, physical_cores

log = logging.getLogger(__name__)

MIN_PREFIX = 16  # shortest shared prefix worth copying from the prefix cache (tokens)
_CTX_ROUND = 256  # llama.cpp rounds each sequence's KV stream to this many cells


@dataclass(frozen=True)
class Generation:
    """One sampled path: its text (stop string excluded), generated token count and why it ended."""

    text: str
    tokens: int
    finish_reason: str  # "stop" (end-of-generation token or stop string) or "length" (max_tokens)


def derive_seed(*parts: int | str) -> int:
    """A 32-bit seed mixed from `parts` (stable across runs and platforms)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=4).digest()
    return min(int.from_bytes(digest, "little"), 0xFFFFFFFE)  # 0xFFFFFFFF means "random" to llama.cpp


class Engine:
    """A GGUF loaded once for batched multi-path sampling.

    `n_ctx` is each sequence's KV cache size in cells (its prompt plus max_tokens); 0 sizes it per
    call, growing as needed. `n_gpu_layers` -1: all layers on the GPU when llama.cpp has GPU offload,
    else 0 (see `gpu_layers()`). `n_threads` 0 uses the physical cores. `prefix_cache`: prompts whose KV
    cells are kept for reuse (0: off; see the module docstring).
    """

    def __init__(self, model: str | Path, *, n_ctx: int = 0, n_gpu_layers: int = -1, n_threads: int = 0,
                 n_batch: int = 512, prefix_cache: int = 2) -> None:
        from mdlite.models import model_path

        self.path = model_path(str(model))
        self.n_ctx, self.n_batch, self.prefix_cache = n_ctx, n_batch, prefix_cache
        self.n_threads = n_threads or physical_cores()
        self.prompt_tokens = self.cached_tokens = 0  # prompt tokens asked for / taken from the prefix cache
        self._cached: list[_Cached] = []  # least recently used first
        self._llama = llama = llama_cpp_module()
        self.n_gpu_layers = gpu_layers(n_gpu_layers)
        self._model = load_model(self.path, n_gpu_layers=self.n_gpu_layers)
        self._vocab = llama.llama_model_get_vocab(self._model)
        self.n_ctx_train = llama.llama_model_n_ctx_train(self._model)
        self._ctx: Any = None
        self._ctx_cells = self._ctx_seqs = 0  # KV cells per sequence; sequences
        self._piece = ctypes.create_string_buffer(256)
        self._eog: list[int] | None = None  # end-of-generation tokens, listed on first use
        log.info("loaded %s (%d threads, n_gpu_layers %d)", self.path, self.n_threads, self.n_gpu_layers)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Free the context and the model."""
        if self._ctx:
            self._llama.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            self._llama.llama_model_free(self._model)
            self._model = None

    def tokenize(self, text: str) -> list[int]:
        """`text` as tokens, with the model's BOS token when it wants one; special tokens written in the
        text (e.g. a chat template's `<|im_start|>`) become those tokens, as in llama.cpp's server."""
        data = text.encode("utf-8")
        size = len(data) + 8
        for _ in range(2):
            tokens = (self._llama.llama_token * size)()
            count = self._llama.llama_tokenize(self._vocab, data, len(data), tokens, size, True, True)
            if count >= 0:
                return list(tokens[:count])
            size = -count
        raise MdliteError(f"llama.cpp could not tokenize a prompt of {len(data)} bytes")

    def sample(self, prompts: Sequence[str], *, n: int | Sequence[int] = 1, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, max_tokens: int = 256,
               stop: Sequence[str] | Sequence[Sequence[str]] = (), seed: int | Sequence[int] = 0,
               first_path: int | Sequence[int] = 0,
               stop_after: Callable[[str], int | None] | Sequence[Callable[[str], int | None] | None] | None = None,
               ignore_eos: bool = False) -> list[list[Generation]]:
        """`n` paths per prompt (an int, or one count per prompt), as result[prompt][path].

        `stop`: stop strings for every prompt, or one list per prompt. `seed`: one base seed, or one
        per prompt; `first_path`: the number of the first path, for all prompts or per prompt (see the
        module docstring). `stop_after`: a callable, for every prompt or one (or None) per prompt; a path
        ends as soon as it returns an index, cut there. `top_k` 0 and `top_p` 1 switch those filters
        off. `ignore_eos` bans end-of-generation tokens, so paths end on stop strings or max_tokens only
        (benchmarks).
        """
        counts = [n] * len(prompts) if isinstance(n, int) else list(n)
        firsts = [first_path] * len(prompts) if isinstance(first_path, int) else list(first_path)
        stops = _per_prompt(stop, len(prompts))
        ends = list(stop_after) if isinstance(stop_after, Sequence) else [stop_after] * len(prompts)
        seeds = [derive_seed(seed, p) for p in range(len(prompts))] if isinstance(seed, int) else list(seed)
        if not len(counts) == len(firsts) == len(seeds) == len(ends) == len(prompts):
            raise ValueError("n, seed, first_path and stop_after must be one value or have one entry per prompt")
        if max_tokens < 1 or min(counts, default=1) < 0:
            raise ValueError("max_tokens must be >= 1 and n >= 0")
        tokens = [self.tokenize(prompt) for prompt in prompts]
        if not all(tokens):
            raise MdliteError("an empty prompt cannot be sampled from (the model adds no BOS token)")
        self._prepare(tokens, counts, max_tokens)
        paths = [_Path(prompt=p, seq=0, stop=stops[p], end=ends[p], sampler=self._sampler(
                    temperature, top_p, top_k, derive_seed(seeds[p], firsts[p] + j), ignore_eos=ignore_eos))
                 for p in range(len(prompts)) for j in range(counts[p])]
        for seq, path in enumerate(paths, start=self.prefix_cache):
            path.seq = seq
        try:
            self._generate(tokens, paths, max_tokens)
        finally:
            for path in paths:
                self._llama.llama_sampler_free(path.sampler)
        result: list[list[Generation]] = [[] for _ in prompts]
        for path in paths:
            result[path.prompt].append(Generation(path.text, path.tokens, path.finish_reason))
        return result

    # ---- private ----

    def _prepare(self, tokens: list[list[int]], counts: list[int], max_tokens: int) -> None:
        """A cleared context big enough for these prompts and paths, or MdliteError saying why not."""
        live = [i for i, count in enumerate(counts) if count]
        longest = max((len(tokens[i]) for i in live), default=0)
        if longest + max_tokens > self.n_ctx_train:
            raise MdliteError(f"a prompt of {longest} tokens + max_tokens {max_tokens} exceeds the model's "
                              f"context of {self.n_ctx_train} tokens; shorten the prompt or lower max_tokens")
        seqs = sum(counts) + self.prefix_cache
        limit = min(self._llama.llama_max_parallel_sequences(), self.n_batch)
        if seqs > limit:
            raise MdliteError(f"{seqs - self.prefix_cache} paths in one call exceed the limit of "
                              f"{limit - self.prefix_cache} sequences; sample fewer paths")
        cells = longest + max_tokens
        if self.n_ctx and cells > self.n_ctx:
            raise MdliteError(f"a prompt of {longest} tokens + max_tokens {max_tokens} needs {cells} KV cells per "
                              f"path, but n_ctx is {self.n_ctx}; raise n_ctx (flag --num-ctx; 0 sizes it "
                              "automatically) or lower max_tokens")
        want_cells = -(-(self.n_ctx or cells) // _CTX_ROUND) * _CTX_ROUND
        if self._ctx is None or want_cells > self._ctx_cells or seqs > self._ctx_seqs:
            self._new_context(max(want_cells, self._ctx_cells), max(seqs, self._ctx_seqs, 1))
        mem = self._llama.llama_get_memory(self._ctx)
        for seq in range(self.prefix_cache, self._ctx_seqs):  # the cached prompts' streams stay
            self._llama.llama_memory_seq_rm(mem, seq, -1, -1)

    def _new_context(self, cells: int, seqs: int) -> None:
        llama = self._llama
        if self._ctx:
            llama.llama_free(self._ctx)
            self._ctx = None
        params = llama.llama_context_default_params()
        params.n_ctx, params.n_seq_max, params.kv_unified = cells * seqs, seqs, False
        params.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_ENABLED
        params.type_k = params.type_v = llama.GGML_TYPE_Q8_0
        params.n_batch = params.n_ubatch = self.n_batch
        params.n_threads = params.n_threads_batch = self.n_threads
        self._ctx = llama.llama_init_from_model(self._model, params)
        if not self._ctx:
            raise MdliteError(f"llama.cpp could not create a context of {cells} KV cells for each of {seqs} "
                              "sequences; lower n_ctx (flag --num-ctx), max_tokens or paths")
        self._ctx_cells, self._ctx_seqs = cells, seqs
        self._cached = [_Cached(seq=i) for i in range(self.prefix_cache)]
        log.debug("context: %d cells per sequence, %d sequences", cells, seqs)

    def _sampler(self, temperature: float, top_p: float, top_k: int, seed: int, *, ignore_eos: bool) -> Any:
        llama = self._llama
        chain = llama.llama_sampler_chain_init(llama.llama_sampler_chain_default_params())
        if ignore_eos:
            n_vocab = llama.llama_vocab_n_tokens(self._vocab)
            if self._eog is None:
                self._eog = [t for t in range(n_vocab) if llama.llama_vocab_is_eog(self._vocab, t)]
            bans = (llama.llama_logit_bias * len(self._eog))(*[(t, float("-inf")) for t in self._eog])
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_logit_bias(n_vocab, len(bans), bans))
        if temperature <= 0:
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_greedy())
            return chain
        if top_k > 0:
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_top_k(top_k))
        if top_p < 1:
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_top_p(top_p, 1))
        llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_temp(temperature))
        llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_dist(seed))
        return chain

    def _generate(self, tokens: list[list[int]], paths: list[_Path], max_tokens: int) -> None:
        llama, ctx = self._llama, self._ctx
        mem = llama.llama_get_memory(ctx)
        batch = llama.llama_batch_init(self.n_batch, 0, 1)
        try:
            # Each prompt alone, on the sequence of its first path (after the cells of its longest cached
            # prefix); copied to its other paths and into the prefix cache.
            for p, prompt in enumerate(tokens):
                mine = [path for path in paths if path.prompt == p]
                if not mine:
                    continue
                for start in range(self._reuse_prefix(prompt, mine[0].seq), len(prompt), self.n_batch):
                    chunk = prompt[start:start + self.n_batch]
                    for i, token in enumerate(chunk):
                        _put(batch, i, token, start + i, mine[0].seq, logits=start + i == len(prompt) - 1)
                    self._decode(batch, len(chunk))
                self._remember_prompt(prompt, mine[0].seq)
                for path in mine:
                    if path is not mine[0]:
                        llama.llama_memory_seq_cp(mem, mine[0].seq, path.seq, -1, -1)
                    path.pos = len(prompt)
                    self._accept(path, llama.llama_sampler_sample(path.sampler, ctx, len(chunk) - 1), max_tokens)
            # Then one batch per step with every live path.
            live = [path for path in paths if path.finish_reason == ""]
            while live:
                for i, path in enumerate(live):
                    _put(batch, i, path.last, path.pos, path.seq, logits=True)
                self._decode(batch, len(live))
                for i, path in enumerate(live):
                    path.pos += 1
                    self._accept(path, llama.llama_sampler_sample(path.sampler, ctx, i), max_tokens)
                    if path.finish_reason:
                        llama.llama_memory_seq_rm(mem, path.seq, -1, -1)
                live = [path for path in live if path.finish_reason == ""]
        finally:
            llama.llama_batch_free(batch)

    def _reuse_prefix(self, prompt: list[int], seq: int) -> int:
        """Copy the cells of the cached prompt sharing the longest prefix with `prompt` (at least
        MIN_PREFIX tokens; at most all but its last token, whose logits are needed) into `seq`; how many
        leading tokens of `prompt` `seq` now holds."""
        self.prompt_tokens += len(prompt)
        shared, best = max(((_common_prefix(entry.tokens, prompt), entry) for entry in self._cached),
                           default=(0, None), key=lambda pair: pair[0])
        shared = min(shared, len(prompt) - 1)
        if best is None or shared < MIN_PREFIX:
            return 0
        mem = self._llama.llama_get_memory(self._ctx)
        self._llama.llama_memory_seq_cp(mem, best.seq, seq, -1, -1)  # a whole stream (buffers copied in order)
        self._llama.llama_memory_seq_rm(mem, seq, shared, -1)
        self.cached_tokens += shared
        return shared

    def _remember_prompt(self, prompt: list[int], seq: int) -> None:
        """Keep `prompt`'s cells (in `seq`) in the slot of the cached prompt of its family (sharing at least
        half of `prompt`: the same exemplar block), else in the least recently used slot."""
        if not self._cached:
            return
        shared, entry = max(((_common_prefix(e.tokens, prompt), e) for e in self._cached), key=lambda pair: pair[0])
        if shared < max(MIN_PREFIX, len(prompt) // 2):
            entry = self._cached[0]
        self._llama.llama_memory_seq_cp(self._llama.llama_get_memory(self._ctx), seq, entry.seq, -1, -1)
        entry.tokens = prompt
        self._cached.remove(entry)
        self._cached.append(entry)

    def _decode(self, batch: Any, count: int) -> None:
        batch.n_tokens = count
        status = self._llama.llama_decode(self._ctx, batch)
        if status != 0:
            raise MdliteError(f"llama_decode failed (status {status}) on a batch of {count} tokens "
                              f"with a KV cache of {self._ctx_cells} cells; lower paths or max_tokens")

    def _accept(self, path: _Path, token: int, max_tokens: int) -> None:
        """Add a sampled token to `path`, ending it on end-of-generation, a stop string or the budget."""
        if self._llama.llama_vocab_is_eog(self._vocab, token):
            path.finish(path.decoder.decode(b"", final=True), "stop")
            return
        path.tokens += 1
        path.last = token
        size = self._llama.llama_token_to_piece(self._vocab, token, self._piece, len(self._piece), 0, False)
        if size < 0:
            raise MdliteError(f"token {token} does not fit a {len(self._piece)}-byte piece buffer")
        path.add(path.decoder.decode(self._piece.raw[:size]))
        if not path.finish_reason and path.tokens >= max_tokens:
            path.finish(path.decoder.decode(b"", final=True), "length")


@dataclass
class _Cached:
    """A prefix-cache slot: the KV stream `seq` holds the cells of `tokens`."""

    seq: int
    tokens: list[int] = field(default_factory=list)


class _Path:
    """The state of one sequence while it is being generated."""

    def __init__(self, *, prompt: int, seq: int, sampler: Any, stop: list[str],
                 end: Callable[[str], int | None] | None = None) -> None:
        self.prompt, self.seq, self.sampler, self.stop, self.end = prompt, seq, sampler, stop, end
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")
        self.text = ""
        self.tokens = self.pos = self.last = 0
        self.finish_reason = ""
        self._longest_stop = max(map(len, stop), default=0)

    def add(self, piece: str) -> None:
        """Append decoded text; end the path at the earliest stop string in the new tail."""
        start = max(0, len(self.text) - self._longest_stop + 1)
        self.text += piece
        found = [i for s in self.stop if (i := self.text.find(s, start)) >= 0]
        if found:
            self.text = self.text[:min(found)]
            self.finish_reason = "stop"
        elif self.end and (cut := self.end(self.text)) is not None:
            self.text = self.text[:cut]
            self.finish_reason = "stop"

    def finish(self, tail: str, reason: str) -> None:
        self.add(tail)
        self.finish_reason = self.finish_reason or reason


def _put(batch: Any, i: int, token: int, pos: int, seq: int, *, logits: bool) -> None:
    batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
    batch.seq_id[i][0] = seq
    batch.logits[i] = logits


def _common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _per_prompt(stop: Sequence[str] | Sequence[Sequence[str]], count: int) -> list[list[str]]:
    if all(isinstance(item, str) for item in stop):
        return [list(stop)] * count  # type: ignore[arg-type]
    if len(stop) != count:
        raise ValueError("stop must be a list of strings or one list of strings per prompt")
    return [list(item) for item in stop]
