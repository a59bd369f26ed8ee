"""Continuous batching of multi-path sampling on llama.cpp: each prompt is evaluated once and shared by its
paths, and a finished path's place goes to the next waiting one at once.

    from mdlite.engine import Engine
    with Engine("qwen2.5-coder-0.5b-instruct") as engine:
        future = engine.submit(cot_prompt, n=5, temperature=0.7, max_tokens=256, stop=["\\nQuestion:"], seed=0)
        [cot, pot] = engine.sample([cot_prompt, pot_prompt], n=5, temperature=0.7, seed=0)  # submit + wait
        future.result()[0].text, cot[0].tokens, cot[0].finish_reason

`Engine.submit(prompt, n=...)` queues a request and returns a `concurrent.futures.Future` of its n
`Generation`s; any thread may submit (teach's event loop, eval's loop, one coroutine per served request),
and `Future.cancel()` drops a request's paths at the next decode step (futures' done-callbacks run on the
worker thread; `close()` there lets the running step finish first). One worker thread owns the
llama.cpp context and repeats one step: admit waiting requests (oldest first) while free sequences are
left for all of a request's paths: evaluate the prompt alone, copy its KV cells to its n sequences
(`llama_memory_seq_cp`), sample each path's first token; then decode every live path in one batch, each
with its own sampler chain; a path that ends frees its sequence for the next step, and a request whose
paths have all ended resolves its future. Live paths hold consecutive sequence ids (llama.cpp splits a
batch into one ubatch per run of consecutive ids, and each ubatch reads all the weights again): a freed
sequence nobody takes is filled by moving the path on the highest id into it (its KV stream copied).
Requests with different sampling settings share batches. A path ends on an end-of-generation token, a
stop string (the text is cut before it), its `stop_after` callable (given the text so far, the index
where it is complete or None; the text is kept up to that index: prompts.STOP_AFTER ends CoT after its
answer sentence and PoT after its program's closing fence) or its `max_tokens` budget. What raises while a
path is handled (its stop_after, ...) fails that path's request alone; a failed `llama_decode` fails every
request in flight. `sample()` is submit-all-and-wait.

Context: `max_paths` sequences of `n_ctx` KV cells each, plus one per prefix-cache slot, allocated once.
A request whose prompt + max_tokens exceeds n_ctx fails alone (MdliteError from `submit`). `n_ctx` 0
sizes the context from the requests waiting when it is first needed, and regrows it (which empties the
prefix cache) only when a longer request arrives, once the paths in flight have ended. The worker creates it
without the engine's lock, so submit() does not wait for llama.cpp's allocation; the new context is made before
the old one is freed, so when llama.cpp cannot make it, only the requests that do not fit the old one fail.
Memory: about 2 x 1.06 bytes x n_layers x n_kv_heads x head_dim per cell (Q8_0 K and V): ~6.5 KB for the 0.5B demo
model, ~0.27 MB for a 7B LLaMA, so 16 paths + 2 slots of 1,024 cells take ~120 MB and ~5 GB.

Prefix cache: the engine keeps the KV cells of its last `prefix_cache` prompts, one KV stream each
(default 2: one per style). A new prompt that shares at least MIN_PREFIX leading tokens with a cached
one (the few-shot exemplar block, a chat template's head) gets those cells copied and only its new
suffix is evaluated; the prompt then replaces the cached prompt of its family (one sharing at least
half of it), else the least recently used one. `prefix_cache=0` turns it off (every prompt is evaluated
whole; the baseline in bench/fewshot.py).

Batch invariance: a path's tokens must not depend on what else shares its batch or joins it later, yet
llama.cpp's CPU kernels change with the batch's shape; with llama.cpp's defaults one prompt's logits
differed by up to 0.8 between batch compositions, enough to flip greedy choices. So on CPU the engine
keeps every computation a path sees the same whatever else is batched: each prompt is decoded in a batch
of its own; each sequence has its own KV stream (`kv_unified` off: its cells never interleave with other
sequences'); flash attention runs over a Q8_0 KV cache (over F16 cells llama.cpp takes a tiled kernel
for many query rows and a split-KV kernel for one); weight repacking is off and GGML_CPU_TILED_MM=0
(both switch matrix kernels with the row count). The same holds for the prefix cache: a prompt
evaluated in two parts (cached prefix + suffix) gives the same cells and logits as in one part.
tests/test_engine.py compares the logits' bytes of every step, alone and in batches of other shapes,
cache on and off. Where it holds: x86-64 CPU builds (tested here): the same model file, prompt, seed and
settings give the same text on the same machine and llama.cpp build, whatever else shares the batch or
was cached. Where it does not: on aarch64 with i8mm, ggml's quantized matrix kernels process two rows
at a time, so a row's result depends on whether the row count is even; with layers on a GPU, kernels
pick their tiling and reduction order by the batch's shape (sampled answers stay draws of the same model;
greedy paths can flip at near-ties). Nowhere across llama.cpp versions, instruction sets or thread
counts. Set n_gpu_layers 0 on a GPU build for the CPU guarantee.

GPU: `n_gpu_layers` -1 (the default everywhere in mdlite) offloads every layer when llama.cpp was built
with GPU offload (CUDA, Metal, Vulkan, ...; `llama_supports_gpu_offload()`) and keeps all on the CPU
otherwise (`gpu_layers()` resolves it; 0 forces the CPU).

Seeds: path j of a request is drawn with the sampler seed `derive_seed(seed, first_path + j)`; `sample()`
gives prompt p the seed `derive_seed(seed, p)` (or the caller's own per-prompt seed). A path's text
therefore does not depend on how many other paths share its batch, and a later request with
`first_path=k` continues a run of k paths. Temperature 0 is greedy.

Tokens: special-token markers written in a prompt (a chat template's `<|im_start|>`) are special tokens, as in
llama.cpp's server, but the user text of a `Prompt` (mdlite.prompts: the question in the student and teacher
prompts) is plain text, whatever it says; the rest gets the same ids as llama.cpp's tokenizer gives the whole text.

Sequence copies: with `kv_unified` off each sequence is a KV stream of its own, and `llama_memory_seq_cp`
between two of them (the whole stream only) splits in two: the cells' positions and sequence ids are copied
at once, the K/V buffers are queued and copied, in the order queued, at the start of the next
`llama_decode`; `llama_memory_seq_rm` changes the cells' metadata only, never buffer data. So a move
(`_pack`: copy to the lower id, then empty the old one), a prefix-cache hit (`_reuse_prefix`: copy the
cached stream, then cut it after the shared prefix) and a prompt's fan-out to its paths (`_start`) are
complete when the next decode reads them, as long as no decode writes a source stream in between (none
does: copies are queued only between decodes). tests/test_engine.py checks each by the logits' bytes.

Threads: `n_threads` 0 uses the machine's physical cores. The model is opened through mdlite's one door
to llama.cpp (`mdlite/llamacpp.py`: threads, GPU layers, environment, no repacked weights).
"""

