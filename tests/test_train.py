"""`mdlite train` and the tiny random LLaMA fixture (`mdlite models make-tiny`): real training steps on the
tiny model (4-bit NF4 on CPU and plain LoRA), token-level checks of the data, resume after kill -9, bad input,
the dry-run memory estimate, and (slow) two steps on the real Gemma 3 270M GGUF."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from mdlite import MdliteError
from mdlite.answers import format_number
from mdlite.cli import cli
from mdlite.config import TrainConfig, load_config, to_dict
from mdlite.data import Problem, problem_hash, synth_problems
from mdlite.models import TINY_LLAMA, make_tiny_model
from mdlite.prompts import STUDENT_DIRECTIVES, prompt_hash, student_prompt

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write_rationales(path: Path, *, problems: int = 40, samples: int = 2, seed: int = 0,
                     extra: list[dict] | None = None) -> Path:
    """A rationales.jsonl in `mdlite teach`'s format from synthetic problems: CoT "... The answer is N." and
    PoT "def solution():\\n    return <equation>\\n", `samples` of each per problem, plus `extra` records."""
    records = []
    for problem in synth_problems(problems, seed=seed):
        answer = format_number(problem.answer)
        for style in ("cot", "pot"):
            text = (f"We compute {problem.equation} = {answer}. The answer is {answer}." if style == "cot"
                    else f"def solution():\n    return {problem.equation}\n")
            records += [_record(problem.id, style, sample, problem.question, problem.answer, text)
                        for sample in range(samples)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records + (extra or [])))
    return path


def _record(problem_id: str, style: str, sample: int, question: str, gold: float, text: str, *,
            kept: bool = True) -> dict:
    return {"key": f"{problem_id}/{style}/{sample}", "problem_id": problem_id,
            "problem_hash": problem_hash(Problem(problem_id, question, gold)), "style": style, "sample": sample,
            "question": question, "gold": gold, "text": text, "answer": gold if kept else None, "kept": kept,
            "reason": None if kept else "wrong answer", "teacher": "fixture", "model_digest": None,
            "prompt_hash": prompt_hash(style), "options": {"temperature": 0.7, "seed": sample}, "tokens": 20,
            "latency_s": 0.1}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LLaMA HF folder, built once per session."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def rationales(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_rationales(tmp_path_factory.mktemp("data") / "rationales.jsonl")


def tiny_config(tiny_model: Path, rationales: Path, output_dir: Path, **changes: object) -> TrainConfig:
    """Settings that train the tiny model visibly in a few seconds on CPU."""
    values = {"rationales": str(rationales), "model": str(tiny_model), "output_dir": str(output_dir),
              "max_steps": 30, "learning_rate": 1e-3, "per_device_train_batch_size": 4,
              "gradient_accumulation_steps": 1, "warmup_steps": 0, "logging_steps": 5, "save_steps": 10,
              "eval_steps": 15, "val_fraction": 0.1, "lora_r": 8}
    return TrainConfig(**{**values, **changes})


# ---- the tiny model -------------------------------------------------------------------------------------


def test_make_tiny_model_is_a_loadable_llama(tiny_model: Path, tmp_path: Path) -> None:
    import sentencepiece as spm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    files = {p.name for p in tiny_model.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer.json"} <= files
    assert sum(p.stat().st_size for p in tiny_model.iterdir()) < 10 * 2**20
    config = json.loads((tiny_model / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 2
    assert config["hidden_size"] % 256 == 0 and config["intermediate_size"] % 256 == 0

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert len(tokenizer) == model.get_input_embeddings().weight.shape[0] == TINY_LLAMA["vocab_size"]
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.pad_token is None  # like LLaMA-2: train must pick an existing token
    text = "Question: Ann has 125 pens.\ndef solution():\n    return 125 - 7\n"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id and tokenizer.decode(ids, skip_special_tokens=True) == text
    sentencepiece = spm.SentencePieceProcessor(model_file=str(tiny_model / "tokenizer.model"))
    assert sentencepiece.encode(text) == ids[1:]  # the HF tokenizer and tokenizer.model agree
    assert all(len(sentencepiece.id_to_piece(i).strip("▁")) <= 1 for i in sentencepiece.encode("1234567"))
    assert tokenizer.decode(tokenizer("Zoë paid €5").input_ids, skip_special_tokens=True) == "Zoë paid €5"

    again = make_tiny_model(tmp_path / "again")  # deterministic by seed
    assert (again / "model.safetensors").read_bytes() == (tiny_model / "model.safetensors").read_bytes()
    assert (again / "tokenizer.model").read_bytes() == (tiny_model / "tokenizer.model").read_bytes()


def test_make_tiny_cli(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["models", "make-tiny", str(tmp_path / "m"), "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m" / "model.safetensors").exists()


# ---- data -------------------------------------------------------------------------------------------------


def test_examples_are_balanced_per_problem_and_split_by_problem(tmp_path: Path) -> None:
    from mdlite.train import read_rationales, split_examples

    q = "Tom has 3 apples. How many apples does Tom have?"
    extra = ([_record("p-a", "cot", s, q, 3, f"Tom has 3. The answer is 3. ({s})") for s in range(3)]
             + [_record("p-a", "pot", 0, q, 3, "def solution():\n    return 3\n")]
             + [_record("p-b", "pot", s, q, 3, f"def solution():\n    return 3 + {s} - {s}\n") for s in range(6)]
             + [_record("p-b", "cot", 0, q, 3, "The answer is 4.", kept=False)])
    path = write_rationales(tmp_path / "r.jsonl", problems=30, samples=3, extra=extra)
    records = read_rationales(path)
    assert all(r["kept"] for r in records) and len(records) == 30 * 6 + 10

    split = split_examples(records, max_per_style=2, val_fraction=0.2, seed=0)
    examples = split.train + split.val
    per = {(e.problem_id, e.style) for e in examples}
    count = {key: sum((e.problem_id, e.style) == key for e in examples) for key in per}
    assert count[("p-a", "cot")] == count[("p-a", "pot")] == 1  # balanced down to the rarer style
    assert count[("p-b", "pot")] == 2 and ("p-b", "cot") not in count  # one style only: the cap
    assert all(n == 2 for key, n in count.items() if key[0].startswith("synth"))
    assert {e.problem_id for e in split.train}.isdisjoint({e.problem_id for e in split.val})
    assert split.counts["val_problems"] == round(32 * 0.2) and split.counts["problems"] == 32
    assert split.counts["train_cot"] + split.counts["val_cot"] == 30 * 2 + 1
    assert split_examples(records, max_per_style=2, val_fraction=0.2, seed=0) == split  # deterministic
    assert all(e.prompt == student_prompt(e.prompt.split("\n")[0][len("Question: "):], style=e.style)
               for e in examples)

    cot_only = split_examples(records, max_per_style=2, val_fraction=0.2, seed=0, styles=["cot"])
    cot = cot_only.train + cot_only.val
    assert {e.style for e in cot} == {"cot"} and len(cot) == 30 * 2 + 2  # p-a keeps 2 CoT: nothing to balance
    assert cot_only.counts["other_styles"] == 30 * 3 + 7 and cot_only.counts["problems"] == 31


def test_completion_only_labels_token_by_token(tiny_model: Path, rationales: Path) -> None:
    from transformers import AutoTokenizer

    from mdlite.train import encode_examples, read_rationales, split_examples

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    cfg = TrainConfig(cot_loss_weight=1.0, pot_loss_weight=0.5)
    split = split_examples(read_rationales(rationales), max_per_style=2, val_fraction=0.0, seed=0)
    encoded, dropped = encode_examples(split.train, tokenizer, cfg, add_bos=True)
    assert dropped == 0 and len(encoded) == len(split.train) == 160
    for example, item in zip(split.train, encoded, strict=True):
        ids, labels, weights = item["input_ids"], item["labels"], item["loss_weights"]
        prompt_ids = tokenizer(example.prompt).input_ids  # how inference tokenizes the prompt (BOS first)
        n = len(prompt_ids)
        assert ids[:n] == prompt_ids and ids[0] == tokenizer.bos_token_id
        for position, (token, label, weight) in enumerate(zip(ids, labels, weights, strict=True)):
            if position < n:
                assert label == -100 and weight == 0.0
            else:
                assert label == token and weight == {"cot": 1.0, "pot": 0.5}[example.style]
        assert ids[-1] == tokenizer.eos_token_id and ids.count(tokenizer.eos_token_id) == 1
        assert tokenizer.decode(ids[n:-1]) == example.completion
        assert STUDENT_DIRECTIVES[example.style] in tokenizer.decode(ids[:n])


def test_weighted_loss_matches_a_direct_computation(tiny_model: Path, rationales: Path, tmp_path: Path) -> None:
    """The Trainer's loss (logits only at completion positions, padding-free or padded batches) equals the
    style-weighted mean cross-entropy over completion tokens computed on each example alone."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mdlite.train import (
        MultiTaskCollator,
        build_trainer,
        encode_examples,
        read_rationales,
        split_examples,
        use_packed_attention,
    )

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    cfg = tiny_config(tiny_model, rationales, tmp_path, cot_loss_weight=2.0, pot_loss_weight=0.5)
    split = split_examples(read_rationales(rationales), max_per_style=1, val_fraction=0.0, seed=0)
    items, _ = encode_examples(split.train[:6], tokenizer, cfg, add_bos=True)
    assert {i["style"] for i in items} == {"cot", "pot"}
    total, count = 0.0, 0
    with torch.no_grad():
        for item in items:
            logits = model(torch.tensor([item["input_ids"]])).logits[0, :-1]
            labels = torch.tensor(item["labels"][1:])
            ce = F.cross_entropy(logits, labels, ignore_index=-100, reduction="none")
            total += float((ce * torch.tensor(item["loss_weights"][1:])).sum())
            count += int((labels != -100).sum())
    expected = total / count
    assert use_packed_attention(model)  # padding-free rows: per-example attention; padded: sdpa with its mask
    trainer = build_trainer(model, tokenizer, items, [], cfg, cuda=False)
    for padding_free in (True, False):
        batch = MultiTaskCollator(pad_token_id=0, padding_free=padding_free)(items)
        assert ("attention_mask" in batch) != padding_free and batch["input_ids"].shape[0] == (1 if padding_free
                                                                                             else len(items))
        with torch.no_grad():
            loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=None)
        assert float(loss) == pytest.approx(expected, rel=1e-4)


