# make demo: install, then run the embedded default pipeline. make test: install, then every test.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PIP    := $(PY) -m pip install -q --disable-pip-version-check

# What `make install` builds for (README, "GPU"): auto, cuda, metal or cpu. auto: cuda when an NVIDIA driver
# is seen (nvidia-smi on PATH; nvcc alone is no GPU: build machines, this project's CI included, have it
# without one): llama-cpp-python compiled with CUDA (-DGGML_CUDA=on; needs the CUDA toolkit's nvcc) and
# torch's CUDA build (PyPI's, or TORCH_INDEX's), checked at the end against the driver; metal on macOS
# (llama.cpp's default there); else cpu: torch's CPU build and a CPU llama.cpp. Your own CMAKE_ARGS (environment
# or `make install CMAKE_ARGS=...`) replace mdlite's llama.cpp build flags. Force the CPU on a GPU machine:
# `make install BACKEND=cpu`. torch is pinned to TORCH_VERSION on every path.
BACKEND ?= auto
# A PyTorch wheel index. cpu: the CPU torch (on Linux a plain `torch` from PyPI is the CUDA build, gigabytes of
# CUDA libraries): `make install TORCH_INDEX=https://download.pytorch.org/whl/cpu`; when it cannot be reached,
# pip's own index is used instead. cuda: the torch built for one CUDA version, for a driver older than PyPI's
# wheel needs or a card its wheel dropped: `make install TORCH_INDEX=https://download.pytorch.org/whl/cu126`
# (no fallback). Empty (the default): pip's own index and configuration.
TORCH_INDEX ?=
TORCH_VERSION := 2.13.0
LLAMA_REQ := $(shell grep -o 'llama-cpp-python\[server\]==[0-9.]*' pyproject.toml)
LLAMA_VERSION := $(lastword $(subst ==, ,$(LLAMA_REQ)))

ifeq ($(BACKEND),auto)
  DETECTED := $(shell if [ "$$(uname -s)" = Darwin ]; then echo metal; \
                elif command -v nvidia-smi >/dev/null 2>&1; then echo cuda; else echo cpu; fi)
else
  DETECTED := $(BACKEND)
endif
ifeq ($(filter $(DETECTED),cuda metal cpu),)
  $(error BACKEND must be auto, cuda, metal or cpu, not '$(BACKEND)')
endif
# llama.cpp's build flags when it must be compiled for this machine (never a wheel from pip's cache).
ifneq ($(strip $(CMAKE_ARGS)),)
  LLAMA_CMAKE := $(CMAKE_ARGS)
else ifeq ($(DETECTED),cuda)
  LLAMA_CMAKE := -DGGML_CUDA=on
else ifeq ($(DETECTED)$(shell uname -s),cpuDarwin)
  LLAMA_CMAKE := -DGGML_METAL=off
endif
ifneq ($(LLAMA_CMAKE),)
  ifeq ($(LLAMA_VERSION),)
    $(error no llama-cpp-python[server]==VERSION pin found in pyproject.toml)
  endif
endif

.PHONY: install demo test test-fast lint readme bench bench-quick

install: $(STAMP)

# cpu: the CPU torch first (a plain `torch` pulls CUDA); cuda: llama-cpp-python compiled with CUDA before the
# rest (pip then keeps it), unless one with GPU offload is installed already.
$(STAMP): pyproject.toml
ifeq ($(DETECTED),cuda)
	@echo "make install: NVIDIA GPU ($(BACKEND)): torch $(TORCH_VERSION) CUDA build from $(or $(TORCH_INDEX),PyPI); llama-cpp-python $(LLAMA_VERSION) compiled with CMAKE_ARGS='$(LLAMA_CMAKE)'"
	@command -v nvcc >/dev/null || [ -n "$$CUDACXX" ] || [ -x /usr/local/cuda/bin/nvcc ] || [ "$(LLAMA_CMAKE)" != -DGGML_CUDA=on ] || { \
	  echo "make install: the CUDA build of llama.cpp needs the CUDA toolkit's nvcc, which is not on PATH. Either install"; \
	  echo "  the CUDA toolkit (or set CUDACXX=/path/to/nvcc), or make install BACKEND=cpu (CPU torch and llama.cpp),"; \
	  echo "  or make install CMAKE_ARGS=-DGGML_CUDA=off (CUDA torch, CPU llama.cpp)"; exit 1; }
else ifeq ($(DETECTED),metal)
	@echo "make install: macOS: llama.cpp uses Metal (its default on macOS)$(if $(LLAMA_CMAKE), built with CMAKE_ARGS='$(LLAMA_CMAKE)'); torch $(TORCH_VERSION) from PyPI (MPS)"
