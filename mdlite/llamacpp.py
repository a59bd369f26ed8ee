"""The one door to llama.cpp: every model mdlite opens with llama.cpp is opened here.

    from mdlite.llamacpp import load_model, open_llama
    llm = open_llama("student-Q4_K_M.gguf", n_ctx=2048)       # llama-cpp-python's Llama (parity, baselines)
    model = load_model("student-Q4_K_M.gguf", n_gpu_layers=-1)  # a raw llama_model pointer (the engine)
    python -m mdlite.llamacpp --model student.gguf --port 8080  # llama_cpp.server, the same parameters

What the door sets, and why (tests/test_llamacpp.py fails when a module outside it opens a model):
- No extra buffer types (`use_extra_bufts = False`: no repacked or AMX weights). With llama.cpp's default
  kernels, Intel Xeons with AMX_INT8 die with a segmentation fault on any prompt longer than one token
  (llama.cpp #20824; Q4_K_M files), and repacked kernels change with a batch's row count, which would break
  the engine's batch invariance (engine.py). On a GPU build they only concern layers kept on the CPU.
  llama-cpp-python's `Llama` takes no argument for it; it reads `llama_model_default_params()`, so the door
  makes that function return mdlite's parameters for the whole process. Other llama.cpp programs on such a
  CPU need the same: llama-cli / llama-server `--no-repack` (or `LLAMA_ARG_REPACK=0`). `mdlite doctor` runs
  the default kernels in a child process (`probe_default_kernels`) to tell whether this CPU has the fault.
- Environment: OMP_WAIT_POLICY=PASSIVE (busy-waiting OpenMP threads made 2 threads on 2 cores erratic) and
  GGML_CPU_TILED_MM=0 (the tiled kernel switches with the row count), unless set already.
- Threads: the physical cores (`physical_cores()`); hyper-threads add little to matrix products.
- GPU layers: -1 means every layer when llama.cpp was built with GPU offload, else 0 (`gpu_layers()`).
- Log: llama.cpp's output goes to this module's logger at DEBUG level (`mdlite -v` shows it), and to a
  file while `log_to()` is active (the export's quantizer log); the last error line explains a failed load.
"""

from __future__ import annotations

import ctypes
import logging
import os
import runpy
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

from mdlite import MdliteError

log = logging.getLogger(__name__)

# llama.cpp file types (llama-quantize spellings) that need no importance matrix, and the binding's constant.
QUANT_TYPES = {
    "F32": "LLAMA_FTYPE_ALL_F32", "F16": "LLAMA_FTYPE_MOSTLY_F16", "BF16": "LLAMA_FTYPE_MOSTLY_BF16",
    **{name: f"LLAMA_FTYPE_MOSTLY_{name}" for name in (
        "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0", "Q3_K_L",
        "Q3_K_M", "Q3_K_S", "Q2_K", "IQ4_NL", "IQ4_XS", "IQ3_M", "IQ3_S", "IQ3_XS", "IQ3_XXS")},
}
NO_REPACK_HINT = "llama-cli / llama-server need --no-repack (or LLAMA_ARG_REPACK=0)"
_LOG: dict[str, Any] = {"callback": None, "error": "", "sinks": []}


def llama_cpp_module() -> ModuleType:
    """`llama_cpp`, with mdlite's environment, model parameters and log callback in place (idempotent).
    GGML_CPU_TILED_MM is read at the first matrix product, so it counts even after an earlier import of
    llama_cpp; OMP_WAIT_POLICY counts only before llama_cpp's libraries load."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("GGML_CPU_TILED_MM", "0")
    try:
        import llama_cpp
    except ImportError as error:
        raise MdliteError("llama-cpp-python is not installed; pip install 'mdlite[infer]'") from error
    if not getattr(llama_cpp, "_mdlite_door", False):
        defaults = llama_cpp.llama_cpp.llama_model_default_params

        def model_defaults() -> Any:
            params = defaults()
            params.use_extra_bufts = False  # see the module docstring
            return params

        llama_cpp.llama_cpp.llama_model_default_params = llama_cpp.llama_model_default_params = model_defaults
        llama_cpp._mdlite_door = True
    _set_log_callback(llama_cpp)
    return llama_cpp


def load_model(path: str | Path, *, n_gpu_layers: int = -1) -> Any:
    """A raw `llama_model` pointer for `path` with mdlite's parameters (free with `llama_model_free`)."""
    llama = llama_cpp_module()
    llama.llama_backend_init()
    params = llama.llama_model_default_params()
    params.n_gpu_layers = gpu_layers(n_gpu_layers)
    _LOG["error"] = ""
    model = llama.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        reason = _LOG["error"] or "no reason given"
        raise MdliteError(f"{path}: llama.cpp could not load this file ({reason}); give a GGUF model file")
    return model


def open_llama(path: str | Path, *, n_ctx: int = 512, n_threads: int = 0, n_gpu_layers: int = -1,
               **kwargs: Any) -> Any:
    """llama-cpp-python's `Llama` for `path` with mdlite's parameters; `kwargs` go to `Llama` as they are."""
    llama = llama_cpp_module()
    threads = n_threads or physical_cores()
    kwargs.setdefault("verbose", False)
    _LOG["error"] = ""
    try:
        return llama.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                           n_gpu_layers=gpu_layers(n_gpu_layers), **kwargs)
    except ValueError as error:  # llama-cpp-python's "Failed to load model from file" / "create llama_context"
        raise MdliteError(f"{path}: llama.cpp could not open it ({_LOG['error'] or error}); on a GPU, free memory "
                          "or pass --n-gpu-layers 0") from None


