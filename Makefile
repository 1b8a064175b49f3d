# `make test` and `make demo` each set up their own environment in .venv first.
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel of torch; on a GPU cluster set TORCH to the build that matches your CUDA.
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
# What `make test` and `make demo` pass on (the README quick-start test narrows them).
PYTEST_ARGS ?= -q tests
DEMO_ARGS ?= --out demo_out
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: test demo install clean-venv bench

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,demo,deepspeed]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/adm demo $(DEMO_ARGS)

bench: $(STAMP)
	$(PY) bench/unet.py

clean-venv:
	rm -rf $(VENV)
