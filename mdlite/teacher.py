"""Teacher backends behind one small interface: Ollama, any OpenAI-compatible server, or a GGUF in-process.

    mdlite teach --teacher ollama:qwen2.5:32b --endpoints http://gpu1:11434 --endpoints http://gpu2:11434
    mdlite teach --teacher openai:http://127.0.0.1:8080/v1#qwen2.5-32b --concurrency 4
    mdlite teach --teacher llamacpp:qwen2.5-coder-0.5b-instruct

Teacher specs (`parse_teacher_spec`):
- `ollama:MODEL` - an Ollama server (the `ollama` client, /api/generate with raw=True so the few-shot
  text is sent as is); host from `endpoints`, else `$OLLAMA_HOST`, else 127.0.0.1:11434.
- `openai:BASE_URL[#MODEL]` - an OpenAI-compatible `/v1/completions` (llama.cpp's server, vLLM,
  LM Studio, Ollama's /v1); `openai-chat:BASE_URL[#MODEL]` uses `/v1/chat/completions` instead, with
  the prompt as one user message and the code-fence stops left out (a chat reply opens its own fence).
  MODEL defaults to the server's first listed model; `$OPENAI_API_KEY` is sent when set. A server whose
  /v1/models says `owned_by: "mdlite"` (`mdlite serve`, which votes over many paths per request) is asked
  for `paths: 1` and `mode: STYLE`, and the completion is that one path's text from the reply's `mdlite`
  field: each completion is one sampled path, as from any other server.
- `llamacpp:PATH_OR_REGISTRY_NAME` - a GGUF loaded in this process on mdlite's continuously batching
  engine (mdlite.engine, prefix cache included): each request is submitted as it comes and decoded with
  up to `batch_paths` other paths (whatever `concurrency` says); the context is `num_ctx` cells per path,
  allocated once, and a prompt that does not fit fails alone. Sampling: top_k 40,
  top_p 0.95 (llama.cpp's defaults); a request's seed gives the same text whatever it is batched with
  (on CPU; with layers on a GPU, the default when llama.cpp has GPU offload, see mdlite/engine.py).

`make_teacher(spec, endpoint=...)` builds one endpoint's backend; `TeacherPool` spreads requests over
several endpoints of one teacher with a bounded number in flight per endpoint, and retries timeouts,
connection errors, 429 and 5xx (503 "busy" included) with exponential backoff and full jitter.
`mdlite eval` evaluates teachers through the same pool.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

from mdlite import MdliteError
from mdlite.engine import StopAfter
from mdlite.prompts import STOP_AFTER

log = logging.getLogger(__name__)

BACKENDS = ("ollama", "openai", "openai-chat", "llamacpp")


@dataclass(frozen=True)
class TeacherSpec:
    """A parsed teacher spec: backend, model name (or GGUF path / registry name) and base URL."""

    backend: str
    model: str
    url: str | None = None


@dataclass(frozen=True)
class Completion:
    """One sampled completion. `server_s` is the server's own generation time when it reports one."""

    text: str
    tokens: int
    latency_s: float
    finish_reason: str | None = None
    server_s: float | None = None


