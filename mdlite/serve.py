"""An OpenAI-compatible server whose replies are voted CoT + PoT answers from one GGUF.

    mdlite serve --model runs/export/student-Q4_K_M.gguf --port 8000 --mode mixed --paths 10
    curl -s http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"messages": [{"role": "user", "content": "Tom has 3 apples and buys 5 more. How many?"}]}'

Endpoints: POST /v1/chat/completions (the question: the last user message), POST /v1/completions (the
question: `prompt`; a prompt written in the student template, as `mdlite eval --prompt-style student`
sends it, is read back to its question, and its style is the default mode), GET /v1/models (one model,
`owned_by: "mdlite"`: how `mdlite eval` knows it talks to mdlite), GET /health (503 while the model loads,
while shutting down, or when the engine's worker thread died).
A question is solved exactly as `mdlite solve` solves it (mdlite.solve's `Question`, `submit_round`,
`take_round`, `finish`, in `solve_one`): the same prompts, seeds (from the request's `seed` and the question's text),
rounds and vote, so a request gives the answer `mdlite solve` gives with the same settings and seed.

Request fields: the OpenAI ones `model` (any name), `messages` / `prompt`, `temperature` (0-2), `top_p`,
`max_tokens` (chat also `max_completion_tokens`; capped at the server's), `seed` (none: a fresh random one,
reported in the reply), `n` (1 only), `stream`, `stream_options` (`include_usage`); accepted and unused:
`stop` (the template's own stop strings apply), `user`, `metadata`, `service_tier`, `parallel_tool_calls`,
and NEUTRAL's fields at their neutral value (`presence_penalty: 0`, `logprobs: false`, `tools: []`, ...;
another value would change the meaning and is a 400). mdlite's own: `paths` (1..max_paths), `mode` (cot,
pot, mixed, hybrid) and `program_stdout` (true: each PoT path's printed output in the reply; off by default,
as it is a channel out of the sandbox). A message has `role`, `content` and `name`, and may carry back
REPLY_FIELDS (what the openai SDK's `message.model_dump()` of a reply holds: `refusal`, `annotations`, ...);
of those, ACTIONS (`tool_calls`, `function_call`, `audio`) only while null or empty. Any other field,
malformed or deeply nested JSON, a lone surrogate escape ("\\ud800"), an integer past Python's digit limit, an
empty question or one over max_prompt_tokens is a 400 with an OpenAI-style `{"error": {"message", "type",
"param", "code"}}` body; a failure of the server's own (the engine, the sandbox) is a 503 or 500.

Reply: choice 0's content is the winning rationale (the first path, PoT paths before CoT as in the
vote's tie rule, whose answer is the voted one; a program in a fenced block) ending in "The answer is
N."; the `mdlite` field holds the `Solution` as `mdlite solve --json` writes it (every path's style,
text, answer, program, program error and, when asked, output; the vote's tallies), plus the mode, seed,
paths and temperature used and `winner` (the winning path's position in `paths`, None when no path
answered). `usage.prompt_tokens` counts each sampled style's prompt once (its paths share its KV cells,
as OpenAI counts a prompt once for n > 1); `completion_tokens` every path's tokens.
With `stream: true` the reply is Server-Sent Events in OpenAI's chunk format: (chat) a chunk with the
assistant role at once, ": keep-alive" comments every KEEP_ALIVE_S while the vote runs, the content a line
per chunk (the same text as without streaming), a chunk with `finish_reason` and the `mdlite` field, with
`stream_options.include_usage` a chunk with `usage` and no choices, then `data: [DONE]`. An error after the
stream began is an `event: error` whose data is the error body (the openai client raises it).

Callers: a POST must be `Content-Type: application/json` (415), so that a web page cannot send one without
a CORS preflight; a request with an `Origin` header (a browser's) is refused (403) unless that origin is in
allowed_origins (`*`: any; those also get CORS headers); a `Host` header other than an IP address,
localhost, the --host name or one of allowed_hosts is refused (403), which defeats DNS rebinding. With an
API key, /v1/* need `Authorization: Bearer KEY`; `run` refuses a --host beyond loopback without one unless
insecure_no_key. A client gets read_timeout_s to send a request's headers (else its connection is closed)
and again its body (408); at most limit_concurrency connections and requests at once (uvicorn's 503 past it).

Batching: the engine batches continuously (mdlite/engine.py): a request's paths join the paths being decoded
at the engine's next step, up to batch_paths together, and a finished path's place goes to the next waiting
one, whatever request it belongs to; paths of different requests and sampling settings share steps. Path j of
a question's style has the same seed in any batch, and the engine's batch invariance makes its text the same
too. At most queue_size requests are admitted at once; more get 503 with Retry-After (the recent time per
request). Each admitted request is one task (`Scheduler.submit`); cancelling it, as a client's disconnect
does, drops its paths at the engine's next decode step.
Ctrl-C / SIGTERM: the server stops accepting connections, lets the requests in flight finish for up to
shutdown_timeout_s (uvicorn's graceful shutdown), then cancels the rest, closes the engine and exits 0 (a
second Ctrl-C quits at once).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import math
import os
import random
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mdlite import MdliteError
from mdlite.answers import answers_match, extract_answer, format_number
from mdlite.config import ServeConfig
from mdlite.prompts import STUDENT_DIRECTIVES, Prompt, prompt_text
from mdlite.solve import Question, Solution, prompt_for, solve_one
from mdlite.vote import MODES

log = logging.getLogger(__name__)

# OpenAI fields that change nothing here at their neutral value (or null): accepted; another value is a 400.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (0,), "frequency_penalty": (0,), "logprobs": (False,), "top_logprobs": (0,),
    "logit_bias": ({},), "tools": ([],), "tool_choice": ("none", "auto"), "response_format": ({"type": "text"},),
    "store": (False,), "echo": (False,), "best_of": (1,), "suffix": ("",)}
IGNORED = {"stop", "user", "metadata", "service_tier", "parallel_tool_calls"}  # accepted with any value, unused
COMMON_FIELDS = {"model", "temperature", "top_p", "max_tokens", "seed", "n", "stream", "stream_options", "paths",
                 "mode", "program_stdout"} | IGNORED | set(NEUTRAL)
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt"}
MESSAGE_FIELDS = {"role", "content", "name"}
REPLY_FIELDS = ("refusal", "annotations", "tool_calls", "function_call", "audio")  # a past reply's, sent back
ACTIONS = ("tool_calls", "function_call", "audio")  # of those, what mdlite cannot honour unless null or empty
TICK_S = 0.25  # how often a waiting request checks its client and the engine's worker
KEEP_ALIVE_S = 5.0  # seconds between SSE keep-alive comments while a streamed request's vote runs


def run(cfg: ServeConfig, *, on_ready: Callable[[str], None] | None = None) -> None:
    """Serve cfg.model until Ctrl-C / SIGTERM: listen at once (/health says loading), load the model on a daemon
    thread (a SIGTERM meanwhile exits at once), then `on_ready(base_url)`. MdliteError for an unsafe --host, a
    missing model or one that does not load or fit."""
    import uvicorn

    from mdlite.engine import Engine
    from mdlite.models import model_path

    if not (cfg.api_key or os.environ.get("MDLITE_API_KEY")) and not cfg.insecure_no_key and not _loopback(cfg.host):
        raise MdliteError(f"--host {cfg.host} lets other machines reach the server and no API key is set; set "
                          "--api-key KEY (or $MDLITE_API_KEY), or pass --insecure-no-key to serve anyone who can "
                          "reach the port")
    path = model_path(cfg.model)
    sock = bind(cfg.host, cfg.port)
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"
    failed: list[BaseException] = []

    def load() -> Any:
        _log_isolation()
        engine = Engine(path, n_ctx=cfg.num_ctx, max_paths=cfg.batch_paths, n_gpu_layers=cfg.n_gpu_layers,
                        n_threads=cfg.n_threads, prefix_cache=cfg.prefix_cache)
        try:
            check_context(engine, cfg)
        except MdliteError:
            engine.close()
            raise
        return engine

    def fail(error: BaseException) -> None:
        failed.append(error)
        server.should_exit = True

    app = create_app(cfg, load, on_ready=(lambda: on_ready(url)) if on_ready else None, on_fail=fail)
    server = uvicorn.Server(server_config(app, cfg))
    log.info("listening at %s; loading %s", url, path)
    main = threading.current_thread() is threading.main_thread()
    # uvicorn raises a SIGTERM again once its graceful shutdown is done; by then nothing is left to do: exit 0
    previous = signal.signal(signal.SIGTERM, lambda *_: log.info("shut down")) if main else None
    try:
        server.run(sockets=[sock])
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
        sock.close()
        if app.state.engine is not None:
            app.state.engine.close()  # after a forced exit the lifespan did not close it (closing twice is harmless)
    if failed:
        raise failed[0]


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port, or MdliteError naming the flag to change."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise MdliteError(f"cannot resolve host {host!r} ({error.strerror}); give an address such as "
                          "127.0.0.1 (flag --host)") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as error:
        sock.close()
        raise MdliteError(f"cannot listen on {host}:{port} ({error.strerror}); choose another --port "
                          "or --host") from None
    sock.setblocking(False)
    return sock


def server_config(app: Any, cfg: ServeConfig) -> Any:
    """uvicorn's settings for `app`: h11 with a deadline on each request's headers, limit_concurrency, and the
    shutdown timeout."""
    import uvicorn

    return uvicorn.Config(app, http=_header_deadline(cfg.read_timeout_s), log_config=None, lifespan="on",
                          limit_concurrency=cfg.limit_concurrency,
                          timeout_graceful_shutdown=cfg.shutdown_timeout_s)  # type: ignore[arg-type]


def check_context(engine: Any, cfg: ServeConfig) -> None:
    """MdliteError unless the longest request (the longer style's prompt around a max_prompt_tokens question, plus
    max_tokens) fits each path's context: then no request can make the engine fail, and what fails is the server's."""
    template = max(len(engine.tokenize(prompt_for("", style, prompt_style=cfg.prompt_style)[0]))
                   for style in ("cot", "pot"))
    need, limit = template + cfg.max_prompt_tokens + cfg.max_tokens, cfg.num_ctx or engine.n_ctx_train
    if need > limit:
        raise MdliteError(f"the longest request needs {need} tokens per path (a {template}-token prompt template + "
                          f"--max-prompt-tokens {cfg.max_prompt_tokens} + --max-tokens {cfg.max_tokens}), over the "
                          f"context of {limit} ({'--num-ctx' if cfg.num_ctx else 'the model'}); lower "
                          "--max-prompt-tokens or --max-tokens")


def create_app(cfg: ServeConfig, load_engine: Callable[[], Any], *, api_key: str | None = None,
               on_ready: Callable[[], None] | None = None,
               on_fail: Callable[[BaseException], None] | None = None) -> Any:
    """The FastAPI app serving the engine `load_engine()` returns (an Engine, or anything with its `sample` and
    `tokenize`); its lifespan loads it in the background, then starts the worker thread (`app.state.scheduler`,
    None until then) and calls `on_ready()`, or `on_fail(error)` if loading fails. `api_key` None: cfg.api_key,
    else $MDLITE_API_KEY."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException
    from starlette.middleware.cors import CORSMiddleware

    key = (cfg.api_key or os.environ.get("MDLITE_API_KEY", "")) if api_key is None else api_key
    model_id = Path(cfg.model).name.removesuffix(".gguf") or "mdlite"
    hosts = {"localhost", cfg.host.lower(), *(h.lower() for h in cfg.allowed_hosts)}
    origins = [o.rstrip("/") for o in cfg.allowed_origins]
    started = int(time.time())

    async def load() -> None:
        try:
            engine = await _in_daemon_thread(load_engine)
        except Exception as error:  # noqa: BLE001 - reported to the caller, or logged
            app.state.failed = f"{type(error).__name__}: {error}"
            if on_fail:
                on_fail(error)
            else:
                log.error("cannot load %s: %s", cfg.model, app.state.failed)
            return
        app.state.engine, app.state.scheduler = engine, Scheduler(engine, cfg)
        log.info("serving %s (%s, %d paths by default)", model_id, cfg.mode, cfg.paths)
        if on_ready:
            on_ready()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(load())
        try:
            yield
        finally:
            loading.cancel()
            if app.state.scheduler is not None:
                await app.state.scheduler.stop()

    app = FastAPI(title="mdlite serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = app.state.scheduler = app.state.failed = None
    if origins:  # answer those origins' CORS preflights; other origins are refused in _check_caller
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.exception_handler(_HttpError)
    async def http_error(request: Request, error: _HttpError) -> JSONResponse:
        return _error_response(error)

    @app.exception_handler(HTTPException)
    async def starlette_error(request: Request, error: HTTPException) -> JSONResponse:
        message = f"no route {request.method} {request.url.path}; routes: POST /v1/chat/completions, " \
                  "POST /v1/completions, GET /v1/models, GET /health" if error.status_code in (404, 405) \
            else str(error.detail)
        return _error_response(_HttpError(error.status_code, message, code="not_found"))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        log.exception("request to %s failed", request.url.path)
        return _error_response(_HttpError(500, f"internal error: {type(error).__name__}: {error}",
                                          kind="server_error"))

    def ready() -> Scheduler:
        if app.state.scheduler is None:
            raise _HttpError(503, f"the model is not loaded ({app.state.failed or 'loading'}); retry shortly",
                             kind="server_error", code="loading", headers={"Retry-After": "5"})
        return app.state.scheduler

    async def health(request: Request) -> JSONResponse:
        _check_caller(request, hosts, origins)
        scheduler = app.state.scheduler
        status = ("loading" if app.state.failed is None else f"failed: {app.state.failed}") if scheduler is None \
            else "shutting down" if scheduler.stopping \
            else "the engine's worker thread died; restart mdlite serve" if not scheduler.alive else "ok"
        counts = {"admitted": scheduler.admitted, "steps": scheduler.engine.steps} if scheduler else {}
        return JSONResponse({"status": status, "model": model_id, **counts}, status_code=200 if status == "ok" else 503)

    async def models(request: Request) -> JSONResponse:
        _check_caller(request, hosts, origins, key=key)
        return JSONResponse({"object": "list", "data": [{"id": model_id, "object": "model",
                                                         "created": started, "owned_by": "mdlite"}]})

    async def chat_completions(request: Request) -> Any:
        return await _answer(request, chat=True)

    async def completions(request: Request) -> Any:
        return await _answer(request, chat=False)

    async def _answer(request: Request, *, chat: bool) -> Any:
        _check_caller(request, hosts, origins, key=key, post=True)
        scheduler = ready()
        body = await _read_json(request, limit=64 * cfg.max_prompt_tokens + 65536, timeout=cfg.read_timeout_s)
        job, asked = _parse(body, cfg, chat=chat)
        engine = app.state.engine
        tokens = len(engine.tokenize(Prompt("", job.question)))  # user text: its markers are plain text
        if tokens > cfg.max_prompt_tokens:
            raise _HttpError(400, f"the question has {tokens} tokens, over the limit of {cfg.max_prompt_tokens} "
                                  "(mdlite serve --max-prompt-tokens)", param="messages" if chat else "prompt",
                             code="context_length_exceeded")

        def reply(solution: Solution) -> dict[str, Any]:
            prompts = [prompt_for(solution.question, style, prompt_style=cfg.prompt_style)[0]
                       for style in sorted({p.style for p in solution.paths})]
            return _reply(solution, job, asked, model_id, prompt_tokens=sum(len(engine.tokenize(p)) for p in prompts))

        future = scheduler.submit(job)
        ticks = _waiting(request, future, scheduler)
        if asked.stream:
            return StreamingResponse(_stream(ticks, future, asked, model_id, reply), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            async for _ in ticks:
                pass
            if not future.done():
                return JSONResponse({"error": {"message": "client disconnected"}}, status_code=499)
            return JSONResponse(reply(future.result()))  # future.result(): an _HttpError when it could not be solved
        finally:
            future.cancel()  # a no-op once settled; else (a disconnect, the shutdown timeout) it drops the request

    # Plain Starlette routes: the endpoint gets the request as is (the body is parsed and checked here).
    app.add_route("/health", health, methods=["GET"])
    app.add_route("/v1/models", models, methods=["GET"])
    app.add_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_route("/v1/completions", completions, methods=["POST"])
    return app


# ---- the engine's front door -----------------------------------------------------------------------


class Scheduler:
    """Admission in front of the engine: at most queue_size requests at once (more get 503 + Retry-After);
    each admitted request is one coroutine solving its question on the continuously batching engine
    (mdlite.solve.solve_one), so a request's paths join the engine's batch at its next step and a cancelled
    request's paths leave it at the next step."""

    def __init__(self, engine: Any, cfg: ServeConfig) -> None:
        self.engine, self.cfg = engine, cfg
        self.stopping = False
        self._tasks: set[asyncio.Task[Solution]] = set()
        self._seconds = 1.0  # a moving average of the time a request takes

    @property
    def admitted(self) -> int:
        return len(self._tasks)

    @property
    def alive(self) -> bool:
        """Whether the engine's worker thread can run (False once it died or the engine closed)."""
        return self.engine.alive

    def submit(self, question: Question) -> asyncio.Task[Solution]:
        """The task solving `question` (its result the Solution, or an _HttpError), or the 503 _HttpError of a full
        queue or a stopping server. Cancelling the task drops the request's paths at the engine's next step."""
        if self.stopping:
            raise _HttpError(503, "the server is shutting down", kind="server_error", code="shutting_down")
        if len(self._tasks) >= self.cfg.queue_size:
            raise _HttpError(503, f"the server is busy ({len(self._tasks)} requests admitted, the limit of "
                                  "--queue-size); retry later", kind="server_error", code="queue_full",
                             headers={"Retry-After": str(max(1, math.ceil(self._seconds)))})
        task = asyncio.create_task(self._solve(question))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def stop(self) -> None:
        """Refuse new requests, cancel those in flight (uvicorn gave them shutdown_timeout_s already) and close
        the engine."""
        self.stopping = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.to_thread(self.engine.close)

    async def _solve(self, question: Question) -> Solution:
        started = time.perf_counter()
        try:
            solution = await solve_one(self.engine, question, program_timeout=self.cfg.program_timeout_s,
                                       program_memory_mb=self.cfg.program_memory_mb)
        except MdliteError as error:  # requests were checked on arrival: what fails now is the server's
            log.error("request failed: %s", error)
            raise _HttpError(503, str(error), kind="server_error", code="cannot_sample") from None
        except (asyncio.CancelledError, _HttpError):
            raise
        except Exception as error:  # noqa: BLE001 - one request's failure is its own 500
            log.exception("request failed")
            raise _HttpError(500, f"the engine failed: {type(error).__name__}: {error}", kind="server_error") from None
        seconds = time.perf_counter() - started
        self._seconds = 0.8 * self._seconds + 0.2 * seconds
        log.info("answered in %.2f s: %s -> %s", seconds, question.question[:60], solution.answer)
        return solution


# ---- requests and replies ---------------------------------------------------------------------------


class _HttpError(Exception):
    """An HTTP error with an OpenAI-style body."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class _Asked:
    """What a request asks of its reply (its Question holds what it asks of the engine), and the reply's id and
    time."""

    chat: bool
    id: str
    stream: bool = False
    include_usage: bool = False
    program_stdout: bool = False
    created: int = field(default_factory=lambda: int(time.time()))


def _error_response(error: _HttpError) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def _waiting(request: Any, future: asyncio.Future[Solution], scheduler: Scheduler) -> AsyncIterator[None]:
    """Yield every TICK_S while `future` is unsettled. Stop when it is settled, or when the client disconnects
    (leaving it unsettled: the caller cancels it); cancel it and raise a 503 when the engine's worker is gone."""
    while not future.done():
        await asyncio.wait([future], timeout=TICK_S)
        if future.done():
            return
        if await request.is_disconnected():
            log.info("client gone; request dropped")
            return
        if not scheduler.alive:
            future.cancel()
            raise _HttpError(503, "the engine's worker thread stopped; restart mdlite serve", kind="server_error",
                             code="engine_stopped")
        yield


async def _stream(ticks: AsyncIterator[None], future: asyncio.Future[Solution], asked: _Asked, model_id: str,
                  reply: Callable[[Solution], dict[str, Any]]) -> AsyncIterator[str]:
    """The Server-Sent Events of a streamed reply (see the module docstring)."""

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        body = {"id": asked.id, "object": "chat.completion.chunk" if asked.chat else "text_completion",
                "created": asked.created, "model": model_id, "choices": choices, **extra}
        return f"data: {json.dumps(body)}\n\n"

    def choice(text: str | None, finish_reason: str | None = None, **delta: str) -> dict[str, Any]:
        if not asked.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        content = {} if text is None else {"content": text}
        return {"index": 0, "delta": {**delta, **content}, "logprobs": None, "finish_reason": finish_reason}

    try:
        if asked.chat:
            yield chunk([choice("", role="assistant")])
        last = time.monotonic()
        async for _ in ticks:
            if time.monotonic() - last >= KEEP_ALIVE_S:
                yield ": keep-alive\n\n"
                last = time.monotonic()
        if not future.done():  # the client is gone
            return
        full = reply(future.result())
    except _HttpError as error:
        yield f"event: error\ndata: {json.dumps(error.body())}\n\n"
        return
    except Exception as error:  # noqa: BLE001 - the status line is sent: the client hears of it in the stream
        log.exception("streamed request failed")
        failure = _HttpError(500, f"internal error: {type(error).__name__}: {error}", kind="server_error")
        yield f"event: error\ndata: {json.dumps(failure.body())}\n\n"
        return
    finally:
        future.cancel()  # a no-op once settled; else it drops the request
    [final] = full["choices"]
    for line in (final["message"]["content"] if asked.chat else final["text"]).splitlines(keepends=True):
        yield chunk([choice(line)])
    yield chunk([choice(None, final["finish_reason"])], mdlite=full["mdlite"])
    if asked.include_usage:
        yield chunk([], usage=full["usage"])
    yield "data: [DONE]\n\n"


def _check_caller(request: Any, hosts: set[str], origins: list[str], *, key: str = "", post: bool = False) -> None:
    """Refuse what a web page could send (a foreign Host: DNS rebinding; an Origin not allowed; a POST that is not
    JSON, the kind a page may send without a CORS preflight), then check the API key."""
    host = request.headers.get("host")
    if host is not None and not _known_host(host, hosts):
        raise _HttpError(403, f"Host {host!r} is not a name this server answers to (a guard against DNS "
                              "rebinding); use its address, or add the name with mdlite serve --allowed-hosts",
                         code="host_not_allowed")
    origin = request.headers.get("origin")
    if origin is not None and "*" not in origins and origin.rstrip("/") not in origins and origin != f"http://{host}":
        raise _HttpError(403, f"requests from web pages at {origin} are refused (a page open in a browser must not "
                              f"use this server); allow that origin with mdlite serve --allowed-origins {origin}",
                         code="origin_not_allowed")
    if key and not hmac.compare_digest(request.headers.get("authorization", "").encode(), f"Bearer {key}".encode()):
        raise _HttpError(401, "missing or wrong API key; send the header 'Authorization: Bearer KEY' "
                              "(the key given to mdlite serve --api-key)", code="invalid_api_key")
    kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if post and kind != "application/json":
        raise _HttpError(415, f"Content-Type must be application/json, not {kind or 'none'!r}",
                         code="unsupported_media_type")


def _known_host(header: str, hosts: set[str]) -> bool:
    """Whether a Host header names this server: an IP address (no DNS name, so no rebinding) or one of `hosts`."""
    try:
        name = urlsplit("//" + header).hostname or ""
    except ValueError:  # a malformed [IPv6] literal
        return False
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return name in hosts or "*" in hosts
    return True


def _loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


async def _read_json(request: Any, *, limit: int, timeout: float) -> dict[str, Any]:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise _HttpError(413, f"request body of {declared} bytes exceeds the limit of {limit}", code="too_large")

    async def read() -> bytes:
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise _HttpError(413, f"request body exceeds the limit of {limit} bytes", code="too_large")
        return bytes(data)

    try:
        data = await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise _HttpError(408, f"the request body did not arrive within {timeout:g} s (mdlite serve --read-timeout-s)",
                         code="timeout", headers={"Connection": "close"}) from None
    try:
        body = json.loads(data)
        json.dumps(body, ensure_ascii=False).encode()  # "\ud800" parses to a lone surrogate, which is no text
    except UnicodeEncodeError as error:
        raise _HttpError(400, f"the request body escapes a lone surrogate ({error.object[error.start]!r}), which is "
                              "no character", code="invalid_json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise _HttpError(400, f"the request body is not valid JSON ({error})", code="invalid_json") from None
    except ValueError:  # json.loads turns a number into int(text), which Python refuses past its digit limit
        raise _HttpError(400, f"the request body holds a number of over {sys.get_int_max_str_digits()} digits",
                         code="invalid_json") from None
    except RecursionError:
        raise _HttpError(400, "the request body is JSON nested too deeply", code="invalid_json") from None
    if not isinstance(body, dict):
        raise _HttpError(400, f"the request body must be a JSON object, not {type(body).__name__}",
                         code="invalid_json")
    return body


def _parse(body: dict[str, Any], cfg: ServeConfig, *, chat: bool) -> tuple[Question, _Asked]:
    """The Question a request body asks to solve and what it asks of the reply, or a 400 _HttpError naming the
    field."""
    allowed = CHAT_FIELDS if chat else COMPLETION_FIELDS
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise _HttpError(400, f"unknown field {unknown[0]!r}; this endpoint takes {', '.join(sorted(allowed))}",
                         param=unknown[0], code="unknown_field")
    for name, neutral in NEUTRAL.items():
        if body.get(name) is not None and body[name] not in neutral:
            raise _HttpError(400, f"{name} {json.dumps(body[name])[:60]} is not supported: a reply is one answer "
                                  f"voted from sampled paths; leave it out or send "
                                  f"{' or '.join(json.dumps(value) for value in neutral)}", param=name,
                             code="unsupported_value")
    for name, kind in (("stream", bool), ("program_stdout", bool), ("stream_options", dict), ("model", str)):
        _check_type(body, name, kind)
    options = body.get("stream_options") or {}
    _check_type(options, "include_usage", bool)
    if body.get("n") not in (None, 1) or isinstance(body.get("n"), bool):
        raise _HttpError(400, "n must be 1: one voted answer per request (ask for more `paths` instead)", param="n")
    text = _question(body) if chat else _prompt(body)
    question, style = _from_template(text)
    if not question:
        raise _HttpError(400, "the question is empty", param="messages" if chat else "prompt", code="empty_prompt")
    mode = body.get("mode", style or cfg.mode)
    if mode not in MODES:
        raise _HttpError(400, f"mode must be one of {', '.join(MODES)}, not {mode!r}", param="mode")
    paths = _number(body, "paths", int, cfg.paths, 1, cfg.max_paths, "mdlite serve --max-paths")
    temperature = _number(body, "temperature", float, cfg.temperature, 0, 2)
    top_p = _number(body, "top_p", float, cfg.top_p, 0, 1)
    if top_p <= 0:
        raise _HttpError(400, "top_p must be in (0, 1]", param="top_p")
    budget = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
    max_tokens = min(_number(body, budget, int, cfg.max_tokens, 1, 2**31 - 1), cfg.max_tokens)
    fresh = cfg.seed if cfg.seed >= 0 else random.getrandbits(31)  # 31 bits: exact in JavaScript clients too
    seed = _number(body, "seed", int, fresh, -2**63, 2**63 - 1)
    job = Question(question, question, seed, mode=mode, paths=paths, prompt_style=cfg.prompt_style,
                   temperature=temperature, top_p=top_p, top_k=cfg.top_k, max_tokens=max_tokens,
                   early_stop=cfg.early_stop, cot_weight=cfg.cot_weight, pot_weight=cfg.pot_weight)
    asked = _Asked(chat=chat, id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                   stream=bool(body.get("stream")), include_usage=bool(options.get("include_usage")),
                   program_stdout=bool(body.get("program_stdout")))
    return job, asked


def _check_type(body: dict[str, Any], name: str, kind: type) -> None:
    if body.get(name) is not None and not isinstance(body[name], kind):
        raise _HttpError(400, f"{name} must be a {kind.__name__}, not {json.dumps(body[name])[:40]}", param=name)


def _number(body: dict[str, Any], name: str, kind: type, default: float, low: float, high: float,
            flag: str = "") -> Any:
    value = body.get(name)
    if value is None:
        return default
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not whole):
        raise _HttpError(400, f"{name} must be {'an integer' if kind is int else 'a number'}, "
                              f"not {json.dumps(value)[:40]}", param=name)
    if not low <= value <= high:
        limit = f" (the server's limit: {flag})" if flag else ""
        raise _HttpError(400, f"{name} must be in [{format_number(low)}, {format_number(high)}], "
                              f"not {value}{limit}", param=name)
    return kind(value)


def _question(body: dict[str, Any]) -> str:
    """The last user message's text."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _HttpError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _HttpError(400, f"messages[{i}] must be an object with a role and a content", param="messages")
        unknown = sorted(set(message) - MESSAGE_FIELDS - set(REPLY_FIELDS))
        if unknown:
            raise _HttpError(400, f"messages[{i}]: unknown field {unknown[0]!r}; a message has role, content "
                                  "and name", param="messages", code="unknown_field")
        carried = next((name for name in ACTIONS if message.get(name) not in (None, [], {}, "")), None)
        if carried:
            raise _HttpError(400, f"messages[{i}]: {carried} {json.dumps(message[carried])[:60]} is not supported: "
                                  "mdlite answers questions in text, without tools or audio; send it empty or "
                                  "leave it out", param="messages", code="unsupported_value")
    users = [m for m in messages if m["role"] == "user"]
    if not users:
        raise _HttpError(400, "no user message: the question is the last message whose role is user",
                         param="messages")
    content = users[-1].get("content")
    if isinstance(content, list):  # content parts
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise _HttpError(400, "only text content parts ({type: text, text}) are supported", param="messages")
        content = "\n".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise _HttpError(400, "the user message's content must be a string or text parts", param="messages")
    return content


def _prompt(body: dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise _HttpError(400, "prompt must be a string (one question per request)", param="prompt")
    return prompt


def _from_template(text: str) -> tuple[str, str | None]:
    """The question of a prompt written in the student template, with its style; else the text, None."""
    head, _, tail = prompt_text("student").partition("{question}")
    for style, directive in STUDENT_DIRECTIVES.items():
        end = tail.format(directive=directive)
        if text.startswith(head) and text.rstrip().endswith(end.rstrip()) and len(text) > len(head) + len(end.strip()):
            return text[len(head):len(text.rstrip()) - len(end.rstrip())].strip(), style
    return text.strip(), None


def _reply(solution: Solution, job: Question, asked: _Asked, model_id: str, *, prompt_tokens: int) -> dict[str, Any]:
    """The OpenAI-shaped reply: the voted answer with its winning rationale, and the `mdlite` field."""
    winner = _winner(solution)
    content = _content(solution, winner)
    path = solution.paths[winner] if winner is not None else None
    choice: dict[str, Any] = {"index": 0, "finish_reason": path.finish_reason if path else "stop"}
    if asked.chat:
        choice["message"] = {"role": "assistant", "content": content}
    else:
        choice.update(text=content, logprobs=None)
    record = solution.to_dict()
    if not asked.program_stdout:
        for each in record["paths"]:
            each["program_stdout"] = None
    return {
        "id": asked.id, "object": "chat.completion" if asked.chat else "text_completion",
        "created": asked.created, "model": model_id, "choices": [choice],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": solution.tokens,
                  "total_tokens": prompt_tokens + solution.tokens},
        "mdlite": {**record, "mode": job.mode, "seed": job.seed, "paths_requested": job.paths,
                   "temperature": job.temperature, "top_p": job.top_p, "max_tokens": job.max_tokens, "winner": winner},
    }


def _winner(solution: Solution) -> int | None:
    """The position of the first path (PoT before CoT, the vote's reading order) with the voted answer."""
    if solution.answer is None:
        return None
    order = sorted(range(len(solution.paths)), key=lambda i: (solution.paths[i].style != "pot", i))
    return next((i for i in order if solution.paths[i].answer is not None
                 and answers_match(solution.paths[i].answer, solution.answer)), None)


def _content(solution: Solution, winner: int | None) -> str:
    if winner is None:
        return f"No answer: none of the {len(solution.paths)} paths gave one."
    path = solution.paths[winner]
    answer = format_number(solution.answer)  # type: ignore[arg-type]
    if path.style == "pot":
        return f"```python\n{path.program}```\nThe answer is {answer}."
    text = path.text.strip()
    stated = extract_answer(text, style="cot", strict=True)
    return text if stated is not None and answers_match(stated, solution.answer) else f"{text}\nThe answer is {answer}."


# ---- the server's own guards ------------------------------------------------------------------------


def _header_deadline(seconds: float) -> type:
    """uvicorn's h11 protocol, closing a connection that sends no complete request headers within `seconds` of
    opening or of its last response (uvicorn's own keep-alive timer stops at the first byte, so a client that
    trickles bytes would hold its connection for ever)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._deadline(None)

        def on_response_complete(self) -> None:
            last = self.cycle
            super().on_response_complete()
            self._deadline(last)

        def _deadline(self, last: Any) -> None:
            def check() -> None:
                if self.cycle is last and not self.transport.is_closing():
                    self.transport.close()

            self.loop.call_later(seconds, check)

    return Protocol


def _log_isolation() -> None:
    """Log how PoT programs are isolated here (a warning when the OS does not cut them off from the network)."""
    from mdlite.sandbox import isolation

    try:
        words, offline = isolation()
    except MdliteError as error:
        log.error("the PoT sandbox does not start (%s); requests with PoT paths will get 503", error)
        return
    log.log(logging.INFO if offline else logging.WARNING, "PoT programs run %s", words)


async def _in_daemon_thread(function: Callable[[], Any]) -> Any:
    """`function()` on a daemon thread: unlike asyncio.to_thread's threads, the exit does not wait for it (SIGTERM
    during a model load exits at once)."""
    result: Future[Any] = Future()

    def run() -> None:
        if result.set_running_or_notify_cancel():
            try:
                result.set_result(function())
            except BaseException as error:  # noqa: BLE001 - raised in the awaiting coroutine
                result.set_exception(error)

    threading.Thread(target=run, name="mdlite-load", daemon=True).start()
    return await asyncio.wrap_future(result)
