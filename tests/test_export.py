"""export-gguf on a tiny LLaMA whose LoRA adapter really learned to answer: merge, llama.cpp's converter,
quantize, Modelfile, parity; `--ollama` registration against tests/fake_ollama.py (it stands in for Ollama, which
cannot be installed here; the `ollama` client is the real one); refusals of broken inputs; an export killed
midway; a real demo model (slow)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import ollama
import pytest
import torch
from click.testing import CliRunner
from fake_ollama import FakeOllama
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from mdlite import MdliteError
from mdlite.answers import format_number
from mdlite.cli import cli
from mdlite.config import ExportConfig, load_config
from mdlite.data import synth_problems
from mdlite.export import OUTPUT_FILES, register_ollama, run
from mdlite.llamacpp import open_llama
from mdlite.models import make_tiny_model
from mdlite.prompts import STUDENT_DIRECTIVES, STUDENT_STOP, STYLES, student_prompt

PROBLEMS = synth_problems(3, seed=0)  # what the adapter learns, and the parity check's problems (seed 0)


def train_adapter(base: Path, adapter_dir: Path, *, steps: int = 80) -> Path:
    """A LoRA adapter trained (full batch, AdamW) until the tiny model answers PROBLEMS in both styles and stops,
    saved like `mdlite train` saves it: adapter, tokenizer files and mdlite.json."""
    from peft import LoraConfig, get_peft_model

    tokenizer = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    rows = []
    for problem in PROBLEMS:
        for style, completion in (("cot", f"The answer is {format_number(problem.answer)}."),
                                  ("pot", f"def solution():\n    return {problem.equation}\n")):
            prompt = student_prompt(problem.question, style=style)
            prompt_ids = [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False).input_ids
            full = tokenizer(prompt + completion, add_special_tokens=False).input_ids
            rows.append((prompt_ids, full[len(prompt_ids) - 1:] + [tokenizer.eos_token_id]))
    width = max(len(a) + len(b) for a, b in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (prompt_ids, completion_ids) in enumerate(rows):
        ids[i, :len(prompt_ids) + len(completion_ids)] = torch.tensor(prompt_ids + completion_ids)
        labels[i, len(prompt_ids):len(prompt_ids) + len(completion_ids)] = torch.tensor(completion_ids)
        mask[i, :len(prompt_ids) + len(completion_ids)] = 1
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(steps):
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    shutil.copy(base / "tokenizer.model", adapter_dir / "tokenizer.model")
    (adapter_dir / "mdlite.json").write_text(json.dumps({"base_model": str(base), "add_bos": True}))
    return adapter_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export")
    base = make_tiny_model(root / "base", seed=0)
    return {"root": root, "base": base, "adapter": train_adapter(base, root / "adapter")}


@pytest.fixture(scope="module")
def exported(tiny: dict[str, Path]) -> dict[str, object]:
    cfg = load_config(ExportConfig, overrides={
        "input_dir": str(tiny["adapter"]), "output_dir": str(tiny["root"] / "out"), "quant_types": ["q4_k_m", "F16"],
        "parity_problems": len(PROBLEMS), "parity_max_tokens": 40, "n_threads": 1, "seed": 0,
    })
    return {"cfg": cfg, "result": run(cfg)}


def greedy_gguf(path: Path, prompt_ids: list[int], budget: int = 40) -> list[int]:
    llm = open_llama(path, n_ctx=256, n_threads=1)
    try:
        out = []
        for token in llm.generate(prompt_ids, temp=0.0, repeat_penalty=1.0):
            out.append(token)
            if token == llm.token_eos() or len(out) >= budget:
                return out
        return out
    finally:
        llm.close()


# ---- the happy path -------------------------------------------------------------------------------------------


def test_outputs_are_complete_and_named(exported: dict) -> None:
    result, out = exported["result"], Path(exported["cfg"].output_dir)
    assert set(result.files) == {"Q4_K_M", "F16"}
    for name in ("student-Q4_K_M.gguf", "student-F16.gguf", "Modelfile", "parity.json", "run.json",
                 "merged/model.safetensors", "merged/tokenizer.model", "merged/tokenizer_config.json"):
        assert (out / name).exists(), name
    assert not (out / ".export.partial").exists()
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "done" and record["inputs"]["kind"] == "adapter"
    assert len(record["llama_cpp"]["llama_cpp_commit"]) == 40 and record["llama_cpp"]["llama_cpp_python"]
    assert record["files"]["Q4_K_M"]["bytes"] < record["files"]["F16"]["bytes"]


def test_llama_cpp_loads_both_files_with_the_right_types(exported: dict) -> None:
    for quant, file_type in (("F16", 1), ("Q4_K_M", 15)):
        llm = open_llama(exported["result"].files[quant], n_ctx=64)
        try:
            assert int(llm.metadata["general.file_type"]) == file_type
            assert llm.n_vocab() == 1000
        finally:
            llm.close()


def test_merged_model_tokens_and_greedy_answers_match_the_gguf(exported: dict) -> None:
    out = Path(exported["cfg"].output_dir)
    tokenizer = AutoTokenizer.from_pretrained(out / "merged")
    model = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)
    llm = open_llama(out / "student-F16.gguf", n_ctx=64, vocab_only=True)
    try:
        for problem in PROBLEMS:
            for style in STYLES:
                prompt = student_prompt(problem.question, style=style)
                ids = [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False).input_ids
                assert llm.tokenize(prompt.encode(), add_bos=True, special=False) == ids
                hf = model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False)[0, len(ids):].tolist()
                gguf = greedy_gguf(out / "student-F16.gguf", ids)
                assert gguf == hf
                assert gguf[-1] == tokenizer.eos_token_id  # the adapter was merged: it answers and stops
                answer = tokenizer.decode(gguf, skip_special_tokens=True)
                if style == "cot":
                    assert answer == f"The answer is {format_number(problem.answer)}."
                else:
                    assert answer.startswith("def solution():")
    finally:
        llm.close()


def test_parity_report(exported: dict) -> None:
    report = json.loads((Path(exported["cfg"].output_dir) / "parity.json").read_text())
    assert report["passed"] and report["failures"] == []
    assert report["tokens"] == {"prompts": 6, "identical": 6, "match_rate": 1.0, "mismatches": []}
    assert report["chat_template"]["ok"]
    assert report["greedy_f16"]["identical"] == 6 and report["greedy_f16"]["divergences"] == []
    assert report["files"]["F16"]["stop_rate"] == 1.0
    assert report["files"]["F16"]["answers"] == [p.answer for p in PROBLEMS for _ in STYLES]
    assert 0 <= report["files"]["Q4_K_M"]["answer_agreement"] <= 1


def test_parity_prompts_only_the_styles_the_adapter_was_trained_on(tiny: dict[str, Path], tmp_path: Path) -> None:
    """A cot-only student is not asked for programs, which it never learned to end: here its PoT answers do not end
    within 12 tokens (its CoT answers do), and with them the stop rate would fail the export."""
    adapter = copy_adapter(tiny, tmp_path, styles=["cot"])
    cfg = load_config(ExportConfig, overrides={
        "input_dir": str(adapter), "output_dir": str(tmp_path / "out"), "quant_types": ["F16"],
        "parity_problems": len(PROBLEMS), "parity_max_tokens": 12, "min_stop_rate": 1.0, "n_threads": 1, "seed": 0})
    report = run(cfg).parity
    assert report["passed"], report["failures"]
    assert report["styles"] == ["cot"] and report["tokens"]["prompts"] == len(PROBLEMS)
    assert report["files"]["F16"]["answers"] == [p.answer for p in PROBLEMS]


def test_gguf_chat_template_is_the_student_prompt(exported: dict) -> None:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    llm = open_llama(exported["result"].files["Q4_K_M"], n_ctx=64, vocab_only=True)
    try:
        source = llm.metadata["tokenizer.chat_template"]
    finally:
        llm.close()
    template = ImmutableSandboxedEnvironment().from_string(source)
    question = PROBLEMS[0].question
    render = lambda messages: template.render(messages=messages, bos_token="<s>", eos_token="</s>")  # noqa: E731
    assert render([{"role": "user", "content": question}]) == "<s>" + student_prompt(question, style="cot")
    pot = [{"role": "system", "content": STUDENT_DIRECTIVES["pot"]}, {"role": "user", "content": question}]
    assert render(pot) == "<s>" + student_prompt(question, style="pot")
    turn = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "The answer is 1."}]
    assert render(turn).endswith("The answer is 1.</s>")


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(command, value) pairs the way Ollama's parser/parser.go reads them: values have no escapes, span lines
    only inside quotes, and end at the first line end where the quotes are complete."""
    def unquote(value: str) -> str | None:
        if value.startswith('"""'):
            return value[3:-3] if len(value) >= 6 and value.endswith('"""') else None
        if value.startswith('"'):
            return value[1:-1] if len(value) >= 2 and value.endswith('"') else None
        return value

    commands, lines = [], iter(text.splitlines())
    for line in lines:
        if not line.strip() or line.startswith("#"):
            continue
        name, _, value = line.partition(" ")
        if name == "PARAMETER":
            name, _, value = value.partition(" ")
        while unquote(value.strip()) is None:
            value += "\n" + next(lines)
        commands.append((name, unquote(value.strip())))
    return commands


