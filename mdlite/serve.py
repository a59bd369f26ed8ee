"""An OpenAI-compatible server whose replies are voted CoT + PoT answers from one GGUF.

    mdlite serve --model runs/export/student-Q4_K_M.gguf --port 8000 --mode mixed --paths 10
    curl -s http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"messages": [{"role": "user", "content": "Tom has 3 apples and buys 5 more. How many?"}]}'

Endpoints: POST /v1/chat/completions (the question: the last user message), POST /v1/completions (the
question: `prompt`; a prompt written in the student template, as `mdlite eval --prompt-style student`
sends it, is read back to its question, and its style is the default mode), GET /v1/models, GET /health.
A question is solved exactly as `mdlite solve` solves it (mdlite.solve's `Question`, `next_round`,
`sample_round`, `finish`): the same prompts, seeds (from the request's `seed` and the question's text),
rounds and vote, so a request gives the answer `mdlite solve` gives with the same settings and seed.

Request fields: the OpenAI ones `model` (any name), `messages` / `prompt`, `temperature` (0-2),
`top_p`, `max_tokens` (chat also `max_completion_tokens`; at most the server's), `seed`, `n` (1 only),
`stream` (false only: a vote needs complete paths), `stop` and `user` (accepted, unused: the template's
own stop strings apply); mdlite's `paths` (1..max_paths) and `mode` (cot, pot, mixed, hybrid).
Any other field, malformed JSON, an empty question or one over max_prompt_chars is a 400 with an
OpenAI-style `{"error": {"message", "type", "param", "code"}}` body.

Reply: choice 0's content is the winning rationale (the first path, PoT paths before CoT as in the
vote's tie rule, whose answer is the voted one; a program in a fenced block) ending in "The answer is
N."; the `mdlite` field holds the `Solution` as `mdlite solve --json` writes it (every path's style,
text, answer, program, program error and output; the vote's tallies), plus the mode, seed, paths and
temperature used and `winner` (the winning path's position in `paths`, None when no path answered).

Batching: one worker thread owns the engine. Each engine call takes the rounds of every admitted
request that it can hold (up to batch_paths paths, one sampling setting per call, oldest first), after
waiting batch_wait_ms for more while requests keep arriving; a new request waits for the batch in
flight, then joins the next one. Path j of a question's style has the same seed in any batch, and the
engine's batch invariance makes its text the same too. At most queue_size requests are admitted at
once; more get 503 with Retry-After. A client that disconnects is dropped before its next round.
Ctrl-C / SIGTERM: the server stops accepting connections, finishes what is in flight for up to
shutdown_timeout_s, cancels the rest, then stops the worker and frees the model (a second Ctrl-C quits
at once).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mdlite import MdliteError
from mdlite.answers import answers_match, extract_answer, format_number
from mdlite.config import ServeConfig
from mdlite.prompts import STUDENT_DIRECTIVES, prompt_text
from mdlite.solve import Question, Solution, finish, next_round, sample_round
from mdlite.vote import MODES

log = logging.getLogger(__name__)

COMMON_FIELDS = {"model", "temperature", "top_p", "max_tokens", "seed", "n", "stream", "stop", "user", "paths", "mode"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt"}
MESSAGE_FIELDS = {"role", "content", "name"}


def run(cfg: ServeConfig, *, on_ready: Callable[[str], None] | None = None) -> None:
    """Load cfg.model and serve until Ctrl-C / SIGTERM; `on_ready(base_url)` once it accepts requests."""
    import uvicorn

    from mdlite.engine import Engine

    sock = bind(cfg.host, cfg.port)
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"
    try:
        engine = Engine(cfg.model, n_ctx=cfg.num_ctx, n_gpu_layers=cfg.n_gpu_layers, n_threads=cfg.n_threads,
                        prefix_cache=cfg.prefix_cache)
    except BaseException:
        sock.close()
        raise
    app = create_app(cfg, engine, on_ready=(lambda: on_ready(url)) if on_ready else None)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, lifespan="on",
                                           timeout_graceful_shutdown=cfg.shutdown_timeout_s))  # type: ignore[arg-type]
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        if app.state.scheduler.stop(timeout=cfg.shutdown_timeout_s):  # forced exit: the lifespan did not stop it
            engine.close()
        else:
            log.warning("the engine is still decoding a batch; exiting without freeing the model")


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


def create_app(cfg: ServeConfig, engine: Any, *, api_key: str | None = None,
               on_ready: Callable[[], None] | None = None) -> Any:
    """The FastAPI app serving `engine` (an Engine, or anything with its `sample`); its lifespan starts
    and stops the worker thread (`app.state.scheduler`). `api_key` None: cfg.api_key, else $MDLITE_API_KEY."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    key = (cfg.api_key or os.environ.get("MDLITE_API_KEY", "")) if api_key is None else api_key
    model_id = Path(cfg.model).name.removesuffix(".gguf") or "mdlite"
    scheduler = Scheduler(engine, cfg)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        log.info("serving %s (%s, %d paths by default)", model_id, cfg.mode, cfg.paths)
        if on_ready:
            on_ready()
        try:
            yield
        finally:
            await asyncio.to_thread(scheduler.stop, timeout=cfg.shutdown_timeout_s)

    app = FastAPI(title="mdlite serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler = scheduler

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

    async def health(request: Request) -> JSONResponse:
        status = 503 if scheduler.stopping else 200
        return JSONResponse({"status": "shutting down" if scheduler.stopping else "ok", "model": model_id,
                             "admitted": scheduler.admitted, "batches": scheduler.batches}, status_code=status)

    async def models(request: Request) -> JSONResponse:
        _check_key(request, key)
        return JSONResponse({"object": "list", "data": [{"id": model_id, "object": "model",
                                                         "created": scheduler.started, "owned_by": "mdlite"}]})

    async def chat_completions(request: Request) -> JSONResponse:
        return await _answer(request, chat=True)

    async def completions(request: Request) -> JSONResponse:
        return await _answer(request, chat=False)

    async def _answer(request: Request, *, chat: bool) -> JSONResponse:
        _check_key(request, key)
        body = await _read_json(request, limit=4 * cfg.max_prompt_chars + 65536)
        job = _parse(body, cfg, chat=chat)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Solution] = loop.create_future()
        job.deliver = lambda outcome: _call_soon(loop, _settle, future, outcome)
        scheduler.submit(job)
        try:
            while not future.done():
                await asyncio.wait([future], timeout=0.25)
                if not future.done() and await request.is_disconnected():
                    job.cancelled = True
                    log.info("client gone; request dropped (%s)", job.state.question[:60])
                    return JSONResponse({"error": {"message": "client disconnected"}}, status_code=499)
        except asyncio.CancelledError:  # the shutdown timeout passed
            job.cancelled = True
            raise
        solution = future.result()  # an _HttpError for a request the engine could not sample
        return JSONResponse(_reply(solution, job, model_id, chat=chat))

    # Plain Starlette routes: the endpoint gets the request as is (the body is parsed and checked here).
    app.add_route("/health", health, methods=["GET"])
    app.add_route("/v1/models", models, methods=["GET"])
    app.add_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_route("/v1/completions", completions, methods=["POST"])
    return app


