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
    shipped = dict(re.findall(r'"([\w-]+)==([\d.]+)"', script.read_text().split("WHEELS=(")[1].split(")")[0]))
    pins = dict(re.findall(r'"([\w-]+)==([\d.]+)"', (SCRIPT.parents[1] / "pyproject.toml").read_text()))
    for name in ("bitsandbytes", "transformers", "peft", "sentencepiece", "protobuf"):
        assert shipped[name] == pins[name], name
    assert shipped["click"] == "8.5.1" and shipped["huggingface_hub"].startswith("1.")  # transformers 5.23: >= 1.31
