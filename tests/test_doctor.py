"""`mdlite doctor`: the real checks on this CPU machine, Ollama against tests/fake_ollama.py and against a
closed port, the GPU user's failure lines, --strict."""

from __future__ import annotations

import socket
from importlib.metadata import PackageNotFoundError

import pytest
from click.testing import CliRunner
from fake_ollama import FakeOllama

from mdlite import doctor
from mdlite.cli import cli
from mdlite.llamacpp import llama_cpp_module, physical_cores


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _doctor(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["doctor", *args], env=env, prog_name="mdlite")
    return result.exit_code, result.output


def _line(output: str, name: str) -> str:
    found = [line for line in output.splitlines() if line[6:].startswith(name + " ")]
    assert found, f"no {name} line in:\n{output}"
    return found[0]


def test_cpu_machine_report_has_a_verdict_per_line() -> None:
    code, output = _doctor(env={"OLLAMA_HOST": f"127.0.0.1:{_closed_port()}"})
    assert code == 0, output
    lines = output.splitlines()
    assert lines[0].startswith("mdlite doctor (") and lines[-1].endswith("fail")
    for line in lines[1:-1]:
        assert line.split()[0] in ("ok", "warn", "fail", "fix:"), line
    for name in ("python", "mdlite", "torch", "gpu", "bf16", "bitsandbytes", "llama.cpp", "system info", "kernels",
                 "cpu", "ollama", "model", "disk"):
        _line(output, name)
    assert _line(output, "bitsandbytes").startswith("ok ") and "NF4 matmul on cpu works" in output
    offload = llama_cpp_module().llama_supports_gpu_offload()
    assert f"GPU offload {'yes' if offload else 'no'}" in _line(output, "llama.cpp")
    assert "CPU:" in _line(output, "system info")
    assert f"uses {physical_cores()} thread" in _line(output, "cpu")
    assert "a 7B export needs ~" in _line(output, "disk")
    assert "qwen2.5-coder-0.5b-instruct" in output and "llama-2-7b" in output


def test_ollama_line_lists_the_models_of_a_running_server() -> None:
    with FakeOllama(model="qwen2.5:32b") as server:
        host = server.url.removeprefix("http://")  # as users write OLLAMA_HOST: HOST:PORT
        [line] = doctor.run_check("ollama", ollama_host=host)
    assert line.verdict == "ok", line
    assert line.detail.startswith(f"0.6.3-fake at {server.url}: 1 model: qwen2.5:32b")


def test_ollama_line_says_not_running_when_nothing_listens() -> None:
    port = _closed_port()
    code, output = _doctor(env={"OLLAMA_HOST": f"127.0.0.1:{port}"})
    assert code == 0
    line = _line(output, "ollama")
    assert line.startswith("warn ")
    assert f"not running at http://127.0.0.1:{port} ($OLLAMA_HOST; nothing listening)" in line
    assert "fix: start it with `ollama serve`" in output


def test_ollama_url_reads_hosts_as_the_ollama_client_does() -> None:
    assert doctor.ollama_url("127.0.0.1") == "http://127.0.0.1:11434"
    assert doctor.ollama_url(":56789") == "http://127.0.0.1:56789"
    assert doctor.ollama_url("gpu1:8080/") == "http://gpu1:8080"
    assert doctor.ollama_url("http://gpu1") == "http://gpu1:80"
    assert doctor.ollama_url("https://example.com:56789/path/") == "https://example.com:56789/path"
    assert doctor.ollama_url("[::1]:5") == "http://[::1]:5"
    [line] = doctor.run_check("ollama", ollama_host="gpu1:port")
    assert line.verdict == "fail" and "not HOST[:PORT]" in line.detail


def test_strict_exits_1_on_a_failed_check_and_0_on_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    lines = [doctor.Check("torch", "ok", "2.13.0"), doctor.Check("ollama", "warn", "not running", "ollama serve")]
    monkeypatch.setattr(doctor, "run", lambda **_: lines)
    assert _doctor("--strict")[0] == 0
    lines.append(doctor.Check("llama.cpp", "fail", "does not load", "reinstall it"))
    code, output = _doctor()
    assert code == 0 and "fail  llama.cpp    does not load" in output and "fix: reinstall it" in output
    code, output = _doctor("--strict")
    assert code == 1 and output.splitlines()[-1] == "1 ok, 1 warn, 1 fail"


def test_a_crashing_check_becomes_a_fail_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def crash() -> list[doctor.Check]:
        raise RuntimeError("boom")

    monkeypatch.setattr(doctor, "_cpu", crash)
    [line] = doctor.run_check("cpu")
    assert line == doctor.Check("cpu", "fail", "the check crashed: RuntimeError: boom", "report it with this screen")


def test_gpu_user_with_a_cpu_llama_cpp_build_is_told_to_rebuild(monkeypatch: pytest.MonkeyPatch) -> None:
    if llama_cpp_module().llama_supports_gpu_offload():
        pytest.skip("this llama.cpp has GPU offload")
    [line, info] = doctor._llama_cpp(doctor._Found(nvidia=True))
    assert line.verdict == "fail" and "GPU offload no" in line.detail
    assert 'CMAKE_ARGS="-DGGML_CUDA=on"' in line.fix and "--no-cache-dir" in line.fix and "==0.3.36" in line.fix
    assert info.name == "system info"


