"""`mdlite serve`: the HTTP API, batching, limits and shutdown with a scripted engine in a real uvicorn server
on loopback (fast), and 32 concurrent clients against the real Qwen2.5-Coder 0.5B GGUF (slow)."""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

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
    """Stands in for the continuously batching Engine: `submit` returns a future settled `delay` seconds later
    (one cancelled before then is dropped: `decoded` never sees it). Path j of a prompt says 7, 8 or 9 by its seed
    alone (as the real engine's text depends on the prompt and seed only); a prompt containing 'explode' fails
    as a llama.cpp failure would. A token is a byte."""

    max_paths = 16

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.calls: list[dict] = []  # every request submitted
        self.decoded: list[dict] = []  # those answered (not cancelled first)
        self.steps = self.in_flight = self.most_in_flight = 0
        self.alive = True
        self._lock = threading.Lock()

    def tokenize(self, text):
        return list(text.encode())

    def close(self):
        self.alive = False

    def submit(self, prompt, *, n, temperature, top_p, top_k, max_tokens, stop, stop_after, seed, first_path):
        call = {"prompt": prompt, "n": n, "temperature": temperature}
        self.calls.append(call)
        future = Future()
        with self._lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)

        def settle():
            with self._lock:
                self.in_flight -= 1
                self.steps += 1
            if not future.set_running_or_notify_cancel():
                return
            self.decoded.append(call)
            if "explode" in prompt:
                failure = "a prompt of 99999 tokens + max_tokens 256 exceeds the model's context"
                future.set_exception(MdliteError(failure))
            else:
                future.set_result([_generation(text) for text in self.texts(prompt, n, first_path, seed, temperature)])

        if self.delay:
            threading.Timer(self.delay, settle).start()
        else:
            settle()
        return future

    def texts(self, prompt, n, first, seed, temperature):
        pot = "Python program" in prompt
        values = [7 + derive_seed(seed, j, temperature) % 3 for j in range(first, first + n)]
        return [f"```python\ndef solution():\n    print('working')\n    return {value}\n```" if pot
                else f"3 + 5 = {value}. The answer is {value}." for value in values]


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
    def texts(self, prompt, n, *_):
        return ["I have no idea."] * n


def test_a_question_no_path_answers_says_so():
    with serving(ClueLessEngine()) as (url, _, _):
        reply = chat(url, paths=2).json()
    assert reply["choices"][0]["message"]["content"] == "No answer: none of the 2 paths gave one."
    assert reply["mdlite"]["answer"] is None and reply["mdlite"]["winner"] is None
    assert [p["program_error"] for p in reply["mdlite"]["paths"]] == [None, "no program"]


def test_requests_that_arrive_together_are_decoded_together_and_keep_their_answers():
    engine = FakeEngine(delay=1.0)
    questions = [f"Question number {i}: how many?" for i in range(6)]
    with serving(engine) as (url, _, _):
        with ThreadPoolExecutor(6) as pool:
            first = pool.submit(chat, url, questions[0], paths=4, seed=1)
            time.sleep(0.2)  # its paths are being decoded: the other five join them, no waiting for a batch's end
            rest = list(pool.map(lambda q: chat(url, q, paths=4, seed=1), questions[1:]))
            replies = [reply.json() for reply in [first.result(), *rest]]
    assert engine.most_in_flight == 12  # CoT + PoT request of all six at once
    for question, reply in zip(questions, replies, strict=True):
        assert reply["mdlite"]["paths"] == reference(question, paths=4, seed=1)["paths"]


