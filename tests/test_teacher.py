"""Teacher backends (teacher.py): spec parsing, the pool's retries and endpoint spreading, the Ollama
backend, and real models: a real `python -m llama_cpp.server` with the Qwen2.5-Coder 0.5B demo GGUF
(the openai backend, and `mdlite teach` end to end) and the same GGUF in-process (llamacpp backend).

The Ollama backend is tested against tests/fake_ollama.py, a small server speaking Ollama's documented
HTTP API, which stands in for Ollama because no Ollama server can be installed here; the client is the
real `ollama` package.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import ollama
import pytest
from click.testing import CliRunner
from fake_ollama import FakeOllama

from mdlite import MdliteError
from mdlite.answers import answers_match, format_number
from mdlite.cli import cli
from mdlite.config import TeachConfig
from mdlite.llamacpp import server_command
from mdlite.models import get_card, model_path
from mdlite.prompts import TEACHER_STOP, teacher_prompt
from mdlite.rationales import run
from mdlite.teacher import TeacherError, TeacherSpec, make_pool, make_teacher, parse_teacher_spec

DEMO_TEACHER = "qwen2.5-coder-0.5b-instruct"
QUESTION = "Ravi has 12 apples and buys 30 more. How many apples does he have now?"


@pytest.mark.parametrize(("spec", "expected"), [
    ("ollama:qwen2.5:32b", TeacherSpec("ollama", "qwen2.5:32b")),
    ("ollama:llama3", TeacherSpec("ollama", "llama3")),
    ("openai:http://127.0.0.1:8080/v1#qwen", TeacherSpec("openai", "qwen", "http://127.0.0.1:8080/v1")),
    ("openai:https://box:8000/v1/", TeacherSpec("openai", "", "https://box:8000/v1")),
    ("openai-chat:http://h:1/v1#m:7b", TeacherSpec("openai-chat", "m:7b", "http://h:1/v1")),
    ("llamacpp:qwen2.5-coder-0.5b-instruct", TeacherSpec("llamacpp", "qwen2.5-coder-0.5b-instruct")),
    ("llamacpp:/models/a:b.gguf", TeacherSpec("llamacpp", "/models/a:b.gguf")),
])
def test_parse_teacher_spec(spec: str, expected: TeacherSpec) -> None:
    assert parse_teacher_spec(spec) == expected


@pytest.mark.parametrize(("spec", "message"), [
    ("qwen2.5:32b", "unknown backend 'qwen2.5'"),
    ("ollama:", "no model given"),
    ("openai:127.0.0.1:8080/v1", "needs a base URL"),
    ("vllm:http://h/v1", "unknown backend"),
])
def test_bad_teacher_specs_say_how_to_write_one(spec: str, message: str) -> None:
    with pytest.raises(MdliteError, match=message) as error:
        parse_teacher_spec(spec)
    assert "--teacher" in str(error.value)


def test_endpoints_replace_the_spec_url() -> None:
    teacher = make_teacher("openai:http://a:1/v1#m", endpoint="http://b:2/v1/")
    assert teacher.endpoint == "http://b:2/v1"
    assert make_teacher("ollama:m", endpoint="http://c:3").endpoint == "http://c:3"
    with pytest.raises(MdliteError, match="in-process"):
        make_teacher("llamacpp:x.gguf", endpoint="http://c:3")


# ---- Ollama backend against the Ollama-protocol test server -------------------------------------


def _complete(pool, prompt: str, **options: object) -> list:
    async def go() -> list:
        try:
            return await pool.complete(prompt, **{"temperature": 0.7, "max_tokens": 32, "stop": [], **options})
        finally:
            await pool.aclose()

    return asyncio.run(go())


def test_ollama_backend_completes_and_reports_usage() -> None:
    prompt = teacher_prompt(QUESTION, style="cot")
    script = {"cot": {QUESTION: [" 12 + 30 = 42. The answer is 42.", " 12 - 30. The answer is -18.\n\nQuestion: x"]}}
    with FakeOllama(model="qwen2.5:32b", script=script) as server:
        async def go() -> tuple:
            pool = make_pool("ollama:qwen2.5:32b", endpoints=[server.url])
            try:
                digest = await pool.check()
                return digest, await pool.complete(prompt, n=3, temperature=0.7, max_tokens=32,
                                                   stop=TEACHER_STOP["cot"], seed=4)
            finally:
                await pool.aclose()

        digest, completions = asyncio.run(go())
        short = _complete(make_pool("ollama:qwen2.5:32b", endpoints=[server.url]), prompt, max_tokens=3, seed=4)
    assert digest == server.digest
    assert [c.text for c in completions] == [script["cot"][QUESTION][s % 2].split("\n\n")[0] for s in (4, 5, 6)]
    assert [c.finish_reason for c in completions] == ["stop"] * 3
    assert completions[0].tokens == 9 and completions[0].latency_s > 0 and completions[0].server_s > 0
    assert short[0].text == " 12 + 30 " and short[0].tokens == 3 and short[0].finish_reason == "length"


def test_fake_server_speaks_the_ollama_api() -> None:
    """The stand-in implements what the real client sends: streaming NDJSON, chat, show, tags, 404."""
    with FakeOllama(model="m", script={"cot": {"Q?": [" one two three"]}}) as server:
        async def go() -> None:
            client = ollama.AsyncClient(host=server.url)
            parts = [part async for part in await client.generate(model="m", prompt="Question: Q?\nAnswer:",
                                                                  raw=True, stream=True)]
            assert len(parts) == 4 and [p.done for p in parts] == [False] * 3 + [True]
            assert "".join(p.response for p in parts) == " one two three" and parts[-1].eval_count == 3
            chat = await client.chat(model="m:latest", messages=[{"role": "user", "content": "Question: Q?\n"}])
            assert chat.message.content == " one two three" and chat.done_reason == "stop"
            assert (await client.show("m")).details.format == "gguf"
            assert [m.model for m in (await client.list()).models] == ["m:latest"]
            with pytest.raises(ollama.ResponseError) as error:
                await client.generate(model="absent", prompt="x")
            assert error.value.status_code == 404
            await client.close()

        asyncio.run(go())


def test_pool_bounds_requests_in_flight_and_retries_503() -> None:
    with FakeOllama(model="m", parallel=2, latency_s=0.05) as server:
        async def go(concurrency: int) -> None:
            pool = make_pool("ollama:m", endpoints=[server.url], concurrency=concurrency, retries=30, backoff_s=0.01)
            try:
                await asyncio.gather(*(pool.complete("x", temperature=0.5, max_tokens=4, stop=[], seed=i)
                                       for i in range(12)))
            finally:
                await pool.aclose()

        asyncio.run(go(2))
        assert server.stats == {"requests": 12, "served": 12, "busy_503": 0, "in_flight": 0, "max_in_flight": 2}
        asyncio.run(go(6))  # more than the server's slots: 503s, retried until served
        assert server.stats["served"] == 24 and server.stats["busy_503"] > 0


def test_pool_gives_up_after_retries_and_never_retries_client_errors() -> None:
    script = {"cot": {"A": ["!error 503"], "B": ["!error 404"]}}
    with FakeOllama(model="m", script=script) as server:
        for question, requests, retryable in (("A", 3, True), ("B", 1, False)):
            before = server.stats["requests"]
            with pytest.raises(TeacherError) as error:
                _complete(make_pool("ollama:m", endpoints=[server.url], retries=2, backoff_s=0.01),
                          f"Question: {question}\nAnswer:")
            assert error.value.retryable is retryable and server.stats["requests"] - before == requests


def test_pool_checks_every_endpoint() -> None:
    with FakeOllama(model="m") as server:
        for spec, endpoints, message in (("ollama:other", [server.url], "ollama pull other"),
                                         ("ollama:m", [server.url, f"http://127.0.0.1:{_free_port()}"],
                                          "cannot reach Ollama")):
            pool = make_pool(spec, endpoints=endpoints)
            with pytest.raises(MdliteError, match=message):
                asyncio.run(pool.check())


# ---- real models: llama.cpp's server (openai backend) and in-process (llamacpp backend) ---------------


@pytest.fixture(scope="module")
def llama_server() -> Iterator[str]:
    """A real llama_cpp.server (through mdlite's door: `python -m mdlite.llamacpp`) with the demo teacher GGUF
    on a free loopback port."""
    port = _free_port()
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    server = subprocess.Popen(server_command("--model", str(model_path(DEMO_TEACHER)), "--host", "127.0.0.1",
                                             "--port", str(port), "--n_ctx", "2048"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None and time.monotonic() < deadline, "llama_cpp.server did not start"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.3)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.terminate()
        server.wait(30)


@pytest.mark.slow
def test_openai_backend_against_llama_cpp_server(llama_server: str) -> None:
    prompt = teacher_prompt(QUESTION, style="pot")

    async def go(spec: str) -> list:
        pool = make_pool(spec)
        try:
            assert await pool.check() is None  # OpenAI-compatible servers give no digest
            first = await pool.complete(prompt, n=2, temperature=0.8, max_tokens=24, stop=TEACHER_STOP["pot"], seed=7)
            again = await pool.complete(prompt, temperature=0.8, max_tokens=24, stop=TEACHER_STOP["pot"], seed=7)
            return [*first, *again]
        finally:
            await pool.aclose()

    completions = asyncio.run(go(f"openai:{llama_server}"))
    assert completions[0].text == completions[2].text  # same seed, same sample
    assert all(0 < c.tokens <= 24 and c.finish_reason in ("stop", "length") for c in completions)
    assert "```" not in completions[0].text
    chat = asyncio.run(go(f"openai-chat:{llama_server}"))
    assert chat[0].text.strip() and chat[0].text == chat[2].text


@pytest.mark.slow
def test_mdlite_teach_against_llama_cpp_server(llama_server: str, shared_data: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, [
        "teach", "--data", str(shared_data / "svamp" / "train.jsonl"), "--limit", "10",
        "--teacher", f"openai:{llama_server}", "--n-cot", "1", "--n-pot", "1", "--max-tokens", "96",
        "--output-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "rationales.jsonl").read_text().splitlines()]
    assert len(records) == 20 and len({r["key"] for r in records}) == 20
    assert sum(r["kept"] for r in records) >= 1, [(r["text"], r["gold"]) for r in records]
    for r in records:
        assert r["tokens"] > 0 and r["teacher"] == f"openai:{llama_server}" and r["model_digest"] is None
        if r["kept"]:
            assert answers_match(r["answer"], r["gold"])
            if r["style"] == "cot":
                assert r["text"].endswith(f"The answer is {format_number(r['gold'])}.")
    stats = json.loads((tmp_path / "teach_stats.json").read_text())
    assert stats["session"]["requests"] == 20 and stats["styles"]["pot"]["tokens_per_s"] > 0


@pytest.mark.slow
def test_llamacpp_backend_in_process(shared_data: Path, tmp_path: Path) -> None:
    """Requests in flight together share the engine's decode steps, each sampled as it would be alone."""
    async def go() -> tuple:
        pool = make_pool(f"llamacpp:{DEMO_TEACHER}", concurrency=1)
        try:
            assert pool.slots == 32  # twice the engine's sequences, whatever the concurrency asked for
            digest = await pool.check()
            prompts = [teacher_prompt(QUESTION, style="pot"), teacher_prompt(QUESTION, style="cot")]
            options = {"temperature": 0.8, "max_tokens": 40}
            requests = [(prompts[style], TEACHER_STOP[("pot", "cot")[style]], seed)
                        for style, seed in [(0, 11), (0, 11), (0, 12), (1, 13)]]
            [teacher] = pool.teachers
            steps = [teacher._engine.steps]
            together = await asyncio.gather(*(pool.complete(p, stop=stop, seed=seed, **options)
                                              for p, stop, seed in requests))
            steps.append(teacher._engine.steps)
            alone = [await pool.complete(p, stop=stop, seed=seed, **options) for p, stop, seed in requests]
            steps.append(teacher._engine.steps)
            return digest, together, alone, [b - a for a, b in itertools.pairwise(steps)]
        finally:
            await pool.aclose()

    digest, together, alone, steps = asyncio.run(go())
    assert digest == get_card(DEMO_TEACHER).gguf["sha256"]
    assert [c[0].text for c in together] == [c[0].text for c in alone]
    assert together[0][0].text == together[1][0].text  # same seed and prompt, same text
    assert 0 < together[0][0].tokens <= 40 and "def solution" in together[0][0].text
    steps_together, steps_alone = steps
    assert steps_together <= max(c[0].tokens for c in together) + 3  # decoded side by side
    assert steps_alone >= sum(c[0].tokens for c in alone) - 4

    stats = run(TeachConfig(data=str(shared_data / "svamp" / "train.jsonl"), limit=2,
                            teacher=f"llamacpp:{DEMO_TEACHER}", n_cot=1, n_pot=1, max_tokens=80,
                            output_dir=str(tmp_path)))["stats"]
    assert stats["session"]["requests"] == 4 and stats["failures"] == []
    assert stats["styles"]["pot"]["samples"] == 2


@pytest.mark.slow
def test_an_over_long_prompt_fails_alone() -> None:
    """One request that does not fit num_ctx gets its own non-retryable error; the others beside it are
    sampled as they would be without it."""
    long_prompt = teacher_prompt(QUESTION + " More words." * 600, style="cot")

    async def go() -> tuple:
        teacher = make_teacher(f"llamacpp:{DEMO_TEACHER}", num_ctx=1024)
        try:
            await teacher.check()
            short = [teacher.complete(teacher_prompt(QUESTION, style="pot"), temperature=0.8, max_tokens=24,
                                      stop=TEACHER_STOP["pot"], seed=seed) for seed in (1, 2)]
            mixed = await asyncio.gather(short[0], teacher.complete(long_prompt, temperature=0.8, max_tokens=24,
                                                                    stop=[], seed=3), short[1],
                                         return_exceptions=True)
            alone = [await teacher.complete(teacher_prompt(QUESTION, style="pot"), temperature=0.8, max_tokens=24,
                                            stop=TEACHER_STOP["pot"], seed=seed) for seed in (1, 2)]
            return mixed, alone
        finally:
            await teacher.aclose()

    mixed, alone = asyncio.run(go())
    assert isinstance(mixed[1], TeacherError) and not mixed[1].retryable
    assert "needs 2206 KV cells per path, but n_ctx is 1024" in str(mixed[1])
    assert [mixed[0][0].text, mixed[2][0].text] == [alone[0][0].text, alone[1][0].text]


@pytest.mark.slow
def test_an_engine_failure_reaches_every_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    """A MemoryError (or a llama.cpp failure) in the engine's worker resolves every waiting request: teach
    cannot hang."""
    def out_of_memory(ctx: object, batch: object) -> int:
        raise MemoryError("no room for the KV cache")

    async def go() -> list:
        teacher = make_teacher(f"llamacpp:{DEMO_TEACHER}")
        try:
            await teacher.check()
            monkeypatch.setattr(teacher._engine._llama, "llama_decode", out_of_memory)
            calls = [teacher.complete(f"prompt {i}", temperature=0.5, max_tokens=8, stop=[], seed=i) for i in range(3)]
            return await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), timeout=60)
        finally:
            monkeypatch.undo()
            await teacher.aclose()

    results = asyncio.run(go())
    assert [type(r) for r in results] == [TeacherError] * 3
    assert all("MemoryError: no room for the KV cache" in str(r) for r in results)


