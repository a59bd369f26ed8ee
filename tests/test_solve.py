"""`mdlite solve` and solve_questions: orchestration with a scripted engine (fast; real sandbox and
voting), and the CLI end to end on the real Qwen2.5-Coder 0.5B demo GGUF (slow)."""

import json
from concurrent.futures import Future

import pytest
from click.testing import CliRunner

from mdlite import MdliteError
from mdlite.cli import cli
from mdlite.engine import Generation, derive_seed
from mdlite.solve import solve_questions


class ScriptedEngine:
    """Stands in for Engine: answers each prompt with the next scripted texts of its question and style."""

    def __init__(self, script: dict[tuple[str, str], list[str]], max_paths: int = 16) -> None:
        self.script, self.max_paths = script, max_paths
        self.calls: list[dict] = []

    def submit(self, prompt, *, n, temperature, top_p, top_k, max_tokens, stop, stop_after, seed, first_path):
        self.calls.append({"prompt": prompt, "n": n, "first_path": first_path, "seed": seed, "stop": stop})
        style = "pot" if "Python program" in prompt or "```python" in prompt else "cot"
        question = next(q for q, s in self.script if s == style and q in prompt)
        texts = self.script[question, style][first_path:first_path + n]
        assert len(texts) == n, f"script too short for {question!r} {style}"
        future = Future()
        future.set_result([Generation(text, 5, "stop") for text in texts])
        return future


COT = "{} + {} = {}. The answer is {}."
POT = "```python\ndef solution():\n    return {}\n```"
SCRIPT = {
    ("Q1", "cot"): [COT.format(3, 5, 8, 8), COT.format(3, 4, 7, 7), "I am not sure.", COT.format(4, 4, 8, 8)],
    ("Q1", "pot"): [POT.format("3 + 5"), POT.format("3 + 5"), POT.format("apples"), POT.format("8.0")],
    ("Q2", "cot"): [COT.format(1, 1, 2, 2), COT.format(1, 2, 3, 3), COT.format(1, 1, 2, 2), "no idea"],
    ("Q2", "pot"): ["def solution():\n    while True:\n        pass\n", POT.format("1 / 0"),
                    "I cannot write this program.", POT.format("x")],
}


def test_mixed_vote_over_both_styles_with_every_path_reported():
    engine = ScriptedEngine(SCRIPT)
    [q1, q2] = solve_questions(engine, ["Q1", "Q2"], mode="mixed", paths=6, program_timeout=0.5)
    assert (q1.answer, q2.answer) == (8, 2)
    assert [(t.answer, t.cot, t.pot) for t in q1.vote.tallies] == [(8, 1, 2), (7, 1, 0)]
    assert [(p.style, p.index) for p in q1.paths] == [("cot", 0), ("cot", 1), ("cot", 2), ("pot", 0), ("pot", 1),
                                                      ("pot", 2)]
    bad_program = q1.paths[5]
    assert bad_program.answer is None and bad_program.program_error.startswith("NameError")
    assert [p.program_error for p in q2.paths if p.style == "pot"] == ["timeout", "ZeroDivisionError: division by zero",
                                                                       "no program"]
    assert q2.paths[5].program is None
    assert q1.tokens == 30 and q1.paths_saved == 0
    # one request per question and style, each style's paths seeded from (seed, question, style)
    assert [(c["n"], c["first_path"]) for c in engine.calls] == [(3, 0)] * 4
    assert [c["seed"] for c in engine.calls[:2]] == [derive_seed(0, "Q1", "cot"), derive_seed(0, "Q1", "pot")]
    json.dumps(q1.to_dict())  # plain data


