"""`make install`'s choices (`make -n`, nothing installed): CPU as in CI, CUDA, the user's CMAKE_ARGS, TORCH_INDEX."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def _plan(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """The commands `make install` would run into a fresh venv folder."""
    environment = {k: v for k, v in os.environ.items() if k not in ("CMAKE_ARGS", "BACKEND", "TORCH_INDEX")}
    result = subprocess.run(["make", "-n", "install", f"VENV={tmp_path / 'venv'}", *args], cwd=ROOT,
                            capture_output=True, text=True, env={**environment, **(env or {})}, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_cpu_install_pins_the_cpu_torch_and_builds_llama_cpp_as_before(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "BACKEND=cpu")
    assert "make install: CPU (cpu)" in plan
    assert "pip install -q --disable-pip-version-check torch==2.13.0\n" in plan
    if platform.system() != "Darwin":  # macOS: a CPU build means compiling llama.cpp with -DGGML_METAL=off
        assert "CMAKE_ARGS" not in plan and "--no-cache-dir" not in plan and "uninstall" not in plan
    assert plan.index("torch==2.13.0") < plan.index('-e ".[all,dev]"')


def test_cuda_install_compiles_llama_cpp_with_cuda_outside_the_wheel_cache(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "BACKEND=cuda")
    assert "torch==" not in plan  # PyPI's torch, the CUDA build, comes with .[all]
    build = next(line for line in plan.splitlines() if "--no-binary" in line)
    assert "CMAKE_ARGS='-DGGML_CUDA=on'" in build and "--no-cache-dir" in build
    assert '"llama-cpp-python[server]==' in build
    assert plan.index("--no-binary") < plan.index('-e ".[all,dev]"')


def test_the_users_cmake_args_win(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "BACKEND=cuda", env={"CMAKE_ARGS": "-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=86"})
    assert "CMAKE_ARGS='-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=86'" in plan


def test_torch_index_is_tried_then_pips_own(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "BACKEND=cpu", "TORCH_INDEX=https://download.pytorch.org/whl/cpu")
    assert "--index-url https://download.pytorch.org/whl/cpu torch==2.13.0 || {" in plan


def test_unknown_backend_is_refused(tmp_path: Path) -> None:
    result = subprocess.run(["make", "-n", "install", "BACKEND=rocm"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0 and "BACKEND must be auto, cuda, metal or cpu" in result.stderr