# ---- the worker -----------------------------------------------------------------------------------


@dataclass(eq=False)
class Job:
    """One request's question, its settings and how to hand back its Solution (or an error)."""

    state: Question
    mode: str
    paths: int
    early_stop: bool
    sampling: tuple[float, float, int, int]  # temperature, top_p, top_k, max_tokens: one engine call's settings
    cot_weight: float = 1.0
    pot_weight: float = 1.0
    deliver: Callable[[Any], None] = field(default=lambda outcome: None, repr=False)
    cancelled: bool = False
    arrived: float = field(default_factory=time.perf_counter)


class Scheduler:
    """The engine's worker thread: admits up to cfg.queue_size jobs and samples the next round of as
    many as fit one engine call (see the module docstring)."""

    def __init__(self, engine: Any, cfg: ServeConfig) -> None:
        self.engine, self.cfg = engine, cfg
        self.batches = 0
        self.started = int(time.time())
        self.stopping = False
        self._jobs: list[Job] = []  # admitted, unfinished, oldest first
        self._arrivals = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._last_batch_s = 1.0

    @property
    def admitted(self) -> int:
        return len(self._jobs)

    def submit(self, job: Job) -> None:
        """Admit `job`, or raise the 503 _HttpError of a full queue or a stopping server."""
        with self._cond:
            if self.stopping:
                raise _HttpError(503, "the server is shutting down", kind="server_error", code="shutting_down")
            if len(self._jobs) >= self.cfg.queue_size:
                wait = max(1, math.ceil(self._last_batch_s))
                raise _HttpError(503, f"the server is busy ({len(self._jobs)} requests admitted, the limit of "
                                      "--queue-size); retry later", kind="server_error", code="queue_full",
                                 headers={"Retry-After": str(wait)})
            self._jobs.append(job)
            self._arrivals += 1
            self._cond.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="mdlite-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> bool:
        """Finish the batch in flight, fail the jobs left with 503 and end the thread; False if it is
        still busy after `timeout` seconds."""
        with self._cond:
            self.stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self.stopping:
                    self._cond.wait()
                if self.stopping:
                    left, self._jobs = self._jobs, []
                    break
                self._gather()
            batch = self._next_batch()
            if batch:
                self._sample(batch)
        for job in left:
            job.deliver(_HttpError(503, "the server shut down before this request was answered",
                                   kind="server_error", code="shutting_down"))

    def _gather(self) -> None:
        """(Lock held.) Wait batch_wait_ms at a time while new requests keep arriving, up to a full batch."""
        wait = self.cfg.batch_wait_ms / 1000
        while wait > 0 and not self.stopping and len(self._jobs) * self.cfg.paths < self.cfg.batch_paths:
            before = self._arrivals
            self._cond.wait(wait)
            if self._arrivals == before:
                break

    def _next_batch(self) -> list[tuple[Job, dict[str, int]]]:
        """Drop cancelled jobs, deliver finished ones, and pick the rounds of the next engine call."""
        with self._cond:
            jobs = list(self._jobs)
        pending, done = [], []
        for job in jobs:
            targets = None if job.cancelled else next_round(job.state.found, mode=job.mode, paths=job.paths,
                                                             early_stop=job.early_stop)
            (pending if targets else done).append((job, targets))
        for job, _ in done:
            self._remove(job)
            if not job.cancelled:
                solution = finish(job.state, mode=job.mode, paths=job.paths, cot_weight=job.cot_weight,
                                  pot_weight=job.pot_weight)
                log.info("answered in %.2f s: %s -> %s", time.perf_counter() - job.arrived, job.state.question[:60],
                         solution.answer)
                job.deliver(solution)
        if not pending:
            return []
        sampling = pending[0][0].sampling
        batch, size = [], 0
        for job, targets in pending:
            have = {style: sum(p.style == style for p in job.state.found) for style in targets}
            count = sum(max(0, target - have[style]) for style, target in targets.items())
            if job.sampling == sampling and (not batch or size + count <= self.cfg.batch_paths):
                batch.append((job, targets))
                size += count
        return batch

    def _sample(self, batch: list[tuple[Job, dict[str, int]]]) -> None:
        started = time.perf_counter()
        try:
            self._round(batch)
        except Exception as error:  # noqa: BLE001 - a bad request must not take the others down
            if len(batch) == 1:
                self._fail(batch[0][0], error)
            else:  # find the culprit: each request alone
                log.warning("a batch of %d requests failed (%s); retrying them one by one", len(batch), error)
                for item in batch:
                    try:
                        self._round([item])
                    except Exception as alone:  # noqa: BLE001
                        self._fail(item[0], alone)
        self.batches += 1
        self._last_batch_s = time.perf_counter() - started
        log.debug("batch %d: %d requests in %.2f s", self.batches, len(batch), self._last_batch_s)

    def _round(self, batch: list[tuple[Job, dict[str, int]]]) -> None:
        temperature, top_p, top_k, max_tokens = batch[0][0].sampling
        sample_round(self.engine, [(job.state, targets) for job, targets in batch],
                     prompt_style=self.cfg.prompt_style, temperature=temperature, top_p=top_p, top_k=top_k,
                     max_tokens=max_tokens, program_timeout=self.cfg.program_timeout_s,
                     program_memory_mb=self.cfg.program_memory_mb)

    def _fail(self, job: Job, error: Exception) -> None:
        self._remove(job)
        if isinstance(error, MdliteError):
            job.deliver(_HttpError(400, str(error), code="cannot_sample"))
        else:
            log.error("request failed: %s: %s", type(error).__name__, error)
            job.deliver(_HttpError(500, f"the engine failed: {type(error).__name__}: {error}", kind="server_error"))

    def _remove(self, job: Job) -> None:
        with self._cond:
            if job in self._jobs:
                self._jobs.remove(job)


