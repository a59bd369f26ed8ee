"""`mdlite serve`: the HTTP API, batching, limits and shutdown with a scripted engine in a real uvicorn server
on loopback (fast), and 32 concurrent clients against the real Qwen2.5-Coder 0.5B GGUF (slow)."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from click.testing import CliRunner

from mdlite import MdliteError
from mdlite.cli import cli
from mdlite.config import ServeConfig
from mdlite.engine import derive_seed
from mdlite.prompts import student_prompt
from mdlite.serve import bind, check_context, create_app, server_config
from mdlite.solve import solve_questions

QUESTION = "Tom has 3 apples and buys 5 more. How many apples does he have?"


class FakeEngine:
    """Stands in for Engine: path j of a prompt says 7, 8 or 9 by its seed alone (as the real engine's text depends
    on the prompt and seed only), after `delay` seconds per call; a prompt containing 'explode' fails the call.
    A token is a byte."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.calls: list[dict] = []

    def tokenize(self, text):
        return list(text.encode())

    def sample(self, prompts, *, n, temperature, top_p, top_k, max_tokens, stop, seed, first_path, stop_after):
        self.calls.append({"prompts": list(prompts), "n": list(n), "temperature": temperature})
        time.sleep(self.delay)
        if any("explode" in prompt for prompt in prompts):
            raise MdliteError("a prompt of 99999 tokens + max_tokens 256 exceeds the model's context")
        out = []
        for prompt, count, first, base in zip(prompts, n, first_path, seed, strict=True):
            pot = "Python program" in prompt
            texts = []
            for j in range(first, first + count):
                value = 7 + derive_seed(base, j, temperature) % 3
                texts.append(f"```python\ndef solution():\n    print('working')\n    return {value}\n```" if pot
                             else f"3 + 5 = {value}. The answer is {value}.")
            out.append([_generation(text) for text in texts])
        return out


def _generation(text):
    from mdlite.engine import Generation

    return Generation(text, len(text.split()), "stop")


@contextlib.contextmanager
def serving(engine, load=None, **settings):
    """A real uvicorn server (mdlite's settings) on 127.0.0.1 (a free port) in a thread, once `engine` (or what
    `load()` returns) is loaded (with `load`: once it listens); yields (base URL, app, uvicorn server)."""
    import uvicorn

    cfg = ServeConfig(model="fake.gguf", **settings)
    assert not cfg.problems()
    loaded = threading.Event()
    app = create_app(cfg, load or (lambda: engine), api_key=cfg.api_key, on_ready=loaded.set)
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(server_config(app, cfg))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 10
    while not (server.started and (load or loaded.is_set())):
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", app, server
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
        assert not thread.is_alive()


def chat(url, question=QUESTION, timeout=30.0, **fields):
    body = {"model": "student", "messages": [{"role": "user", "content": question}], **fields}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=timeout)


def reference(question=QUESTION, *, mode="mixed", paths=10, seed=0, temperature=0.7):
    """What `mdlite solve` answers with these settings (the same solve_questions on the same engine), as a reply
    carries it: programs' printed output left out unless asked for."""
    [solution] = solve_questions(FakeEngine(), [question], mode=mode, paths=paths, seed=seed, temperature=temperature,
                                 top_p=0.95)
    record = json.loads(json.dumps(solution.to_dict()))
    assert {p["program_stdout"] for p in record["paths"] if p["style"] == "pot"} == {"working\n"}
    for path in record["paths"]:
        path["program_stdout"] = None
    return record


# ---- the API --------------------------------------------------------------------------------------


def test_chat_reply_is_the_voted_answer_with_its_rationale_and_every_path():
    with serving(FakeEngine()) as (url, _, _):
        reply = chat(url, "  " + QUESTION + "\n", paths=6, seed=3)
        assert reply.status_code == 200, reply.text
        body = reply.json()
    expected = reference(paths=6, seed=3)
    assert body["object"] == "chat.completion" and body["model"] == "fake" and body["id"].startswith("chatcmpl-")
    [choice] = body["choices"]
    extra = body["mdlite"]
    assert extra["answer"] == expected["answer"]
    assert extra["paths"] == expected["paths"]  # path for path what `mdlite solve` samples
    assert extra["vote"] == expected["vote"] and (extra["mode"], extra["seed"]) == ("mixed", 3)
    winner = extra["paths"][extra["winner"]]
    assert winner["answer"] == expected["answer"] and winner["style"] == "pot"  # PoT first, as the vote reads
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "stop"
    assert choice["message"]["content"] == f"```python\n{winner['program']}```\nThe answer is {expected['answer']:g}."
    assert body["usage"]["completion_tokens"] == expected["tokens"]