def test_packed_attention_equals_masked_sdpa_with_sliding_window() -> None:
    import torch
    import torch.nn.functional as F

    from mdlite.train import _packed_attention

    torch.manual_seed(0)
    lengths, window = [5, 9, 3, 12], 4
    n = sum(lengths)
    query, key, value = torch.randn(1, 4, n, 8), torch.randn(1, 2, n, 8), torch.randn(1, 2, n, 8)
    positions = torch.cat([torch.arange(length) for length in lengths])[None]
    segment = torch.cat([torch.full((length,), i) for i, length in enumerate(lengths)])
    for sliding_window in (None, window):
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        mask = (segment[:, None] == segment[None, :]) & (j <= i)
        if sliding_window:
            mask &= i - j < sliding_window
        expected = F.scaled_dot_product_attention(query, key.repeat_interleave(2, 1), value.repeat_interleave(2, 1),
                                                  attn_mask=mask).transpose(1, 2)
        module = torch.nn.Module()
        output, _ = _packed_attention(module, query, key, value, None, sliding_window=sliding_window,
                                      position_ids=positions)
        assert torch.allclose(output, expected, atol=1e-6)


def test_batches_mix_both_styles_with_the_right_directive(tiny_model: Path, rationales: Path,
                                                          tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mdlite.train import build_trainer, encode_examples, read_rationales, split_examples

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    cfg = tiny_config(tiny_model, rationales, tmp_path, cot_loss_weight=1.0, pot_loss_weight=0.25)
    split = split_examples(read_rationales(rationales), max_per_style=2, val_fraction=0.0, seed=0)
    items, _ = encode_examples(split.train, tokenizer, cfg, add_bos=True)
    trainer = build_trainer(AutoModelForCausalLM.from_pretrained(tiny_model), tokenizer, items, [], cfg, cuda=False)
    seen = {"cot": 0, "pot": 0}
    mixed = 0
    for batch in trainer.get_train_dataloader():
        ids, positions, weights = (batch[k][0].tolist() for k in ("input_ids", "position_ids", "loss_weights"))
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(ids)]
        styles = set()
        for start, end in zip(starts, starts[1:], strict=False):
            text = tokenizer.decode(ids[start:end])
            style = "cot" if STUDENT_DIRECTIVES["cot"] in text else "pot"
            assert STUDENT_DIRECTIVES["pot" if style == "cot" else "cot"] not in text
            completion = text.split(STUDENT_DIRECTIVES[style] + "\n", 1)[1]
            assert completion.endswith("</s>") and "</s>" not in completion[:-4]
            pattern = (r"We compute .+ = [\d.]+\. The answer is [\d.]+\." if style == "cot"
                       else r"def solution\(\):\n    return .+\n")
            assert re.fullmatch(pattern, completion[:-4]), completion
            assert max(weights[start:end]) == {"cot": 1.0, "pot": 0.25}[style]
            styles.add(style)
            seen[style] += 1
        mixed += styles == {"cot", "pot"}
    assert seen["cot"] == seen["pot"] == len(items) // 2  # one epoch, balanced
    assert mixed >= len(items) // 4 * 0.6  # random order: most batches hold both styles


