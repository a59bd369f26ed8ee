#!/usr/bin/env bash
# mdlite's GPU-path device check: one CUDA GPU, 16 cores, no network; one command of at most 10 minutes, results
# as files in $OUT plus one summary.
#
# Here (with network), once, in the checkout, just before the device run:
#     bash bench/device_check.sh prepare
#   fills .devcheck/ (git-excluded; carried to the device): the wheels the device image lacks or has in other
#   versions (bitsandbytes 0.50.2 trimmed to its CUDA 13 and CPU libraries: 43 -> 7 MB; transformers 5.23.0,
#   peft 0.21.2, huggingface_hub 1.33.0, click, sentencepiece, protobuf; diskcache for llama-cpp-python; ollama and
#   pydantic for the fake teacher's client), and the llama-cpp-python sdist of pyproject's pin trimmed to what a
#   CUDA build of the library and mdlite's converter need (77 MB -> ~2.5 MB .tar.xz; bench/devcheck_pack.py).
#   What travels (tracked files + .devcheck) must stay under 60 MiB (one call carries at most 64); prepare says.
# On the GPU machine (the `run` tool: carry [".devcheck"], timeout_s 600):
#     bash bench/device_check.sh device                 # results in $OUT
# A subset, e.g. a rerun on the still-warm machine (the llama build in .devcheck-build/ is reused):
#     STAGES='env build tiny export llama distill' bash bench/device_check.sh device
# Here, a rehearsal of every stage on the CPU with tiny shapes (the venv's own packages and CPU llama-cpp-python;
# the CUDA compile is replaced by a cmake configure of the trimmed source and the printed command):
#     DEVCHECK_CPU=1 PYTHON=.venv/bin/python OUT=/tmp/devcheck bash bench/device_check.sh device
#
# Stages (issue 35 first; each time-boxed, all done by DEADLINE seconds, default 540; expected seconds on an H100):
#   env     nvidia-smi; the wheels into /tmp/devcheck-site; versions; bf16; doctor's torch / gpu / bitsandbytes lines;
#           llama.cpp's converter from the trimmed sdist into $MDLITE_HOME (what export fetches with network)   ~25
#   build   in the background from here on (nice 10, all cores, while the GPU trains): llama-cpp-python from the
#           trimmed sdist with CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=<card>-real -DLLAVA_BUILD=OFF
#           ..." into .devcheck-build/site (a separate target: no other llama_cpp is touched); compile time, the
#           slowest translation units (ninja's log), offload yes/no. Reused when already built there  ~300 (bg)
#   cap24   bench/gpu_check.py --memory-cap-gib 24: LLaMA-2-7B shapes (random weights, built once), the 7B config's
#           train settings, 20 optimizer steps: fits or OOM, peak allocated / reserved / NVML, tokens/s, the
#           --dry-run estimate beside the measured peak                                                     ~150
#   cap16   the same at 16 GiB                                                                               ~110
#   search  the largest micro-batch at 16 GiB (8, 10, 12, 14, 16, 20, 24; 2 steps each, accumulation 1, up to
#           the first OOM; the model loaded once)                                                            ~75
#   tiny    bench/gpu_check.py --shape tiny: train.run's CUDA path and the GPU merge (its adapter feeds export) ~30
#   export  (after the build) mdlite export-gguf of the tiny adapter: F16, Q8_0, Q4_K_M, parity check with every
#           layer offloaded                                                                                  ~30
#   llama   bench/llama_gpu_check.py: the engine on the GPU (-1 layers), several paths, batch invariance (alone vs
#           in a request of 8 vs a mixed batch; GPU vs CPU), doctor's llama.cpp line, the parity report    ~45
#   distill bench/device_distill.py: mdlite distill of a tiny config (fake Ollama teacher, QLoRA on CUDA, GPU merge,
#           export with parity, eval offloaded); runs beside export and llama, started when the build ends  ~80
#   Earlier checks, not in the default list: probe (saved activations), 7b (4 steps + merge), ddp1 (torchrun).
# Results in $OUT (5 files; at most 8 come back): summary.txt, stages.log (every stage's log), build.log,
# results.json (every stage's figures), distill_summary.md.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
WHEELS=("bitsandbytes==0.50.2" "transformers==5.23.0" "peft==0.21.2" "huggingface_hub==1.33.0" "click==8.5.1"
        "sentencepiece==0.2.3" "protobuf==7.36.2")
# llama-cpp-python's diskcache; the ollama client (fake teacher of the distill stage) and its pydantic
EXTRA_WHEELS=("diskcache==5.6.3" "ollama==0.6.3" "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types==0.8.0"
              "typing-inspection==0.4.5" "typing-extensions==4.16.0")
LLAMA_VERSION=$(sed -n 's/.*"llama-cpp-python\[server\]==\([0-9.]*\)".*/\1/p' "$ROOT/pyproject.toml")
LLAMA_SRC=.devcheck/llama-cpp-python-$LLAMA_VERSION-cuda-src.tar.xz
LIMIT_MIB=60