def test_missing_packages_fail_with_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> str:
        raise PackageNotFoundError(name)

    monkeypatch.setattr(doctor, "version", missing)
    [llama] = doctor._llama_cpp(doctor._Found())
    [bnb] = doctor._bitsandbytes(doctor._Found())
    assert llama.verdict == bnb.verdict == "fail"
    assert "pip install 'mdlite[infer]'" in llama.fix and "--quantization none" in bnb.fix


def test_7b_export_disk_estimate() -> None:
    # merged bf16 13.5 GB (fp32 27.0 on CPU) + F16 13.5 + Q4_K_M 4.2 + Q8_0 7.6 GB
    assert doctor.export_bytes_7b(cuda=True) == pytest.approx(38.7e9, rel=0.01)
    assert doctor.export_bytes_7b(cuda=False) == pytest.approx(52.2e9, rel=0.01)


def test_system_info_is_condensed() -> None:
    text = "CUDA : ARCHS = 890 | USE_GRAPHS = 1 | PEER_MAX_BATCH_SIZE = 128 | CPU : SSE3 = 1 | AVX = 1 | AMX = 0 | "
    assert doctor._system_info(text) == "CUDA: ARCHS=890 USE_GRAPHS PEER_MAX_BATCH_SIZE=128 CPU: SSE3 AVX"


# ---- GPU lines that must be able to fail (forced here; a GPU machine runs them for real) ------------------


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> dict:
    """torch on this CPU machine, told that an sm_86 card with emulated-only bf16 is there; `card` changes it."""
    import torch

    card = {"capability": (8, 6), "archs": ["sm_80", "sm_86", "sm_90"]}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i=0: type("P", (), {"total_memory": 16 * 2**30}))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: card["capability"])
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: card["archs"])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(doctor, "_driver_cuda", lambda: "12.4")
    return card


def test_gpu_line_fails_when_a_kernel_launch_fails(fake_gpu: dict) -> None:
    lines = {line.name: line for line in doctor._torch(doctor._Found())}
    gpu = lines["gpu"]  # the launch really runs: this CPU build of torch cannot
    assert gpu.verdict == "fail" and "Fake GPU (16.0 GiB); but a kernel launch failed" in gpu.detail
    assert "TORCH_INDEX=https://download.pytorch.org/whl/cu124" in gpu.fix
    bf16 = lines["bf16"]  # emulated bf16 does not count
    assert bf16.verdict == "warn" and "training uses fp16" in bf16.detail


def test_gpu_line_fails_when_torch_has_no_kernels_for_the_card(fake_gpu: dict) -> None:
    fake_gpu["capability"] = (6, 1)  # a Pascal card; CUDA 13 wheels start at sm_75
    gpu = next(line for line in doctor._torch(doctor._Found()) if line.name == "gpu")
    assert gpu.verdict == "fail" and "has kernels for sm_80 sm_86 sm_90, not this card's sm_61" in gpu.detail
    assert "an older CUDA's torch wheels" in gpu.fix and "whl/cu126" in gpu.fix


def test_arch_list_against_capability() -> None:
    assert doctor.arch_runs((8, 9), ["sm_80", "sm_86"])  # same major, older minor: the binary runs
    assert not doctor.arch_runs((8, 6), ["sm_89", "sm_90"])
    assert doctor.arch_runs((9, 0), ["sm_90a"]) and not doctor.arch_runs((10, 0), ["sm_90a", "sm_90"])
    assert doctor.arch_runs((12, 0), ["sm_90", "compute_90"])  # PTX: the driver compiles it
    assert not doctor.arch_runs((7, 0), ["sm_75", "sm_80", "compute_80"])


def test_make_installs_torch_check_names_driver_torch_and_index(fake_gpu: dict,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    ok, text = doctor.torch_cuda_report()
    assert not ok
    assert "(CUDA 13.0), driver for CUDA 12.4: torch cannot use the GPU" in text
    assert "make install TORCH_INDEX=https://download.pytorch.org/whl/cu124" in text and "BACKEND=cpu" in text


def test_llama_cpp_line_fails_when_one_offloaded_layer_fails(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    monkeypatch.setattr(llama_cpp_module(), "llama_supports_gpu_offload", lambda: True)
    monkeypatch.setattr(doctor, "_cached_model", lambda: broken)
    line, _ = doctor._llama_cpp(doctor._Found(nvidia=True))  # the child process really tries, and fails
    assert line.verdict == "fail"
    assert "GPU offload yes; one layer of broken.gguf on the GPU failed (exit 1" in line.detail
    assert "-DCMAKE_CUDA_ARCHITECTURES=native" in line.fix
    monkeypatch.setattr(doctor, "_cached_model", lambda: None)
    line, _ = doctor._llama_cpp(doctor._Found(nvidia=True))
    assert line.verdict == "warn" and "not tried on this card" in line.detail and "models fetch" in line.fix