# ---- training --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quantization", ["nf4", "none"])
def test_training_lowers_the_loss(quantization: str, tiny_model: Path, rationales: Path, tmp_path: Path) -> None:
    from mdlite.train import run

    cfg = tiny_config(tiny_model, rationales, tmp_path / "out", quantization=quantization)
    result = run(cfg)
    assert result.global_step == 30
    log = [json.loads(line) for line in (tmp_path / "out" / "trainer_log.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in log if "eval_loss" in r]
    losses = [r["loss"] for r in log if "loss" in r]
    assert [r["step"] for r in log if "eval_loss" in r] == [0, 15, 30]  # the fixed validation batch
    assert evals[-1] < evals[0] - 0.5 and losses[-1] < losses[0] - 0.5
    assert all(r["tokens_per_s"] > 0 and r["elapsed_s"] >= 0 and "remaining_s" in r for r in log if "loss" in r)
    assert result.eval_loss == pytest.approx(evals[-1])

    adapter = result.adapter_dir
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer.model",
            "mdlite.json"} <= {p.name for p in adapter.iterdir()}
    meta = json.loads((adapter / "mdlite.json").read_text())
    assert meta["base_model"] == str(tiny_model) and meta["base_model_path"] == str(tiny_model)
    assert meta["add_bos"] is True and meta["quantization"] == quantization
    checkpoints = sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-20", "checkpoint-30"]  # save_total_limit 2
    assert (tmp_path / "out" / "checkpoint-30" / "adapter_model.safetensors").exists()
    assert (tmp_path / "out" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["status"] == "done" and record["config"]["quantization"] == quantization
    assert len(record["inputs"]["rationales"]["sha256"]) == 64 and record["versions"]["peft"]
    assert record["data"]["val_problems"] == 4 and record["data"]["dropped_too_long"] == 0
    target_modules = json.loads((adapter / "adapter_config.json").read_text())["target_modules"]
    assert {name.split(".")[-1] for name in target_modules} == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                                 "gate_proj", "up_proj", "down_proj"}

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter)
    assert len(tokenizer) == TINY_LLAMA["vocab_size"] and tokenizer.pad_token_id == tokenizer.unk_token_id

    if quantization == "none":  # a finished run is not redone; a different one needs --overwrite
        started = time.monotonic()
        assert run(cfg).global_step == 30 and time.monotonic() - started < 5
        with pytest.raises(MdliteError, match="lora_r.*--overwrite"):
            run(replace(cfg, lora_r=4))
        again = run(replace(cfg, lora_r=4, max_steps=5, eval_steps=5), overwrite=True)
        assert again.global_step == 5 and not (tmp_path / "out" / "checkpoint-30").exists()