def test_modelfile_prompts_like_training_and_stops(exported: dict) -> None:
    text = exported["result"].modelfile.read_text()
    commands = parse_modelfile(text)
    values = dict(commands)
    assert values["FROM"] == "./student-Q4_K_M.gguf"  # the first quant type asked for
    assert (Path(exported["cfg"].output_dir) / values["FROM"]).exists()
    assert [v for k, v in commands if k == "stop"] == STUDENT_STOP
    assert values["num_ctx"] == "2048"
    question = PROBLEMS[1].question
    for directive, style in ((values["SYSTEM"], "cot"), (STUDENT_DIRECTIVES["pot"], "pot")):
        rendered = values["TEMPLATE"].replace("{{ .Prompt }}", question).replace("{{ .System }}", directive)
        assert rendered == student_prompt(question, style=style) + "{{ .Response }}"
    assert STUDENT_DIRECTIVES["pot"] in text  # the comment telling users how to ask for a program


# ---- the command line, a full model folder, a failed parity check ---------------------------------------------


def test_help() -> None:
    result = CliRunner().invoke(cli, ["export-gguf", "--help"])
    assert result.exit_code == 0
    for flag in ("ADAPTER_OR_MODEL_DIR", "-q, --quant-types", "--output-dir", "--parity / --no-parity",
                 "--min-stop-rate"):
        assert flag in result.output