else
	@echo "make install: CPU ($(BACKEND)$(if $(filter auto,$(BACKEND)),: no nvidia-smi)): torch $(TORCH_VERSION) CPU build$(if $(TORCH_INDEX), from $(TORCH_INDEX)), llama.cpp $(if $(LLAMA_CMAKE),built with CMAKE_ARGS='$(LLAMA_CMAKE)',for the CPU) (GPU machines: README, GPU)"
endif
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
ifeq ($(TORCH_INDEX),)
	$(PIP) torch==$(TORCH_VERSION)
else ifeq ($(DETECTED),cuda)
	$(PY) -c 'import sys, torch; sys.exit(torch.__version__ != "$(TORCH_VERSION)+$(notdir $(TORCH_INDEX))")' 2>/dev/null || $(PY) -m pip uninstall -q -y torch 2>/dev/null; \
	$(PIP) --index-url $(TORCH_INDEX) torch==$(TORCH_VERSION) || { echo "make install: no torch $(TORCH_VERSION) at $(TORCH_INDEX); pick a CUDA version pytorch.org lists for it"; exit 1; }
else
	$(PIP) --index-url $(TORCH_INDEX) torch==$(TORCH_VERSION) || { echo "make install: $(TORCH_INDEX) failed; torch from pip's own index"; $(PIP) torch==$(TORCH_VERSION); }
endif
ifneq ($(LLAMA_CMAKE),)
	if [ "$(LLAMA_CMAKE)" = -DGGML_CUDA=on ] && $(PY) -c 'import sys, llama_cpp; sys.exit(llama_cpp.__version__ != "$(LLAMA_VERSION)" or not llama_cpp.llama_supports_gpu_offload())' 2>/dev/null; then \
	  echo "make install: llama-cpp-python $(LLAMA_VERSION) with GPU offload is installed already"; \
	else \
	  $(PY) -m pip uninstall -q -y llama-cpp-python 2>/dev/null; \
	  command -v nvcc >/dev/null || [ -n "$$CUDACXX" ] || ! [ -x /usr/local/cuda/bin/nvcc ] || export CUDACXX=/usr/local/cuda/bin/nvcc; \
	  echo "make install: compiling llama.cpp $(if $(findstring GGML_CUDA=on,$(LLAMA_CMAKE)),with CUDA: 10-30 minutes,for this machine: ~11 minutes on 2 cores), silent until it ends"; \
	  CMAKE_ARGS='$(LLAMA_CMAKE)' $(PIP) --no-cache-dir --no-binary llama-cpp-python "$(LLAMA_REQ)" || { \
	    echo "make install: compiling llama-cpp-python with CMAKE_ARGS='$(LLAMA_CMAKE)' failed (see above);"; \
	    echo "  nvcc older than the card (unsupported gpu architecture): an architecture it knows, e.g."; \
	    echo "    make install CMAKE_ARGS='-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=86' (nvcc --list-gpu-arch lists them)"; \
	    echo "  gcc newer than nvcc accepts (unsupported GNU version): a gcc it supports, e.g."; \
	    echo "    make install CMAKE_ARGS='-DGGML_CUDA=on -DCMAKE_CUDA_HOST_COMPILER=/usr/bin/g++-12'"; \
	    echo "  for a CPU build: make install BACKEND=cpu, or CMAKE_ARGS=-DGGML_CUDA=off to keep torch's CUDA build"; exit 1; }; \
	fi
endif
	$(PY) -m pip install -q --disable-pip-version-check -e ".[all,dev]"
ifeq ($(DETECTED),cuda)
	@$(PY) -c 'import llama_cpp as l; print("make install: llama.cpp GPU offload:", "yes" if l.llama_supports_gpu_offload() else "NO (no GPU visible now?); check with: mdlite doctor")'
	@$(PY) -c 'import sys; from mdlite.doctor import torch_cuda_report as r; ok, text = r(); print("make install: " + text); sys.exit(not ok)'
endif
	touch $(STAMP)

demo: install
	$(VENV)/bin/mdlite distill configs/demo.yaml

test: install
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow" -x -q

# Every benchmark, one markdown table (about an hour on 2 cores; bench-quick: a few minutes, noisier).
bench: install
	$(PY) bench/run_all.py

bench-quick: install
	$(PY) bench/run_all.py --quick

lint: install
	$(VENV)/bin/ruff check mdlite tests bench

readme: install
	UPDATE_README=1 $(PY) -m pytest -q tests/test_readme.py