class TeacherError(Exception):
    """A request that failed; `retryable` for timeouts, connection errors, 429 and 5xx."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class Teacher(Protocol):
    """One endpoint of a teacher."""

    name: str  # the spec, e.g. "ollama:qwen2.5:32b"
    endpoint: str  # where the requests go, for messages
    max_concurrency: int | None  # None: as many as the caller allows

    async def check(self) -> str | None:
        """Reachable and serving the model (MdliteError if not); the model digest when known."""
        ...

    async def complete(self, prompt: str, *, n: int = 1, temperature: float, max_tokens: int, stop: list[str],
                       seed: int | None = None, stop_after: StopAfter | None = None) -> list[Completion]:
        """`n` completions of `prompt`; sample j uses seed `seed + j`; a completion ends where `stop_after` (given
        the text so far, the index where it is complete or None) cuts it (servers: cut afterwards).
        TeacherError on failure."""
        ...

    async def aclose(self) -> None:
        ...


def parse_teacher_spec(spec: str) -> TeacherSpec:
    """`ollama:MODEL`, `openai:BASE_URL[#MODEL]`, `openai-chat:BASE_URL[#MODEL]` or `llamacpp:PATH_OR_NAME`."""
    backend, _, rest = spec.partition(":")
    fix = ("write it as ollama:MODEL, openai:http://HOST:PORT/v1#MODEL or llamacpp:PATH_OR_REGISTRY_NAME "
           "(flag --teacher)")
    if backend not in BACKENDS or not rest:
        raise MdliteError(f"teacher {spec!r}: unknown backend {backend!r}; {fix}" if backend not in BACKENDS
                          else f"teacher {spec!r}: no model given; {fix}")
    if backend.startswith("openai"):
        url, _, model = rest.partition("#")
        if not url.startswith(("http://", "https://")):
            raise MdliteError(f"teacher {spec!r}: {backend} needs a base URL such as http://127.0.0.1:8080/v1; {fix}")
        return TeacherSpec(backend, model, url.rstrip("/"))
    return TeacherSpec(backend, rest)


def make_teacher(spec: str, *, endpoint: str | None = None, num_ctx: int = 2048, keep_alive: str = "30m",
                 timeout_s: float = 300.0, n_threads: int = 0, n_gpu_layers: int = -1) -> Teacher:
    """The backend for one endpoint of `spec`; `endpoint` replaces the spec's host / base URL.

    `num_ctx`: context window (Ollama option, llama.cpp n_ctx); `keep_alive`: how long Ollama keeps the
    model loaded; `timeout_s`: per request; `n_threads`: llamacpp threads (0: the physical cores);
    `n_gpu_layers`: llamacpp layers on the GPU (-1: all when llama.cpp has GPU offload; 0: CPU only).
    """
    parsed = parse_teacher_spec(spec)
    if parsed.backend == "ollama":
        return OllamaTeacher(spec, parsed.model, host=endpoint, num_ctx=num_ctx, keep_alive=keep_alive,
                             timeout_s=timeout_s)
    if parsed.backend.startswith("openai"):
        return OpenAITeacher(spec, parsed.model, url=(endpoint or parsed.url or "").rstrip("/"),
                             chat=parsed.backend == "openai-chat", timeout_s=timeout_s)
    if endpoint:
        raise MdliteError(f"teacher {spec!r} runs in-process; drop --endpoints")
    return LlamaCppTeacher(spec, parsed.model, num_ctx=num_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers)


class TeacherPool:
    """The endpoints of one teacher: up to `concurrency` requests in flight per endpoint (an in-process
    teacher: twice its `batch_paths`, so that a finished path's place is taken at once), each request on
    the first free endpoint, retryable failures retried `retries` times after a random delay in
    [0, min(max_backoff_s, backoff_s * 2**attempt)] (full jitter)."""

    def __init__(self, teachers: list[Teacher], *, concurrency: int = 1, retries: int = 4, backoff_s: float = 1.0,
                 max_backoff_s: float = 30.0) -> None:
        self.teachers = teachers
        self.retries, self.backoff_s, self.max_backoff_s = retries, backoff_s, max_backoff_s
        slots = [2 * t.batch_paths if isinstance(t, LlamaCppTeacher)
                 else min(concurrency, t.max_concurrency or concurrency) for t in teachers]
        self.slots = sum(slots)
        self._free: asyncio.Queue[Teacher] = asyncio.Queue()
        for teacher, count in zip(teachers, slots, strict=True):
            for _ in range(count):
                self._free.put_nowait(teacher)
        self._rng = random.Random()

    async def check(self) -> str | None:
        """Check every endpoint (MdliteError naming the first bad one); the model digest when known."""
        digests = await asyncio.gather(*(t.check() for t in self.teachers))
        if len(set(digests)) > 1:
            log.warning("endpoints serve different model files: %s",
                        ", ".join(f"{t.endpoint}={d}" for t, d in zip(self.teachers, digests, strict=True)))
        return digests[0]

    async def complete(self, prompt: str, *, n: int = 1, temperature: float, max_tokens: int, stop: list[str],
                       seed: int | None = None, stop_after: StopAfter | None = None) -> list[Completion]:
        """`Teacher.complete` on a free endpoint, retried on retryable errors; TeacherError once out of retries."""
        attempt = 0
        while True:
            teacher = await self._free.get()
            try:
                return await teacher.complete(prompt, n=n, temperature=temperature, max_tokens=max_tokens,
                                              stop=stop, seed=seed, stop_after=stop_after)
            except TeacherError as error:
                if not error.retryable or attempt == self.retries:
                    raise
                delay = self._rng.uniform(0, min(self.max_backoff_s, self.backoff_s * 2**attempt))
                log.info("%s: %s; retry %d/%d in %.2f s", teacher.endpoint, error, attempt + 1, self.retries, delay)
            finally:
                self._free.put_nowait(teacher)
            attempt += 1
            await asyncio.sleep(delay)

    async def aclose(self) -> None:
        await asyncio.gather(*(t.aclose() for t in self.teachers))


def make_pool(spec: str, *, endpoints: list[str] | None = None, concurrency: int = 1, retries: int = 4,
              backoff_s: float = 1.0, **teacher_options: Any) -> TeacherPool:
    """A TeacherPool over `endpoints` (empty: the spec's own endpoint); options as in `make_teacher`."""
    teachers = [make_teacher(spec, endpoint=e, **teacher_options) for e in (endpoints or [None])]
    return TeacherPool(teachers, concurrency=concurrency, retries=retries, backoff_s=backoff_s)


# ---- Ollama -------------------------------------------------------------------------------------


class OllamaTeacher:
    """An Ollama server through the `ollama` client's AsyncClient; raw /api/generate requests."""

    max_concurrency = None

    def __init__(self, name: str, model: str, *, host: str | None, num_ctx: int, keep_alive: str,
                 timeout_s: float) -> None:
        import httpx
        import ollama

        self.name, self.model, self.num_ctx = name, model, num_ctx
        # Ollama reads a string as a Go duration ("30m") and a number as seconds: send "-1" or "300" as numbers.
        self.keep_alive: str | float = keep_alive if keep_alive[-1:].isalpha() else float(keep_alive)
        self.endpoint = host or os.environ.get("OLLAMA_HOST") or "http://127.0.0.1:11434"
        self._client = ollama.AsyncClient(host=self.endpoint, timeout=httpx.Timeout(timeout_s, connect=10.0))

    async def check(self) -> str | None:
        try:
            listing = await self._client.list()
        except Exception as error:  # noqa: BLE001 - any failure here means the server is not usable
            raise MdliteError(f"cannot reach Ollama at {self.endpoint} ({_describe(error)}); start it with "
                              "`ollama serve`, or point --endpoints / $OLLAMA_HOST at it") from None
        wanted = self.model if ":" in self.model else f"{self.model}:latest"
        for model in listing.models:
            if model.model in (self.model, wanted):
                return model.digest
        raise MdliteError(f"model {self.model!r} is not on the Ollama server at {self.endpoint}; "
                          f"run `ollama pull {self.model}` there (flag --teacher)")

    async def complete(self, prompt: str, *, n: int = 1, temperature: float, max_tokens: int, stop: list[str],
                       seed: int | None = None, stop_after: StopAfter | None = None) -> list[Completion]:
        completions = []
        for j in range(n):
            options = {"temperature": temperature, "num_predict": max_tokens, "num_ctx": self.num_ctx, "stop": stop}
            if seed is not None:
                options["seed"] = seed + j
            start = time.perf_counter()
            try:
                response = await self._client.generate(model=self.model, prompt=prompt, raw=True, stream=False,
                                                       options=options, keep_alive=self.keep_alive)
            except Exception as error:  # noqa: BLE001 - classified below
                raise _teacher_error(error, self.endpoint) from error
            completions.append(Completion(
                text=cut_after(response.response or "", stop_after), tokens=response.eval_count or 0,
                latency_s=time.perf_counter() - start, finish_reason=response.done_reason,
                server_s=response.total_duration / 1e9 if response.total_duration else None))
        return completions

    async def aclose(self) -> None:
        await self._client.close()


# ---- OpenAI-compatible ----------------------------------------------------------------------------


class OpenAITeacher:
    """An OpenAI-compatible server's /v1/completions (or /v1/chat/completions) through httpx."""

    max_concurrency = None

    def __init__(self, name: str, model: str, *, url: str, chat: bool, timeout_s: float) -> None:
        import httpx

        self.name, self.model, self.chat, self.endpoint = name, model, chat, url
        self.mdlite = False  # the server is `mdlite serve` (its /v1/models says owned_by: mdlite)
        key = os.environ.get("OPENAI_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._client = httpx.AsyncClient(base_url=url + "/", headers=headers,
                                         timeout=httpx.Timeout(timeout_s, connect=10.0))

    async def check(self) -> str | None:
        try:
            listing = (await self._post_or_get("GET", "models"))["data"]
        except TeacherError as error:
            raise MdliteError(f"cannot list models at {self.endpoint}/models ({error}); start the server or fix "
                              "the URL in --teacher / --endpoints") from None
        ids = [entry.get("id") for entry in listing]
        if not self.model:
            if not ids:
                raise MdliteError(f"{self.endpoint} lists no models; name one as --teacher {self.name}#MODEL")
            self.model = ids[0]
        elif self.model not in ids:
            log.warning("%s does not list model %r (it lists %s)", self.endpoint, self.model, ids)
        self.mdlite = any(entry.get("id") == self.model and entry.get("owned_by") == "mdlite" for entry in listing)
        return None

    async def complete(self, prompt: str, *, n: int = 1, temperature: float, max_tokens: int, stop: list[str],
                       seed: int | None = None, stop_after: StopAfter | None = None) -> list[Completion]:
        completions = []
        for j in range(n):
            body: dict[str, Any] = {"model": self.model, "max_tokens": max_tokens, "temperature": temperature}
            if seed is not None:
                body["seed"] = seed + j
            if self.mdlite:  # one path (of the style whose stop_after eval and teach pass), not a vote over many
                body["paths"] = 1
                for style, pattern in STOP_AFTER.items():
                    if pattern == stop_after:
                        body["mode"] = style
            if self.chat:
                body["messages"] = [{"role": "user", "content": prompt}]
                body["stop"] = [s for s in stop if "```" not in s]
            else:
                body["prompt"], body["stop"] = prompt, stop
            start = time.perf_counter()
            reply = await self._post_or_get("POST", "chat/completions" if self.chat else "completions", body)
            choice = reply["choices"][0]
            text = choice["message"]["content"] if self.chat else choice["text"]
            if self.mdlite:  # the path as sampled (the content is the vote's rationale, rewritten)
                [path] = reply["mdlite"]["paths"]
                text, choice = path["text"], {"finish_reason": path["finish_reason"]}
            timings = reply.get("timings") or {}  # llama.cpp's llama-server reports these
            server_ms = timings.get("prompt_ms", 0) + timings.get("predicted_ms", 0)
            completions.append(Completion(
                text=cut_after(text or "", stop_after), tokens=(reply.get("usage") or {}).get("completion_tokens", 0),
                latency_s=time.perf_counter() - start, finish_reason=choice.get("finish_reason"),
                server_s=server_ms / 1000 if server_ms else None))
        return completions

    async def _post_or_get(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            response = await self._client.request(method, path, json=body)
        except Exception as error:  # noqa: BLE001 - classified below
            raise _teacher_error(error, self.endpoint) from error
        if response.status_code >= 400:
            retryable = response.status_code == 429 or response.status_code >= 500
            raise TeacherError(f"HTTP {response.status_code} from {self.endpoint}/{path}: {response.text[:200]}",
                               retryable=retryable)
        return response.json()

    async def aclose(self) -> None:
        await self._client.aclose()


# ---- llama.cpp in-process -----------------------------------------------------------------------


class LlamaCppTeacher:
    """A GGUF in this process on mdlite's continuously batching engine (every layer on the GPU when llama.cpp
    was built with GPU offload, as the engine's default): each request is submitted as it comes, and the
    engine decodes up to `batch_paths` paths together, a finished path's place taken by the next waiting
    one. The context is sized once to `num_ctx` cells per path: a prompt that does not fit fails alone. An engine
    failure is a TeacherError, retryable while the engine still runs; once closed, requests get a TeacherError."""

    max_concurrency = None

    def __init__(self, name: str, model: str, *, num_ctx: int, n_threads: int, n_gpu_layers: int = -1,
                 batch_paths: int = 16) -> None:
        self.name, self.model, self.num_ctx, self.n_threads = name, model, num_ctx, n_threads
        self.n_gpu_layers, self.batch_paths = n_gpu_layers, batch_paths
        self.endpoint = f"in-process {model}"
        self._engine: Any = None
        self._closed = False
        self._lock = threading.Lock()

    async def check(self) -> str | None:
        return await asyncio.to_thread(self._load)

    async def complete(self, prompt: str, *, n: int = 1, temperature: float, max_tokens: int, stop: list[str],
                       seed: int | None = None, stop_after: StopAfter | None = None) -> list[Completion]:
        engine = self._engine or await asyncio.to_thread(self._load_engine)
        start = time.perf_counter()
        try:
            future = engine.submit(prompt, n=n, temperature=temperature, top_k=40, top_p=0.95, max_tokens=max_tokens,
                                   stop=stop, stop_after=stop_after,
                                   seed=random.getrandbits(31) if seed is None else seed)
        except (MdliteError, ValueError) as error:  # this prompt cannot be sampled (too long for num_ctx, ...)
            raise TeacherError(f"{self.endpoint}: {error}", retryable=False) from None
        try:
            generations = await asyncio.wrap_future(future)  # cancelling this call drops its paths
        except Exception as error:  # noqa: BLE001 - the engine failed: retryable while it still runs
            raise TeacherError(f"{self.endpoint}: {_describe(error)}", retryable=engine.alive) from error
        latency = time.perf_counter() - start
        return [Completion(text=g.text, tokens=g.tokens, latency_s=latency, finish_reason=g.finish_reason)
                for g in generations]

    async def aclose(self) -> None:
        await asyncio.to_thread(self._close)  # the engine's worker finishes its step off the event loop

    def _load(self) -> str | None:
        from mdlite.models import registry

        self._load_engine()
        card = registry().get(self.model)
        return card.gguf.get("sha256") if card and card.gguf else None

    def _load_engine(self) -> Any:
        """The engine, loaded on first use; TeacherError once the teacher is closed."""
        from mdlite.engine import Engine

        with self._lock:
            if self._closed:
                raise TeacherError(f"{self.endpoint}: the teacher is closed", retryable=False)
            if self._engine is None:
                self._engine = Engine(self.model, n_ctx=self.num_ctx, max_paths=self.batch_paths,
                                      n_gpu_layers=self.n_gpu_layers, n_threads=self.n_threads)
            return self._engine

    def _close(self) -> None:
        with self._lock:
            self._closed = True
            if self._engine is not None:
                self._engine.close()
                self._engine = None


def cut_after(text: str, stop_after: StopAfter | None) -> str:
    """`text` up to where `stop_after` says it is complete (all of it when it is not)."""
    cut = stop_after(text) if stop_after else None
    return text if cut is None else text[:cut]


# ---- helpers ------------------------------------------------------------------------------------


def _teacher_error(error: Exception, endpoint: str) -> TeacherError:
    """A client exception as a TeacherError: network trouble, timeouts, 429 and 5xx are retryable."""
    import httpx

    code = getattr(error, "status_code", None)  # ollama.ResponseError
    if isinstance(code, int):
        return TeacherError(f"HTTP {code} from {endpoint}: {str(error)[:200]}", retryable=code == 429 or code >= 500)
    retryable = isinstance(error, (httpx.TransportError, ConnectionError, TimeoutError))
    return TeacherError(f"{endpoint}: {_describe(error)}", retryable=retryable)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
