# Two entry points do all their own set-up from a fresh clone:
#   make app    launch the demo on the embedded (offline) models
#   make test   run the test suite
# Set-up installs the CPU build of torch first: from this machine's local wheel when
# one is there (no download), otherwise from PyTorch's CPU index. A bare `torch`
# requirement would otherwise pull a multi-GB CUDA build.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PIP    := $(PY) -m pip -q --disable-pip-version-check
TORCH  ?= torch==2.13.0

.PHONY: app test test-slow bench setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# torch: a local CPU wheel when pip can find one offline, else PyTorch's CPU index.
	$(PIP) install --no-deps --no-index "$(TORCH)" 2>/dev/null \
	  || $(PIP) install "$(TORCH)" --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple
	@# Everything else with uv (parallel downloads); the installed torch satisfies the range.
	$(PIP) install uv
	$(VENV)/bin/uv pip install -q --python $(PY) -e ".[test]"
	touch $@

app: $(STAMP)
	$(PY) app.py

test: $(STAMP)
	$(PY) -m pytest -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

bench: $(STAMP)
	$(PY) benchmarks/dager_bench.py
	$(PY) benchmarks/dlg_bench.py
	$(PY) benchmarks/defense_bench.py --target-only

clean:
	rm -rf $(VENV)
