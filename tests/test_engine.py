"""The batched llama.cpp engine on the real Qwen2.5-Coder 0.5B demo GGUF (slow), and its pure helpers."""

import pytest

from mdlite import MdliteError
from mdlite.engine import Engine, _Path, _per_prompt, derive_seed
from mdlite.prompts import STUDENT_STOP, student_prompt, teacher_prompt

MODEL = "qwen2.5-coder-0.5b-instruct"
QUESTIONS = ["Tom has 3 apples and buys 5 more. How many apples does he have?",
             "A box holds 12 pens. How many pens are in 4 boxes?",
             "Sara had 20 dollars and spent 7. How much money is left?"]


def chat(text: str) -> str:
    """A ChatML prompt: the instruct model answers and ends its turn with <|im_end|> (an EOG token)."""
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def engine():
    with Engine(MODEL) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def llm(engine):
    """llama-cpp-python's own sampler, with the engine's kernel choices (flash attention over a Q8_0 KV cache,
    no repacking)."""
    import llama_cpp.llama_cpp as api
    from llama_cpp import Llama

    def no_repacking():
        params = default_params()
        params.use_extra_bufts = False
        return params

    default_params = api.llama_model_default_params
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(api, "llama_model_default_params", no_repacking)
        reference = Llama(model_path=str(engine.path), n_ctx=512, n_threads=engine.n_threads, flash_attn=True,
                          type_k=api.GGML_TYPE_Q8_0, type_v=api.GGML_TYPE_Q8_0, verbose=False)
    yield reference
    reference.close()


# ---- pure helpers -------------------------------------------------------------------------------


def test_derive_seed_is_stable_and_spreads():
    assert derive_seed(0, "q1", "cot") == derive_seed(0, "q1", "cot")
    seeds = {derive_seed(0, p, j) for p in range(10) for j in range(10)}
    assert len(seeds) == 100
    assert all(0 <= s < 0xFFFFFFFF for s in seeds)


def test_path_cuts_at_the_earliest_stop_string_even_across_pieces():
    path = _Path(prompt=0, seq=0, sampler=None, stop=["\nQuestion:", "```"])
    for piece in ["x = 1\n", "Quest", "ion: more ``", "`"]:
        path.add(piece)
        if path.finish_reason:
            break
    assert (path.text, path.finish_reason) == ("x = 1", "stop")


def test_stop_is_shared_or_per_prompt():
    assert _per_prompt(["a", "b"], 2) == [["a", "b"], ["a", "b"]]
    assert _per_prompt([["a"], ["b", "c"]], 2) == [["a"], ["b", "c"]]
    assert _per_prompt([], 3) == [[], [], []]
    with pytest.raises(ValueError):
        _per_prompt([["a"]], 2)


# ---- the real model -----------------------------------------------------------------------------

@pytest.mark.slow
def test_batched_greedy_equals_sequential_greedy(engine, llm):
    prompts = [student_prompt(q, style=style) for q in QUESTIONS[:2] for style in ("cot", "pot")]
    batched = engine.sample(prompts, n=2, max_tokens=24, ignore_eos=True)
    no_eog = {t: float("-inf") for t in range(llm.n_vocab()) if engine._llama.llama_vocab_is_eog(engine._vocab, t)}
    for prompt, paths in zip(prompts, batched, strict=True):
        [[alone]] = engine.sample([prompt], n=1, max_tokens=24, ignore_eos=True)
        reference = llm.create_completion(prompt, max_tokens=24, temperature=0.0, logit_bias=no_eog)["choices"][0]
        assert paths[0] == paths[1] == alone
        assert alone.text == reference["text"]
        assert alone.tokens == 24 and alone.finish_reason == "length"


@pytest.mark.slow
def test_same_seed_same_path_whatever_the_number_of_paths(engine):
    prompts = [student_prompt(QUESTIONS[0], style="cot"), student_prompt(QUESTIONS[1], style="pot")]
    knobs = {"temperature": 1.0, "max_tokens": 16, "seed": 7}
    one = engine.sample(prompts, n=1, **knobs)
    four = engine.sample(prompts, n=4, **knobs)
    eight = engine.sample(prompts, n=[8, 2], **knobs)
    later = engine.sample(prompts, n=2, first_path=2, **knobs)
    for p in range(2):
        assert one[p][0] == four[p][0] == eight[p][0]
        assert four[p][1] == eight[p][1]
        assert later[p] == four[p][2:]
    assert eight[0][2:4] == four[0][2:4]
    assert len({g.text for g in eight[0]}) > 1  # sampling really samples
    other_seed = engine.sample(prompts[:1], n=4, temperature=1.0, max_tokens=16, seed=8)
    assert [g.text for g in other_seed[0]] != [g.text for g in four[0]]