def test_early_stop_saves_the_paths_of_questions_whose_first_answers_agree():
    engine = ScriptedEngine(SCRIPT)
    [q1, q2] = solve_questions(engine, ["Q1", "Q2"], mode="mixed", paths=8, early_stop=True, ids=["a", "b"],
                               program_timeout=0.5)
    assert (q1.answer, q1.paths_saved, len(q1.paths)) == (8, 6, 2)  # cot 0 and pot 0 both say 8
    assert q2.paths_saved == 0 and len(q2.paths) == 8  # the first program timed out: sample the rest
    first, rest = engine.calls[:4], engine.calls[4:]
    assert [c["n"] for c in first] == [1, 1, 1, 1]
    assert [(c["n"], c["first_path"]) for c in rest] == [(3, 1), (3, 1)]  # only Q2, continuing at path 1
    assert [c["seed"] for c in rest] == [derive_seed(0, "b", "cot"), derive_seed(0, "b", "pot")]
    assert q2.answer == 2


def test_hybrid_falls_back_to_cot_only_where_every_program_failed():
    engine = ScriptedEngine(SCRIPT)
    [q1, q2] = solve_questions(engine, ["Q1", "Q2"], mode="hybrid", paths=3, program_timeout=0.5)
    assert (q1.answer, q1.vote.decided_by, {p.style for p in q1.paths}) == (8, "pot", {"pot"})
    assert (q2.answer, q2.vote.decided_by) == (2, "cot")
    assert [p.style for p in q2.paths] == ["pot"] * 3 + ["cot"] * 3
    assert [("Python program" in c["prompt"], c["n"]) for c in engine.calls] == [(True, 3), (True, 3), (False, 3)]


def test_a_round_of_more_paths_than_the_engine_decodes_together_is_split():
    engine = ScriptedEngine(SCRIPT, max_paths=3)
    [q1] = solve_questions(engine, ["Q1"], mode="cot", paths=4)
    assert [(c["n"], c["first_path"]) for c in engine.calls] == [(3, 0), (1, 3)]
    assert [p.index for p in q1.paths] == [0, 1, 2, 3] and q1.answer == 8


class RefusingEngine(ScriptedEngine):
    """Refuses Q2's PoT prompt as the engine refuses a prompt over n_ctx; Q2's CoT request stays pending."""

    alive = True
    refusal = "a prompt of 300 tokens + max_tokens 256 needs 556 KV cells per path, but n_ctx is 512"

    def submit(self, prompt, **kwargs):
        if "Q2" not in prompt:
            return super().submit(prompt, **kwargs)
        if "Python program" in prompt:
            raise MdliteError(self.refusal)
        self.pending = Future()
        return self.pending


def test_a_question_that_cannot_be_sampled_is_its_own_error_row():
    """A round whose second request is refused cancels its first; the question gets failed paths with the
    reason, and the run goes on with the other questions."""
    engine = RefusingEngine(SCRIPT)
    [q1, q2] = solve_questions(engine, ["Q1", "Q2"], mode="mixed", paths=2)
    assert engine.pending.cancelled()  # Q2's CoT request does not decode on for nothing
    assert q1.answer == 8 and [p.finish_reason for p in q1.paths] == ["stop", "stop"]
    assert q2.answer is None and q2.tokens == 0
    assert [(p.style, p.index, p.finish_reason, p.error) for p in q2.paths] == [
        ("cot", 0, "error", engine.refusal), ("pot", 0, "error", engine.refusal)]


def test_few_shot_prompts_use_the_teacher_stops():
    engine = ScriptedEngine(SCRIPT)
    solve_questions(engine, ["Q1"], mode="mixed", paths=2, prompt_style="few-shot")
    assert [c["stop"] for c in engine.calls] == [["\nQuestion:", "\n\n"], ["\n```", "\nQuestion:"]]
    assert engine.calls[1]["prompt"].endswith("Question: Q1\nProgram:\n```python\n")


# ---- the command --------------------------------------------------------------------------------


def test_solve_help():
    result = CliRunner().invoke(cli, ["solve", "--help"])
    assert result.exit_code == 0
    for flag in ("--model", "--mode", "--paths", "--prompt-style", "--show", "--json", "--file", "--early-stop"):
        assert flag in result.output