def test_per_request_settings_and_limits():
    engine = FakeEngine()
    with serving(engine, paths=4, max_paths=8) as (url, _, _):
        reply = chat(url, mode="hybrid", paths=8, temperature=0.2, seed=11, max_tokens=64).json()
        assert reply["mdlite"]["answer"] == reference(mode="hybrid", paths=8, seed=11, temperature=0.2)["answer"]
        assert (reply["mdlite"]["temperature"], reply["mdlite"]["max_tokens"]) == (0.2, 64)
        assert engine.calls[-1]["temperature"] == 0.2 and engine.calls[-1]["n"] == 8
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
    # what Python's json reads but cannot use: a lone surrogate, an integer past the int-digit limit
    (b'{"messages": [{"role": "user", "content": "How many \\ud800 apples?"}]}', "lone surrogate ('\\ud800')"),
    (b'{"messages": [{"role": "user", "content": "How many?"}], "seed": ' + b"9" * 5000 + b"}",
     "a number of over 4300 digits"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function"}]},
                   {"role": "user", "content": QUESTION}]}, "messages[0]: tool_calls [{"),
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


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_disconnects_stops_costing_at_once(stream):
    engine = FakeEngine(delay=1.0)
    with serving(engine) as (url, app, _):
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(chat, url, "Q first?", paths=2, temperature=0.5)
            time.sleep(0.1)
            body = {"messages": [{"role": "user", "content": "Q gone?"}], "paths": 2, "temperature": 0.9}
            if stream:
                with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}) as gone:
                    assert '"role": "assistant"' in next(gone.iter_lines())  # then it hangs up
            else:
                with pytest.raises(httpx.ReadTimeout):
                    httpx.post(f"{url}/v1/chat/completions", json=body, timeout=0.3)
            assert first.result().status_code == 200
        assert chat(url, paths=2).status_code == 200
        assert any("Q gone?" in call["prompt"] for call in engine.calls)  # submitted, then dropped undecoded
        assert not any("Q gone?" in call["prompt"] for call in engine.decoded)
        assert app.state.scheduler.admitted == 0


def test_shutdown_finishes_the_requests_in_flight():
    engine = FakeEngine(delay=0.5)
    with serving(engine) as (url, app, server):
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(chat, url, paths=2)
            time.sleep(0.2)
            server.should_exit = True  # what Ctrl-C / SIGTERM set
            assert pending.result().status_code == 200
    assert app.state.scheduler.stopping and not engine.alive  # the engine was closed


# ---- the openai client: plain, neutral fields, streaming ------------------------------------------


def openai_client(url):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def test_the_openai_client_with_neutral_fields_and_a_long_max_tokens():
    """What chat front ends send by default is accepted; max_tokens beyond the server's is capped; prompt_tokens
    counts each sampled style's prompt once."""
    with serving(FakeEngine(), paths=4) as (url, _, _):
        client = openai_client(url)
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}]
        reply = client.chat.completions.create(
            model="student", messages=messages,
            seed=3, max_tokens=4096, n=1, presence_penalty=0, frequency_penalty=0, logprobs=False, top_logprobs=0,
            logit_bias={}, tools=[], tool_choice="none", parallel_tool_calls=False, response_format={"type": "text"},
            store=False, user="someone", metadata={"chat": "1"}, stop=["\n\n"])
        text = client.completions.create(model="student", prompt=QUESTION, seed=3, max_tokens=100_000, echo=False,
                                         best_of=1, presence_penalty=0, extra_body={"paths": 4})
    expected = reference(paths=4, seed=3)
    extra = reply.model_extra["mdlite"]
    assert extra["paths"] == expected["paths"] and extra["max_tokens"] == 256  # capped at the server's --max-tokens
    assert text.choices[0].text == reply.choices[0].message.content and text.model_extra["mdlite"]["max_tokens"] == 256
    prompt_tokens = sum(len(student_prompt(QUESTION, style=style).encode()) for style in ("cot", "pot"))
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, expected["tokens"])
    assert reply.usage.total_tokens == prompt_tokens + expected["tokens"]