# ---- requests and replies ---------------------------------------------------------------------------


class _HttpError(Exception):
    """An HTTP error with an OpenAI-style body."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}


def _error_response(error: _HttpError) -> Any:
    from fastapi.responses import JSONResponse

    body = {"error": {"message": error.message, "type": error.kind, "param": error.param, "code": error.code}}
    return JSONResponse(body, status_code=error.status, headers=error.headers)


def _call_soon(loop: asyncio.AbstractEventLoop, *call: Any) -> None:
    try:
        loop.call_soon_threadsafe(*call)
    except RuntimeError:  # the loop is closed: the server was forced to exit
        pass


def _settle(future: asyncio.Future, outcome: Any) -> None:
    if future.done():  # its client is gone
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def _check_key(request: Any, key: str) -> None:
    if not key:
        return
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
        raise _HttpError(401, "missing or wrong API key; send the header 'Authorization: Bearer KEY' "
                              "(the key given to mdlite serve --api-key)", code="invalid_api_key")


async def _read_json(request: Any, *, limit: int) -> dict[str, Any]:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise _HttpError(413, f"request body of {declared} bytes exceeds the limit of {limit}", code="too_large")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise _HttpError(413, f"request body exceeds the limit of {limit} bytes", code="too_large")
    try:
        body = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise _HttpError(400, f"the request body is not valid JSON ({error})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise _HttpError(400, f"the request body must be a JSON object, not {type(body).__name__}",
                         code="invalid_json")
    return body


def _parse(body: dict[str, Any], cfg: ServeConfig, *, chat: bool) -> Job:
    """The Job a request body asks for, or a 400 _HttpError naming the field and the fix."""
    allowed = CHAT_FIELDS if chat else COMPLETION_FIELDS
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise _HttpError(400, f"unknown field {unknown[0]!r}; this endpoint takes {', '.join(sorted(allowed))}",
                         param=unknown[0], code="unknown_field")
    if body.get("stream"):
        raise _HttpError(400, "stream: true is not supported: the reply is a vote over complete paths; "
                              "send stream: false", param="stream", code="stream_unsupported")
    _check_type(body, "stream", bool)
    _check_type(body, "model", str)
    _check_type(body, "user", str)
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str) and not (
            isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise _HttpError(400, "stop must be a string or a list of strings", param="stop")
    if body.get("n") not in (None, 1) or isinstance(body.get("n"), bool):
        raise _HttpError(400, "n must be 1: one voted answer per request (ask for more `paths` instead)", param="n")
    text = _question(body) if chat else _prompt(body)
    question, style = _from_template(text)
    if not question:
        raise _HttpError(400, "the question is empty", param="messages" if chat else "prompt", code="empty_prompt")
    if len(question) > cfg.max_prompt_chars:
        raise _HttpError(400, f"the question has {len(question)} characters, over the limit of "
                              f"{cfg.max_prompt_chars} (mdlite serve --max-prompt-chars)",
                         param="messages" if chat else "prompt", code="context_length_exceeded")
    mode = body.get("mode", style or cfg.mode)
    if mode not in MODES:
        raise _HttpError(400, f"mode must be one of {', '.join(MODES)}, not {mode!r}", param="mode")
    paths = _number(body, "paths", int, cfg.paths, 1, cfg.max_paths, "mdlite serve --max-paths")
    temperature = _number(body, "temperature", float, cfg.temperature, 0, 2)
    top_p = _number(body, "top_p", float, cfg.top_p, 0, 1)
    if top_p <= 0:
        raise _HttpError(400, "top_p must be in (0, 1]", param="top_p")
    budget = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
    max_tokens = _number(body, budget, int, cfg.max_tokens, 1, cfg.max_tokens, "mdlite serve --max-tokens")
    seed = _number(body, "seed", int, cfg.seed, -2**63, 2**63 - 1)
    return Job(state=Question(question, question, seed), mode=mode, paths=paths, early_stop=cfg.early_stop,
               sampling=(temperature, top_p, cfg.top_k, max_tokens), cot_weight=cfg.cot_weight,
               pot_weight=cfg.pot_weight)


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
        unknown = sorted(set(message) - MESSAGE_FIELDS)
        if unknown:
            raise _HttpError(400, f"messages[{i}]: unknown field {unknown[0]!r}; a message has role, content "
                                  "and name", param="messages", code="unknown_field")
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


def _reply(solution: Solution, job: Job, model_id: str, *, chat: bool) -> dict[str, Any]:
    """The OpenAI-shaped reply: the voted answer with its winning rationale, and the `mdlite` field."""
    winner = _winner(solution)
    content = _content(solution, winner)
    path = solution.paths[winner] if winner is not None else None
    choice: dict[str, Any] = {"index": 0, "finish_reason": path.finish_reason if path else "stop"}
    if chat:
        choice["message"] = {"role": "assistant", "content": content}
    else:
        choice.update(text=content, logprobs=None)
    temperature, top_p, _, max_tokens = job.sampling
    return {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()), "model": model_id, "choices": [choice],
        "usage": {"prompt_tokens": 0, "completion_tokens": solution.tokens, "total_tokens": solution.tokens},
        "mdlite": {**solution.to_dict(), "mode": job.mode, "seed": job.state.seed, "paths_requested": job.paths,
                   "temperature": temperature, "top_p": top_p, "max_tokens": max_tokens, "winner": winner},
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
