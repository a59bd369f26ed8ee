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
        assert "compiling llama.cpp" not in plan
    assert plan.index("torch==2.13.0") < plan.index('-e ".[all,dev]"')
    assert "torch_cuda_report" not in plan  # no GPU to check


def test_cuda_install_pins_torch_and_compiles_llama_cpp_with_cuda_outside_the_wheel_cache(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "BACKEND=cuda")
    assert "pip install -q --disable-pip-version-check torch==2.13.0\n" in plan  # PyPI's CUDA build, pinned
    assert plan.index("torch==2.13.0") < plan.index("--no-binary") < plan.index('-e ".[all,dev]"')
    build = next(line for line in plan.splitlines() if "--no-binary" in line)
    assert "CMAKE_ARGS='-DGGML_CUDA=on'" in build and "--no-cache-dir" in build
    assert '"llama-cpp-python[server]==' in build
    assert plan.index("compiling llama.cpp with CUDA: 10-30 minutes") < plan.index("--no-binary")
    failed = plan[plan.index("--no-binary"):]
    assert "-DCMAKE_CUDA_ARCHITECTURES=" in failed and "-DCMAKE_CUDA_HOST_COMPILER=" in failed
    # the last step before the stamp: torch must compute on the GPU, else make install fails with the advice
    check = next(line for line in plan.splitlines() if "torch_cuda_report" in line)
    assert "sys.exit(not ok)" in check
    assert plan.index('-e ".[all,dev]"') < plan.index("torch_cuda_report") < plan.index("/.installed")


def test_cuda_install_takes_torch_from_torch_index_without_falling_back(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "BACKEND=cuda", "TORCH_INDEX=https://download.pytorch.org/whl/cu126")
    assert "--index-url https://download.pytorch.org/whl/cu126 torch==2.13.0 || {" in plan
    assert "pip's own index" not in plan and "exit 1" in plan.split("whl/cu126 torch==2.13.0 ||")[1].splitlines()[0]
    # another build of the same version is replaced (pip would keep it: 2.13.0 satisfies ==2.13.0)
    assert 'torch.__version__ != "2.13.0+cu126"' in plan and "pip uninstall -q -y torch" in plan


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
