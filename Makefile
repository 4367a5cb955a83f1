# One place for the commands the README and CI use.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install test demo bench

$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

# The test suite (CI runs exactly this): files spread over one worker per core (pytest-xdist;
# a file's tests stay together, so module fixtures are built once), at most 4.
test: install
	$(PY) -m pytest -q -rs --durations=15 -n auto --maxprocesses 4 --dist loadfile $(PYTEST_ARGS) tests

# The README's main job: a small Qwen3 on real text that exists on every machine.
demo: install
	$(PY) launch/demo.py

bench: install
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done