def test_streaming_gives_the_same_content_with_keep_alives_usage_and_the_vote(monkeypatch):
    monkeypatch.setattr("mdlite.serve.KEEP_ALIVE_S", 0.2)
    question = [{"role": "user", "content": QUESTION}]
    with serving(FakeEngine(delay=0.8)) as (url, _, _):
        client = openai_client(url)
        plain = client.chat.completions.create(model="student", messages=question, seed=3)
        chunks = list(client.chat.completions.create(model="student", messages=question, seed=3, stream=True,
                                                     stream_options={"include_usage": True}))
        text = client.completions.create(model="student", prompt=QUESTION, seed=3)
        text_chunks = list(client.completions.create(model="student", prompt=QUESTION, seed=3, stream=True))
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={"messages": question, "stream": True}) as raw:
            assert raw.headers["content-type"].startswith("text/event-stream")
            events = "".join(raw.iter_text())
    first, *middle, final, usage = chunks
    assert first.choices[0].delta.role == "assistant" and len(middle) > 1  # the content a line per chunk
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks[:-1]) == plain.choices[0].message.content
    assert final.choices[0].finish_reason == "stop" and final.model_extra["mdlite"] == plain.model_extra["mdlite"]
    assert usage.choices == [] and usage.usage == plain.usage
    assert {(chunk.id, chunk.object) for chunk in chunks} == {(first.id, "chat.completion.chunk")}
    assert "".join(chunk.choices[0].text for chunk in text_chunks) == text.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == "stop" and text_chunks[0].object == "text_completion"
    assert ": keep-alive\n\n" in events and events.endswith("data: [DONE]\n\n")  # keep-alives while the vote ran


def test_an_error_after_the_stream_began_is_raised_by_the_openai_client():
    from openai import APIError, BadRequestError

    with serving(FakeEngine()) as (url, _, _):
        client = openai_client(url)
        stream = client.chat.completions.create(model="student", messages=[{"role": "user", "content": "explode"}],
                                                stream=True)
        with pytest.raises(APIError, match="exceeds the model's context"):
            list(stream)
        with pytest.raises(BadRequestError, match="n must be 1"):  # before the stream: a plain 400
            client.chat.completions.create(model="student", messages=[{"role": "user", "content": QUESTION}], n=2,
                                           stream=True)
        assert chat(url, paths=2).status_code == 200


def test_a_multi_turn_client_sends_the_replies_back():
    """The openai SDK's `message.model_dump()` of a reply (refusal, tool_calls, function_call, audio: None; OpenAI's
    own server also sends annotations: []) goes back in the conversation; the question is the last user message."""
    with serving(FakeEngine(), paths=2) as (url, _, _):
        client = openai_client(url)
        messages = [{"role": "user", "content": QUESTION}]
        reply = client.chat.completions.create(model="student", messages=messages).choices[0].message.model_dump()
        assert {"refusal", "tool_calls", "function_call", "audio", "annotations"} <= set(reply)
        messages += [reply, {"role": "user", "content": "And with 2 more?"}]
        second = client.chat.completions.create(model="student", messages=messages)
        messages += [{**second.choices[0].message.model_dump(), "annotations": [], "refusal": "I cannot."},
                     {"role": "user", "content": "And with 3 more?"}]  # a past refusal is history, not an action
        third = client.chat.completions.create(model="student", messages=messages)
    assert second.model_extra["mdlite"]["question"] == "And with 2 more?"
    assert third.model_extra["mdlite"]["question"] == "And with 3 more?"


class HugeAnswerEngine(FakeEngine):
    """Its paths state answers no float holds."""

    def texts(self, prompt, n, *_):
        return [("The answer is 1e999.\n", f"He has {'9' * 400} apples. The answer is {'9' * 400}.\n")[j % 2]
                for j in range(n)]


def test_answers_that_are_not_finite_are_no_answer_in_plain_and_streamed_replies():
    def strict(text):  # JSON has no Infinity or NaN
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in {text[:200]}"))

    body = {"messages": [{"role": "user", "content": QUESTION}], "mode": "cot", "paths": 2, "seed": 1}
    with serving(HugeAnswerEngine()) as (url, _, _):
        plain = httpx.post(f"{url}/v1/chat/completions", json=body)
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}) as raw:
            events = [line.removeprefix("data: ") for line in raw.iter_lines() if line.startswith("data: {")]
            chunks = [strict(event) for event in events]
    assert plain.status_code == 200, plain.text
    reply = strict(plain.text)
    assert reply["mdlite"]["answer"] is None and [p["answer"] for p in reply["mdlite"]["paths"]] == [None] * 2
    assert reply["choices"][0]["message"]["content"] == "No answer: none of the 2 paths gave one."
    assert chunks[-1]["mdlite"] == reply["mdlite"]


