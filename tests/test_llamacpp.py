"""The one door to llama.cpp: nothing else in mdlite, bench/ or the tests opens a model; what the door sets
(no extra buffer types, threads, GPU layers); the default-kernel probe that doctor runs, ok and crashing."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from mdlite import doctor, llamacpp
from mdlite.llamacpp import llama_cpp_module, log_to, open_llama, probe_default_kernels
from mdlite.models import model_path

ROOT = Path(__file__).resolve().parents[1]
DOOR = ROOT / "mdlite" / "llamacpp.py"
OPENERS = {"Llama", "llama_model_load_from_file", "llama_load_model_from_file"}


def doors_opened(source: str) -> list[str]:
    """What in `source` opens a llama.cpp model, or starts llama_cpp.server, other than through the door."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            if name in OPENERS:
                found.append(f"line {node.lineno}: {name}(...)")
        elif isinstance(node, ast.Constant) and node.value == "llama_cpp.server":
            found.append(f"line {node.lineno}: 'llama_cpp.server'")
    return found


def test_no_module_outside_the_door_opens_a_llama_cpp_model() -> None:
    files = [p for folder in ("mdlite", "bench", "tests") for p in sorted((ROOT / folder).rglob("*.py"))
             if p not in (DOOR, Path(__file__).resolve())]  # this file holds the ways around it as test data
    assert len(files) > 40
    offenders = {str(p.relative_to(ROOT)): hits for p in files if (hits := doors_opened(p.read_text("utf-8")))}
    assert not offenders, f"open llama.cpp models through mdlite.llamacpp (open_llama, load_model): {offenders}"


def test_the_door_check_catches_each_way_around_it() -> None:
    sneaky = ("from llama_cpp import Llama\nimport llama_cpp\nllm = Llama('m.gguf')\nllm = llama_cpp.Llama('m.gguf')\n"
              "m = llama_cpp.llama_model_load_from_file(b'm', p)\ncmd = ['-m', 'llama_cpp.server']\n")
    assert len(doors_opened(sneaky)) == 4
    assert doors_opened("from mdlite.llamacpp import open_llama\nllm = open_llama('m.gguf')\n") == []


def test_model_parameters_have_no_extra_buffer_types_for_any_opener() -> None:
    llama = llama_cpp_module()
    assert llama.llama_model_default_params().use_extra_bufts is False
    assert llama.llama_cpp.llama_model_default_params().use_extra_bufts is False  # what llama.py's Llama reads
    assert llama_cpp_module() is llama  # idempotent: the wrapper is not wrapped again
    assert llama.llama_model_default_params().use_extra_bufts is False


@pytest.mark.slow
def test_open_llama_uses_the_doors_parameters() -> None:
    log: list[str] = []
    with log_to(log.append):  # llama.cpp names each weight buffer it allocates
        llm = open_llama(model_path("gemma-3-270m"), n_ctx=64, n_threads=1, n_gpu_layers=0)
    buffers = [line for line in "".join(log).splitlines() if "model buffer size" in line]
    assert buffers and not [line for line in buffers if "REPACK" in line or "AMX" in line], buffers
    try:
        assert llm.model_params.use_extra_bufts is False
        assert llm.n_threads == 1 and llm.model_params.n_gpu_layers == 0
        assert llm.create_completion("1 2 3 4", max_tokens=2, temperature=0.0)["choices"][0]["text"]
    finally:
        llm.close()