def test_unknown_quant_type_lists_the_valid_ones(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["export-gguf", str(tmp_path), "-q", "Q4_K_X", "-q", "q8_0"])
    assert result.exit_code == 2
    assert "unknown quant type Q4_K_X" in result.output and "Q4_K_M" in result.output and "Q8_0" in result.output


def test_full_model_folder_is_converted_as_is_and_parity_failure_exits_1(exported: dict, tmp_path: Path) -> None:
    merged = Path(exported["cfg"].output_dir) / "merged"
    before = {path.name: path.read_bytes() for path in merged.iterdir()}
    out = tmp_path / "out"
    # 3 tokens are too few for any answer to end: the stop-rate threshold is crossed, and a GGUF that failed its
    # parity check is not registered with Ollama.
    with FakeOllama() as server:
        result = CliRunner().invoke(cli, ["export-gguf", str(merged), "-q", "Q8_0", "--output-dir", str(out),
                                          "--parity-problems", "1", "--parity-max-tokens", "3", "--n-threads", "1",
                                          "--ollama", "broken", "--ollama-host", server.url])
    assert result.exit_code == 1, result.output
    assert server.created == {} and server.blobs == {}
    assert "min_stop_rate" in result.output
    assert (out / "student-Q8_0.gguf").exists() and not (out / "merged").exists()
    assert json.loads((out / "run.json").read_text())["status"] == "parity_failed"
    assert json.loads((out / "parity.json").read_text())["files"]["Q8_0"]["stop_rate"] == 0.0
    assert {path.name: path.read_bytes() for path in merged.iterdir()} == before  # the input is left alone


# ---- --ollama: registration with a running Ollama (tests/fake_ollama.py speaks its blob and create API) ---------


def test_ollama_registers_the_gguf_with_the_modelfile_settings(exported: dict, tmp_path: Path) -> None:
    merged = Path(exported["cfg"].output_dir) / "merged"
    out = tmp_path / "out"
    with FakeOllama(model="teacher") as server:
        result = CliRunner().invoke(cli, ["export-gguf", str(merged), "-q", "Q8_0", "-q", "F16", "--no-parity",
                                          "--output-dir", str(out), "--ollama", "tiny-student",
                                          "--ollama-host", server.url])
        assert result.exit_code == 0, result.output
        assert f"registered with Ollama at {server.url} as tiny-student (uploaded)" in result.output
        gguf = out / "student-Q8_0.gguf"  # the first type, as the Modelfile
        digest = "sha256:" + hashlib.sha256(gguf.read_bytes()).hexdigest()
        assert server.blobs == {digest: {"size": gguf.stat().st_size, "magic": b"GGUF"}}
        create = server.created["tiny-student:latest"]
        assert create["files"] == {gguf.name: digest}
        modelfile = dict(parse_modelfile((out / "Modelfile").read_text()))
        assert create["template"] == modelfile["TEMPLATE"] and create["system"] == modelfile["SYSTEM"]
        assert create["parameters"] == {"stop": STUDENT_STOP, "num_ctx": 2048, "temperature": 0}
        assert modelfile["temperature"] == "0"
        question = PROBLEMS[0].question
        assert create["template"].replace("{{ .Prompt }}", question).replace("{{ .System }}", create["system"]) \
            == student_prompt(question, style="cot") + "{{ .Response }}"
        shown = ollama.Client(host=server.url).show("tiny-student")
        assert shown.template == create["template"] and "temperature" in (shown.parameters or "")

        # Again under another name: the blob is already there (HEAD), so nothing is uploaded twice.
        again = register_ollama(gguf, "me/tiny-student:q8", num_ctx=512, host=server.url)
        assert again == {"name": "me/tiny-student:q8", "digest": digest, "uploaded": False, "host": server.url}
        assert server.created["me/tiny-student:q8"]["parameters"]["num_ctx"] == 512
        assert [r["path"] for r in server.requests] == ["/api/create", "/api/create"]


