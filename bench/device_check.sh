#!/usr/bin/env bash
# mdlite's GPU-path device check: one CUDA GPU, no network, under 8 minutes, results as files plus one summary.
#
# Here (with network), once, in the checkout: the wheels the device image lacks, into .devcheck/ (git-excluded):
#     bash bench/device_check.sh prepare
#   bitsandbytes 0.50.2 (43 MB), transformers 5.23.0 (13 MB), peft 0.21.2, huggingface_hub 1.33.0 (transformers
#   5.23 needs >= 1.31; 2.x needs httpx2), click, sentencepiece, protobuf (mdlite's CLI and the tiny tokenizer);
#   the image has python3.12, torch 2.11+cu130, transformers 5.17, accelerate 1.15, an old peft, NVML. matplotlib
#   (20 MB with its dependencies) does not travel: without it train skips loss.png. Everything that travels must
#   stay under 60 MiB (one call carries at most 64).
# On the GPU machine, with .devcheck carried along:   bash bench/device_check.sh device     (results in $OUT)
# A subset:   STAGES='probe 7b' DEADLINE=300 bash bench/device_check.sh device
# Here, a rehearsal of every stage on the CPU with tiny shapes (the venv's own packages, no wheels installed):
#     DEVCHECK_CPU=1 PYTHON=.venv/bin/python OUT=/tmp/devcheck bash bench/device_check.sh device
#
# Stages, each time-boxed, all done by DEADLINE seconds (default 420):
#   env    nvidia-smi; the wheels into /tmp/site; versions; a kernel launch; bf16 with and without emulation;
#          mdlite doctor's python / torch / gpu / bf16 / bitsandbytes / disk lines                      ~30 s
#   probe  NF4 Linear4bit with bf16 compute, forward AND backward; paged 8-bit AdamW steps; then
#          bench/gpu_check.py --probe at LLaMA-2-7B width: residual stream dtype and the saved bytes per token
#          per layer (hooks, and allocated memory with and without checkpointing) next to the estimate's terms ~40 s
#   7b     bench/gpu_check.py at LLaMA-2-7B shapes, the configs' QLoRA settings, 4 steps, then the merge: peak
#          allocated / reserved / NVML vs the estimate, tokens/s, merge peak, the child's max RSS; its JSON is
#          written after training and again after the merge; ~95 s are kept for the two stages after it  ~3-4 min
#   tiny   bench/gpu_check.py --shape tiny: train.run's CUDA path and the GPU merge; keeps its model for ddp1  ~30 s
#   ddp1   torchrun --nproc_per_node 1 -m mdlite train: LOCAL_RANK, the process group, the wrapper around a
#          4-bit model, the LoRA hash ($MDLITE_BATCH_LOG)                                                 ~40 s
# Results in $OUT (8 files): summary.txt, 01_env.log, 02_probe.log, 03_7b.log, 04_tiny.log, 05_ddp1.log,
# gpu_check_7b.json, gpu_check_tiny.json.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
WHEELS=("bitsandbytes==0.50.2" "transformers==5.23.0" "peft==0.21.2" "huggingface_hub==1.33.0" "click==8.5.1"
        "sentencepiece==0.2.3" "protobuf==7.36.2")
LIMIT_MIB=60

prepare() {
  cd "$ROOT" || exit 1
  local exclude total
  exclude=$(git rev-parse --git-path info/exclude) || exit 1
  mkdir -p "$(dirname "$exclude")"
  grep -qx '/.devcheck/' "$exclude" 2>/dev/null || echo '/.devcheck/' >> "$exclude"
  rm -rf .devcheck/whl && mkdir -p .devcheck/whl
  "$PYTHON" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .devcheck/whl "${WHEELS[@]}" || exit 1
  ls -l .devcheck/whl
  [ "$(ls .devcheck/whl/*.whl | wc -l)" -eq "${#WHEELS[@]}" ] || { echo "expected ${#WHEELS[@]} wheels"; exit 1; }
  # what travels: tracked files, untracked files git does not ignore, and the carried .devcheck
  total=$(( $(du -sb .devcheck | cut -f1) + $(git ls-files -z --cached --others --exclude-standard \
            | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1) ))
  echo "travels: $((total / 1048576)) MiB of the ${LIMIT_MIB} MiB allowed"
  [ "$total" -lt $((LIMIT_MIB * 1048576)) ] || { echo "too large"; exit 1; }
  git status --short --ignored .devcheck | head -3
}

