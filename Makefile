# make demo: install, then run the embedded default pipeline. make test: install, then every test.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast lint readme bench bench-quick

install: $(STAMP)

# On a machine without an NVIDIA GPU, take the CPU torch build first (a plain `torch` pulls CUDA).
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	command -v nvidia-smi >/dev/null || $(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e ".[all,dev]"
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
