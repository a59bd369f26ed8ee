"""A small server that speaks Ollama's HTTP API, for the tests and bench/teacher.py.

It stands in for Ollama because no Ollama server can be installed here (there is no Debian, PyPI or npm
package with the binary); the `ollama` client that talks to it is the real one. It implements the parts
of Ollama's documented API that clients use: POST /api/generate and /api/chat (NDJSON streaming by
default, one JSON object with "stream": false; the usage fields eval_count, total_duration, ... in
nanoseconds), GET /api/tags, POST /api/show, GET /api/version and GET / ("Ollama is running");
404 for an unknown model. It has `parallel` slots (like OLLAMA_NUM_PARALLEL) and answers 503 when all
are busy, waits `latency_s` per request, and gives scripted answers.

Model import, as Ollama's server does it (server/routes.go, server/create.go): HEAD /api/blobs/DIGEST (200
when the blob is there, else 404), POST /api/blobs/DIGEST (the body's sha256 must equal DIGEST, else 400
"digest mismatch"; 201 when stored, 200 without reading the body when already there), both 400 for a digest
that is not sha256:<64 hex>; POST /api/create with `model`, `files` ({file name: digest}, relative names, each
an uploaded blob that is a GGUF file), `template`, `system`, `parameters` (400 for an invalid name, a missing
blob, a file that is not GGUF, neither `from` nor `files`); NDJSON progress ending in {"status": "success"},
or one JSON object with "stream": false. A created model is listed, shown (its template, system and
parameters) and answers like the scripted one. `blobs`, `created` and `requests` (every generate/chat/create
body) are there for tests to inspect.

    python tests/fake_ollama.py --port 11434 --model qwen2.5:32b --parallel 8 --latency 0.1 --script s.json

prints "listening on http://127.0.0.1:PORT" once it accepts connections (`--port 0`: a free port).

Scripted answers: `script` is {"cot": {question: [responses]}, "pot": {question: [responses]}}. The
question is the prompt's last "Question: ..." line and the style is "pot" when the prompt ends inside a
```python fence or its last line asks for a Python program (the student prompt); a request with options.seed
s gets responses[s % len(responses)], so the same request always gets the same answer. A response
"!error CODE" makes the server answer HTTP CODE instead.
Unscripted prompts get "The answer is 0.". Stop strings and num_predict (one token per word) apply.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

_QUESTION = re.compile(r"Question: (.*)\n")
_DIGEST = re.compile(r"sha256[:-][0-9a-fA-F]{64}")
_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)*(:[\w][\w.-]{0,127})?")  # model/name.go, roughly


class FakeOllama:
    """The server, run in a thread (`with FakeOllama(...) as server:`) or as a script (`main`)."""

    def __init__(self, *, model: str = "fake-teacher", host: str = "127.0.0.1", port: int = 0, parallel: int = 1,
                 latency_s: float = 0.0, script: dict[str, dict[str, list[str]]] | None = None) -> None:
        self.model = model if ":" in model else f"{model}:latest"
        self.digest = hashlib.sha256(self.model.encode()).hexdigest()
        self.latency_s, self.script = latency_s, script or {}
        self._slots = threading.BoundedSemaphore(parallel)
        self._lock = threading.Lock()
        self.stats = {"requests": 0, "served": 0, "busy_503": 0, "in_flight": 0, "max_in_flight": 0}
        self.blobs: dict[str, dict[str, Any]] = {}  # "sha256:..." -> {"size": bytes, "magic": first 4 bytes}
        self.created: dict[str, dict[str, Any]] = {}  # model name -> its /api/create request
        self.requests: list[dict[str, Any]] = []  # every generate / chat / create request body, in order
        self.httpd = ThreadingHTTPServer((host, port), _handler(self))
        self.httpd.daemon_threads = True
        self.url = f"http://{host}:{self.httpd.server_address[1]}"
        self._thread: threading.Thread | None = None

    def __enter__(self) -> FakeOllama:
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def answer(self, prompt: str, options: dict[str, Any]) -> str:
        """The scripted response to `prompt` (see the module docstring)."""
        last = prompt.rstrip("\n").rpartition("\n")[2]
        style = "pot" if prompt.rstrip(" ").endswith("```python\n") or "Python program" in last else "cot"
        questions = _QUESTION.findall(prompt + "\n")
        responses = self.script.get(style, {}).get(questions[-1].strip() if questions else "", [])
        if not responses:
            return " The answer is 0."
        return responses[int(options.get("seed", 0)) % len(responses)]

    def generate(self, prompt: str, options: dict[str, Any]) -> tuple[str, list[str], str]:
        """(response or "!error CODE", the pieces streamed, done_reason) after `latency_s`."""
        time.sleep(self.latency_s)
        text = self.answer(prompt, options)
        if text.startswith("!error"):
            return text, [], "error"
        cut = [text.find(stop) for stop in options.get("stop") or [] if stop and stop in text]
        text = text[: min(cut)] if cut else text
        pieces = re.findall(r"\s*\S+\s*", text) or [text]
        limit = int(options.get("num_predict", -1))
        if 0 <= limit < len(pieces):
            return "".join(pieces[:limit]), pieces[:limit], "length"
        return text, pieces, "stop"

    def model_entry(self) -> dict[str, Any]:
        return {"name": self.model, "model": self.model, "modified_at": _now(), "size": 1 << 20,
                "digest": self.digest, "details": _DETAILS}

    def known(self, name: str | None) -> str | None:
        """The full name (NAME:TAG) of the scripted or a created model called `name`, else None."""
        full = name if name and ":" in name else f"{name}:latest"
        return full if full == self.model or full in self.created else None

    def create(self, body: dict[str, Any]) -> tuple[int, str | None]:
        """(status, error) of an /api/create request, checked as Ollama checks it; a valid one is kept."""
        name = body.get("model") or body.get("name") or ""
        files = body.get("files") or {}
        if not _NAME.fullmatch(name):
            return 400, "invalid model name"
        if not files and not body.get("from"):
            return 400, "neither 'from' or 'files' was specified"
        for file, digest in files.items():
            if file.startswith("/") or ".." in file.split("/"):
                return 400, "file path must be relative"
            if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
                return 400, "invalid digest format"
            if digest.replace("-", ":", 1) not in self.blobs:
                return 400, f"open blobs/{digest.replace(':', '-', 1)}: no such file or directory"
            if self.blobs[digest.replace("-", ":", 1)]["magic"] != b"GGUF":
                return 400, "supplied file was not in GGUF format"
        full = name if ":" in name else f"{name}:latest"
        with self._lock:
            self.created[full] = body
        return 200, None

    def created_entry(self, name: str) -> dict[str, Any]:
        body = self.created[name]
        digest = next(iter((body.get("files") or {}).values()), "sha256:" + "0" * 64)
        return {"name": name, "model": name, "modified_at": _now(), "size": self.blobs.get(digest, {}).get("size", 0),
                "digest": hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest(),
                "details": {**_DETAILS, "family": "llama", "families": ["llama"]}}


_DETAILS = {"parent_model": "", "format": "gguf", "family": "fake", "families": ["fake"],
            "parameter_size": "0.5B", "quantization_level": "Q4_K_M"}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _handler(server: FakeOllama) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the client expects
        disable_nagle_algorithm = True  # headers and body go out as separate writes

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def do_GET(self) -> None:
            if self.path == "/":
                self._send(200, "Ollama is running", content_type="text/plain")
            elif self.path == "/api/version":
                self._send(200, {"version": "0.6.3-fake"})
            elif self.path == "/api/tags":
                self._send(200, {"models": [server.model_entry(), *map(server.created_entry, list(server.created))]})
            elif self.path == "/fake/stats":
                self._send(200, server.stats)
            else:
                self._send(404, {"error": "not found"})

        def do_HEAD(self) -> None:
            digest = self.path.removeprefix("/api/blobs/")
            if self.path == "/":
                self._send(200, "", content_type="text/plain")
            elif digest == self.path:
                self._send(404, "")
            elif not _DIGEST.fullmatch(digest):
                self._send(400, "")
            else:
                self._send(200 if digest.replace("-", ":", 1) in server.blobs else 404, "")

        def do_POST(self) -> None:
            if self.path.startswith("/api/blobs/"):
                self._blob(self.path.removeprefix("/api/blobs/"))
                return
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if self.path in ("/api/generate", "/api/chat", "/api/create"):
                with server._lock:
                    server.requests.append({"path": self.path, **body})
            if self.path == "/api/create":
                self._create(body)
            elif self.path not in ("/api/generate", "/api/chat", "/api/show"):
                self._send(404, {"error": "not found"})
            elif server.known(body.get("model")) is None:
                self._send(404, {"error": f"model '{body.get('model')}' not found"})
            elif self.path == "/api/show":
                self._show(server.known(body.get("model")) or "")
            else:
                self._generate(body, chat=self.path == "/api/chat")

        def _blob(self, digest: str) -> None:
            """POST /api/blobs/DIGEST: store the body's size and magic when its sha256 is DIGEST."""
            if not _DIGEST.fullmatch(digest):
                self._discard_body()
                self._send(400, {"error": "invalid digest format"})
                return
            digest = digest.replace("-", ":", 1)
            if digest in server.blobs:  # Ollama answers before reading the body; the fake reads it to stay alive
                self._discard_body()
                self._send(200, "")
                return
            sha, size, magic = hashlib.sha256(), 0, b""
            for chunk in self._body_chunks():
                sha.update(chunk)
                magic = (magic + chunk[:4])[:4] if len(magic) < 4 else magic
                size += len(chunk)
            if f"sha256:{sha.hexdigest()}" != digest:
                self._send(400, {"error": f"digest mismatch, expected \"{digest}\", got \"sha256:{sha.hexdigest()}\""})
                return
            with server._lock:
                server.blobs[digest] = {"size": size, "magic": magic}
            self._send(201, "")

        def _create(self, body: dict[str, Any]) -> None:
            status, error = server.create(body)
            if error is not None:
                self._send(status, {"error": error})
                return
            digests = list((body.get("files") or {}).values())
            steps = [{"status": "parsing GGUF"}, *[{"status": f"using existing layer {d}"} for d in digests],
                     {"status": "writing manifest"}, {"status": "success"}]
            if body.get("stream", True):
                self._stream(steps)
            else:
                self._send(200, steps[-1])

        def _show(self, name: str) -> None:
            body = server.created.get(name)
            if body is None:
                self._send(200, {"modelfile": f"FROM {server.model}", "parameters": "", "template": "{{ .Prompt }}",
                                 "details": _DETAILS, "model_info": {"general.architecture": "fake"},
                                 "capabilities": ["completion"], "modified_at": _now()})
                return
            parameters = [f"{key:<30} {json.dumps(value)}" for key, values in (body.get("parameters") or {}).items()
                          for value in (values if isinstance(values, list) else [values])]
            self._send(200, {"modelfile": f"FROM {next(iter(body['files'].values()))}",
                             "template": body.get("template", ""), "system": body.get("system", ""),
                             "parameters": "\n".join(parameters),
                             "details": server.created_entry(name)["details"],
                             "model_info": {"general.architecture": "llama"}, "capabilities": ["completion"],
                             "modified_at": _now()})

        def _body_chunks(self) -> Any:
            """The request body in pieces: Content-Length or chunked transfer encoding."""
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                    yield self.rfile.read(size)
                    self.rfile.readline()
                self.rfile.readline()
                return
            left = int(self.headers.get("Content-Length", 0))
            while left > 0:
                chunk = self.rfile.read(min(left, 1 << 20))
                if not chunk:
                    return
                left -= len(chunk)
                yield chunk

        def _discard_body(self) -> None:
            for _ in self._body_chunks():
                pass

        def _generate(self, body: dict[str, Any], *, chat: bool) -> None:
            with server._lock:
                server.stats["requests"] += 1
            if not server._slots.acquire(blocking=False):
                with server._lock:
                    server.stats["busy_503"] += 1
                self._send(503, {"error": "server busy, please try again.  maximum pending requests exceeded"})
                return
            with server._lock:
                server.stats["in_flight"] += 1
                server.stats["max_in_flight"] = max(server.stats["max_in_flight"], server.stats["in_flight"])
            try:
                start = time.perf_counter_ns()
                prompt = body["messages"][-1]["content"] if chat else body.get("prompt", "")
                text, pieces, reason = server.generate(prompt, body.get("options") or {})
            finally:
                with server._lock:
                    server.stats["in_flight"] -= 1
                server._slots.release()
            if reason == "error":
                self._send(int(text.split()[1]), {"error": "scripted failure"})
                return
            with server._lock:
                server.stats["served"] += 1
            elapsed = time.perf_counter_ns() - start
            final = {"done": True, "done_reason": reason, "total_duration": elapsed, "load_duration": 0,
                     "prompt_eval_count": len(prompt.split()), "prompt_eval_duration": 0,
                     "eval_count": len(pieces), "eval_duration": elapsed}
            if body.get("stream", True):
                self._stream([_part(server.model, piece, chat) for piece in pieces] + [
                    {**_part(server.model, "", chat), **final}])
            else:
                self._send(200, {**_part(server.model, text, chat), **final})

        def _send(self, status: int, payload: Any, content_type: str = "application/json") -> None:
            data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _stream(self, parts: list[dict[str, Any]]) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in parts:
                line = json.dumps(part).encode() + b"\n"
                self.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")

    return Handler


def _part(model: str, text: str, chat: bool) -> dict[str, Any]:
    part: dict[str, Any] = {"model": model, "created_at": _now(), "done": False}
    if chat:
        part["message"] = {"role": "assistant", "content": text}
    else:
        part["response"] = text
    return part


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    parser.add_argument("--model", default="fake-teacher")
    parser.add_argument("--parallel", type=int, default=1, help="slots; more requests at once get 503")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per request")
    parser.add_argument("--script", type=Path, help="JSON file of scripted answers")
    args = parser.parse_args()
    script = json.loads(args.script.read_text()) if args.script else None
    server = FakeOllama(model=args.model, host=args.host, port=args.port, parallel=args.parallel,
                        latency_s=args.latency, script=script)
    print(f"listening on {server.url}", flush=True)
    server.httpd.serve_forever()


if __name__ == "__main__":
    main()