def test_completions_models_and_health():
    with serving(FakeEngine()) as (url, _, _):
        plain = httpx.post(f"{url}/v1/completions", json={"prompt": QUESTION, "mode": "cot", "paths": 3}).json()
        assert plain["object"] == "text_completion"
        assert plain["choices"][0]["text"] == plain["mdlite"]["paths"][plain["mdlite"]["winner"]]["text"]
        # a prompt in the student template (mdlite eval --prompt-style student) is read back to its question and style
        templated = httpx.post(f"{url}/v1/completions", json={"prompt": student_prompt(QUESTION, style="pot"),
                                                               "paths": 3, "seed": 0}).json()
        assert templated["mdlite"]["question"] == QUESTION and templated["mdlite"]["mode"] == "pot"
        assert templated["mdlite"]["answer"] == reference(mode="pot", paths=3)["answer"]
        [model] = httpx.get(f"{url}/v1/models").json()["data"]
        assert model["id"] == "fake" and model["owned_by"] == "mdlite"
        health = httpx.get(f"{url}/health").json()
        assert health["status"] == "ok" and health["admitted"] == 0


class ClueLessEngine(FakeEngine):
    def sample(self, prompts, *, n, **settings):
        super().sample(prompts, n=n, **settings)
        return [[_generation("I have no idea.") for _ in range(count)] for count in n]


def test_a_question_no_path_answers_says_so():
    with serving(ClueLessEngine()) as (url, _, _):
        reply = chat(url, paths=2).json()
    assert reply["choices"][0]["message"]["content"] == "No answer: none of the 2 paths gave one."
    assert reply["mdlite"]["answer"] is None and reply["mdlite"]["winner"] is None
    assert [p["program_error"] for p in reply["mdlite"]["paths"]] == [None, "no program"]


def test_requests_that_arrive_together_share_engine_batches_and_keep_their_answers():
    engine = FakeEngine(delay=1.0)
    questions = [f"Question number {i}: how many?" for i in range(6)]
    with serving(engine) as (url, _, _):
        with ThreadPoolExecutor(6) as pool:
            first = pool.submit(chat, url, questions[0], paths=4, seed=1)
            time.sleep(0.2)  # its batch is in flight: the other five arrive meanwhile and wait for it
            rest = list(pool.map(lambda q: chat(url, q, paths=4, seed=1), questions[1:]))
            replies = [reply.json() for reply in [first.result(), *rest]]
    assert [len(call["prompts"]) for call in engine.calls] == [2, 10]  # CoT + PoT prompt per request
    for question, reply in zip(questions, replies, strict=True):
        assert reply["mdlite"]["paths"] == reference(question, paths=4, seed=1)["paths"]


def test_per_request_settings_and_limits():
    engine = FakeEngine()
    with serving(engine, paths=4, max_paths=8) as (url, _, _):
        reply = chat(url, mode="hybrid", paths=8, temperature=0.2, seed=11, max_tokens=64).json()
        assert reply["mdlite"]["answer"] == reference(mode="hybrid", paths=8, seed=11, temperature=0.2)["answer"]
        assert (reply["mdlite"]["temperature"], reply["mdlite"]["max_tokens"]) == (0.2, 64)
        assert engine.calls[-1]["temperature"] == 0.2 and engine.calls[-1]["n"] == [8]
        too_many = chat(url, paths=9)
        assert too_many.status_code == 400 and "--max-paths" in too_many.json()["error"]["message"]