def test_a_file_llama_cpp_cannot_open_is_a_one_line_error(tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(Exception, match="llama.cpp could not open it") as error:
        open_llama(bad, n_ctx=64)
    assert type(error.value).__name__ == "MdliteError" and "\n" not in str(error.value)


@pytest.mark.slow
def test_default_kernels_probe_on_this_cpu_matches_doctor() -> None:
    """The real probe on this machine's CPU. Where llama.cpp's default kernels run, doctor says ok; where they
    crash (an AMX Xeon: SIGSEGV, llama.cpp #20824), only that crash is accepted and doctor fails with the fix
    (the door's own run on the same file: test_open_llama_uses_the_doors_parameters, which passes there)."""
    path = model_path("gemma-3-270m")  # cached, so doctor has a model to probe
    ok, detail = probe_default_kernels(path)
    [line] = doctor.run_check("kernels")
    if ok:
        assert line.verdict == "ok" and "run on this CPU" in line.detail, line
    else:
        assert detail == "the child died with signal 11 (SIGSEGV)", detail
        assert line.verdict == "fail" and "--no-repack" in line.fix, line


def test_a_crashing_probe_is_a_fail_line_and_doctor_survives(monkeypatch: pytest.MonkeyPatch,
                                                             tmp_path: Path) -> None:
    """The failing branch, forced: the child dies with SIGSEGV the way llama.cpp #20824 does."""
    monkeypatch.setattr(llamacpp, "PROBE_CODE", "import ctypes; ctypes.string_at(0)")
    ok, detail = probe_default_kernels(tmp_path / "any.gguf")
    assert not ok and "signal 11 (SIGSEGV)" in detail
    fake = tmp_path / "cached.gguf"
    fake.write_bytes(b"GGUF")
    monkeypatch.setattr(doctor, "_cached_model", lambda: fake)
    [line] = doctor.run_check("kernels")
    assert line.verdict == "fail" and "crash on this CPU (llama.cpp #20824)" in line.detail, line
    assert "--no-repack" in line.fix and "LLAMA_ARG_REPACK=0" in line.fix
    assert doctor.failed([line])


def test_no_cached_model_is_a_warning_not_a_crash(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(doctor, "_cached_model", lambda: None)
    [line] = doctor.run_check("kernels")
    assert line.verdict == "warn" and "mdlite models fetch" in line.fix


def fake_machine(root: Path, cores: dict[int, tuple[int, int]], cgroup: str, files: dict[str, str]) -> Path:
    """A /sys and /proc tree: CPU -> (package, core) topology, /proc/self/cgroup, cgroup files."""
    for cpu, (package, core) in cores.items():
        topology = root / f"sys/devices/system/cpu/cpu{cpu}/topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text(f"{package}\n")
        (topology / "core_id").write_text(f"{core}\n")
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/cgroup").write_text(cgroup)
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize(("affinity", "cgroup", "files", "expected"), [
    ({0, 1, 2, 3}, "0::/\n", {}, 2),  # 2 cores x 2 hyper-threads, no quota
    ({0, 2}, "0::/\n", {}, 1),  # both siblings of core 0
    ({0, 1}, "0::/\n", {}, 2),
    (set(range(8)), "0::/job\n", {"sys/fs/cgroup/job/cpu.max": "150000 100000\n"}, 2),  # --cpus=1.5 -> 2
    (set(range(8)), "0::/job\n", {"sys/fs/cgroup/job/cpu.max": "max 100000\n"}, 4),  # no limit: 4 cores
    (set(range(8)), "4:cpu,cpuacct:/d\n0::/\n", {"sys/fs/cgroup/cpu,cpuacct/d/cpu.cfs_quota_us": "100000\n",
                                                   "sys/fs/cgroup/cpu,cpuacct/d/cpu.cfs_period_us": "100000\n"}, 1),
    (set(range(8)), "4:cpu,cpuacct:/d\n", {"sys/fs/cgroup/cpu,cpuacct/d/cpu.cfs_quota_us": "-1\n",
                                           "sys/fs/cgroup/cpu,cpuacct/d/cpu.cfs_period_us": "100000\n"}, 4),
    # no cgroup namespace of its own: the host's path is not under /sys/fs/cgroup, the container's cgroup is its root
    (set(range(8)), "0::/system.slice/docker-1f2e.scope\n", {"sys/fs/cgroup/cpu.max": "200000 100000\n"}, 2),
    (set(range(8)), "4:cpu,cpuacct:/docker/1f2e\n", {"sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "100000\n",
                                                     "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, 1),
])
def test_physical_cores_counts_cores_in_the_affinity_mask_capped_by_the_cgroup_quota(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, affinity: set[int], cgroup: str, files: dict[str, str],
        expected: int) -> None:
    topology = {cpu: (cpu // 4, cpu % 2) for cpu in range(8)}  # 2 packages x 2 cores x 2 threads
    root = fake_machine(tmp_path, topology, cgroup, files)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: affinity)
    assert llamacpp.physical_cores(root) == expected