def server_command(*args: str) -> list[str]:
    """The command line of llama-cpp-python's OpenAI-compatible server with mdlite's parameters."""
    return [sys.executable, "-m", "mdlite.llamacpp", *args]


def gpu_layers(n_gpu_layers: int = -1) -> int:
    """The layer count to give llama.cpp: a negative `n_gpu_layers` (mdlite's default, -1) means every layer
    when llama.cpp was built with GPU offload, else 0 (llama.cpp reads a negative count as "all"); 0 and
    N >= 1 as given."""
    if n_gpu_layers >= 0:
        return n_gpu_layers
    return -1 if llama_cpp_module().llama_supports_gpu_offload() else 0


def physical_cores(root: Path = Path("/")) -> int:
    """Physical CPU cores this process may use: on Linux the distinct (package, core) ids of the CPUs in its
    affinity mask (two hyper-thread siblings are one core), capped by its cgroup's CPU quota (`docker --cpus=2`
    on a 32-core host: 2); elsewhere os.cpu_count(). `root`: where /sys and /proc are (tests)."""
    if not hasattr(os, "sched_getaffinity"):
        return os.cpu_count() or 1
    cores = set()
    for cpu in os.sched_getaffinity(0):
        topology = root / f"sys/devices/system/cpu/cpu{cpu}/topology"
        try:
            cores.add(tuple((topology / name).read_text().strip() for name in ("physical_package_id", "core_id")))
        except OSError:
            cores.add(("cpu", str(cpu)))  # no topology: count the CPU itself
    quota = _cgroup_cpus(root)
    return max(1, min(len(cores), quota) if quota else len(cores))


def _cgroup_cpus(root: Path) -> int:
    """The CPUs this process's cgroup may use, rounded up (cgroup v2 cpu.max, v1 cfs quota); 0: no limit.
    A container without its own cgroup namespace (cgroup v1 Docker, `--cgroupns=host`) sees the host's path in
    /proc/self/cgroup, while its own cgroup is mounted at the root: where that path is missing, the root's
    files are read."""
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: "0::/path"
            mount, names = root / "sys/fs/cgroup", ["cpu.max"]
        elif "cpu" in controllers.split(","):  # v1: "4:cpu,cpuacct:/path"
            mount, names = root / "sys/fs/cgroup" / controllers, ["cpu.cfs_quota_us", "cpu.cfs_period_us"]
        else:
            continue
        folder = mount / path.lstrip("/")
        folder = folder if folder.is_dir() else mount
        try:
            values = " ".join((folder / name).read_text().strip() for name in names).split()
        except OSError:
            continue
        if len(values) == 2 and values[0].isdigit() and int(values[0]) > 0 and int(values[1]) > 0:
            return -(-int(values[0]) // int(values[1]))
    return 0


def system_info() -> str:
    """llama.cpp's system info line (its CPU features and backends)."""
    return llama_cpp_module().llama_print_system_info().decode(errors="replace").strip()


# The probe: llama.cpp's own defaults (what llama-cli, llama-server and Ollama run), a few-token prompt.
PROBE_CODE = """
import sys, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, n_threads=int(sys.argv[2]), verbose=False)
llm.create_completion("1 2 3 4 5 6 7 8", max_tokens=2, temperature=0.0)
print("ok")
"""


def probe_default_kernels(path: str | Path, *, timeout_s: float = 120.0) -> tuple[bool, str]:
    """(ok, detail): whether llama.cpp's default kernels (repacked / AMX weights on) run a short prompt on
    `path`, tried in a child process so that a crash there (llama.cpp #20824) cannot take this one down."""
    env = {k: v for k, v in os.environ.items() if k != "GGML_CPU_TILED_MM"}  # llama.cpp's default kernels
    try:
        done = subprocess.run([sys.executable, "-c", PROBE_CODE, str(path), str(physical_cores())],
                              capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return False, f"no answer in {timeout_s:.0f} s"
    if done.returncode == 0 and done.stdout.strip().endswith("ok"):
        return True, "a 9-token prompt ran"
    if done.returncode < 0:
        return False, f"the child died with signal {-done.returncode} ({_signal_name(-done.returncode)})"
    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
    return False, f"the child exited with {done.returncode}: {tail[0][:120]}"


@contextmanager
def log_to(sink: Callable[[str], None]) -> Iterator[None]:
    """Also send llama.cpp's log text to `sink` (e.g. a file's write) while the block runs."""
    llama_cpp_module()
    _LOG["sinks"].append(sink)
    try:
        yield
    finally:
        _LOG["sinks"].remove(sink)


def _set_log_callback(llama: ModuleType) -> None:
    """llama.cpp's log to this module's logger (DEBUG) and the `log_to` sinks; remember the last error."""
    if _LOG["callback"] is None:
        @llama.llama_log_callback
        def forward(level: int, text: bytes, user_data: Any) -> None:
            message = text.decode("utf-8", "replace")
            if level == 3:  # GGML_LOG_LEVEL_ERROR
                _LOG["error"] = message.strip()
            for sink in _LOG["sinks"]:
                sink(message)
            if message.strip():
                log.debug("llama.cpp: %s", message.rstrip())

        _LOG["callback"] = forward  # keep a reference: llama.cpp holds the C pointer
    llama.llama_log_set(_LOG["callback"], ctypes.c_void_p(0))


def _signal_name(number: int) -> str:
    import signal

    try:
        return signal.Signals(number).name
    except ValueError:
        return "unknown signal"


if __name__ == "__main__":  # llama_cpp.server with mdlite's parameters: server_command()
    from llama_cpp import _logger

    llama_cpp_module().llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))  # the server's --verbose
    sys.argv[0] = "llama_cpp.server"
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