@pytest.mark.slow
def test_long_few_shot_paths_alone_and_batched_agree(engine):
    """Past 256 KV cells a lone sequence would take another attention kernel than a batch (with F16 cells)."""
    prompts = [teacher_prompt(QUESTIONS[1], style=style) for style in ("cot", "pot")]
    assert min(len(engine.tokenize(p)) for p in prompts) > 300
    knobs = {"max_tokens": 32, "ignore_eos": True}
    seeds = [11, 22]  # per prompt: a lone prompt would otherwise take prompt 0's seed
    for temperature in (0.0, 0.8):
        alone = [engine.sample([p], n=1, temperature=temperature, seed=[s], **knobs)[0][0]
                 for p, s in zip(prompts, seeds, strict=True)]
        together = engine.sample(prompts, n=[3, 1], temperature=temperature, seed=seeds, **knobs)
        assert together[0][0] == alone[0] and together[1][0] == alone[1]
        if temperature == 0:
            assert together[0][1] == together[0][2] == alone[0]


@pytest.mark.slow
def test_eos_stop_strings_and_budget_end_paths_independently(engine, llm):
    prompts = [chat("Reply with the single word: yes"),
               student_prompt(QUESTIONS[2], style="cot"),
               chat("Count from 1 to 50, separated by commas.")]
    stops = [[], [" dollars", "\n"], []]
    [eos], [stopped], [budget] = engine.sample(prompts, n=1, max_tokens=32, stop=stops)
    assert eos.finish_reason == "stop" and eos.tokens < 5 and "yes" in eos.text.lower()
    assert "<|im_end|>" not in eos.text
    assert stopped.finish_reason == "stop" and stopped.tokens < 32
    assert " dollars" not in stopped.text and "\n" not in stopped.text
    assert (budget.finish_reason, budget.tokens) == ("length", 32)
    assert budget.text.startswith("1, 2, 3")
    # each path ends as it would alone
    assert engine.sample(prompts[2:], n=1, max_tokens=32) == [[budget]]
    reference = llm.create_completion(prompts[1], max_tokens=32, temperature=0.0, stop=stops[1])["choices"][0]
    assert (stopped.text, stopped.finish_reason) == (reference["text"], reference["finish_reason"])


@pytest.mark.slow
def test_multibyte_characters_split_across_tokens_decode_whole(engine, llm):
    prompt = chat("Write the Japanese word for thank you, then the Chinese one, then a flag emoji.")
    [[path]] = engine.sample([prompt], n=1, max_tokens=24, stop=STUDENT_STOP)
    # the same tokens (create_completion would not parse the special tokens in the text)
    reference = llm.create_completion(engine.tokenize(prompt), max_tokens=24, temperature=0.0,
                                      stop=STUDENT_STOP)["choices"][0]
    assert path.text == reference["text"]
    assert "\ufffd" not in path.text and any(ord(c) > 0x2E80 for c in path.text)


@pytest.mark.slow
def test_context_overflow_is_a_clear_error(engine):
    small = Engine(engine.path, n_ctx=256)
    try:
        long_prompt = student_prompt(" ".join(["Tom has 3 apples."] * 50), style="cot")
        with pytest.raises(MdliteError, match=r"needs \d+ KV cells per path, but n_ctx is 256.*--n-ctx"):
            small.sample([long_prompt], n=2, max_tokens=32)
        with pytest.raises(MdliteError, match="needs"):
            small.sample([student_prompt(QUESTIONS[0], style="cot")], n=1, max_tokens=250)
        [eight] = small.sample([student_prompt(QUESTIONS[0], style="cot")], n=8, max_tokens=8, ignore_eos=True)
        assert [path.tokens for path in eight] == [8] * 8
    finally:
        small.close()
    with pytest.raises(MdliteError, match="exceeds the model's context"):
        engine.sample(["word " * 10], n=1, max_tokens=engine.n_ctx_train)


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(MdliteError, match="no such model file"):
        Engine(tmp_path / "missing.gguf")
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("not a model")
    with pytest.raises(MdliteError, match="could not load this file"):
        Engine(not_gguf)
