"""bench/gpu_check.py, the 7B-shape device check, on its small CPU path: random tiny LLaMA, QLoRA through
`mdlite.train.run`, measured peak memory and tokens/s next to the `--dry-run` estimate, then the merge."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


def test_gpu_check_tiny_prints_measured_vs_estimate(tmp_path: Path) -> None:
    command = [sys.executable, str(SCRIPT), "--shape", "tiny", "--steps", "2", "--max-length", "128",
               "--batch-size", "2", "--work", str(tmp_path / "work"), "--json", str(tmp_path / "check.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny matrices: threads only contend with other jobs
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "built a random tiny" in out
    assert "micro-batch 2 x 128 tokens, gradient accumulation 2, gradient checkpointing on" in out  # the 7B config
    assert "estimate/measured" in out and "estimate vs measured peak (max_rss):" in out
    assert "tokens/s (training" in out and "merge (float32 base on cpu, saved)" in out  # the checkpoint's dtype
    report = json.loads((tmp_path / "check.json").read_text())
    assert report["steps"] == 2 and report["tokens_per_s"] > 0
    assert report["estimate_gb"]["total"] > 0 and all(v > 0 for v in report["train_peak_gb"].values())
    assert report["merge"]["seconds"] >= 0 and report["merge"]["peak_gb"]
    assert not (tmp_path / "work").exists()  # removed unless --keep


def test_gpu_check_refuses_7b_shapes_without_cuda(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        return
    done = subprocess.run([sys.executable, str(SCRIPT), "--work", str(tmp_path / "w")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "needs a CUDA GPU; use --shape tiny" in done.stderr


def test_probe_measures_the_estimates_layer_term_on_the_cpu(tmp_path: Path) -> None:
    """Saved-tensor hooks on mdlite's own QLoRA model (bf16 autocast, as on a GPU): the last layer keeps exactly
    what `layer_activation_bytes` counts (with the CPU's 4-byte dropout masks), and the residual stream is fp32."""
    from mdlite.train import layer_activation_bytes

    command = [sys.executable, str(SCRIPT), "--probe", "--shape", "tiny", "--probe-tokens", "128",
               "--json", str(tmp_path / "probe.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "probe.json").read_text())
    assert report["residual_dtype"] == ["torch.float32"]
    arch = {**report["shape"], "head_dim": report["shape"]["hidden_size"] // report["shape"]["num_attention_heads"]}
    assert report["layer_bytes_per_token_total"] == layer_activation_bytes(arch, lora_r=64, residual_bytes=4,
                                                                            mask_bytes=4)
    assert set(report["layer_bytes_per_token"]) == {"float32", "bfloat16"}
    assert report["estimate_terms"]["checkpoint"] == 4 * report["shape"]["hidden_size"]


def test_device_check_ships_the_pinned_wheels_and_parses() -> None:
    """bench/device_check.sh: valid bash, and the wheels it carries to the GPU machine are pyproject's pins."""
    import re

    script = SCRIPT.with_name("device_check.sh")
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    shipped = dict(re.findall(r'"([\w-]+)==([\d.]+)"', text.split("WHEELS=(")[1].split(")")[0]))
    extra = dict(re.findall(r'"([\w-]+)==([\d.]+)"', text.split("EXTRA_WHEELS=(")[1].split(")")[0]))
    pins = dict(re.findall(r'"([\w-]+)(?:\[\w+\])?==([\d.]+)"', (SCRIPT.parents[1] / "pyproject.toml").read_text()))
    for name in ("bitsandbytes", "transformers", "peft", "sentencepiece", "protobuf"):
        assert shipped[name] == pins[name], name
    assert shipped["click"] == "8.5.1" and shipped["huggingface_hub"].startswith("1.")  # transformers 5.23: >= 1.31
    assert extra["ollama"] == pins["ollama"] and "diskcache" in extra  # the fake teacher's client; llama_cpp's need
    assert "llama-cpp-python" in pins  # the sdist prepare trims is pyproject's pin (read from it by the script)


def test_memory_cap_reports_an_oom_and_the_batch_search_stops_at_it(tmp_path: Path) -> None:
    """`--memory-cap-gib` on the CPU is recorded, not enforced; `--fake-oom-above` takes the OOM paths: the capped
    run reports fits false with exit code 0, and the search goes up to the first OOM and reports the largest fit."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = [sys.executable, str(SCRIPT), "--shape", "tiny", "--steps", "2", "--max-length", "128",
              "--memory-cap-gib", "16", "--model", str(tmp_path / "model")]
    oom = subprocess.run([*common, "--batch-size", "4", "--fake-oom-above", "2", "--work", str(tmp_path / "cap"),
                          "--json", str(tmp_path / "cap.json")], capture_output=True, text=True, timeout=300, env=env)
    assert oom.returncode == 0, oom.stderr[-3000:]
    assert "not enforced on the CPU" in oom.stdout and "RESULT cap 16 GiB: OOM" in oom.stdout
    report = json.loads((tmp_path / "cap.json").read_text())
    assert report["fits"] is False and report["oom"].startswith("fake OOM") and report["memory_cap"]["gib"] == 16
    assert "merge" not in report and (tmp_path / "model" / ".gpu_check-built.json").exists()  # built once, kept
    search = subprocess.run([*common, "--batch-search", "2,3,4,6", "--fake-oom-above", "3", "--work",
                             str(tmp_path / "search"), "--json", str(tmp_path / "search.json")],
                            capture_output=True, text=True, timeout=300, env=env)
    assert search.returncode == 0, search.stderr[-3000:]
    assert "reusing the random tiny" in search.stdout
    report = json.loads((tmp_path / "search.json").read_text())
    assert [(t["micro_batch"], t["fits"]) for t in report["tries"]] == [(2, True), (3, True), (4, False)]
    assert report["largest_fitting"] == 3 and report["tries"][0]["tokens_per_s"] > 0
    assert all(t["estimate_gb"] > 0 for t in report["tries"])


def test_devcheck_pack_trims_the_llama_sdist_and_the_bitsandbytes_wheel(tmp_path: Path) -> None:
    """What prepare packs: the sdist keeps the library's build files, the converter and the commit, not the test
    models, docs or other backends; the wheel keeps CUDA 13 and CPU libraries and a RECORD that matches."""
    import base64
    import hashlib
    import io
    import tarfile
    import zipfile

    pack = SCRIPT.with_name("devcheck_pack.py")
    root = "llama_cpp_python-0.3.36/"
    names = ["CMakeLists.txt", "pyproject.toml", "llama_cpp/__init__.py", ".git/modules/vendor/llama.cpp/HEAD",
             ".git/modules/vendor/llama.cpp/objects/pack", "vendor/llama.cpp/CMakeLists.txt",
             "vendor/llama.cpp/convert_hf_to_gguf.py", "vendor/llama.cpp/gguf-py/gguf/__init__.py",
             "vendor/llama.cpp/models/ggml-vocab-llama.gguf", "vendor/llama.cpp/docs/build.md",
             "vendor/llama.cpp/ggml/src/ggml-cuda/mmq.cu", "vendor/llama.cpp/ggml/src/ggml-vulkan/x.cpp",
             "vendor/llama.cpp/ggml/src/ggml-cpu/ops.cpp", "vendor/llama.cpp/ggml/src/ggml.c",
             "vendor/llama.cpp/tools/mtmd/mtmd.cpp", "vendor/llama.cpp/vendor/nlohmann/json.hpp"]
    with tarfile.open(tmp_path / "sdist.tar.gz", "w:gz") as sdist:
        for name in names:
            info = tarfile.TarInfo(root + name)
            info.size = len(name)
            sdist.addfile(info, io.BytesIO(name.encode()))
    out = tmp_path / "src.tar.xz"
    subprocess.run([sys.executable, str(pack), "llama", str(tmp_path / "sdist.tar.gz"), str(out)], check=True,
                   capture_output=True)
    with tarfile.open(out) as kept:
        found = sorted(m.name.removeprefix(root) for m in kept)
    dropped = ("vendor/llama.cpp/models", "vendor/llama.cpp/docs", "vendor/llama.cpp/tools",
               ".git/modules/vendor/llama.cpp/objects", "vendor/llama.cpp/ggml/src/ggml-vulkan")
    assert found == sorted(n for n in names if not n.startswith(dropped))

    wheel = tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for lib in ("cpu", "cuda118", "cuda128", "cuda130", "rocm72"):
            zf.writestr(f"bitsandbytes/libbitsandbytes_{lib}.so", lib)
        zf.writestr("bitsandbytes/__init__.py", "")
        zf.writestr("bitsandbytes-0.50.2.dist-info/RECORD", "stale")
    subprocess.run([sys.executable, str(pack), "bnb", str(wheel)], check=True, capture_output=True)
    with zipfile.ZipFile(wheel) as zf:
        kept = sorted(zf.namelist())
        record = zf.read("bitsandbytes-0.50.2.dist-info/RECORD").decode().splitlines()
        data = zf.read("bitsandbytes/libbitsandbytes_cuda130.so")
    assert kept == ["bitsandbytes-0.50.2.dist-info/RECORD", "bitsandbytes/__init__.py",
                    "bitsandbytes/libbitsandbytes_cpu.so", "bitsandbytes/libbitsandbytes_cuda130.so"]
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    assert f"bitsandbytes/libbitsandbytes_cuda130.so,sha256={digest},{len(data)}" in record


def test_llama_check_counts_differing_paths_and_reads_the_load_log() -> None:
    sys.path.insert(0, str(SCRIPT.parent))
    import llama_gpu_check

    assert llama_gpu_check._differ([["abc", "abd"]], [["abc", "abx"]]) == {"differ": 1, "of": 2,
                                                                        "first_difference_at": [2]}
    log = ["llama.cpp: load_tensors: layer   0 assigned to device CUDA0, is_swa = 0",
           "llama.cpp: load_tensors: layer   1 assigned to device CUDA0, is_swa = 0",
           "llama.cpp: llama_kv_cache: layer   0: dev = CUDA0", "llama.cpp: load_tensors: offloaded 2/2 layers to GPU"]
    assert llama_gpu_check._placement(log) == ("layers by device {'CUDA0': 2}, KV cache by device {'CUDA0': 1}; "
                                               "offloaded 2/2 layers to GPU")