prepare() {
  cd "$ROOT" || exit 1
  local exclude total tmp
  exclude=$(git rev-parse --git-path info/exclude) || exit 1
  mkdir -p "$(dirname "$exclude")"
  for path in /.devcheck/ /.devcheck-build/; do grep -qx "$path" "$exclude" 2>/dev/null || echo "$path" >> "$exclude"; done
  rm -rf .devcheck/whl && mkdir -p .devcheck/whl
  "$PYTHON" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .devcheck/whl "${WHEELS[@]}" "${EXTRA_WHEELS[@]}" || exit 1
  local want=$(( ${#WHEELS[@]} + ${#EXTRA_WHEELS[@]} ))
  [ "$(ls .devcheck/whl/*.whl | wc -l)" -eq "$want" ] || { echo "expected $want wheels"; exit 1; }
  "$PYTHON" bench/devcheck_pack.py bnb .devcheck/whl/bitsandbytes-*.whl || exit 1
  ls -l .devcheck/whl
  # llama-cpp-python's sdist (pyproject's pin), trimmed: its CUDA build happens on the device
  tmp=$(mktemp -d) || exit 1
  "$PYTHON" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: -d "$tmp" \
    "llama-cpp-python==$LLAMA_VERSION" || { rm -rf "$tmp"; exit 1; }
  rm -f .devcheck/llama-cpp-python-*-cuda-src.tar.xz
  "$PYTHON" bench/devcheck_pack.py llama "$tmp"/llama_cpp_python-"$LLAMA_VERSION".tar.gz "$LLAMA_SRC" \
    || { rm -rf "$tmp"; exit 1; }
  rm -rf "$tmp"
  # what travels: tracked files, untracked files git does not ignore, and the carried .devcheck
  rm -rf .devcheck/work  # an old run's work folder never travels
  total=$(( $(du -sb .devcheck | cut -f1) + $(git ls-files -z --cached --others --exclude-standard \
            | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1) ))
  echo ".devcheck: $(du -sb .devcheck | cut -f1) bytes; travels: $((total / 1048576)) MiB of the ${LIMIT_MIB} MiB allowed"
  [ "$total" -lt $((LIMIT_MIB * 1048576)) ] || { echo "too large"; exit 1; }
  git status --short --ignored .devcheck | head -3
}

build_llama() {  # the build stage's body (runs in the background of `device`)
  cd "$ROOT" || exit 1
  local src=$BUILD_DIR/src build=$BUILD_DIR/build log=$BUILD_DIR/pip.log nvcc="" cc cuda_root args stamp start rc
  local jobs
  jobs=$(( $(nproc) > 2 ? $(nproc) - 1 : 1 ))  # one core stays with the training stages beside it
  [ -f "$LLAMA_SRC" ] || { echo "FAIL build: no $LLAMA_SRC; run 'bash bench/device_check.sh prepare' first"; exit 1; }
  if [ ! -f "$src/.unpacked" ] || [ "$LLAMA_SRC" -nt "$src/.unpacked" ]; then
    rm -rf "$src" && mkdir -p "$src" && tar xJf "$LLAMA_SRC" -C "$src" --strip-components=1 && touch "$src/.unpacked" \
      || { echo "FAIL build: cannot unpack $LLAMA_SRC"; exit 1; }
  fi
  for candidate in "$(command -v nvcc)" /usr/local/cuda/bin/nvcc /usr/local/cuda-*/bin/nvcc /opt/cuda*/bin/nvcc; do
    [ -n "$candidate" ] && [ -x "$candidate" ] && { nvcc=$candidate; break; }
  done
  if [ -n "${DEVCHECK_CPU:-}" ]; then
    cc=90; cuda_root=/usr/local/cuda  # for the printed command only
  else
    [ -n "$nvcc" ] || nvcc=$(find /usr /opt -maxdepth 6 -name nvcc -type f -perm -u+x 2>/dev/null | head -1)
    [ -n "$nvcc" ] || { echo "FAIL build: no nvcc found (PATH, /usr/local/cuda*, /opt)"; exit 1; }
    cuda_root=$(dirname "$(dirname "$(readlink -f "$nvcc")")")
    cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
    [ -n "$cc" ] || cc=$("$PYTHON" -c "import torch; print('%d%d' % torch.cuda.get_device_capability())")
    set -x; "$nvcc" --version | tail -2; "$nvcc" --list-gpu-arch | tr '\n' ' '; echo; cmake --version | head -1
    ninja --version; "$PYTHON" -c "import scikit_build_core; print('scikit-build-core', scikit_build_core.__version__)"
    ls "$cuda_root"/lib64 2>/dev/null | grep -E 'libcu(blas|dart)\.so' | tr '\n' ' '; echo; set +x
  fi
  # Only the library: no mtmd (LLAVA_BUILD), no NCCL (one GPU), flash-attention vector kernels for the KV types
  # mdlite uses (Q8_0: the engine; F16: always built), no fatbin compression, one real architecture: this card's.
  args="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=${cc}-real -DCUDAToolkit_ROOT=$cuda_root -DLLAVA_BUILD=OFF"
  args+=" -DGGML_CUDA_NCCL=OFF -DGGML_CUDA_FA_QUANTS=q8_0-q8_0 -DGGML_CUDA_COMPRESSION_MODE=none -DLLAMA_OPENSSL=OFF"
  args+=" -DGGML_CCACHE=OFF"
  local cmd=(nice -n 10 "$PYTHON" -m pip install -v --no-build-isolation --no-deps --no-index --no-cache-dir
             --disable-pip-version-check --target "$LLAMA_SITE.new" --config-settings=build-dir="$build"
             --config-settings=cmake.build-type=Release "$src")
  echo "+ CMAKE_ARGS=\"$args\" CMAKE_BUILD_PARALLEL_LEVEL=$jobs CUDACXX=${nvcc:-nvcc} ${cmd[*]}"
  if [ -n "${DEVCHECK_CPU:-}" ]; then
    echo "RESULT build: skipped: no nvcc/GPU (CPU rehearsal; the command above is the device's)"
    rm -rf "$BUILD_DIR/cpu-configure"
    if cmake -S "$src" -B "$BUILD_DIR/cpu-configure" -G Ninja -Wno-dev -DLLAVA_BUILD=OFF -DLLAMA_OPENSSL=OFF \
         -DGGML_CUDA_NCCL=OFF -DGGML_CCACHE=OFF > "$BUILD_DIR/cpu-configure.log" 2>&1; then
      echo "RESULT build: the trimmed source configures (cmake, CPU backend): $(grep -c . "$BUILD_DIR/cpu-configure/build.ninja") lines of build.ninja"
    else
      tail -n 20 "$BUILD_DIR/cpu-configure.log"; echo "FAIL build: cmake cannot configure the trimmed source"; exit 1
    fi
    if "$PYTHON" -c "import scikit_build_core" 2>/dev/null; then  # pip + scikit-build-core mechanics, no compile
      rm -rf "$BUILD_DIR/site-rehearsal"
      CMAKE_ARGS="-DLLAMA_BUILD=OFF" "$PYTHON" -m pip install -q --no-build-isolation --no-deps --no-index \
        --no-cache-dir --disable-pip-version-check --target "$BUILD_DIR/site-rehearsal" \
        --config-settings=build-dir="$BUILD_DIR/build-rehearsal" "$src" \
        && echo "RESULT build: pip + scikit-build-core install the package (no library: LLAMA_BUILD=OFF)"
    else
      echo "RESULT build: no scikit-build-core here: pip's part not rehearsed"
    fi
    exit 0
  fi
  stamp="$args $(sha256sum "$LLAMA_SRC" | cut -c1-16)"
  if [ -f "$LLAMA_SITE/.devcheck-built" ] && [ "$(cat "$LLAMA_SITE/.devcheck-built")" = "$stamp" ]; then
    echo "RESULT build: reusing $LLAMA_SITE (built earlier on this machine with the same arguments)"
  else
    rm -rf "$LLAMA_SITE.new"
    start=$SECONDS
    CMAKE_ARGS="$args" CMAKE_BUILD_PARALLEL_LEVEL=$jobs CUDACXX=$nvcc PATH="$(dirname "$nvcc"):$PATH" \
      "${cmd[@]}" > "$log" 2>&1; rc=$?
    grep -aE '^-- (Using CMAKE_CUDA|CUDA Toolkit|CUDA host|Including|The CUDA)' "$log" | head -8
    if [ $rc -ne 0 ]; then
      grep -aE 'error|Error|FAILED' "$log" | head -20; tail -n 15 "$log"
      echo "FAIL build: pip exited $rc after $(( SECONDS - start ))s (build.log)"; exit 1
    fi
    rm -rf "$LLAMA_SITE" && mv "$LLAMA_SITE.new" "$LLAMA_SITE" && echo "$stamp" > "$LLAMA_SITE/.devcheck-built"
    echo "RESULT build: llama-cpp-python $LLAMA_VERSION with CUDA for sm_$cc in $(( SECONDS - start ))s, $jobs jobs" \
         "(nice 10, beside the training stages)"
  fi
  "$PYTHON" - "$build/.ninja_log" <<'PY'
import sys
from pathlib import Path

path = Path(sys.argv[1])
if path.exists():
    spans = {}
    for line in path.read_text().splitlines():
        if line.startswith("#") or line.count("\t") < 4:
            continue
        start, end, _, output, _ = line.split("\t")[:5]
        spans[output] = (int(start), int(end))  # the last build of each output
    steps = sorted(((end - start) / 1000, out) for out, (start, end) in spans.items())
    cuda = [s for s, out in steps if out.endswith(".cu.o")]
    wall = (max(e for _, e in spans.values()) - min(s for s, _ in spans.values())) / 1000
    print(f"RESULT compile (ninja log): {len(steps)} steps ({len(cuda)} CUDA), {wall:.0f} s wall, {sum(s for s, _ in steps):.0f} s "
          f"summed ({sum(cuda):.0f} s CUDA); slowest: " + ", ".join(f"{Path(o).name.removesuffix('.o')} {s:.0f}s"
                                                                   for s, o in steps[-6:][::-1]))
PY
  local waited=0  # the env stage installs diskcache (llama_cpp imports it) into $DEVCHECK_SITE
  while [ ! -f "$DEVCHECK_SITE/.installed" ] && [ $waited -lt 150 ]; do sleep 2; waited=$(( waited + 2 )); done
  # libcudart / libcublas: found by the libraries' RPATH; else from the toolkit's folders (recorded for later stages)
  if ! PYTHONPATH=$LLAMA_SITE:$DEVCHECK_SITE "$PYTHON" -c "import llama_cpp" 2> "$BUILD_DIR/import.err"; then
    tail -n 3 "$BUILD_DIR/import.err"
    echo "$cuda_root/lib64:$cuda_root/targets/x86_64-linux/lib" > "$BUILD_DIR/ld_library_path"
    export LD_LIBRARY_PATH=$(cat "$BUILD_DIR/ld_library_path")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    echo "llama_cpp does not import as built; with LD_LIBRARY_PATH=$LD_LIBRARY_PATH:"
  else
    rm -f "$BUILD_DIR/ld_library_path"
  fi
  PYTHONPATH=$LLAMA_SITE:$DEVCHECK_SITE "$PYTHON" - <<'PY'
import llama_cpp

offload = bool(llama_cpp.llama_supports_gpu_offload())
info = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
print(f"{'RESULT' if offload else 'FAIL'} build: import llama_cpp from {llama_cpp.__file__}: GPU offload "
      f"{'yes' if offload else 'no'}; {info[:300]}")
raise SystemExit(0 if offload else 1)
PY
}

device() {
  OUT=${OUT:-/tmp/devcheck-out}; mkdir -p "$OUT"; export OUT
  DEADLINE=${DEADLINE:-540}
  STAGES=${STAGES:-env build cap24 cap16 search tiny export llama distill}
  SUMMARY=$OUT/summary.txt
  want() { [[ " $STAGES " == *" $1 "* ]]; }
  RESERVE_S=0; want tiny && RESERVE_S=$(( RESERVE_S + 45 )); want ddp1 && RESERVE_S=$(( RESERVE_S + 50 ))
  local site=/tmp/devcheck-site shape=llama-2-7b probe_tokens=2048 tmp_free root_free
  # issue 35's runs: 20 steps at each cap; the micro-batch search; the llama check's size
  local cap_args=(--steps 20) search_args=(--batch-search 8,10,12,14,16,20,24 --steps 2)
  local llama_args=(--prompts 8 --paths 8 --max-tokens 48)
  if [ -n "${DEVCHECK_CPU:-}" ]; then
    shape=tiny; probe_tokens=128
    cap_args=(--steps 2 --max-length 128 --batch-size 2)
    search_args=(--batch-search 2,3,4 --steps 2 --max-length 128 --fake-oom-above 3)
    llama_args=(--prompts 4 --paths 4 --max-tokens 16 --ngl0)
  fi
  BUILD_DIR=$ROOT/.devcheck-build  # git-excluded, not carried: kept on a warm machine between calls
  LLAMA_SITE=$BUILD_DIR/site
  export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHON
  export MDLITE_HOME=/tmp/devcheck-home PYTHONPATH=$site:$LLAMA_SITE:$ROOT DEVCHECK_SITE=$site BUILD_DIR LLAMA_SITE
  export LLAMA_VERSION LLAMA_SRC
  cd "$ROOT" || exit 1
  # the work folder: the file system with more room (the 7B model is 13.5 GB in bf16; the 7b stage's merge as much)
  WORK=/tmp/devcheck-work
  tmp_free=$(df -B1G --output=avail /tmp | tail -1 | tr -d ' ')
  mkdir -p "$BUILD_DIR"
  root_free=$(df -B1G --output=avail "$BUILD_DIR" | tail -1 | tr -d ' ')
  [ "$root_free" -gt "$tmp_free" ] && WORK=$BUILD_DIR/work
  mkdir -p "$WORK"
  find "$WORK" -mindepth 1 -maxdepth 1 ! -name model7b -exec rm -rf {} +  # the 7B build is reused on a warm machine
  LOGS=$WORK/logs RESULTS=$WORK/results
  mkdir -p "$LOGS" "$RESULTS"
  : > "$OUT/stages.log"
  export WORK LOGS RESULTS
  echo "mdlite device check: stages '$STAGES', deadline ${DEADLINE}s, work $WORK (free GB: /tmp $tmp_free," \
       "checkout $root_free)${DEVCHECK_CPU:+, CPU rehearsal}" | tee "$SUMMARY"

  stage() {  # stage NAME LIMIT_S COMMAND...: time-boxed, log in $LOGS/NAME.log (then stages.log), a summary line
    local name=$1 limit=$2 left start rc; shift 2
    left=$(( DEADLINE - SECONDS ))
    if [ "$left" -lt 20 ]; then echo "$name: SKIPPED (deadline)" | tee -a "$SUMMARY"; return 1; fi
    [ "$limit" -gt "$left" ] && limit=$left
    start=$SECONDS
    echo "$name: started at ${start}s (limit ${limit}s)" >> "$OUT/stages.log"
    timeout -k 10 "$limit" "$@" > "$LOGS/$name.log" 2>&1; rc=$?
    { echo "$name: rc $rc in $(( SECONDS - start ))s (limit ${limit}s)$([ $rc -eq 124 ] && echo ' TIMED OUT')"
      grep -aoE '(RESULT|FAIL) .*' "$LOGS/$name.log" | sed 's/^/    /'  # also after a progress bar's \r
      [ $rc -eq 0 ] || tail -n 4 "$LOGS/$name.log" | sed 's/^/    | /'
    } > "$LOGS/$name.summary"
    cat "$LOGS/$name.summary" >> "$SUMMARY"; head -1 "$LOGS/$name.summary"
    { echo "======== $name (rc $rc, $(( SECONDS - start ))s)"; tr '\r' '\n' < "$LOGS/$name.log" \
        | grep -av '^\s*$' | tail -c 1000000; } >> "$OUT/stages.log"
    collect
    return $rc
  }
  collect() {  # every stage's figures ($RESULTS/*.json) into $OUT/results.json
    "$PYTHON" - "$RESULTS" "$OUT/results.json" <<'PY' 2>/dev/null
import json
import pathlib
import sys

found = {}
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    try:
        found[path.stem] = json.loads(path.read_text())
    except ValueError:
        found[path.stem] = {"unreadable": path.name}
pathlib.Path(sys.argv[2]).write_text(json.dumps(found, indent=1) + "\n")
PY
  }
  BG_PIDS=()
  bg_stage() {  # bg_stage NAME LIMIT_S COMMAND...: `stage` in the background; wait_stage NAME collects it
    local name=$1
    stage "$@" & BG_PIDS+=("$name:$!")
  }
  wait_stage() {  # wait_stage NAME: its rc (1 when it never started)
    local entry rc
    for entry in "${BG_PIDS[@]}"; do
      if [ "${entry%%:*}" = "$1" ]; then wait "${entry#*:}"; rc=$?; return $rc; fi
    done
    return 1
  }

  # ---- build: llama-cpp-python with CUDA, in the background from the start (the compiler uses the CPUs while
  # env and the training stages use the GPU; its final import check runs after env installed diskcache) ---------
  if want build; then
    local build_limit=$(( DEADLINE - SECONDS - 90 ))  # export and llama need ~90 s after it
    [ "$build_limit" -gt "${BUILD_LIMIT_S:-480}" ] && build_limit=${BUILD_LIMIT_S:-480}
    bg_stage 02_build "$build_limit" bash bench/device_check.sh build-llama
  fi

  # ---- env (always: the others need the wheels) -----------------------------------------------------------
  stage 01_env 120 bash -s <<'SH' || { echo "env failed: nothing else can run" | tee -a "$SUMMARY"; return 1; }
set -x
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv || [ -n "${DEVCHECK_CPU:-}" ]
df -h /tmp "$WORK"; free -g; nproc
if [ -z "${DEVCHECK_CPU:-}" ]; then
  rm -rf "$DEVCHECK_SITE"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --target "$DEVCHECK_SITE" \
    .devcheck/whl/*.whl || for wheel in .devcheck/whl/*.whl; do "$PYTHON" -m zipfile -e "$wheel" "$DEVCHECK_SITE" \
    || exit 1; done  # no pip: a wheel is a zip file of what goes into site-packages
  touch "$DEVCHECK_SITE/.installed"  # the build stage's import check waits for it (diskcache)
fi
set +x
"$PYTHON" - <<'PY'
import importlib.metadata as md
import json
import os
from pathlib import Path

import torch

for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "huggingface_hub", "tokenizers",
             "safetensors", "sentencepiece", "protobuf", "click", "httpx", "hf-xet", "nvidia-ml-py", "matplotlib",
             "ollama", "pydantic", "diskcache", "jinja2", "numpy", "scikit-build-core", "cmake", "ninja"):
    try:
        print(f"{name:18} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name:18} MISSING")
import bitsandbytes, peft, transformers  # noqa: E401,F401 - import errors show here
import mdlite.cli, mdlite.export, mdlite.train  # noqa: E401,F401
from mdlite import doctor, export

for module in (transformers, peft, bitsandbytes):
    assert module.__file__.startswith(os.environ["DEVCHECK_SITE"]) or os.environ.get("DEVCHECK_CPU"), module.__file__
if torch.cuda.is_available():
    print("torch.version.cuda", torch.version.cuda, "| device", torch.cuda.get_device_name(), "| capability",
          torch.cuda.get_device_capability(), "| arch list", torch.cuda.get_arch_list())
    print("is_bf16_supported():", torch.cuda.is_bf16_supported(), "| including_emulation=False:",
          torch.cuda.is_bf16_supported(including_emulation=False))
    ok, text = doctor.torch_cuda_report()
    print(("RESULT " if ok else "FAIL ") + "make install's torch check: " + text)
report = doctor.run(only=("python", "torch", "bitsandbytes", "disk"))
print(doctor.format_report(report))
print("RESULT doctor:", ", ".join(f"{c.name} {c.verdict}" for c in report if c.name in ("gpu", "bf16", "bitsandbytes")))
# llama.cpp's converter, as export.converter_dir() would fetch it with network: from the trimmed sdist
archive = Path(os.environ["LLAMA_SRC"])
folder = Path(os.environ["MDLITE_HOME"]) / f"llama.cpp-{os.environ['LLAMA_VERSION']}"
if archive.exists() and not (folder / "source.json").exists():
    folder.mkdir(parents=True, exist_ok=True)
    commit = export._extract_converter(archive, folder)
    (folder / "source.json").write_text(json.dumps({"llama_cpp_python": os.environ["LLAMA_VERSION"],
                                                    "llama_cpp_commit": commit, "sdist": archive.name}) + "\n")
print(("RESULT" if (folder / "source.json").exists() else "FAIL") + f" converter in {folder}: "
      + ((folder / "source.json").read_text().strip() if (folder / "source.json").exists() else
         f"none ({archive} missing: run prepare)"))
PY
SH

  # ---- consumer cards, emulated: 24 and 16 GiB caps, 20 optimizer steps each; the largest micro-batch at 16 --------
  local model7b=$WORK/model7b
  [ -n "${DEVCHECK_CPU:-}" ] && model7b=$WORK/model-tiny
  local cap
  for cap in 24 16; do
    want "cap$cap" && stage "0$(( cap == 24 ? 3 : 4 ))_cap$cap" $(( cap == 24 ? 200 : 140 )) "$PYTHON" \
      bench/gpu_check.py --shape "$shape" --memory-cap-gib "$cap" --model "$model7b" --work "$WORK/cap$cap" \
      --no-merge --json "$RESULTS/cap$cap.json" "${cap_args[@]}"
  done
  want search && stage 05_search 120 "$PYTHON" bench/gpu_check.py --shape "$shape" --memory-cap-gib 16 \
    --model "$model7b" --work "$WORK/search" --json "$RESULTS/search16.json" "${search_args[@]}"

  # ---- earlier checks (not in the default STAGES) ------------------------------------------------------------
  want probe && stage 10_probe 150 bash -s "$shape" "$probe_tokens" <<'SH'
"$PYTHON" - <<'PY' || exit 1
import torch
import bitsandbytes as bnb

dev = "cuda" if torch.cuda.is_available() else "cpu"
width = 4096 if dev == "cuda" else 256
# 1. NF4 + double quant, bf16 compute: forward and backward into the input (QLoRA's path; doctor: fp32 forward)
g = torch.Generator().manual_seed(0)
W = torch.randn(width, width, generator=g) * 0.02
layer = bnb.nn.Linear4bit(width, width, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                          compress_statistics=True)
layer.weight = bnb.nn.Params4bit(W.to(torch.bfloat16), requires_grad=False, quant_type="nf4",
                                 compress_statistics=True)
layer = layer.to(dev)
x = torch.randn(64, width, device=dev, dtype=torch.bfloat16, requires_grad=True)
y = layer(x)
y.float().pow(2).sum().backward()
Wd = W.to(dev)
ref = x.detach().float() @ Wd.T
fwd = float((y.float() - ref).norm() / ref.norm())
gref = 2 * ref @ Wd  # d/dx of sum((x W^T)^2)
bwd = float((x.grad.float() - gref).norm() / gref.norm())
ok = fwd < 0.3 and bwd < 0.3
print(f"{'RESULT' if ok else 'FAIL'} NF4 bf16 {tuple(layer.weight.shape)} {layer.weight.dtype}: output {y.dtype}, "
      f"forward rel. error {fwd:.3f}, backward {bwd:.3f}")
# 2. paged 8-bit AdamW (the configs' optimizer; managed memory, which torch.cuda.max_memory_* does not see)
if dev == "cuda":
    p = torch.nn.Parameter(torch.randn(4096, 256, device=dev))
    opt = bnb.optim.PagedAdamW8bit([p], lr=1e-2)
    start = p.detach().clone()
    for _ in range(3):
        p.pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    moved, finite = float((p - start).abs().max()), bool(torch.isfinite(p).all())
    print(f"{'RESULT' if moved > 0 and finite else 'FAIL'} paged_adamw_8bit: 3 steps, max change {moved:.4f}, "
          f"finite {finite}")
PY
"$PYTHON" bench/gpu_check.py --probe --shape "$1" --probe-tokens "$2" --work "$WORK/probe" \
  | sed -E 's/^(probe|  allocated)/RESULT \1/'
SH

  # ---- LLaMA-2-7B shapes ------------------------------------------------------------------------------------------
  if want 7b; then
    local free merge_flag="" limit
    free=$(df -B1G --output=avail "$WORK" | tail -1 | tr -d ' ')
    if [ "$free" -lt 32 ]; then merge_flag=--no-merge; echo "03_7b: only ${free} GB free under $WORK: --no-merge" \
      | tee -a "$SUMMARY"; fi
    limit=$(( DEADLINE - SECONDS - RESERVE_S - 10 ))  # what tiny and ddp1 need is kept for them
    stage 10_7b $(( limit + 10 )) "$PYTHON" - "$shape" "$limit" $merge_flag <<'PY'
import json
import os
import resource
import subprocess
import sys
import time

shape, limit, *rest = sys.argv[1:]
work, out = os.path.join(os.environ["WORK"], "gc7b"), os.path.join(os.environ["RESULTS"], "7b.json")
cmd = [os.environ["PYTHON"], "bench/gpu_check.py", "--shape", shape, "--steps", "4", "--work", work, "--json", out,
       *rest]
print("+", " ".join(cmd), flush=True)
start = time.time()
try:
    rc = subprocess.run(cmd, timeout=max(int(limit), 1)).returncode
except subprocess.TimeoutExpired:
    rc = 124
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
print(f"\n{'RESULT' if rc == 0 else 'FAIL'} gpu_check {shape}: rc {rc} in {time.time() - start:.0f} s; the child's max "
      f"RSS {rss:.1f} GiB (~14 GiB: bf16 through the page cache; >= 27 GiB: fp32 on the CPU somewhere)")
if rc == 0:
    report = json.load(open(out))
    print(f"RESULT estimate {report['estimate_gb']['total']} GiB vs measured {report['train_peak_gb']}: "
          f"{report['estimate_vs_measured']:+.1%}; tokens/s {report['tokens_per_s']}")
subprocess.run(["rm", "-rf", work])
sys.exit(rc)
PY
  fi


  # ---- tiny gpu_check: train.run's CUDA path and the merge, in seconds (its adapter feeds export) -----------------
  want tiny && stage 06_tiny 90 "$PYTHON" bench/gpu_check.py --shape tiny --steps 2 --max-length 128 \
    --batch-size 2 --work "$WORK/gc_tiny" --keep --json "$RESULTS/tiny.json"

  # ---- one-rank torchrun: LOCAL_RANK, the process group, the wrapper around a 4-bit model, the LoRA hash --------
  if want ddp1; then
    if [ ! -f "$WORK/gc_tiny/rationales.jsonl" ]; then
      echo "11_ddp1: SKIPPED (needs the tiny stage's model)" | tee -a "$SUMMARY"
    else
      stage 11_ddp1 150 env MDLITE_BATCH_LOG="$WORK/ddp1-log" NCCL_DEBUG=WARN bash -s <<'SH'
"$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 1 -m mdlite train \
  --rationales "$WORK/gc_tiny/rationales.jsonl" --model "$WORK/gc_tiny/model" --output-dir "$WORK/ddp1" \
  --max-steps 3 --val-fraction 0 --save-steps 2 --logging-steps 1 --per-device-train-batch-size 2 \
  --gradient-accumulation-steps 1 --max-length 128 --overwrite || exit 1
"$PYTHON" - <<'PY'
import json
import os
import pathlib

work, logs = pathlib.Path(os.environ["WORK"]), pathlib.Path(os.environ["MDLITE_BATCH_LOG"])
record = json.loads((work / "ddp1" / "run.json").read_text())
lora = json.loads((logs / "lora-rank0.json").read_text())
batches = (logs / "batches-rank0.jsonl").read_text().splitlines()
print("run.json:", {k: record.get(k) for k in ("status", "processes", "device", "global_step", "train_loss")})
print("adapter:", sorted(p.name for p in (work / "ddp1" / "adapter").iterdir()))
ok = record["status"] == "done" and record["processes"] == 1 and len(batches) == 3
print(f"{'RESULT' if ok else 'FAIL'} ddp1: {len(batches)} micro-batches on rank 0, {record['processes']} process, "
      f"model wrapped by {lora['wrapped_by']}, LoRA sha256 {lora['sha256'][:16]}")
raise SystemExit(0 if ok else 1)
PY
SH
    fi
  fi


  # ---- llama.cpp on CUDA: wait for the build; then distill beside export and llama ---------------------------------
  local llama_ok=1
  if want build; then
    wait_stage 02_build || llama_ok=0
    [ -f "$BUILD_DIR/pip.log" ] && tail -c 4000000 "$BUILD_DIR/pip.log" > "$OUT/build.log"
  elif [ -z "${DEVCHECK_CPU:-}" ] && [ ! -f "$LLAMA_SITE/.devcheck-built" ]; then
    llama_ok=0
  fi
  [ -f "$BUILD_DIR/ld_library_path" ] && export LD_LIBRARY_PATH=$(cat "$BUILD_DIR/ld_library_path")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  if [ "$llama_ok" -eq 0 ]; then
    for name in export llama distill; do want $name && echo "$name: SKIPPED (no CUDA llama-cpp-python: see build)" \
      | tee -a "$SUMMARY"; done
  else
    want distill && bg_stage 09_distill 240 "$PYTHON" bench/device_distill.py --work "$WORK/distill" \
      --summary-to "$OUT/distill_summary.md" --json "$RESULTS/distill.json"
    if want export; then
      if [ -d "$WORK/gc_tiny/train/adapter" ]; then
        stage 07_export 120 "$PYTHON" -m mdlite export-gguf "$WORK/gc_tiny/train/adapter" --output-dir "$WORK/export" \
          -q F16 -q Q8_0 -q Q4_K_M --parity-problems 4 --parity-max-tokens 24 --min-greedy-match 0 \
          --min-answer-agreement 0 --min-stop-rate 0 --n-gpu-layers -1
      else
        echo "07_export: SKIPPED (needs the tiny stage's adapter)" | tee -a "$SUMMARY"
      fi
    fi
    if want llama; then
      local ggufs=() file
      for file in "$WORK"/export/student-Q4_K_M.gguf "$WORK"/export/student-Q8_0.gguf; do
        [ -f "$file" ] && ggufs+=(--gguf "$file")
      done
      if [ ${#ggufs[@]} -gt 0 ]; then
        stage 08_llama 150 "$PYTHON" bench/llama_gpu_check.py "${ggufs[@]}" --export-dir "$WORK/export" \
          --json "$RESULTS/llama.json" "${llama_args[@]}"
      else
        echo "08_llama: SKIPPED (no exported GGUF)" | tee -a "$SUMMARY"
      fi
    fi
    want distill && wait_stage 09_distill
  fi

  # ---- summary ------------------------------------------------------------------------------------------------------
  collect
  "$PYTHON" - "$RESULTS" >> "$SUMMARY" 2>&1 <<'PY'
import json
import pathlib
import sys

results = pathlib.Path(sys.argv[1])


def load(name: str) -> dict | None:
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


print("---- figures")
for name in ("cap24", "cap16"):
    r = load(name)
    if r is None:
        print(f"{name}: none")
        continue
    cap, est = r.get("memory_cap") or {}, r["estimate_gb"]
    print(f"{name}: {r['device']}, {r['shape']}, micro-batch {r['train_config']['per_device_train_batch_size']} x "
          f"{r['train_config']['max_length']}, accumulation {r['train_config']['gradient_accumulation_steps']}, "
          f"{r['optimizer']}: {'fits' if r['fits'] else 'OOM'}; {r['steps']} steps in {r['train_s']} s, tokens/s "
          f"{r['tokens_per_s']}; peak {r['train_peak_gb']} GiB; --dry-run estimate {est['total']} GiB "
          f"({r['estimate_vs_measured']:+.1%} vs the measured peak); a real card: {cap.get('card_fits')}")
r = load("search16")
if r:
    print(f"search16: largest micro-batch that fits {r['largest_fitting']} (tried up to {r['largest_tried']}): "
          + "; ".join(f"{t['micro_batch']} {'ok' if t['fits'] else 'OOM'} {t['peak_gb']} est {t['estimate_gb']}"
                      f" tok/s {t['tokens_per_s']}" for t in r["tries"]))
for name in ("tiny", "7b"):
    r = load(name)
    if r:
        merge = r.get("merge") or {}
        print(f"{name}: {r['device']}, {r['steps']} steps, peak {r['train_peak_gb']}, estimate "
              f"{r['estimate_gb']['total']}; merge {merge.get('dtype')} on {merge.get('device')} {merge.get('seconds')} s")
r = load("llama")
if r:
    print(f"llama: llama-cpp-python {r['llama_cpp_python']}, GPU offload {r['gpu_offload']}")
    for file, found in r["files"].items():
        for name, rows in found["placements"].items():
            print(f"  {file}, n_gpu_layers {rows['n_gpu_layers']}: {rows['placement']}")
            for temperature in ("0.0", "0.7"):
                row = rows[temperature]
                print(f"    temperature {temperature}: differ request/alone {row['request_vs_alone']['differ']}/"
                      f"{row['paths']}, mixed/alone {row['mixed_vs_alone']['differ']}/{row['paths']}"
                      + (f", ngl 0 vs -1 {row['ngl0_vs_ngl-1']['differ']}/{row['paths']}" if "ngl0_vs_ngl-1" in row else ""))
    if r.get("doctor"):
        print(f"  doctor llama.cpp: {r['doctor']['verdict']}: {r['doctor']['detail']}")
    if r.get("parity"):
        print(f"  export parity (n_gpu_layers {r['parity'].get('n_gpu_layers')}): passed {r['parity'].get('passed')}")
r = load("distill")
if r:
    print(f"distill: exit {r['returncode']} in {r['seconds']} s; " + ", ".join(
        f"{k} {v['seconds']} s" for k, v in r["stages"].items()) + f"; train on {(r.get('train') or {}).get('device')}")
PY
  echo "total ${SECONDS}s" | tee -a "$SUMMARY"
  ls -la "$OUT"
  cat "$SUMMARY"
}

case ${1:-} in
  prepare) prepare ;;
  device) device ;;
  build-llama) build_llama ;;  # the device's build stage (needs device's environment)
  *) echo "usage: $0 prepare | device"; exit 2 ;;
esac