def test_fake_ollama_checks_blob_digests_like_ollama(tmp_path: Path) -> None:
    with FakeOllama() as server:
        client = httpx.Client(base_url=server.url)
        good, fake = "sha256:" + hashlib.sha256(b"GGUF data").hexdigest(), "sha256:" + "0" * 64
        assert client.head(f"/api/blobs/{good}").status_code == 404
        assert client.post(f"/api/blobs/{fake}", content=b"GGUF data").status_code == 400  # digest mismatch
        assert client.post("/api/blobs/md5:abc", content=b"x").status_code == 400
        assert client.post(f"/api/blobs/{good}", content=b"GGUF data").status_code == 201
        assert client.head(f"/api/blobs/{good}").status_code == 200
        assert client.post(f"/api/blobs/{good}", content=b"GGUF data").status_code == 200  # already there
        created = client.post("/api/create", json={"model": "m", "files": {"m.gguf": fake}, "stream": False})
        assert created.status_code == 400 and "no such file" in created.json()["error"]
        created = client.post("/api/create", json={"model": "m", "files": {"../m.gguf": good}, "stream": False})
        assert created.status_code == 400
        assert client.post("/api/create", json={"model": "m", "files": {"m.gguf": good}}).text.splitlines()[-1] \
            == '{"status": "success"}'


def test_ollama_without_its_package_is_one_line_naming_the_extra(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ollama", None)  # as if it were not installed: import raises ImportError
    result = CliRunner().invoke(cli, ["export-gguf", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "out"),
                                      "--ollama", "my-student"])
    assert result.exit_code == 2, result.output
    assert result.output == ("mdlite: error: --ollama needs the ollama package: pip install 'mdlite[teacher]' (or "
                             "drop --ollama and run `ollama create NAME -f Modelfile` later)\n")


def test_ollama_not_running_is_one_line_before_any_work(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port where nothing listens
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    started = time.monotonic()
    result = CliRunner().invoke(cli, ["export-gguf", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "out"),
                                      "--ollama", "my-student", "--ollama-host", closed])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"mdlite: error: cannot reach Ollama at {closed}")
    assert "--ollama-host" in result.output
    assert result.output.count("\n") == 1 and time.monotonic() - started < 30
    bad_name = CliRunner().invoke(cli, ["export-gguf", str(tmp_path), "--ollama", "no spaces!"])
    assert bad_name.exit_code == 2 and "(flag --ollama)" in bad_name.output


# ---- refusals -------------------------------------------------------------------------------------------------


def copy_adapter(tiny: dict[str, Path], tmp_path: Path, **meta: object) -> Path:
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny["adapter"], adapter)
    if meta:
        record = json.loads((adapter / "mdlite.json").read_text())
        (adapter / "mdlite.json").write_text(json.dumps({**record, **meta}))
    return adapter


def refused(adapter_or_model: Path, tmp_path: Path) -> str:
    out = tmp_path / "out"
    with pytest.raises(MdliteError) as error:
        run(load_config(ExportConfig, overrides={"input_dir": str(adapter_or_model), "output_dir": str(out)}))
    assert not out.exists() or not any(out.iterdir()), "a refused export must not write anything"
    return str(error.value)


def test_corrupted_adapter_is_refused(tiny: dict[str, Path], tmp_path: Path) -> None:
    adapter = copy_adapter(tiny, tmp_path)
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert "cannot read the adapter" in refused(adapter, tmp_path)


def test_adapter_with_nan_weights_is_refused(tiny: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    adapter = copy_adapter(tiny, tmp_path)
    tensors = load_file(adapter / "adapter_model.safetensors")
    first = sorted(tensors)[0]
    tensors[first][0, 0] = float("nan")
    save_file(tensors, adapter / "adapter_model.safetensors")
    assert "NaN/inf" in refused(adapter, tmp_path)


def test_base_with_other_shapes_is_refused(tiny: dict[str, Path], tmp_path: Path) -> None:
    other = tmp_path / "other-base"
    LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=1000)).save_pretrained(other)
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny["base"] / name, other / name)
    message = refused(copy_adapter(tiny, tmp_path, base_model=str(other)), tmp_path)
    assert "does not fit the base" in message and "has shape" in message