@pytest.mark.parametrize(("body", "fragment"), [
    (b'{"messages": [', "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b"[" * 100_000, "nested too deeply"),
    ({"messages": [{"role": "user", "content": QUESTION}], "logprobs": True}, "logprobs true is not supported"),
    ({"messages": [{"role": "user", "content": QUESTION}], "presence_penalty": 0.5}, "leave it out or send 0"),
    ({"messages": [{"role": "user", "content": QUESTION}], "tools": [{"type": "function", "function": {"name": "f"}}]},
     "tools [{"),
    ({"messages": [{"role": "user", "content": QUESTION}], "response_format": {"type": "json_object"}},
     'send {"type": "text"}'),
    ({"messages": [{"role": "user", "content": QUESTION}], "mood": "happy"}, "unknown field 'mood'"),
    ({"messages": [{"role": "user", "content": QUESTION, "mood": "x"}]}, "unknown field 'mood'"),
    ({"messages": [{"role": "user", "content": "   "}]}, "the question is empty"),
    ({"messages": [{"role": "user", "content": "x" * 5000}]}, "5000 tokens, over the limit of 1024"),
    ({"messages": [{"role": "system", "content": "be nice"}]}, "no user message"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "only text content parts"),
    ({"messages": [{"role": "user", "content": QUESTION}], "paths": 100}, "paths must be in [1, 32]"),
    ({"messages": [{"role": "user", "content": QUESTION}], "paths": 0}, "paths must be in [1, 32]"),
    ({"messages": [{"role": "user", "content": QUESTION}], "paths": "4"}, "paths must be an integer"),
    ({"messages": [{"role": "user", "content": QUESTION}], "paths": 2.5}, "paths must be an integer"),
    ({"messages": [{"role": "user", "content": QUESTION}], "mode": "vote"}, "mode must be one of"),
    ({"messages": [{"role": "user", "content": QUESTION}], "temperature": 3}, "temperature must be in [0, 2]"),
    ({"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 0}, "max_tokens must be in [1, "),
    ({"messages": [{"role": "user", "content": QUESTION}], "n": 3}, "n must be 1"),
    ({"messages": [{"role": "user", "content": QUESTION}], "stream": "yes"}, "stream must be a bool"),
    ({"messages": [{"role": "user", "content": QUESTION}], "stream_options": {"include_usage": 1}},
     "include_usage must be a bool"),
    ({"messages": [{"role": "user", "content": QUESTION}], "seed": True}, "seed must be an integer"),
])
def test_bad_requests_get_a_clear_400_and_the_server_keeps_serving(body, fragment):
    with serving(FakeEngine()) as (url, _, _):
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        reply = httpx.post(f"{url}/v1/chat/completions", content=content,
                           headers={"Content-Type": "application/json"})
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert fragment in error["message"] and error["type"] == "invalid_request_error"
        assert chat(url, paths=2).status_code == 200


def test_unknown_routes_huge_bodies_and_engine_failures_are_json_errors():
    engine = FakeEngine()
    with serving(engine) as (url, _, _):
        missing = httpx.get(f"{url}/v1/embeddings")
        assert missing.status_code == 404 and "POST /v1/chat/completions" in missing.json()["error"]["message"]
        huge = httpx.post(f"{url}/v1/completions", content=b" " * 200_000, headers={"Content-Type": "application/json"})
        assert huge.status_code == 413 and "exceeds the limit" in huge.json()["error"]["message"]
        # a request the engine fails on fails alone (503: what a request can cause is checked before it is admitted,
        # so an engine failure is the server's); the one batched with it is answered
        with ThreadPoolExecutor(2) as pool:
            bad, good = pool.map(lambda q: chat(url, q, paths=2, seed=0), ["explode this", QUESTION])
        assert bad.status_code == 503 and "exceeds the model's context" in bad.json()["error"]["message"]
        assert bad.json()["error"]["type"] == "server_error"
        assert good.status_code == 200 and good.json()["mdlite"]["answer"] == reference(paths=2)["answer"]


def test_api_key():
    with serving(FakeEngine(), api_key="s3cret") as (url, _, _):
        assert chat(url).status_code == 401
        wrong = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "--api-key" in wrong.json()["error"]["message"]
        assert httpx.get(f"{url}/health").status_code == 200
        ok = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": "Bearer s3cret"},
                        json={"messages": [{"role": "user", "content": QUESTION}], "paths": 2})
        assert ok.status_code == 200


def test_a_full_queue_answers_503_with_retry_after():
    with serving(FakeEngine(delay=0.6), queue_size=2) as (url, _, _):
        with ThreadPoolExecutor(5) as pool:
            replies = list(pool.map(lambda i: chat(url, f"Q{i}?", paths=2), range(5)))
        codes = sorted(r.status_code for r in replies)
        assert codes.count(200) >= 2 and 503 in codes and set(codes) <= {200, 503}
        busy = next(r for r in replies if r.status_code == 503)
        assert int(busy.headers["Retry-After"]) >= 1 and "--queue-size" in busy.json()["error"]["message"]
        assert chat(url, paths=2).status_code == 200


def test_a_client_that_disconnects_is_dropped_before_its_next_round():
    engine = FakeEngine(delay=1.0)
    with serving(engine) as (url, app, _):
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(chat, url, "Q first?", paths=2, temperature=0.5)  # keeps the engine busy for 1 s
            time.sleep(0.1)
            gone = pool.submit(chat, url, "Q gone?", paths=2, temperature=0.9, timeout=0.3)  # another batch
            with pytest.raises(httpx.ReadTimeout):
                gone.result()
            assert first.result().status_code == 200
        assert chat(url, paths=2).status_code == 200
        assert not any("Q gone?" in prompt for call in engine.calls for prompt in call["prompts"])
        assert app.state.scheduler.admitted == 0


def test_shutdown_finishes_the_requests_in_flight():
    engine = FakeEngine(delay=0.5)
    with serving(engine) as (url, app, server):
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(chat, url, paths=2)
            time.sleep(0.2)
            server.should_exit = True  # what Ctrl-C / SIGTERM set
            assert pending.result().status_code == 200
    assert app.state.scheduler.stopping and app.state.scheduler.stop(timeout=0)


def test_port_in_use_is_a_clear_error():
    taken = bind("127.0.0.1", 0)
    try:
        with pytest.raises(MdliteError, match="choose another --port"):
            bind("127.0.0.1", taken.getsockname()[1])
    finally:
        taken.close()


def test_serve_help_and_config_errors():
    result = CliRunner().invoke(cli, ["serve", "--help"])
    assert result.exit_code == 0
    for flag in ("--model", "--host", "--port", "--api-key", "--paths", "--max-paths", "--queue-size",
                 "--max-prompt-tokens", "--allowed-origins", "--allowed-hosts", "--insecure-no-key",
                 "--read-timeout-s", "--limit-concurrency", "Open WebUI", "Example:"):
        assert flag in result.output
    assert "[default: 127.0.0.1]" in result.output
    bad = CliRunner().invoke(cli, ["serve", "--model", "x.gguf", "--paths", "40"])
    assert bad.exit_code == 2 and "paths 40 exceeds max_paths 32" in bad.output
    missing = CliRunner().invoke(cli, ["serve", "--model", "missing/student.gguf", "--port", "0"])
    assert missing.exit_code == 2 and "no such model file" in missing.output


# ---- the real model -------------------------------------------------------------------------------

MODEL = "qwen2.5-coder-0.5b-instruct"
LOAD_QUESTIONS = ["Tom has 3 apples and buys 5 more. How many apples does he have?",
                  "A box holds 12 pens. How many pens are in 4 boxes?",
                  "Sara had 20 dollars and spent 7. How much money is left?",
                  "There are 9 birds on a tree and 4 fly away. How many birds are left?"]
SETTINGS = ["--prompt-style", "few-shot", "--paths", "2", "--temperature", "0.7", "--max-tokens", "24"]


@pytest.mark.slow
def test_32_concurrent_clients_get_the_answers_mdlite_solve_gives():
    """32 clients x 2 requests (4 questions x seeds 0 and 1) against `mdlite serve` on loopback: every request
    answered, each path as `mdlite solve` samples it with the same seed; then SIGTERM finishes one in flight."""
    process = subprocess.Popen([sys.executable, "-m", "mdlite", "serve", "--model", MODEL, "--port", "0", *SETTINGS],
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = None
        deadline = time.time() + 120
        while url is None and time.time() < deadline:
            line = process.stderr.readline()
            assert line, "mdlite serve exited before it was ready"
            if found := re.search(r"at (http://\S+)", line):
                url = found.group(1)
        assert url, "mdlite serve did not become ready"
        jobs = [(LOAD_QUESTIONS[(client + k) % 4], (client // 4 + k) % 2) for client in range(32) for k in range(2)]

        def client(first: int) -> list[dict]:
            with httpx.Client(base_url=url, timeout=600) as http:
                out = []
                for question, seed in jobs[first:first + 2]:
                    reply = http.post("/chat/completions", json={"messages": [{"role": "user", "content": question}],
                                                                  "seed": seed})
                    assert reply.status_code == 200, reply.text
                    out.append(reply.json()["mdlite"])
                return out

        started = time.perf_counter()
        with ThreadPoolExecutor(32) as pool:
            served = [record for records in pool.map(client, range(0, 64, 2)) for record in records]
        wall = time.perf_counter() - started
        assert len(served) == 64
        print(f"64 requests from 32 clients in {wall:.1f} s")

        expected = {}
        for seed in (0, 1):
            result = CliRunner().invoke(cli, ["solve", "-", "--model", MODEL, *SETTINGS, "--seed", str(seed), "--json"],
                                        input="\n".join(LOAD_QUESTIONS))
            assert result.exit_code == 0, result.output
            for line in result.stdout.splitlines():
                record = json.loads(line)
                expected[record["question"], seed] = record
        for (question, seed), record in zip(jobs, served, strict=True):
            want = expected[question, seed]
            assert (record["question"], record["seed"]) == (question, seed)
            assert [p["text"] for p in record["paths"]] == [p["text"] for p in want["paths"]]
            assert record["answer"] == want["answer"] and record["vote"] == want["vote"]

        with ThreadPoolExecutor(1) as pool:  # SIGTERM while a request is in flight: it is still answered
            body = {"messages": [{"role": "user", "content": jobs[0][0]}], "seed": jobs[0][1]}
            pending = pool.submit(httpx.post, f"{url}/chat/completions", json=body, timeout=300)
            time.sleep(1.0)
            process.send_signal(signal.SIGTERM)
            assert pending.result().json()["mdlite"]["paths"] == served[0]["paths"]
        assert process.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        process.stderr.close()