@pytest.mark.slow
def test_an_engine_failure_is_retried_by_the_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure of the in-process engine reaches the pool as a TeacherError, retryable while the engine lives:
    the pool's retry rules apply to it as to an HTTP teacher's 503."""
    async def go() -> list:
        pool = make_pool(f"llamacpp:{DEMO_TEACHER}", retries=1, backoff_s=0.01)
        try:
            await pool.check()
            [teacher] = pool.teachers
            decode, calls = teacher._engine._llama.llama_decode, itertools.count()

            def fails_once(ctx: object, batch: object) -> int:
                if next(calls) == 0:
                    raise MemoryError("no room for the KV cache")
                return decode(ctx, batch)

            monkeypatch.setattr(teacher._engine._llama, "llama_decode", fails_once)
            return await pool.complete(teacher_prompt(QUESTION, style="cot"), temperature=0.0, max_tokens=8, stop=[])
        finally:
            monkeypatch.undo()
            await pool.aclose()

    [completion] = asyncio.run(go())
    assert completion.tokens > 0


@pytest.mark.slow
def test_a_closed_in_process_teacher_refuses_requests_without_loading_again() -> None:
    async def go() -> object:
        teacher = make_teacher(f"llamacpp:{DEMO_TEACHER}")
        await teacher.check()
        await teacher.aclose()
        try:
            with pytest.raises(TeacherError, match="closed"):
                await teacher.complete("Count: 1, 2,", temperature=0.0, max_tokens=4, stop=[])
            return teacher._engine
        finally:
            await teacher.aclose()

    assert asyncio.run(go()) is None  # no model loaded again


@pytest.mark.slow
def test_closing_the_in_process_teacher_keeps_the_event_loop_running(monkeypatch: pytest.MonkeyPatch) -> None:
    """aclose() waits for the engine's worker to finish its step off the event loop; the request in flight
    fails with a non-retryable TeacherError."""
    decoding = threading.Event()

    async def go() -> tuple:
        teacher = make_teacher(f"llamacpp:{DEMO_TEACHER}")
        await teacher.check()
        decode = teacher._engine._llama.llama_decode

        def slow_decode(ctx: object, batch: object) -> int:
            decoding.set()
            time.sleep(2)
            return decode(ctx, batch)

        monkeypatch.setattr(teacher._engine._llama, "llama_decode", slow_decode)
        request = asyncio.ensure_future(teacher.complete("Count: 1, 2,", temperature=0.0, max_tokens=8, stop=[]))
        await asyncio.to_thread(decoding.wait, 30)
        gaps = []

        async def beat() -> None:
            while True:
                started = time.perf_counter()
                await asyncio.sleep(0.05)
                gaps.append(time.perf_counter() - started)

        beating = asyncio.ensure_future(beat())
        try:
            await teacher.aclose()
        finally:
            beating.cancel()
            monkeypatch.undo()
        return gaps, (await asyncio.gather(request, return_exceptions=True))[0]

    gaps, failed = asyncio.run(go())
    assert len(gaps) > 10 and max(gaps) < 0.5  # the loop ran every 50 ms while the worker finished its step
    assert isinstance(failed, TeacherError) and not failed.retryable and "closed" in str(failed)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize(("keep_alive", "sent"), [("30m", "30m"), ("-1", -1.0), ("300", 300.0), ("0", 0.0)])
def test_ollama_keep_alive_numbers_are_sent_as_seconds(keep_alive: str, sent: str | float) -> None:
    teacher = make_teacher("ollama:teacher", endpoint="http://127.0.0.1:9", keep_alive=keep_alive)
    assert teacher.keep_alive == sent  # Ollama parses a string as a Go duration, where "-1" has no unit