from __future__ import annotations

import codecs
import ctypes
import hashlib
import heapq
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from mdlite import MdliteError
from mdlite.llamacpp import gpu_layers, llama_cpp_module, load_model, physical_cores
from mdlite.prompts import Prompt

log = logging.getLogger(__name__)

MIN_PREFIX = 16  # shortest shared prefix worth copying from the prefix cache (tokens)
_CTX_ROUND = 256  # llama.cpp rounds each sequence's KV stream to this many cells

StopAfter = Callable[[str], "int | None"]  # text -> the index just past a complete rationale, or None


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
    """A GGUF loaded once for continuously batched multi-path sampling (see the module docstring).

    `n_ctx`: each sequence's KV cells (its prompt plus max_tokens); 0 sizes them from the requests.
    `max_paths`: the paths decoded together (sequences). `n_gpu_layers` -1: all layers on the GPU when
    llama.cpp has GPU offload, else 0 (see `gpu_layers()`). `n_threads` 0 uses the physical cores.
    `prefix_cache`: prompts whose KV cells are kept for reuse (0: off).
    """

    def __init__(self, model: str | Path, *, n_ctx: int = 0, max_paths: int = 16, n_gpu_layers: int = -1,
                 n_threads: int = 0, n_batch: int = 512, prefix_cache: int = 2) -> None:
        from mdlite.models import model_path

        self.path = model_path(str(model))
        self.n_ctx, self.n_batch, self.prefix_cache = n_ctx, n_batch, prefix_cache
        self.n_threads = n_threads or physical_cores()
        self._llama = llama = llama_cpp_module()
        self.max_paths = min(max_paths, llama.llama_max_parallel_sequences() - prefix_cache, n_batch)
        if self.max_paths < 1:
            raise MdliteError(f"max_paths {max_paths} with prefix_cache {prefix_cache} leaves no sequence to sample "
                              "on; raise max_paths (flag --batch-paths) or lower prefix_cache")
        self.prompt_tokens = self.cached_tokens = 0  # prompt tokens asked for / taken from the prefix cache
        self.steps = self.rows = 0  # decode steps so far, and the paths they decoded (rows per step = rows / steps)
        self.moves = 0  # paths moved to a lower sequence (_pack)
        self.step_s = self.prompt_s = 0.0  # seconds in llama_decode: steps, and prompts (profiling, bench/)
        self.n_gpu_layers = gpu_layers(n_gpu_layers)
        self._model = load_model(self.path, n_gpu_layers=self.n_gpu_layers)
        self._vocab = llama.llama_model_get_vocab(self._model)
        self.n_ctx_train = llama.llama_model_n_ctx_train(self._model)
        self._ctx: Any = None
        self._ctx_cells = 0  # KV cells per sequence of the current context
        self._cached: list[_Cached] = []  # least recently used first
        self._free: list[int] = []  # sequences without a path, a min-heap (see _pack)
        self._waiting: deque[_Request] = deque()
        self._live: list[_Request] = []
        self._cond = threading.Condition()
        self._worker: threading.Thread | None = None
        self._closing = False
        self._stopped = False  # the worker has stopped (closed, or died): nothing queued would be answered
        self._piece = ctypes.create_string_buffer(256)
        self._eog: list[int] | None = None  # end-of-generation tokens, listed on first use
        log.info("loaded %s (%d threads, n_gpu_layers %d)", self.path, self.n_threads, self.n_gpu_layers)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    @property
    def alive(self) -> bool:
        """False once the engine is closed or its worker thread stopped."""
        return not self._closing and not self._stopped

    def close(self) -> None:
        """Fail what is waiting or in flight (MdliteError), stop the worker, free the context and the model. On
        the worker's own thread (a future's done-callback, inside its step) it only tells the worker to stop:
        the worker frees them once the step is done."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._worker is threading.current_thread():
            return
        if self._worker is not None:
            self._worker.join()
        self._free_llama()

    def tokenize(self, text: str) -> list[int]:
        """`text` as tokens, with the model's BOS token when it wants one; special tokens written in the text
        (e.g. a chat template's `<|im_start|>`) become those tokens, as in llama.cpp's server, except in the user
        text of a `Prompt` (mdlite.prompts), which is plain text whatever it says."""
        with self._cond:  # close() frees the model under the lock
            if not self._model:
                raise MdliteError("the engine is closed")
            llama = self._llama
            tokens = [llama.llama_vocab_bos(self._vocab)] if llama.llama_vocab_get_add_bos(self._vocab) else []
            plain = ""  # text not tokenized yet: llama.cpp tokenizes the text between special tokens as one piece
            for i, part in enumerate(text.parts if isinstance(text, Prompt) else [text]):
                markers = {} if i % 2 else self._markers(part)
                pattern = "|".join(map(re.escape, sorted(markers, key=len, reverse=True)))
                for k, piece in enumerate(re.split(f"({pattern})", part) if markers else [part]):
                    if k % 2:
                        tokens += [*self._tokens(plain, special=False), markers[piece]]
                        plain = ""
                    else:
                        plain += piece
            return tokens + self._tokens(plain, special=False)

    def submit(self, prompt: str, *, n: int = 1, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
               max_tokens: int = 256, stop: Sequence[str] = (), stop_after: StopAfter | None = None, seed: int = 0,
               first_path: int = 0, ignore_eos: bool = False) -> Future[list[Generation]]:
        """Queue `n` paths of `prompt`; the future's result is their Generations, in path order.

        `stop`: stop strings. `stop_after`: called with a path's text after each token, it returns the index
        just past a complete answer (the path ends there) or None. `seed`, `first_path`: path j is drawn with
        derive_seed(seed, first_path + j). `top_k` 0 and `top_p` 1 switch those filters off. `ignore_eos`
        bans end-of-generation tokens, so paths end on stop strings or max_tokens only (benchmarks).
        MdliteError (at once) for a prompt that cannot be sampled: empty, too long, or more paths than
        max_paths.
        """
        if max_tokens < 1 or n < 0:
            raise ValueError("max_tokens must be >= 1 and n >= 0")
        tokens = self.tokenize(prompt)
        self._check(tokens, n, max_tokens)
        request = _Request(tokens, n, (temperature, top_p, top_k, ignore_eos), max_tokens, _stop_strings(stop),
                           stop_after, seed, first_path)
        if n == 0:
            request.future.set_result([])
            return request.future
        with self._cond:
            if not self.alive:
                raise MdliteError("the engine is closed" if self._closing else "the engine's worker thread died")
            self._waiting.append(request)
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="mdlite-engine", daemon=True)
                self._worker.start()
            self._cond.notify()
        return request.future

    def sample(self, prompts: Sequence[str], *, n: int | Sequence[int] = 1, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, max_tokens: int = 256,
               stop: Sequence[str] | Sequence[Sequence[str]] = (), seed: int | Sequence[int] = 0,
               first_path: int | Sequence[int] = 0,
               stop_after: StopAfter | Sequence[StopAfter | None] | None = None,
               ignore_eos: bool = False) -> list[list[Generation]]:
        """`n` paths per prompt (an int, or one count per prompt), as result[prompt][path]: every prompt
        submitted, then waited for.

        `stop`: stop strings for every prompt, or one list per prompt. `seed`: one base seed (prompt p gets
        derive_seed(seed, p)) or one per prompt; `first_path` and `stop_after`: one for all prompts or one
        per prompt. The rest as `submit`.
        """
        count = len(prompts)
        counts = _each(n, count, "n")
        seeds = [derive_seed(seed, p) for p in range(count)] if isinstance(seed, int) else _each(seed, count, "seed")
        firsts = _each(first_path, count, "first_path")
        ends = _each(stop_after, count, "stop_after")
        stops = _per_prompt(stop, count)
        futures: list[Future[list[Generation]]] = []
        try:
            for p, prompt in enumerate(prompts):
                futures.append(self.submit(prompt, n=counts[p], temperature=temperature, top_p=top_p, top_k=top_k,
                                           max_tokens=max_tokens, stop=stops[p], stop_after=ends[p], seed=seeds[p],
                                           first_path=firsts[p], ignore_eos=ignore_eos))
            return [future.result() for future in futures]
        finally:
            for future in futures:
                future.cancel()

    # ---- the worker ----

    def _check(self, tokens: list[int], n: int, max_tokens: int) -> None:
        if not tokens:
            raise MdliteError("an empty prompt cannot be sampled from (the model adds no BOS token)")
        cells = len(tokens) + max_tokens
        if cells > self.n_ctx_train:
            raise MdliteError(f"a prompt of {len(tokens)} tokens + max_tokens {max_tokens} exceeds the model's "
                              f"context of {self.n_ctx_train} tokens; shorten the prompt or lower max_tokens")
        if self.n_ctx and cells > self.n_ctx:
            raise MdliteError(f"a prompt of {len(tokens)} tokens + max_tokens {max_tokens} needs {cells} KV cells per "
                              f"path, but n_ctx is {self.n_ctx}; raise n_ctx (flag --num-ctx; 0 sizes it "
                              "automatically) or lower max_tokens")
        if n > self.max_paths:
            raise MdliteError(f"{n} paths of one prompt exceed the engine's {self.max_paths} sequences; sample "
                              "fewer paths or raise batch_paths (flag --batch-paths)")

    def _work(self) -> None:
        """The worker thread: size the context, admit, decode one step, repeat; fail everything left when the
        engine closes or the worker fails (its error handling included), then refuse new requests."""
        batch = self._llama.llama_batch_init(self.n_batch, 0, 1)
        try:
            while True:
                with self._cond:
                    while not self._closing and not self._live and not self._waiting:
                        self._cond.wait()
                    if self._closing:
                        break
                    cells = self._cells_wanted()
                try:
                    if cells:
                        self._resize(cells)
                    with self._cond:
                        admitted = self._admit()
                    self._step(admitted, batch)
                except Exception as error:  # noqa: BLE001 - a llama.cpp failure reaches every caller, none hangs
                    log.error("the engine failed: %s: %s", type(error).__name__, error)
                    failed, self._live = self._live, []
                    for request in failed:
                        request.fail(error)
                    for request in failed:
                        self._release(request)
        finally:
            with self._cond:
                self._stopped = True
                left, self._waiting = [*self._live, *self._waiting], deque()
            for request in left:
                request.fail(MdliteError("the engine was closed before this request was answered" if self._closing
                                         else "the engine's worker thread died"))
            for request in self._live:
                self._release(request)
            self._live = []
            self._llama.llama_batch_free(batch)
            if self._closing:
                self._free_llama()

    def _cells_wanted(self) -> int:
        """(Lock held.) The KV cells per sequence to (re)create the context with before admitting, or 0: none
        yet, or (n_ctx 0) a waiting request longer than the context once nothing is in flight."""
        needed = max((len(r.tokens) + r.max_tokens for r in self._waiting if not r.future.cancelled()), default=0)
        if not needed or (self._ctx and (self.n_ctx or needed <= self._ctx_cells or self._live)):
            return 0
        cells = self.n_ctx or min(needed + needed // 4, self.n_ctx_train)  # headroom for longer prompts
        return -(-cells // _CTX_ROUND) * _CTX_ROUND

    def _resize(self, cells: int) -> None:
        """(Re)create the context without the lock (submit() does not wait for llama.cpp's allocation). If it
        cannot be created, the old one stays: the waiting requests that do not fit it fail (all, without one)."""
        try:
            self._new_context(cells)
        except Exception as error:  # noqa: BLE001 - MdliteError for a NULL context, or what the binding raised
            with self._cond:
                failed = [r for r in self._waiting if len(r.tokens) + r.max_tokens > self._ctx_cells]
                self._waiting = deque(r for r in self._waiting if r not in failed)
            for request in failed:  # (its done-callbacks may submit again)
                request.fail(error)

    def _admit(self) -> list[_Request]:
        """(Lock held.) Move the oldest waiting requests into free sequences while all their paths fit;
        cancelled ones are dropped."""
        admitted = []
        while self._waiting:
            request = self._waiting[0]
            if request.future.cancelled():
                self._waiting.popleft()
                continue
            if len(request.tokens) + request.max_tokens > self._ctx_cells or request.n > len(self._free):
                break  # it waits for free sequences or, with n_ctx 0, for the context to regrow
            self._waiting.popleft()
            request.paths = [_Path(seq=heapq.heappop(self._free), key=(request.seed, request.first_path + j),
                                   stop=request.stop, stop_after=request.stop_after, max_tokens=request.max_tokens)
                             for j in range(request.n)]
            admitted.append(request)
        return admitted

    def _step(self, admitted: list[_Request], batch: Any) -> None:
        """One step of the worker: drop cancelled requests, start the admitted ones, decode one token of every
        live path, then settle what ended."""
        self._drop_cancelled()
        self._live += admitted  # before any starts: a failure below releases them all
        for request in admitted:
            self._start(request, batch)
        self._decode_live(batch)
        self._settle()

    def _drop_cancelled(self) -> None:
        """Release the requests whose futures were cancelled (Future.cancel())."""
        for request in [r for r in self._live if r.future.cancelled()]:
            self._release(request)
            self._live.remove(request)

    def _decode_live(self, batch: Any) -> None:
        """Decode every live path's pending token in one batch (sequence order, consecutive ids: `_pack`) and
        sample each path's next token."""
        live = self._pack()
        if not live:
            return
        for i, path in enumerate(live):
            _put(batch, i, path.pending_token, path.pos, path.seq, logits=True)
        self.step_s += self._decode(batch, len(live))
        self.steps += 1
        self.rows += len(live)
        for i, path in enumerate(live):
            path.pos += 1
            self._sample_token(path, i)

    def _settle(self) -> None:
        """Fail the requests one of whose paths raised, free the sequence of every path that ended, and
        resolve the requests whose paths have all ended."""
        for request in list(self._live):
            if error := next((path.error for path in request.paths if path.error), None):
                log.warning("a request failed: %s: %s", type(error).__name__, error)
                self._live.remove(request)
                self._release(request)
                request.fail(error)
                continue
            for path in request.paths:
                if path.finish_reason:
                    self._free_path(path)
            if all(path.finish_reason for path in request.paths):
                self._live.remove(request)
                request.succeed()

    def _pack(self) -> list[_Path]:
        """The live paths in sequence order, holding consecutive ids: llama.cpp splits a batch into one ubatch
        per run of consecutive sequence ids (its KV streams), each reading all the weights again. A path on
        the highest id moves into the lowest free one (llama.cpp copies its KV stream: the text is the same)."""
        live = sorted((path for request in self._live for path in request.paths if not path.finish_reason),
                      key=lambda path: path.seq)
        mem = self._llama.llama_get_memory(self._ctx)
        moved = []
        with self._cond:
            while live and self._free and self._free[0] < live[-1].seq:
                path = live.pop()
                seq = heapq.heappushpop(self._free, path.seq)
                self._llama.llama_memory_seq_cp(mem, path.seq, seq, -1, -1)
                self._llama.llama_memory_seq_rm(mem, path.seq, -1, -1)
                path.seq = seq
                moved.append(path)
        self.moves += len(moved)
        return sorted(live + moved, key=lambda path: path.seq)

    def _start(self, request: _Request, batch: Any) -> None:
        """Evaluate `request`'s prompt alone on its first sequence (after the cells of its longest cached
        prefix), copy it to the other sequences and the prefix cache, sample every path's first token."""
        llama = self._llama
        prompt, first = request.tokens, request.paths[0].seq
        temperature, top_p, top_k, ignore_eos = request.sampler_params
        for path in request.paths:
            path.sampler = self._sampler(temperature, top_p, top_k, derive_seed(*path.key), ignore_eos=ignore_eos)
        for start in range(self._reuse_prefix(prompt, first), len(prompt), self.n_batch):
            chunk = prompt[start:start + self.n_batch]
            for i, token in enumerate(chunk):
                _put(batch, i, token, start + i, first, logits=start + i == len(prompt) - 1)
            self.prompt_s += self._decode(batch, len(chunk))
        self._remember_prompt(prompt, first)
        mem = llama.llama_get_memory(self._ctx)
        for path in request.paths:
            if path.seq != first:
                llama.llama_memory_seq_cp(mem, first, path.seq, -1, -1)
            path.pos = len(prompt)
            self._sample_token(path, len(chunk) - 1)

    def _release(self, request: _Request) -> None:
        """Free the samplers and sequences that `request`'s paths still hold."""
        for path in request.paths:
            self._free_path(path)

    def _free_path(self, path: _Path) -> None:
        """Free `path`'s sampler and give its sequence back (emptied) to the free ones, once."""
        if path.sampler is not None:
            self._llama.llama_sampler_free(path.sampler)
            path.sampler = None
        if path.seq is not None:
            self._llama.llama_memory_seq_rm(self._llama.llama_get_memory(self._ctx), path.seq, -1, -1)
            with self._cond:
                heapq.heappush(self._free, path.seq)
            path.seq = None

    def _new_context(self, cells: int) -> None:
        """A context of `cells` KV cells per sequence, replacing the old one (freed only once this one exists)."""
        llama = self._llama
        seqs = self.max_paths + self.prefix_cache
        params = llama.llama_context_default_params()
        params.n_ctx, params.n_seq_max, params.kv_unified = cells * seqs, seqs, False
        params.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_ENABLED
        params.type_k = params.type_v = llama.GGML_TYPE_Q8_0
        params.n_batch = params.n_ubatch = self.n_batch
        params.n_threads = params.n_threads_batch = self.n_threads
        ctx = llama.llama_init_from_model(self._model, params)
        if not ctx:
            raise MdliteError(f"llama.cpp could not create a context of {cells} KV cells for each of {seqs} "
                              "sequences; lower n_ctx (flag --num-ctx), max_tokens or batch_paths")
        with self._cond:
            if self._ctx:
                llama.llama_free(self._ctx)
            self._ctx, self._ctx_cells = ctx, cells
            self._cached = [_Cached(seq=i) for i in range(self.prefix_cache)]
            self._free = list(range(self.prefix_cache, seqs))  # sorted, so already a heap
        log.debug("context: %d cells per sequence, %d sequences", cells, seqs)

    def _free_llama(self) -> None:
        """Free the context and the model (once; under the lock, which tokenize() holds)."""
        with self._cond:
            if self._model and self.steps:
                log.info("engine: %d steps, %.1f paths per step, %d moved; %.1f s decoding steps, %.1f s prompts (%d "
                         "of %d prompt tokens from the prefix cache)", self.steps, self.rows / self.steps, self.moves,
                         self.step_s, self.prompt_s, self.cached_tokens, self.prompt_tokens)
            if self._ctx:
                self._llama.llama_free(self._ctx)
                self._ctx = None
            if self._model:
                self._llama.llama_model_free(self._model)
                self._model = None

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
        self._llama.llama_memory_seq_cp(mem, best.seq, seq, -1, -1)  # see "Sequence copies" (module docstring)
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

    def _decode(self, batch: Any, count: int) -> float:
        """Decode the first `count` tokens of `batch`; the seconds it took."""
        batch.n_tokens = count
        started = time.perf_counter()
        status = self._llama.llama_decode(self._ctx, batch)
        if status != 0:
            raise MdliteError(f"llama_decode failed (status {status}) on a batch of {count} tokens "
                              f"with a KV cache of {self._ctx_cells} cells; lower paths or max_tokens")
        return time.perf_counter() - started

    def _markers(self, text: str) -> dict[str, int]:
        """The special tokens written in `text` (those llama.cpp reads only when asked to), by their text."""
        llama, kinds = self._llama, self._llama.LLAMA_TOKEN_ATTR_CONTROL | self._llama.LLAMA_TOKEN_ATTR_UNKNOWN
        return {llama.llama_vocab_get_text(self._vocab, token).decode("utf-8", "replace"): token
                for token in self._tokens(text, special=True) if llama.llama_vocab_get_attr(self._vocab, token) & kinds}

    def _tokens(self, text: str, *, special: bool) -> list[int]:
        """llama.cpp's tokens of `text`, no BOS; `special`: special tokens written in it become those tokens."""
        data = text.encode("utf-8")
        size = len(data) + 8
        for _ in range(2):
            tokens = (self._llama.llama_token * size)()
            count = self._llama.llama_tokenize(self._vocab, data, len(data), tokens, size, False, special)
            if count >= 0:
                return list(tokens[:count])
            size = -count
        raise MdliteError(f"llama.cpp could not tokenize a prompt of {len(data)} bytes")

    def _sample_token(self, path: _Path, row: int) -> None:
        """Sample `path`'s next token from the logits of batch row `row` and add it to the path (`_add_token`).
        What raises there (its stop_after, ...) ends the path with that error: it fails its own request alone."""
        try:
            self._add_token(path, self._llama.llama_sampler_sample(path.sampler, self._ctx, row))
        except Exception as error:  # noqa: BLE001 - one path's failure is its request's, not the batch's
            path.error, path.finish_reason = error, "error"

    def _add_token(self, path: _Path, token: int) -> None:
        """Add `token` to `path`, ending it on end-of-generation, a stop string, its stop_after or its budget."""
        if self._llama.llama_vocab_is_eog(self._vocab, token):
            path.finish(path.decoder.decode(b"", final=True), "stop")
            return
        path.tokens += 1
        path.pending_token = token
        size = self._llama.llama_token_to_piece(self._vocab, token, self._piece, len(self._piece), 0, False)
        if size < 0:
            raise MdliteError(f"token {token} does not fit a {len(self._piece)}-byte piece buffer")
        path.add(path.decoder.decode(self._piece.raw[:size]))
        if not path.finish_reason and path.tokens >= path.max_tokens:
            path.finish(path.decoder.decode(b"", final=True), "length")


@dataclass
class _Cached:
    """A prefix-cache slot: the KV stream `seq` holds the cells of `tokens`."""

    seq: int
    tokens: list[int] = field(default_factory=list)


@dataclass(eq=False)
class _Request:
    """A submitted prompt: its paths' settings, and once admitted, its paths (each holding its sequence)."""

    tokens: list[int]
    n: int
    sampler_params: tuple[float, float, int, bool]  # temperature, top_p, top_k, ignore_eos
    max_tokens: int
    stop: list[str]
    stop_after: StopAfter | None
    seed: int
    first_path: int
    future: Future[list[Generation]] = field(default_factory=Future)
    paths: list[_Path] = field(default_factory=list)

    def succeed(self) -> None:
        if self.future.set_running_or_notify_cancel():
            self.future.set_result([Generation(p.text, p.tokens, p.finish_reason) for p in self.paths])

    def fail(self, error: BaseException) -> None:
        if self.future.set_running_or_notify_cancel():
            self.future.set_exception(error)


class _Path:
    """One path being generated. It is the one owner of its sequence id (`seq`, None once given back), which
    `_pack` may change; `pending_token` is the token sampled last, which the next step decodes at `pos`."""

    def __init__(self, *, seq: int, stop: list[str], stop_after: StopAfter | None = None, max_tokens: int = 256,
                 key: tuple[int, int] = (0, 0)) -> None:
        self.seq: int | None = seq
        self.sampler: Any = None  # its sampler chain, from _start until it ends
        self.stop, self.stop_after, self.max_tokens = stop, stop_after, max_tokens
        self.key = key  # (the request's seed, the path's number): which draw this is
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")
        self.text = ""
        self.tokens = self.pos = self.pending_token = 0
        self.finish_reason = ""
        self.error: Exception | None = None  # what raised while it was handled (its request fails with it)
        self._longest_stop = max(map(len, stop), default=0)

    def add(self, piece: str) -> None:
        """Append decoded text; end the path at the earliest stop string in the new tail, else where its
        `stop_after` says the text is complete."""
        start = max(0, len(self.text) - self._longest_stop + 1)
        self.text += piece
        found = [i for s in self.stop if (i := self.text.find(s, start)) >= 0]
        if found:
            self.text = self.text[:min(found)]
            self.finish_reason = "stop"
        elif self.stop_after and (cut := self.stop_after(self.text)) is not None:
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


def _each(value: Any, count: int, name: str) -> list[Any]:
    """`value` repeated `count` times, or `value` itself when it is a sequence of `count` entries."""
    if isinstance(value, (int, float)) or value is None or callable(value):
        return [value] * count
    if len(value) != count:
        raise ValueError(f"{name} must be one value or have one entry per prompt")
    return list(value)


def _per_prompt(stop: Sequence[str] | Sequence[Sequence[str]], count: int) -> list[list[str]]:
    if all(isinstance(item, str) for item in stop):
        return [_stop_strings(stop)] * count  # type: ignore[arg-type]
    if len(stop) != count:
        raise ValueError("stop must be a list of strings or one list of strings per prompt")
    return [_stop_strings(item) for item in stop]


def _stop_strings(stop: Sequence[str]) -> list[str]:
    """`stop` as a list; ValueError for a bare string (each of its characters would stop) or an empty stop string
    (it would cut after the first character)."""
    if isinstance(stop, str) or not all(isinstance(item, str) and item for item in stop):
        raise ValueError(f"stop must be a list of non-empty strings, not {stop!r}")
    return list(stop)