@pytest.mark.parametrize(("args", "message"), [
    (["Q?", "--model", "missing/student.gguf"], "missing/student.gguf: no such model file"),
    (["Q?"], "no model given"),
    (["Q?", "--model", "x.gguf", "--mode", "vote", "--paths", "0"], "mode must be cot, pot, mixed or hybrid"),
    (["--file", "nowhere.txt", "--model", "x.gguf"], "nowhere.txt: no such file"),
])
def test_user_mistakes_are_one_line_errors_with_exit_2(args, message):
    result = CliRunner().invoke(cli, ["solve", *args])
    assert result.exit_code == 2
    assert message in result.output
    assert result.output.startswith("mdlite: error: ") and result.output.count("\n") == 1


@pytest.mark.slow
def test_solve_json_from_stdin_on_the_real_model(tmp_path):
    questions = ("Tom has 3 apples and buys 5 more. How many apples does he have?\n\n"
                 "A box holds 12 pens. How many pens are in 4 boxes?\n")
    args = ["solve", "-", "--model", "qwen2.5-coder-0.5b-instruct", "--prompt-style", "few-shot", "--mode", "mixed",
            "--paths", "4", "--early-stop", "--temperature", "0.5", "--max-tokens", "48", "--output-dir", str(tmp_path),
            "--json"]
    result = CliRunner().invoke(cli, args, input=questions)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["question"] for r in records] == questions.split("\n")[::2][:2]
    assert set(records[0]) == {"id", "question", "answer", "vote", "paths", "paths_saved", "tokens"}
    assert set(records[0]["vote"]) == {"answer", "tallies", "decided_by"}
    assert set(records[0]["paths"][0]) == {"style", "index", "text", "tokens", "finish_reason", "answer", "program",
                                           "program_error", "program_stdout", "error"}
    assert [r["answer"] for r in records] == [8, 48]  # few-shot Qwen gets these right
    for record in records:
        assert len(record["paths"]) + record["paths_saved"] == 4
        assert record["tokens"] == sum(p["tokens"] for p in record["paths"])
    assert (tmp_path / "solutions.jsonl").read_text().count("\n") == 2
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["config"]["paths"] == 4 and run["inputs"]["questions"] == 2

    shown = CliRunner().invoke(cli, ["solve", records[0]["question"], "--model", "qwen2.5-coder-0.5b-instruct",
                                     "--prompt-style", "few-shot", "--paths", "2", "--temperature", "0",
                                     "--max-tokens", "48", "--show"])
    assert shown.exit_code == 0, shown.output
    assert shown.stdout.startswith("answer: 8\nvotes: 8 x2 (cot 1, pot 1)")
    assert "--- pot path 0: answer 8" in shown.output and "def solution" in shown.output
    assert "[program: ok" in shown.output


@pytest.mark.slow
def test_an_over_long_question_is_its_own_error_row_on_the_real_model():
    """A question whose prompt does not fit n_ctx gets failed paths naming the flag to change; the questions beside
    it get the answers they get alone."""
    from mdlite.engine import Engine

    short = "Tom has 3 apples and buys 5 more. How many apples does he have?"
    knobs = {"mode": "mixed", "paths": 2, "temperature": 0.0, "max_tokens": 32}
    with Engine("qwen2.5-coder-0.5b-instruct", n_ctx=256, max_paths=4) as engine:
        [alone] = solve_questions(engine, [short], **knobs)
        [long, beside] = solve_questions(engine, [" ".join(["Tom has 3 apples."] * 60), short], **knobs)
    assert beside == alone and beside.answer is not None
    assert long.answer is None
    assert [(p.style, p.finish_reason) for p in long.paths] == [("cot", "error"), ("pot", "error")]
    assert all("n_ctx is 256" in p.error and "--num-ctx" in p.error for p in long.paths)