def test_base_with_another_vocabulary_is_refused(tiny: dict[str, Path], tmp_path: Path) -> None:
    other = make_tiny_model(tmp_path / "other-base", seed=1)  # same shapes, a different SentencePiece vocabulary
    message = refused(copy_adapter(tiny, tmp_path, base_model=str(other)), tmp_path)
    assert "tokenizer differs from the base's" in message


def test_missing_tokenizer_files_are_refused(tiny: dict[str, Path], tmp_path: Path) -> None:
    adapter = copy_adapter(tiny, tmp_path)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        (adapter / name).unlink()
    assert "missing tokenizer files" in refused(adapter, tmp_path)


def test_unsupported_architecture_is_refused(tiny: dict[str, Path], tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny["base"], model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "architectures": ["MadeUpForCausalLM"]}))
    assert "MadeUpForCausalLM is not supported" in refused(model, tmp_path)


def test_too_little_disk_space_is_refused(tiny: dict[str, Path], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    free = shutil.disk_usage(tmp_path)._replace(free=5_000_000)  # the tiny export needs ~30 MB
    monkeypatch.setattr("mdlite.export.shutil.disk_usage", lambda path: free)
    assert "only 0.01 GB are free" in refused(tiny["adapter"], tmp_path)


# ---- GPU memory and precision (a card is simulated; a GPU machine runs bench/device_check.sh) ------------------


def test_merge_runs_on_the_gpu_in_the_checkpoints_dtype_or_on_the_cpu(tiny: dict[str, Path], tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    from mdlite import export

    base = tmp_path / "fp16-base"  # the base as LLaMA-2 ships it: config.json says float16
    shutil.copytree(tiny["base"], base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "dtype": "float16"}))
    source = export.resolve_source(copy_adapter(tiny, tmp_path, base_model=str(base), base_model_path=str(base)))
    weights = export._parameters(base) * 2
    free = [weights * 1.1 + 2**30 + 1]
    native_bf16 = [False]  # a T4: bf16 only by emulation
    monkeypatch.setattr(export, "_cuda", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (int(free[0]), 24 * 2**30))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation or native_bf16[0])

    assert export.merge_device(source) == ("cuda:0", "float16")  # fits: on the GPU, fp16 as the checkpoint
    free[0] -= 2
    with caplog.at_level("WARNING", logger="mdlite.export"):
        assert export.merge_device(source) == ("cpu", "float32")  # does not fit: the CPU merge, said so
    assert "merging on the CPU in fp32 instead" in caplog.text and "free the GPU" in caplog.text

    assert export.merge_dtype({"torch_dtype": "bfloat16"}, cuda=True) == "float32"  # no bf16 hardware: exact fp32
    native_bf16[0] = True
    assert export.merge_dtype({"dtype": "bfloat16"}, cuda=True) == "bfloat16"
    assert export.merge_dtype({"dtype": "float16"}, cuda=False) == "float32"  # the CPU path stays fp32
    assert export.merge_dtype({}, cuda=True) == "float32"
    assert export.estimate_bytes(source, ["F16"], merge_dtype="float16") == 2 * weights
    assert export.estimate_bytes(source, ["F16"]) == 3 * weights  # fp32 merged weights + F16