def test_a_request_without_seed_gets_a_fresh_one_that_reproduces_it():
    with serving(FakeEngine()) as (url, _, _):
        first, second = (chat(url, paths=6).json()["mdlite"] for _ in range(2))
        again = chat(url, paths=6, seed=first["seed"]).json()["mdlite"]
    assert first["seed"] != second["seed"]  # "regenerate" in a chat UI gives a new sample
    assert again["paths"] == first["paths"] == reference(paths=6, seed=first["seed"])["paths"]
    with serving(FakeEngine(), seed=5) as (url, _, _):  # a server started with --seed answers reproducibly
        assert chat(url, paths=6).json()["mdlite"]["paths"] == reference(paths=6, seed=5)["paths"]


def test_program_output_only_when_asked():
    with serving(FakeEngine()) as (url, _, _):
        quiet = chat(url, paths=2).json()["mdlite"]["paths"]
        told = chat(url, paths=2, program_stdout=True).json()["mdlite"]["paths"]
    assert [(p["style"], p["program_stdout"]) for p in quiet] == [("cot", None), ("pot", None)]
    assert [(p["style"], p["program_stdout"]) for p in told] == [("cot", None), ("pot", "working\n")]


# ---- callers: web pages, hosts, keys -----------------------------------------------------------------


def test_web_pages_and_foreign_hosts_are_refused():
    engine = FakeEngine()
    body = json.dumps({"messages": [{"role": "user", "content": QUESTION}], "paths": 2}).encode()

    def post(url, **headers):
        return httpx.post(f"{url}/v1/chat/completions", content=body, headers=headers)

    with serving(engine) as (url, _, _):
        port = url.rsplit(":", 1)[1]
        # a page's "simple request" (text/plain: no CORS preflight) from another origin
        page = post(url, **{"Content-Type": "text/plain", "Origin": "http://evil.example"})
        assert page.status_code == 403 and "--allowed-origins http://evil.example" in page.json()["error"]["message"]
        assert post(url, **{"Content-Type": "application/json", "Origin": "http://evil.example"}).status_code == 403
        plain = post(url, **{"Content-Type": "text/plain"})
        assert plain.status_code == 415 and "must be application/json" in plain.json()["error"]["message"]
        # DNS rebinding: a page whose name now resolves to 127.0.0.1 sends its own name as Host
        rebound = post(url, **{"Content-Type": "application/json", "Host": f"evil.example:{port}"})
        assert rebound.status_code == 403 and "--allowed-hosts" in rebound.json()["error"]["message"]
        assert httpx.get(f"{url}/v1/models", headers={"Host": f"evil.example:{port}"}).status_code == 403
        assert not engine.calls
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "127.0.0.1"):
            assert post(url, **{"Content-Type": "application/json; charset=utf-8", "Host": host}).status_code == 200
    with serving(FakeEngine(), allowed_origins=["http://ui.example:3000/"], allowed_hosts=["box.lan"]) as (url, _, _):
        port = url.rsplit(":", 1)[1]
        ui = {"Origin": "http://ui.example:3000", "Host": f"box.lan:{port}"}
        preflight = httpx.options(f"{url}/v1/chat/completions", headers={
            **ui, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
        assert preflight.status_code == 200
        allowed = post(url, **ui, **{"Content-Type": "application/json"})
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "http://ui.example:3000"
        assert post(url, **{"Content-Type": "application/json", "Origin": "http://evil.example"}).status_code == 403


def test_a_host_beyond_loopback_needs_an_api_key(monkeypatch):
    monkeypatch.delenv("MDLITE_API_KEY", raising=False)
    refused = CliRunner().invoke(cli, ["serve", "--model", "missing/student.gguf", "--host", "0.0.0.0"])
    assert refused.exit_code == 2 and len(refused.output.strip().splitlines()) == 1
    assert "--api-key" in refused.output and "--insecure-no-key" in refused.output
    for flags in (["--insecure-no-key"], ["--api-key", "k"]):  # past the check: the next error is the model's
        allowed = CliRunner().invoke(cli, ["serve", "--model", "missing/student.gguf", "--host", "0.0.0.0", *flags])
        assert allowed.exit_code == 2 and "no such model file" in allowed.output


# ---- limits, health, failures -----------------------------------------------------------------------


def _read_until_closed(sock):
    sock.settimeout(10)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_slow_clients_are_cut_off_while_others_are_served():
    with serving(FakeEngine(), read_timeout_s=2) as (url, _, _):
        address = ("127.0.0.1", int(url.rsplit(":", 1)[1]))
        started = time.monotonic()
        with socket.create_connection(address) as half, socket.create_connection(address) as trickle:
            half.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                         b"\r\nContent-Length: 200\r\n\r\n" + b'{"messages": [')  # half a body, then nothing
            trickle.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # headers never end
            assert chat(url, paths=2).status_code == 200 and time.monotonic() - started < 2  # served meanwhile
            reply = _read_until_closed(half)
            assert reply.startswith(b"HTTP/1.1 408") and b"--read-timeout-s" in reply
            assert _read_until_closed(trickle) == b""  # closed without a word
        assert 1.9 < time.monotonic() - started < 8


def test_limit_concurrency():
    with serving(FakeEngine(), limit_concurrency=3) as (url, _, _):
        address = ("127.0.0.1", int(url.rsplit(":", 1)[1]))
        idle = [socket.create_connection(address) for _ in range(2)]
        time.sleep(0.2)
        assert httpx.get(f"{url}/health").status_code == 503  # 2 idle connections + this one
        for sock in idle:
            sock.close()
        time.sleep(0.2)
        assert httpx.get(f"{url}/health").status_code == 200


class CrashingEngine(FakeEngine):
    def submit(self, prompt, **settings):
        if "crash" in prompt:
            self.alive = False  # its worker thread died: the future is never settled
            return Future()
        return super().submit(prompt, **settings)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_health_says_loading_until_the_model_is_in_and_reports_a_dead_worker():
    release = threading.Event()

    def load():
        release.wait(10)
        return CrashingEngine()

    with serving(None, load=load) as (url, app, _):
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        early = chat(url, paths=2)
        assert early.status_code == 503 and early.json()["error"]["code"] == "loading" and early.headers["Retry-After"]
        release.set()
        deadline = time.time() + 10
        while app.state.scheduler is None:
            assert time.time() < deadline
            time.sleep(0.01)
        assert httpx.get(f"{url}/health").json()["status"] == "ok" and chat(url, paths=2).status_code == 200
        crashed = chat(url, "crash now", paths=2)
        assert crashed.status_code == 503 and "worker thread stopped" in crashed.json()["error"]["message"]
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and "worker thread died" in health.json()["status"]


def test_the_longest_request_must_fit_the_context():
    engine = FakeEngine()
    engine.n_ctx_train = 300  # the student template is at most 80 tokens here (a token is a byte)
    check_context(engine, ServeConfig(model="x.gguf", max_prompt_tokens=100, max_tokens=64))
    check_context(engine, ServeConfig(model="x.gguf", max_prompt_tokens=100, max_tokens=256, num_ctx=500))
    with pytest.raises(MdliteError, match=r"over the context of 300 \(the model\); lower --max-prompt-tokens"):
        check_context(engine, ServeConfig(model="x.gguf", max_prompt_tokens=100, max_tokens=256))


# ---- mdlite eval over mdlite serve ---------------------------------------------------------------------


def test_eval_of_a_served_mdlite_scores_paths_not_votes(tmp_path):
    """/v1/models says owned_by mdlite, so eval asks for one path per request (paths: 1, mode: its style) and
    records that path's own text and tokens, not a vote over the server's default 10."""
    from mdlite.data import Problem, write_problems

    write_problems([Problem(str(i), f"Tom has 3 apples and buys {i} more. How many apples?", 3 + i) for i in (4, 5)],
                   tmp_path / "problems.jsonl")
    engine = FakeEngine()
    with serving(engine) as (url, _, _):
        result = CliRunner().invoke(cli, ["eval", "--model", f"openai:{url}/v1", "--prompt-style", "student",
                                          "--data", str(tmp_path / "problems.jsonl"), "--paths", "2",
                                          "--output-dir", str(tmp_path / "eval")])
        assert result.exit_code == 0, result.output
    assert [call["n"] for call in engine.calls] == [1] * 2 * (1 + 1 + 2 + 2)  # greedy + 2 sampled per style
    records = [json.loads(line) for line in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 2 * 6
    for record in records:
        assert record["text"].startswith("```python" if record["style"] == "pot" else "3 + 5 = ")
        assert record["tokens"] == len(record["text"].split())  # the path's own, not the vote's sum
        assert record["correct"] == (record["answer"] == record["gold"])


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


SLOW_LOAD = """
import sys, time
import mdlite.engine

class SlowEngine(mdlite.engine.Engine):
    def __init__(self, *args, **kwargs):
        time.sleep(120)  # a big model from a slow disk
        super().__init__(*args, **kwargs)

mdlite.engine.Engine = SlowEngine
from mdlite.cli import cli
cli(["serve", "--model", sys.argv[1], "--port", sys.argv[2]])
"""


def test_sigterm_while_the_model_loads_exits_at_once(tmp_path):
    """SIGTERM during a long model load: the server exits at once (0), without waiting for the load to end."""
    model = tmp_path / "student.gguf"
    model.write_bytes(b"GGUF")  # never opened: the signal comes first
    with contextlib.closing(bind("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-c", SLOW_LOAD, str(model), str(port)])
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None and time.monotonic() < deadline, "mdlite serve did not start"
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert (health.status_code, health.json()["status"]) == (503, "loading")
        process.send_signal(signal.SIGTERM)
        signalled = time.perf_counter()
        assert process.wait(timeout=60) == 0
        assert time.perf_counter() - signalled < 10
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


# ---- the real model -------------------------------------------------------------------------------

MODEL = "qwen2.5-coder-0.5b-instruct"
LOAD_QUESTIONS = ["Tom has 3 apples and buys 5 more. How many apples does he have?",
                  "A box holds 12 pens. How many pens are in 4 boxes?",
                  "Sara had 20 dollars and spent 7. How much money is left?",
                  "There are 9 birds on a tree and 4 fly away. How many birds are left?"]
SETTINGS = ["--prompt-style", "few-shot", "--paths", "2", "--temperature", "0.7", "--max-tokens", "24"]


@pytest.mark.slow
def test_health_answers_while_the_engine_creates_its_context(monkeypatch, slow_context_creation):
    """A request that arrives while the engine creates its context (llama.cpp allocating the KV cache) does not
    hold up the event loop: /health answers at once."""
    from mdlite.engine import Engine

    engine = Engine(MODEL, max_paths=4, prefix_cache=0)
    creating = slow_context_creation(engine, 3)
    try:
        with serving(engine, paths=1, max_tokens=8, temperature=0.0) as (url, _, _), ThreadPoolExecutor(2) as pool:
            first = pool.submit(chat, url, timeout=120)
            assert creating.wait(30)
            second = pool.submit(chat, url, "A box holds 12 pens. How many pens are in 4 boxes?", timeout=120)
            time.sleep(0.5)  # the second request is submitted to the engine while the context is created
            started = time.perf_counter()
            assert httpx.get(f"{url}/health", timeout=30).json()["status"] == "ok"
            assert time.perf_counter() - started < 1
            assert first.result().status_code == second.result().status_code == 200
    finally:
        monkeypatch.undo()
        engine.close()


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
            signalled = time.perf_counter()
            assert pending.result().json()["mdlite"]["paths"] == served[0]["paths"]
        assert process.wait(timeout=60) == 0  # a clean exit: the request in flight answered, the engine closed
        assert time.perf_counter() - signalled < 30 + 5  # within --shutdown-timeout-s (30 s by default)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        process.stderr.close()
