# Two set-up commands: `make demo` and `make test`. Each creates .venv if missing and
# installs the project into it (re-installing only when pyproject.toml changed).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[test,lint]"
	touch $(STAMP)

# Bytecode caches for our own modules even where the environment turns them off
# (PYTHONDONTWRITEBYTECODE=1, as on the CI machines): every worker process the demo
# and the tests start imports the package, and compiled anew each time that took
# ~0.2 s of CPU a process (the process tests: 36 -> 23 s of CPU with caches).
# (__pycache__ is git-ignored.)
RUN := env -u PYTHONDONTWRITEBYTECODE

demo: $(STAMP)
	$(RUN) $(BIN)/actorgrad demo

# The suite runs in TEST_JOBS processes (pytest-xdist; 'auto': one per core, 0: all in
# this one), a test module at a time in each, its tests in their order (loadfile): as
# fast here as worksteal, whose stolen tests could run a module's own tests after its
# shared-cluster ones while that cluster stood ("already initialized", 10 failures).
TEST_JOBS ?= auto

test: $(STAMP)
	$(RUN) $(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_JOBS) --dist loadfile

$(VENV)/.bench-installed: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[bench]" || echo "torch not installable: benchmarks run without the PyTorch side"
	touch $@

bench: $(VENV)/.bench-installed
	$(BIN)/python -m benchmarks

lint: $(STAMP)
	$(BIN)/ruff check actorgrad tests examples benchmarks
	$(BIN)/ruff format --check actorgrad tests examples benchmarks
	$(BIN)/mypy actorgrad

clean:
	rm -rf $(VENV) build *.egg-info