device() {
  OUT=${OUT:-/tmp/devcheck-out}; mkdir -p "$OUT"; export OUT
  DEADLINE=${DEADLINE:-420}
  STAGES=${STAGES:-env probe 7b tiny ddp1}
  SUMMARY=$OUT/summary.txt
  want() { [[ " $STAGES " == *" $1 "* ]]; }
  RESERVE_S=0; want tiny && RESERVE_S=$(( RESERVE_S + 45 )); want ddp1 && RESERVE_S=$(( RESERVE_S + 50 ))
  local site=/tmp/devcheck-site shape=llama-2-7b probe_tokens=2048 tmp_free root_free
  if [ -n "${DEVCHECK_CPU:-}" ]; then shape=tiny; probe_tokens=128; fi
  export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHON
  export MDLITE_HOME=/tmp/devcheck-home PYTHONPATH=$site:$ROOT DEVCHECK_SITE=$site
  cd "$ROOT" || exit 1
  # the work folder: the file system with more room (the 7B stage writes ~27 GB: bf16 base and merged)
  WORK=/tmp/devcheck-work
  tmp_free=$(df -B1G --output=avail /tmp | tail -1 | tr -d ' ')
  root_free=$(df -B1G --output=avail "$ROOT" | tail -1 | tr -d ' ')
  [ "$root_free" -gt "$tmp_free" ] && WORK=$ROOT/.devcheck/work
  rm -rf "$WORK" && mkdir -p "$WORK"
  export WORK
  echo "mdlite device check: stages '$STAGES', deadline ${DEADLINE}s, work $WORK (free GB: /tmp $tmp_free," \
       "checkout $root_free)${DEVCHECK_CPU:+, CPU rehearsal}" | tee "$SUMMARY"

  stage() {  # stage NAME LIMIT_S COMMAND...: time-boxed, log in $OUT/NAME.log, a line in summary.txt
    local name=$1 limit=$2 left start rc; shift 2
    left=$(( DEADLINE - SECONDS ))
    if [ "$left" -lt 20 ]; then echo "$name: SKIPPED (deadline)" | tee -a "$SUMMARY"; return 1; fi
    [ "$limit" -gt "$left" ] && limit=$left
    start=$SECONDS
    timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1; rc=$?
    echo "$name: rc $rc in $(( SECONDS - start ))s (limit ${limit}s)$([ $rc -eq 124 ] && echo ' TIMED OUT')" \
      | tee -a "$SUMMARY"
    grep -aoE '(RESULT|FAIL) .*' "$OUT/$name.log" | sed 's/^/    /' >> "$SUMMARY"  # also after a progress bar's \r
    [ $rc -eq 0 ] || tail -n 4 "$OUT/$name.log" | sed 's/^/    | /' >> "$SUMMARY"
    return $rc
  }

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
fi
set +x
"$PYTHON" - <<'PY'
import importlib.metadata as md
import os

import torch

for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "huggingface_hub", "tokenizers",
             "safetensors", "sentencepiece", "protobuf", "click", "httpx", "hf-xet", "nvidia-ml-py", "matplotlib"):
    try:
        print(f"{name:16} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name:16} MISSING")
import bitsandbytes, peft, transformers  # noqa: E401,F401 - import errors show here
import mdlite.cli, mdlite.export, mdlite.train  # noqa: E401,F401
from mdlite import doctor

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
PY
SH

  # ---- probe ----------------------------------------------------------------------------------------------------
  want probe && stage 02_probe 150 bash -s "$shape" "$probe_tokens" <<'SH'
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
    stage 03_7b $(( limit + 10 )) "$PYTHON" - "$shape" "$limit" $merge_flag <<'PY'
import json
import os
import resource
import subprocess
import sys
import time

shape, limit, *rest = sys.argv[1:]
work, out = os.path.join(os.environ["WORK"], "gc7b"), os.path.join(os.environ["OUT"], "gpu_check_7b.json")
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

  # ---- tiny gpu_check: train.run's CUDA path and the merge, in seconds ------------------------------------------
  want tiny && stage 04_tiny 150 "$PYTHON" bench/gpu_check.py --shape tiny --steps 2 --max-length 128 \
    --batch-size 2 --work "$WORK/gc_tiny" --keep --json "$OUT/gpu_check_tiny.json"

  # ---- one-rank torchrun: LOCAL_RANK, the process group, the wrapper around a 4-bit model, the LoRA hash --------
  if want ddp1; then
    if [ ! -f "$WORK/gc_tiny/rationales.jsonl" ]; then
      echo "05_ddp1: SKIPPED (needs the tiny stage's model)" | tee -a "$SUMMARY"
    else
      stage 05_ddp1 150 env MDLITE_BATCH_LOG="$WORK/ddp1-log" NCCL_DEBUG=WARN bash -s <<'SH'
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

  # ---- summary ------------------------------------------------------------------------------------------------------
  "$PYTHON" - "$OUT" >> "$SUMMARY" 2>&1 <<'PY'
import json
import pathlib
import sys

out = pathlib.Path(sys.argv[1])
for name in ("gpu_check_tiny.json", "gpu_check_7b.json"):
    path = out / name
    if not path.exists():
        print(f"{name}: none")
        continue
    r = json.loads(path.read_text())
    est = r["estimate_gb"]
    print(f"{name}: {r['device']}, {r['steps']} steps in {r['train_s']} s, tokens/s {r['tokens_per_s']}, "
          f"optimizer {r['optimizer']}")
    print(f"  estimate {est['total']} GiB ({', '.join(f'{k} {v}' for k, v in est.items() if k != 'total')})")
    print(f"  measured {r['train_peak_gb']}; estimate/measured - 1 = {r['estimate_vs_measured']:+.1%}")
    merge = r.get("merge")
    if merge:
        print(f"  merge in {merge['dtype']} on {merge['device']}: {merge['seconds']} s, peak {merge['peak_gb']}, "
              f"allocated before {merge['allocated_before_gb']}")
        if name == "gpu_check_7b.json":
            f16 = r["parameters"] * 2 / 2**30
            held = merge["peak_gb"].get("max_memory_allocated", 0)
            print(f"  export on a 24 GB card: the merge peaks at {held:.1f} GiB; parity then moves the merged model "
                  f"to the CPU before llama.cpp loads the F16 GGUF (~{f16:.1f} GiB + KV cache): "
                  f"{'both fit' if max(held, f16 + 0.5) < 22.4 else 'does NOT fit'} 24 GB one at a time")
PY
  echo "total ${SECONDS}s" | tee -a "$SUMMARY"
  cat "$SUMMARY"
}

case ${1:-} in
  prepare) prepare ;;
  device) device ;;
  *) echo "usage: $0 prepare | device"; exit 2 ;;
esac