def test_llama_cpp_refusing_a_gguf_is_one_clear_error(tiny: dict[str, Path], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from mdlite import export
    from mdlite.engine import llama_cpp_module

    seen = []

    def refuse(**kwargs: object) -> None:
        seen.append(kwargs["n_gpu_layers"])  # what llama-cpp-python raises, e.g. out of GPU memory:
        raise ValueError(f"Failed to load model from file: {kwargs['model_path']}")

    monkeypatch.setattr(llama_cpp_module(), "Llama", refuse)
    model = AutoModelForCausalLM.from_pretrained(tiny["base"])
    cfg = load_config(ExportConfig, overrides={"parity_problems": 1, "n_gpu_layers": 20})
    expected = r"x-F16\.gguf: llama\.cpp could not open it \(Failed to load.*\); on a GPU, .*--n-gpu-layers 0"
    with pytest.raises(MdliteError, match=expected):
        export.check_parity(model, AutoTokenizer.from_pretrained(tiny["base"]), {"F16": tmp_path / "x-F16.gguf"}, cfg,
                            add_bos=True)
    assert seen == [20]


# ---- llama.cpp's output: a log file, progress bars, -v ------------------------------------------------------


def test_converter_and_quantizer_output_goes_to_export_log_not_the_terminal(tiny: dict[str, Path],
                                                                           tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = [sys.executable, "-c", "from mdlite.cli import cli; cli()", "export-gguf", str(tiny["adapter"]),
               "-q", "Q4_K_M", "--output-dir", str(out), "--no-parity", "--n-threads", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    log = (out / "export.log").read_text()
    assert " --> F16" in log and "converting to q4_K" in log  # the converter's and the quantizer's lines
    terminal = done.stdout + done.stderr
    assert " --> " not in terminal and "converting to" not in terminal
    assert "quantize student-Q4_K_M.gguf" in done.stderr  # its progress bar
    # nor library notes a newcomer reads as errors: bitsandbytes' missing CPU 4-bit kernel (on CPUs with
    # AVX512-BF16), transformers' FutureWarning about peft's use of a deprecated property
    assert "gemm_4bit_forward" not in terminal and "Warning" not in terminal, terminal[-2000:]


def test_verbose_shows_the_quantizer_log(exported: dict[str, object], tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    from mdlite.export import quantize

    f16 = exported["result"].files["F16"]
    with caplog.at_level(logging.INFO, logger="mdlite.export"):
        quantize(f16, tmp_path / "q8.gguf", "Q8_0", n_threads=1, log_file=tmp_path / "export.log")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("quantize: [")]
    assert len(lines) >= 10 and "converting to q8_0" in (tmp_path / "export.log").read_text()


def test_a_failed_quantize_shows_the_logs_last_lines_and_path(tmp_path: Path) -> None:
    from mdlite.export import quantize

    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(MdliteError, match="could not quantize to Q4_K_M") as error:
        quantize(bad, tmp_path / "q.gguf", "Q4_K_M", log_file=tmp_path / "export.log")
    message = str(error.value)
    assert "the log ends:" in message and f"full log: {tmp_path / 'export.log'}" in message
    assert (tmp_path / "export.log").read_text().strip()  # llama.cpp said why


# ---- an export killed midway ----------------------------------------------------------------------------------


def test_killed_export_leaves_no_final_file_and_a_rerun_completes(tiny: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = [sys.executable, "-c", "from mdlite.cli import cli; cli()", "export-gguf", str(tiny["adapter"]),
               "-q", "Q4_K_M", "--output-dir", str(out), "--no-parity"]
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = out / ".export.partial" / "export.log"
    deadline = time.monotonic() + 120
    while not log.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert log.exists(), "the export never reached the converter"
    os.killpg(process.pid, signal.SIGKILL)  # the export and its converter subprocess, mid-conversion
    process.wait()
    assert not [name for name in OUTPUT_FILES if (out / name).exists()]
    assert not list(out.glob("*.gguf"))

    cfg = load_config(ExportConfig, overrides={"input_dir": str(tiny["adapter"]), "output_dir": str(out),
                                               "quant_types": ["Q4_K_M"], "parity": False})
    result = run(cfg)
    assert result.files["Q4_K_M"].exists() and not (out / ".export.partial").exists()
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "export.log", "merged", "run.json",
                                                     "student-Q4_K_M.gguf"]


# ---- another family: a tiny random Gemma 3 student, trained by `mdlite train`, exported with parity ------------

TEACHER = "llamacpp:qwen2.5-coder-0.5b-instruct"  # the rationales' teacher: Qwen (ChatML, no BOS, EOS <|im_end|>)


def make_tiny_gemma3(folder: Path) -> Path:
    """A tiny random Gemma 3 HF folder: Gemma's special ids and names (pad 0 <pad>, eos 1 <eos>, bos 2 <bos>, unk 3,
    where the tiny LLaMA has unk 0, bos 1, eos 2 and no pad), a SentencePiece tokenizer that adds BOS, tied
    embeddings, a sliding-window layer and a global one."""
    import io

    import sentencepiece as spm
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, GemmaTokenizer

    folder.mkdir(parents=True)
    lines = [student_prompt(p.question, style=style) for p in synth_problems(300, seed=0) for style in STYLES]
    lines += [f"The answer is {format_number(p.answer)}. def solution():\n    return {p.equation}"
              for p in synth_problems(300, seed=0)]
    spm_model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([line for text in lines for line in text.splitlines() if line.strip()]),
        model_writer=spm_model, model_type="bpe", vocab_size=999, byte_fallback=True, split_digits=True,
        character_coverage=1.0, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
        bos_piece="<bos>", unk_piece="<unk>", normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, allow_whitespace_only_pieces=True, num_threads=1, minloglevel=2)
    (folder / "tokenizer.model").write_bytes(spm_model.getvalue())
    tokenizer = GemmaTokenizer.from_pretrained(folder, add_bos_token=True)
    tokenizer.save_pretrained(folder)
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=128, sliding_window=64,
                              layer_types=["sliding_attention", "full_attention"], max_position_embeddings=2048,
                              pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    Gemma3ForCausalLM(config).to(torch.float32).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gemma(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A tiny Gemma 3 trained by `mdlite train` on a Qwen teacher's (kept) rationales, exported by `export.run`."""
    from mdlite.config import TrainConfig
    from mdlite.train import run as train

    root = tmp_path_factory.mktemp("gemma")
    base = make_tiny_gemma3(root / "base")
    records = [{"key": f"{p.id}/{style}/0", "problem_id": p.id, "style": style, "sample": 0, "question": p.question,
                "gold": p.answer, "kept": True, "reason": None, "teacher": TEACHER,
                "text": f"The answer is {format_number(p.answer)}." if style == "cot" else
                f"def solution():\n    return {p.equation}\n"} for p in PROBLEMS for style in STYLES]
    rationales = root / "rationales.jsonl"
    rationales.write_text("".join(json.dumps(r) + "\n" for r in records))
    train_cfg = load_config(TrainConfig, overrides={
        "rationales": str(rationales), "model": str(base), "output_dir": str(root / "train"), "quantization": "none",
        "max_steps": 60, "learning_rate": 3e-3, "warmup_steps": 0, "lr_scheduler_type": "constant",
        "per_device_train_batch_size": 6, "gradient_accumulation_steps": 1, "val_fraction": 0.0, "lora_dropout": 0.0,
        "gradient_checkpointing": False, "save_steps": 1000, "logging_steps": 20})
    adapter = train(train_cfg).adapter_dir
    export_cfg = load_config(ExportConfig, overrides={
        "input_dir": str(adapter), "output_dir": str(root / "export"), "quant_types": ["Q8_0", "F16"],
        "parity_problems": len(PROBLEMS), "parity_max_tokens": 40, "n_threads": 1, "seed": 0})
    return {"base": base, "adapter": adapter, "train_cfg": train_cfg, "export": run(export_cfg)}


def test_a_gemma3_student_of_a_qwen_teacher_trains_and_exports_through_the_same_path(gemma: dict) -> None:
    meta = json.loads((gemma["adapter"] / "mdlite.json").read_text())
    assert meta["add_bos"] is True and meta["eos_token"] == "<eos>"  # Gemma's, not the teacher's or LLaMA's
    result = gemma["export"]
    report = result.parity
    assert report["passed"], report["failures"]
    assert report["tokens"]["match_rate"] == 1.0 and report["chat_template"]["ok"]
    assert report["greedy_f16"]["identical"] == 6 and report["files"]["F16"]["stop_rate"] == 1.0
    assert report["files"]["F16"]["answers"] == [p.answer for p in PROBLEMS for _ in STYLES]  # it learned, and stops
    llm = open_llama(result.files["Q8_0"], n_ctx=64, vocab_only=True)
    try:
        assert llm.metadata["general.architecture"] == "gemma3"
        assert (llm.token_bos(), llm.token_eos(), int(llm.metadata["tokenizer.ggml.padding_token_id"])) == (2, 1, 0)
    finally:
        llm.close()


def test_gemma3_student_is_asked_with_the_token_ids_it_trained_on(gemma: dict, tiny: dict[str, Path]) -> None:
    """Training's prompt ids (BOS first) and EOS equal what solve / serve / eval send through the engine, and what
    Ollama gets from the Modelfile's TEMPLATE; the tiny LLaMA's BOS and EOS ids are the other way round."""
    from mdlite.engine import Engine
    from mdlite.solve import prompt_for
    from mdlite.train import Example, encode_examples

    tokenizer = AutoTokenizer.from_pretrained(gemma["adapter"])
    llama_tokenizer = AutoTokenizer.from_pretrained(tiny["base"])
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (2, 1, 0)
    assert (llama_tokenizer.bos_token_id, llama_tokenizer.eos_token_id) == (1, 2)
    template = dict(parse_modelfile(gemma["export"].modelfile.read_text()))["TEMPLATE"]
    gguf = gemma["export"].files["Q8_0"]
    llm = open_llama(gguf, n_ctx=64, vocab_only=True)
    try:
        with Engine(gguf, n_threads=1) as engine:
            for problem in PROBLEMS:
                for style in STYLES:
                    prompt = prompt_for(problem.question, style, prompt_style="student")[0]
                    [encoded], _ = encode_examples([Example(problem.id, style, 0, prompt, "The answer is 1.")],
                                                   tokenizer, gemma["train_cfg"], add_bos=True)
                    trained = encoded["input_ids"][:encoded["labels"].count(-100)]
                    assert trained[0] == 2 and encoded["input_ids"][-1] == llm.token_eos() == 1
                    assert engine.tokenize(prompt) == trained
                    rendered = template.replace("{{ .Prompt }}", problem.question).replace(
                        "{{ .System }}", STUDENT_DIRECTIVES[style]).replace("{{ .Response }}", "")
                    assert llm.tokenize(rendered.encode(), add_bos=True, special=True) == trained
    finally:
        llm.close()


# ---- a real pretrained model ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_export_of_the_gemma_demo_model_with_a_lora_adapter(tmp_path: Path) -> None:
    """gemma-3-270m (GGUF, dequantized once by transformers and cached) + a random small LoRA -> Q8_0, Q4_K_M."""
    from peft import LoraConfig, get_peft_model

    from mdlite.models import hf_from_gguf, model_path

    base = hf_from_gguf(model_path("gemma-3-270m"))
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.01)  # LoRA B starts at zero: make the adapter change the model
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    AutoTokenizer.from_pretrained(base).save_pretrained(adapter)
    (adapter / "mdlite.json").write_text(json.dumps({"base_model": str(base), "add_bos": True}))
    del model

    cfg = load_config(ExportConfig, overrides={
        "input_dir": str(adapter), "output_dir": str(tmp_path / "out"), "quant_types": ["Q8_0", "Q4_K_M"],
        "parity_problems": 2, "parity_max_tokens": 24, "min_stop_rate": 0.0, "min_answer_agreement": 0.0,
    })
    result = run(cfg)
    report = result.parity
    assert report["tokens"]["match_rate"] == 1.0 and report["chat_template"]["ok"]
    assert report["greedy_f16"]["match_rate"] == 1.0, report["greedy_f16"]["divergences"]
    assert result.files["Q4_K_M"].stat().st_size < result.files["Q8_0"].stat().st_size < 600e6
    llm = open_llama(result.files["Q4_K_M"], n_ctx=64, vocab_only=True)
    try:
        assert llm.metadata["general.architecture"] == "gemma3"
    finally:
        llm.close()
    _check_real_gemma_prompts(base, result)


def _check_real_gemma_prompts(base: Path, result: object) -> None:
    """The real Gemma student is asked (engine: solve / serve / eval; Ollama: the Modelfile) with the token ids
    `mdlite train` gives it, BOS first, and stops on the EOS it learned; the Qwen teacher tokenizes otherwise."""
    from mdlite.config import TrainConfig
    from mdlite.engine import Engine
    from mdlite.models import model_path, resolve_base_model
    from mdlite.solve import prompt_for
    from mdlite.train import Example, encode_examples, expected_bos

    tokenizer = AutoTokenizer.from_pretrained(base)
    add_bos = expected_bos(tokenizer, resolve_base_model("gemma-3-270m"))
    template = dict(parse_modelfile(result.modelfile.read_text()))["TEMPLATE"]
    gguf = result.files["Q8_0"]
    llm = open_llama(gguf, n_ctx=64, vocab_only=True)
    teacher = open_llama(model_path("qwen2.5-coder-0.5b-instruct"), n_ctx=64, vocab_only=True)
    try:
        with Engine(gguf, n_threads=1) as engine:
            for problem in synth_problems(2, seed=1):
                for style in STYLES:
                    prompt = prompt_for(problem.question, style, prompt_style="student")[0]
                    [encoded], _ = encode_examples([Example(problem.id, style, 0, prompt, "The answer is 1.")],
                                                   tokenizer, TrainConfig(), add_bos=add_bos)
                    trained = encoded["input_ids"][:encoded["labels"].count(-100)]
                    assert trained[0] == llm.token_bos() == tokenizer.bos_token_id == 2
                    assert encoded["input_ids"][-1] == llm.token_eos() == tokenizer.eos_token_id == 1
                    assert engine.tokenize(prompt) == trained
                    rendered = template.replace("{{ .Prompt }}", problem.question).replace(
                        "{{ .System }}", STUDENT_DIRECTIVES[style]).replace("{{ .Response }}", "")
                    assert llm.tokenize(rendered.encode(), add_bos=True, special=True) == trained
                    asked_teacher = teacher.tokenize(prompt.encode(), add_bos=True, special=True)
                    assert asked_teacher[0] != teacher.token_bos() and teacher.token_eos() != 1  # no BOS, other EOS
    finally:
        llm.close()
        teacher.close()