def test_kill_9_then_rerun_resumes_from_the_last_checkpoint(tiny_model: Path, rationales: Path,
                                                            tmp_path: Path) -> None:
    from mdlite.train import run

    out = tmp_path / "out"
    cfg = tiny_config(tiny_model, rationales, out, max_steps=40, save_steps=5, eval_steps=20)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"train": to_dict(cfg)}))
    mdlite = Path(sys.executable).with_name("mdlite")
    process = subprocess.Popen([str(mdlite), "train", "-c", str(config)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not (out / "checkpoint-10" / "trainer_state.json").exists():
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (out / "adapter").exists()
    last = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert 10 <= last < 40

    result = run(load_config(TrainConfig, config, section="train"))
    assert result.global_step == 40
    record = json.loads((out / "run.json").read_text())
    resumed = int(record["resumed_from"].split("-")[1])
    assert record["status"] == "done" and 10 <= resumed <= last
    steps = [json.loads(line)["step"] for line in (out / "trainer_log.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == sorted(set(steps)) and steps[-1] == 40  # no step logged twice after the resume
    assert (out / "adapter" / "adapter_model.safetensors").exists()


def test_plain_lora_prints_no_library_notes_that_read_as_errors(tiny_model: Path, rationales: Path,
                                                                 tmp_path: Path) -> None:
    """`make demo`'s path (plain LoRA) prints neither bitsandbytes' note that the optional `kernels` package for its
    CPU 4-bit kernel is missing (logged on CPUs with AVX512-BF16) nor transformers' FutureWarning about peft's use of
    a deprecated property: a newcomer reads them as errors."""
    cfg = tiny_config(tiny_model, rationales, tmp_path / "out", quantization="none", max_steps=2, save_steps=2,
                      eval_steps=2)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"train": to_dict(cfg)}))
    done = subprocess.run([sys.executable, "-m", "mdlite", "train", "-c", str(config)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "gemm_4bit_forward" not in done.stderr and "Warning" not in done.stderr, done.stderr[-2000:]


# ---- bad input --------------------------------------------------------------------------------------------


def test_bad_rationales_files(tmp_path: Path) -> None:
    from mdlite.train import read_rationales

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(MdliteError, match="empty.jsonl: no rationales in the file"):
        read_rationales(empty)
    rejected = tmp_path / "rejected.jsonl"
    rejected.write_text(json.dumps(_record("p", "cot", 0, "Q?", 1, "The answer is 2.", kept=False)) + "\n")
    with pytest.raises(MdliteError, match=r"1 records, 0 kept"):
        read_rationales(rejected)
    with pytest.raises(MdliteError, match="not found.*mdlite teach"):
        read_rationales(tmp_path / "missing.jsonl")
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(_record("p", "cot", 0, "Q?", 1, "The answer is 1.")) + "\n{oops\n")
    with pytest.raises(MdliteError, match="broken.jsonl:2: not valid JSON"):
        read_rationales(broken)
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({**_record("p", "cot", 0, "Q?", 1, "x"), "style": "tot"}) + "\n")
    with pytest.raises(MdliteError, match="odd.jsonl:1: style must be one of cot, pot"):
        read_rationales(odd)

    result = CliRunner().invoke(cli, ["train", "--rationales", str(empty), "--model", "x"])
    assert result.exit_code == 2 and "no rationales" in result.output and "Traceback" not in result.output


def test_unknown_model_and_bad_config(tmp_path: Path, rationales: Path) -> None:
    from mdlite.models import resolve_base_model

    with pytest.raises(MdliteError, match="unknown model 'no-such-model'; known: .*llama-2-7b"):
        resolve_base_model("no-such-model")
    with pytest.raises(MdliteError, match="no such model file"):
        resolve_base_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(MdliteError, match="no config.json"):
        resolve_base_model(str(tmp_path / "folder"))
    result = CliRunner().invoke(cli, ["train", "--rationales", str(rationales), "--model", "no-such-model",
                                      "--output-dir", str(tmp_path / "o")])
    assert result.exit_code == 2 and "unknown model 'no-such-model'" in result.output
    result = CliRunner().invoke(cli, ["train", "--quantization", "int8", "--lora-r", "0", "--val-fraction", "1"])
    assert result.exit_code == 2
    assert all(s in result.output for s in ("--quantization", "--lora-r", "--val-fraction"))


def test_gguf_cache_is_keyed_by_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mdlite.models import resolve_base_model

    monkeypatch.setenv("MDLITE_HOME", str(tmp_path / "home"))
    files = [tmp_path / folder / "student-F16.gguf" for folder in ("a", "b", "copy-of-a")]
    for file, data in zip(files, (b"GGUF" + b"\1" * 100, b"GGUF" + b"\2" * 100, b"GGUF" + b"\1" * 100), strict=True):
        file.parent.mkdir()
        file.write_bytes(data)
    a, b, copy = (Path(resolve_base_model(str(file), fetch=False).path) for file in files)
    assert a != b and a == copy and a.parent == tmp_path / "home" / "hf" and a.name.startswith("student-F16-")


def test_tokenizer_preflight(tiny_model: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mdlite.models import BaseModel
    from mdlite.train import expected_bos, preflight_tokenizer

    base = BaseModel(str(tiny_model), str(tiny_model))
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    preflight_tokenizer(tokenizer, model, base)
    assert tokenizer.pad_token == "<unk>" and len(tokenizer) == 1000 and model.config.pad_token_id == 0
    assert expected_bos(tokenizer, base) is True
    tokenizer.add_tokens(["<extra>"])  # a grown vocabulary no longer matches the embedding
    with pytest.raises(MdliteError, match="tokenizer has 1001 tokens but the model's embedding has only 1000 rows"):
        preflight_tokenizer(tokenizer, model, base)


def test_too_long_rationales_are_dropped_with_a_warning(tiny_model: Path, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    from transformers import AutoTokenizer

    from mdlite.train import encode_examples, read_rationales, run, split_examples

    long_text = "Step. " * 400 + "The answer is 3."
    path = write_rationales(tmp_path / "r.jsonl", problems=6, samples=1,
                            extra=[_record("p-long", "cot", 0, "Tom has 3 apples. How many?", 3, long_text)])
    cfg = tiny_config(tiny_model, path, tmp_path / "out", max_length=128, val_fraction=0.0)
    split = split_examples(read_rationales(path), max_per_style=4, val_fraction=0.0, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    with caplog.at_level("WARNING", logger="mdlite.train"):
        items, dropped = encode_examples(split.train, tokenizer, cfg, add_bos=True)
    assert dropped == 1 and len(items) == 12 and all(len(i["input_ids"]) <= 128 for i in items)
    assert "dropped 1 of 13 examples longer than max_length=128" in caplog.text and "--max-length" in caplog.text

    only_long = tmp_path / "long.jsonl"
    only_long.write_text(json.dumps(_record("p-long", "cot", 0, "Q?", 3, long_text)) + "\n")
    with pytest.raises(MdliteError, match="every training example is longer than max_length=128"):
        run(replace(cfg, rationales=str(only_long)))


def test_nf4_without_bitsandbytes_is_a_clear_error(tiny_model: Path, rationales: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from mdlite.train import run

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    with pytest.raises(MdliteError, match=r"nf4 needs bitsandbytes.*--quantization none"):
        run(tiny_config(tiny_model, rationales, tmp_path / "out", quantization="nf4"))


# ---- dry run and configs -----------------------------------------------------------------------------------


def test_dry_run_estimates_memory_without_weights(rationales: Path, tiny_model: Path, tmp_path: Path) -> None:
    from mdlite.train import architecture, estimate_memory

    result = CliRunner().invoke(cli, ["train", "--dry-run", "--model", "llama-2-7b", "--rationales",
                                      str(rationales), "--output-dir", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert "model: llama-2-7b" in result.output and "train_cot" in result.output
    assert "GPU memory estimate" in result.output and "fits" in result.output
    assert re.search(r"per token: one layer keeps [\d,]+ B, a checkpointed layer input 16,384 B", result.output)
    assert "(100% of the tokens: no tokenizer or data here, all counted)" in result.output
    assert not (tmp_path / "o").exists()

    llama = architecture("llama-2-7b")
    qlora = estimate_memory(llama, TrainConfig(per_device_train_batch_size=1, max_length=512, lora_r=16))
    assert 3.3 < qlora["weights"] < 4.5 and qlora["lora_parameters_millions"] == pytest.approx(40.0, abs=0.1)
    assert 5 < qlora["total"] < 8  # QLoRA 7B, micro-batch 1: an 8 GB card
    lora = estimate_memory(llama, TrainConfig(quantization="none", per_device_train_batch_size=1))
    assert lora["weights"] > 12 and lora["total"] > 16 * 0.95 and lora["lm_head_copy"] == 0  # bf16 lm_head: no copy
    no_checkpointing = estimate_memory(llama, TrainConfig(gradient_checkpointing=False))
    assert no_checkpointing["activations"] > 4 * estimate_memory(llama, TrainConfig())["activations"]
    half = estimate_memory(llama, TrainConfig(), completion_fraction=0.5)
    assert half["logits"] == pytest.approx(estimate_memory(llama, TrainConfig())["logits"] / 2, abs=0.01)
    assert architecture(str(tiny_model))["hidden_size"] == TINY_LLAMA["hidden_size"]


def test_dry_run_counts_logits_of_completion_tokens_only(rationales: Path, tiny_model: Path, tmp_path: Path) -> None:
    from mdlite.train import dry_run

    report = dry_run(TrainConfig(rationales=str(rationales), model=str(tiny_model), output_dir=str(tmp_path)))
    fraction = report["tokens"]["completion_fraction"]
    assert 0.05 < fraction < 0.5  # short rationales after a long student prompt
    assert report["activation_terms"]["completion_fraction"] == fraction
    assert report["activation_terms"]["checkpoint"] == 4 * TINY_LLAMA["hidden_size"]  # fp32 residual stream (nf4)


def test_7b_estimate_follows_the_code() -> None:
    """LLaMA-2-7B, the configs' micro-batch 8 x 512: ~14 GiB, with the fp32 residual stream saved at each
    checkpoint (2x the bf16 guess), autocast's bf16 lm_head copy, and the logits of completion tokens only."""
    from mdlite.train import activation_terms, architecture, estimate_memory

    cfg = load_config(TrainConfig, CONFIGS / "svamp-llama2-7b.yaml", section="train")
    llama = architecture("llama-2-7b")
    memory = estimate_memory(llama, cfg)
    assert 13.5 < memory["total"] < 14.5
    assert memory["lm_head_copy"] == pytest.approx(32000 * 4096 * 2 / 2**30, abs=0.01)
    terms = activation_terms(llama, cfg)
    assert terms["checkpoint"] == 4 * 4096
    assert memory["activations"] == pytest.approx((32 * 4096 * terms["checkpoint"] + 2 * 4096 * terms["layer"])
                                                  / 2**30, abs=0.01)
    plain = activation_terms(llama, TrainConfig(quantization="none", lora_dropout=0.0))
    assert plain["checkpoint"] == 2 * 4096 and plain["layer"] < terms["layer"]


@pytest.mark.parametrize("name", ["svamp-llama2-7b", "svamp-codellama-7b"])
def test_paper_configs_fit_a_24_gb_gpu(name: str) -> None:
    from mdlite.train import architecture, estimate_memory

    cfg = load_config(TrainConfig, CONFIGS / f"{name}.yaml", section="train")
    assert cfg.model in ("llama-2-7b", "codellama-7b") and cfg.quantization == "nf4"
    assert estimate_memory(architecture(cfg.model), cfg)["total"] < 24 * 0.95


def test_compute_dtype_does_not_count_emulated_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from mdlite.train import compute_dtype

    native = [False]  # a T4 / V100: is_bf16_supported() says yes, but only by emulation
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation or native[0])
    assert compute_dtype(cuda=True) == torch.float16 and compute_dtype(cuda=False) == torch.float32
    native[0] = True  # Ampere and newer
    assert compute_dtype(cuda=True) == torch.bfloat16


def test_two_processes_train_one_adapter_on_different_batches(tiny_model: Path, rationales: Path,
                                                             tmp_path: Path) -> None:
    """`accelerate launch -m mdlite train` with 2 DDP processes on the CPU (gloo): QLoRA + DDP finishes, each
    process trains on its own batches ($MDLITE_BATCH_LOG) and ends with the same LoRA weights (gradients were
    synchronised), the main process alone writes one adapter and logs."""
    import socket

    config = tmp_path / "train.yaml"
    values = to_dict(tiny_config(tiny_model, rationales, tmp_path / "out", max_steps=6, save_steps=3, eval_steps=3,
                                 logging_steps=2))
    config.write_text(yaml.safe_dump({"train": values}))
    with socket.socket() as probe:  # a free port for the process group
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # --multi_gpu starts one process per --num_processes (torchrun); without a GPU each one trains on the CPU.
    # (`--cpu --num_processes 2` starts a single process unless an MPI hostfile is given.)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(port), "-m", "mdlite", "train", "-c", str(config)]
    env = {**os.environ, "MDLITE_BATCH_LOG": str(tmp_path / "batches"), "CUDA_VISIBLE_DEVICES": "",
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    batches = {rank: [json.loads(line) for line in (tmp_path / "batches" / f"batches-rank{rank}.jsonl")
                      .read_text().splitlines()] for rank in (0, 1)}
    assert [len(batches[0]), len(batches[1])] == [6, 6]  # 6 steps of one micro-batch on each process
    hashes = [{b["sha256"] for b in batches[rank]} for rank in (0, 1)]
    assert len(hashes[0]) == len(hashes[1]) == 6 and not hashes[0] & hashes[1]
    # different batches, yet the same LoRA weights at the end: DDP averaged the gradients of every step
    weights = [json.loads((tmp_path / "batches" / f"lora-rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [w["rank"] for w in weights] == [0, 1] and weights[0]["sha256"] == weights[1]["sha256"]
    assert [w["wrapped_by"] for w in weights] == ["DistributedDataParallel"] * 2

    out = tmp_path / "out"
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "done" and record["processes"] == 2 and record["global_step"] == 6
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "checkpoint-3", "checkpoint-6", "loss.png",
                                                     "run.json", "trainer_log.jsonl"]
    assert (out / "adapter" / "adapter_model.safetensors").exists() and (out / "adapter" / "mdlite.json").exists()
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in log if "loss" in r]
    assert train_steps == [1, 2, 4, 6]  # written once, by the main process
    assert all(6.0 < r["loss"] < 7.5 for r in log if "loss" in r)  # ~ln(1000): per-token mean, not halved by DDP


def test_train_help() -> None:
    result = CliRunner().invoke(cli, ["train", "--help"])
    assert result.exit_code == 0
    assert all(flag in result.output for flag in ("--dry-run", "--overwrite", "--quantization", "--lora-r",
                                                   "--cot-loss-weight", "--padding-free / --no-padding-free"))


# ---- a real pretrained model ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_qlora_steps_on_gemma_3_270m(tmp_path: Path) -> None:
    """The demo GGUF, dequantized by transformers once and cached as an HF folder (~1.5 min the first time)."""
    from mdlite import mdlite_home
    from mdlite.models import get_card
    from mdlite.train import run

    rationales = write_rationales(tmp_path / "r.jsonl", problems=8, samples=1)
    cfg = TrainConfig(rationales=str(rationales), model="gemma-3-270m", output_dir=str(tmp_path / "out"),
                      max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=1, max_length=256,
                      val_fraction=0.0, logging_steps=1, save_steps=2)
    result = run(cfg)
    assert result.global_step == 2 and 0 < result.train_loss < 20
    meta = json.loads((result.adapter_dir / "mdlite.json").read_text())
    cache = mdlite_home() / "hf" / f"gemma-3-270m-q4_k_m-{get_card('gemma-3-270m').gguf['sha256'][:16]}"
    assert meta["base_model"] == "gemma-3-270m" and meta["base_model_path"] == str(cache)
    assert meta["base_gguf"].endswith("gemma-3-270m-q4_k_m.gguf") and meta["add_bos"] is True
    assert (cache / "config.json").exists() and "quantization_config" not in json.loads(
        (cache / "config.json").read_text())


def test_lora_hash_changes_with_the_weights_and_hub_models_are_fetched_once(tiny_model: Path, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """What the DDP test compares, and the download the main process does before the others load."""
    import huggingface_hub
    import torch

    from mdlite.train import BaseModel, add_lora, fetch_hub_model, load_model, lora_sha256

    cfg = TrainConfig(model=str(tiny_model), quantization="none", lora_r=4)
    base = BaseModel(str(tiny_model), str(tiny_model))
    model = add_lora(load_model(base, cfg, cuda=False), cfg, base)
    before = lora_sha256(model)
    assert lora_sha256(model) == before and len(before) == 64
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).add_(1e-3)
    assert lora_sha256(model) != before

    fetched = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kwargs: fetched.append(repo))
    fetch_hub_model(base)  # a local folder: nothing to fetch
    fetch_hub_model(BaseModel("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b-hf"))
    assert fetched == ["meta-llama/Llama-2-7b-hf"]


def test_a_missing_matplotlib_skips_only_the_plot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    from mdlite.train import plot_losses

    log = tmp_path / "trainer_log.jsonl"
    log.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    plot_losses(log, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 0
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    plot_losses(log, tmp_path / "again.png")
    assert not (tmp_path / "again.png").exists() and "matplotlib is not installed" in caplog.text
