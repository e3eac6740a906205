# Constellation — developer commands. `make help` lists them.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU path: torch==2.13.0 (this machine class has the CPU wheel on disk). On a CUDA node the same
# pin resolves to PyPI's CUDA build; see README "GPU nodes".
TORCH_SPEC ?= torch==2.13.0
EXAMPLE ?= .cache/example

.PHONY: help setup test run example clean

help:
	@echo "make setup    create $(VENV) and install Constellation with its dev extra ($(TORCH_SPEC))"
	@echo "make test     setup, then run the test suite (what CI runs)"
	@echo "make run      setup, then build a small example constellation and explain a prompt"
	@echo "make clean    remove $(VENV), caches and the example"

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	@touch $@

test: setup
	$(BIN)/python -m pytest

example: setup
	$(BIN)/python -m tests.make_example $(EXAMPLE)

run: example
	$(BIN)/constellation index inspect $(EXAMPLE)/index
	$(BIN)/constellation explain --config $(EXAMPLE)/constellation.toml "The patient fever biopsy dose tumor renal."

clean:
	rm -rf $(VENV) .cache .pytest_cache *.egg-info
